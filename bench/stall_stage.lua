-- Worst event-loop stall with the shared stage: N workers each dirty the
-- same K keys once per second (1 s sync), and a 1 ms probe timer in every
-- worker records how late it fires. Contenders: control (the same
-- increments into a plain Lua table, cleared each second: counting without
-- any sync), original (bench/reference_counter.lua: one dict write per key
-- and worker, in one go), stage (default with N > 1), direct
-- ({ stage = false }). Rounds alternate the contenders (the order rotates);
-- medians over the rounds.
--
--   luajit bench/stall_stage.lua              (from the repository root)
--
-- STALL_WORKERS (32), STALL_KEYS (100000), STALL_SECS (6), STALL_WARM (3),
-- STALL_ROUNDS (3). Prints, per contender, the worst lateness over all
-- workers and the median of the per-worker worsts, in ms (medians over the
-- rounds). The key loop itself (K Lua table adds in one timer run) is in
-- every contender, control included, so the sync's share is the
-- difference to control. With more workers than cores the OS scheduler's
-- delays are in every contender too.

package.path = "./?.lua;" .. package.path
local nginx = require("spec.support.nginx")
local socket = require("socket")
local stats = require("bench.stats")

local WORKERS = tonumber(os.getenv("STALL_WORKERS")) or 32
local KEYS = tonumber(os.getenv("STALL_KEYS")) or 100000
local SECS = tonumber(os.getenv("STALL_SECS")) or 6
local WARM = tonumber(os.getenv("STALL_WARM")) or 3
local ROUNDS = tonumber(os.getenv("STALL_ROUNDS")) or 3
local MODES = { "control", "original", "stage", "direct" }

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
    if mode == "original" then
        c = require("bench.reference_counter").new("stall", 1)
    elseif mode == "stage" then
        c = assert(require("resty.counter").new("stall", 1, nil,
                                                { stage_bytes = ${STAGE} }))
    elseif mode == "direct" then
        c = assert(require("resty.counter").new("stall", 1, nil,
                                                { stage = false }))
    end
    local plain = {}
    assert(ngx.timer.every(1, function(premature)
        if premature then
            return
        end
        if c then
            for i = 1, K do
                c:incr(keys[i], 1)
            end
        else
            require("table.clear")(plain)
            for i = 1, K do
                local k = keys[i]
                plain[k] = (plain[k] or 0) + 1
            end
        end
    end))
    local out, id = ngx.shared.stall_out, "w" .. ngx.worker.id()
    -- A monotonic clock in ns resolution (ngx.now() has milliseconds).
    local ffi = require("ffi")
    pcall(ffi.cdef, "struct stall_timespec { long tv_sec; long tv_nsec; };"
        .. "int clock_gettime(int clk, struct stall_timespec *tp);")
    local ts = ffi.new("struct stall_timespec")
    local function clock()
        ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
        return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
    end
    local start = clock()
    local probe
    probe = function(premature, due)
        if premature then
            return
        end
        local now = clock()
        if now - start > ${WARM} then
            local late = now - due
            if late > (out:get(id) or 0) then
                out:set(id, late)
            end
        end
        ngx.timer.at(0.001, probe, now + 0.001)
    end
    ngx.timer.at(0.001, probe, clock() + 0.001)
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

local function median(t)
    return stats.median(t) or 0 / 0
end

print(
    ("stall: %d workers, %d keys, %d s after %d s warm-up, %d rounds"):format(
        WORKERS,
        KEYS,
        SECS,
        WARM,
        ROUNDS
    )
)
local worsts, medians = {}, {}
for _, mode in ipairs(MODES) do
    worsts[mode], medians[mode] = {}, {}
end
for round = 1, ROUNDS do
    for i = 1, #MODES do
        local mode = MODES[(i + round - 2) % #MODES + 1]
        local worst, med, n = run(mode)
        table.insert(worsts[mode], worst)
        table.insert(medians[mode], med)
        io.stderr:write(
            ("stall: round %d %-8s worst %.1f ms, median %.1f ms (%d workers)\n"):format(
                round,
                mode,
                worst,
                med,
                n
            )
        )
    end
end
for _, mode in ipairs(MODES) do
    print(
        ("%-8s worst %7.1f ms, median of per-worker worsts %7.1f ms"):format(
            mode,
            median(worsts[mode]),
            median(medians[mode])
        )
    )
end
