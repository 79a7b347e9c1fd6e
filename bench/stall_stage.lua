-- Worst event-loop stall with the shared stage: N workers each dirty the
-- same K keys once per second (1 s sync), and a 1 ms probe timer in every
-- worker records how late it fires. Contenders: control (the key loop
-- without counting), stage (default with N > 1), direct ({ stage = false }).
--
--   luajit bench/stall_stage.lua              (from the repository root)
--
-- STALL_WORKERS (32), STALL_KEYS (100000), STALL_SECS (6), STALL_WARM (3).
-- Prints, per contender, the worst lateness over all workers and the
-- median of the per-worker worsts, in ms. The key loop itself (K Lua table
-- adds in one timer run) is in every contender, control included, so the
-- sync's share is the difference to control. With more workers than cores
-- the OS scheduler's delays are in every contender too.

package.path = "./?.lua;" .. package.path
local nginx = require("spec.support.nginx")
local socket = require("socket")

local WORKERS = tonumber(os.getenv("STALL_WORKERS")) or 32
local KEYS = tonumber(os.getenv("STALL_KEYS")) or 100000
local SECS = tonumber(os.getenv("STALL_SECS")) or 6
local WARM = tonumber(os.getenv("STALL_WARM")) or 3

local HTTP = [[
lua_shared_dict stall ${DICT_MB}m;
lua_shared_dict stall_out 1m;
init_worker_by_lua_block {
    local mode, K = "${MODE}", ${KEYS}
    local keys = {}
    for i = 1, K do
        keys[i] = 'stall_requests_total{route="r' .. i .. '",code="200"}'
    end
    local c
    if mode == "stage" then
        c = assert(require("resty.counter").new("stall", 1, nil,
                                                { stage_bytes = ${STAGE} }))
    elseif mode == "direct" then
        c = assert(require("resty.counter").new("stall", 1, nil,
                                                { stage = false }))
    end
    local sink = 0
    assert(ngx.timer.every(1, function(premature)
        if premature then
            return
        end
        if c then
            for i = 1, K do
                c:incr(keys[i], 1)
            end
        else
            for i = 1, K do
                sink = sink + #keys[i]
            end
        end
    end))
    local out, id = ngx.shared.stall_out, "w" .. ngx.worker.id()
    local start = ngx.now()
    local probe
    probe = function(premature, due)
        if premature then
            return
        end
        ngx.update_time()
        local now = ngx.now()
        if now - start > ${WARM} then
            local late = now - due
            if late > (out:get(id) or 0) then
                out:set(id, late)
            end
        end
        ngx.timer.at(0.001, probe, now + 0.001)
    end
    ngx.update_time()
    ngx.timer.at(0.001, probe, ngx.now() + 0.001)
}
]]

local SERVER = [[
location = /worst {
    content_by_lua_block {
        local out, t = ngx.shared.stall_out, {}
        for _, k in ipairs(out:get_keys(0)) do
            t[#t + 1] = out:get(k)
        end
        ngx.say(table.concat(t, " "))
    }
}
]]

local function run(mode)
    local stage = KEYS * 192 * 2 + 1048576
    local dict_mb = math.ceil(KEYS * 600 / 1e6) + 8 + math.ceil(stage / 2 ^ 20)
    local srv = nginx.start({
        workers = WORKERS,
        http = (HTTP:gsub("%${([%w_]+)}", {
            MODE = mode,
            KEYS = tostring(KEYS),
            DICT_MB = tostring(dict_mb),
            STAGE = tostring(stage),
            WARM = tostring(WARM),
        })),
        server = SERVER,
    })
    socket.sleep(WARM + SECS)
    local _, body = srv:get("/worst")
    srv:stop()
    local t = {}
    for v in (body or ""):gmatch("%S+") do
        t[#t + 1] = tonumber(v) * 1e3
    end
    table.sort(t)
    return t[#t] or 0 / 0, t[math.ceil(#t / 2)] or 0 / 0, #t
end

print(
    ("stall: %d workers, %d keys, %d s after %d s warm-up"):format(
        WORKERS,
        KEYS,
        SECS,
        WARM
    )
)
for _, mode in ipairs({ "control", "stage", "direct" }) do
    local worst, median, n = run(mode)
    print(
        (
            "%-8s worst %7.1f ms, median of per-worker worsts %7.1f ms "
            .. "(%d workers)"
        ):format(mode, worst, median, n)
    )
end
