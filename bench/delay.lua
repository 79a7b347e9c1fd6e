-- The delay bound of the shared stage: how long an increment takes to
-- reach the dict, against 2 x sync_interval + the fold's time.
--
--   luajit bench/delay.lua                    (from the repository root)
--
-- DELAY_WORKERS (4) workers sync every DELAY_INTERVAL (1) s; each also
-- dirties DELAY_KEYS (20000) shared keys per interval, so the fold has
-- real work. The driver increments a fresh key "mark:<n>" through a request
-- every 0.1 s for DELAY_SECS (20) s, and reads the dict every 20 ms: the
-- delay of a mark is from its request's answer to the first read that
-- sees it. Prints max, median and the bound.

package.path = "./?.lua;" .. package.path
local nginx = require("spec.support.nginx")
local socket = require("socket")

local WORKERS = tonumber(os.getenv("DELAY_WORKERS")) or 4
local INTERVAL = tonumber(os.getenv("DELAY_INTERVAL")) or 1
local KEYS = tonumber(os.getenv("DELAY_KEYS")) or 20000
local SECS = tonumber(os.getenv("DELAY_SECS")) or 20

local HTTP = [[
lua_shared_dict resty_counter_stage 16m;
lua_shared_dict delay 64m;
init_worker_by_lua_block {
    local c = require("resty.counter").new("delay", ]] .. INTERVAL .. [[)
    package.loaded.delay_counter = c
    assert(ngx.timer.every(]] .. INTERVAL .. [[, function(premature)
        if premature then
            return
        end
        for i = 1, ]] .. KEYS .. [[ do
            c:incr("k" .. i)
        end
    end))
}
]]

local SERVER = [[
location = /mark {
    content_by_lua_block {
        package.loaded.delay_counter:incr("mark:" .. ngx.var.arg_n)
        ngx.say(ngx.worker.pid())
    }
}
location = /marks {
    content_by_lua_block {
        local d = ngx.shared.delay
        local out = {}
        for n in ngx.var.arg_ns:gmatch("%d+") do
            if d:get("mark:" .. n) then
                out[#out + 1] = n
            end
        end
        local s = package.loaded.delay_counter:stats()
        ngx.say(table.concat(out, " "), "|", s.stage and "stage" or "direct")
    }
}
]]

local srv = nginx.start({ workers = WORKERS, http = HTTP, server = SERVER })
socket.sleep(2 * INTERVAL)
local sent, waiting, delays = {}, {}, {}
local mode
local n, t_end, next_mark = 0, socket.gettime() + SECS, 0
while socket.gettime() < t_end or next(waiting) do
    local now = socket.gettime()
    if now < t_end and now >= next_mark then
        n = n + 1
        local status = srv:get("/mark?n=" .. n)
        assert(status == 200)
        sent[n] = socket.gettime()
        waiting[n] = true
        next_mark = now + 0.1
    end
    local ns = {}
    for k in pairs(waiting) do
        ns[#ns + 1] = k
    end
    if #ns > 0 then
        local status, body = srv:get("/marks?ns=" .. table.concat(ns, ","))
        assert(status == 200)
        local seen_at = socket.gettime()
        local list
        list, mode = body:match("^(.-)|(%a+)")
        for k in list:gmatch("%d+") do
            k = tonumber(k)
            delays[#delays + 1] = seen_at - sent[k]
            waiting[k] = nil
        end
    end
    if socket.gettime() > t_end + 10 * INTERVAL then
        break
    end
    socket.sleep(0.02)
end
srv:stop()
table.sort(delays)
local lost = 0
for _ in pairs(waiting) do
    lost = lost + 1
end
print(
    (
        "delay: %d workers (%s path), interval %.1f s, %d keys per worker "
        .. "and interval: %d marks, median %.3f s, max %.3f s, never seen %d; "
        .. "bound 2 x interval = %.1f s + fold time"
    ):format(
        WORKERS,
        mode or "?",
        INTERVAL,
        KEYS,
        #delays,
        delays[math.ceil(#delays / 2)] or 0 / 0,
        delays[#delays] or 0 / 0,
        lost,
        2 * INTERVAL
    )
)
