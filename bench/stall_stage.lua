-- Worst event-loop stall with the shared stage: N workers each dirty the
-- same K keys once per second, spread over the second (1 s sync), and a
-- 1 ms probe timer in every worker records how late it fires. Contenders: control (the same
-- increments into a plain Lua table, cleared each second: counting without
-- any sync), original (bench/reference_counter.lua: one dict write per key
-- and worker, in one go), stage (default with N > 1), direct
-- ({ stage = false }). Rounds alternate the contenders (the order rotates);
-- medians over the rounds.
--
--   luajit bench/stall_stage.lua              (from the repository root)
--
-- STALL_WORKERS (32), STALL_KEYS (100000), STALL_SECS (6), STALL_WARM (3),
-- STALL_ROUNDS (3), STALL_MODES (the contenders), STALL_GC (stop: a
-- diagnostic, every worker's Lua GC stopped), STALL_SCRAPE (seconds between
-- two scrapes, 0: none): a client outside nginx GETs /scrape that often,
-- whose handler calls the counter's sync() in the content phase, as
-- nginx-lua-prometheus's collect() does before each scrape (the control
-- answers without syncing). With scrapes, the goal of each counter is a
-- worst lateness within the control's plus 2 ms. Two figures per
-- contender, each as the worst over all workers and the median of the
-- per-worker worsts, in ms (medians over the rounds):
--   * lateness: how late the probe ran, in wall time. With more workers
--     than cores it is mostly run-queue waiting: every worker's timers fire
--     at the same second, and their CPU bursts queue on 2 cores.
--   * hold: the CPU the worker spent between two probe runs, that is, how
--     long its event loop went without giving the probe a turn, whatever
--     the OS scheduler did meanwhile. The stall a sync imposes on its own
--     worker's events. The load itself (K / 100 Lua table adds per 10 ms
--     timer run) is in every contender, control included, so the sync's
--     share is the difference to control.

package.path = "./?.lua;" .. package.path
local nginx = require("spec.support.nginx")
local socket = require("socket")
local stats = require("bench.stats")

local WORKERS = tonumber(os.getenv("STALL_WORKERS")) or 32
local KEYS = tonumber(os.getenv("STALL_KEYS")) or 100000
local SECS = tonumber(os.getenv("STALL_SECS")) or 6
local WARM = tonumber(os.getenv("STALL_WARM")) or 3
local ROUNDS = tonumber(os.getenv("STALL_ROUNDS")) or 3
local MODES = {}
for m in
    (os.getenv("STALL_MODES") or "control original stage direct"):gmatch("%S+")
do
    MODES[#MODES + 1] = m
end
-- Diagnostic: STALL_GC=stop stops each worker's Lua GC for the run.
local GC = os.getenv("STALL_GC") == "stop" and "stop" or "keep"
local SCRAPE = tonumber(os.getenv("STALL_SCRAPE")) or 0

local HTTP = [[
lua_shared_dict resty_counter_stage ${STAGE_MB}m;
lua_shared_dict stall ${DICT_MB}m;
lua_shared_dict stall_out 1m;
init_worker_by_lua_block {
    local mode, K = "${MODE}", ${KEYS}
    if "${GC}" == "stop" then
        collectgarbage("stop")
    end
    local contenders = require("bench.contenders")
    local keys = contenders.keys("stall_requests_total", K)
    local c = contenders.new(mode, "stall", ${STAGE})
    package.loaded["bench.stall_counter"] = c or false -- for /scrape
    -- The increments arrive spread over the second, as requests do: every
    -- 10 ms a timer adds the next K / 100 keys, so that no single run of
    -- the load itself holds the event loop for long.
    local plain, CHUNK, next_key = {}, math.ceil(K / 100), 1
    assert(ngx.timer.every(0.01, function(premature)
        if premature then
            return
        end
        local last = math.min(K, next_key + CHUNK - 1)
        if c then
            for i = next_key, last do
                c:incr(keys[i], 1)
            end
        else
            if next_key == 1 then
                require("table.clear")(plain)
            end
            for i = next_key, last do
                local k = keys[i]
                plain[k] = (plain[k] or 0) + 1
            end
        end
        next_key = last < K and last + 1 or 1
    end))
    local out, id = ngx.shared.stall_out, "w" .. ngx.worker.id()
    -- A monotonic clock in ns resolution (ngx.now() has milliseconds).
    local ffi = require("ffi")
    pcall(ffi.cdef, "struct stall_timespec { long tv_sec; long tv_nsec; };"
        .. "int clock_gettime(int clk, struct stall_timespec *tp);")
    local ts = ffi.new("struct stall_timespec")
    local function clock(which)
        ffi.C.clock_gettime(which or 1, ts) -- 1: CLOCK_MONOTONIC
        return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
    end
    local CPU = 2 -- CLOCK_PROCESS_CPUTIME_ID
    local start = clock()
    local probe
    probe = function(premature, due, cpu_before)
        if premature then
            return
        end
        local now, cpu = clock(), clock(CPU)
        if now - start > ${WARM} then
            -- late: wall time past due, run-queue waits included. hold:
            -- CPU this worker spent between two probe runs, that is, how
            -- long its event loop was held without the probe getting a
            -- turn, whatever the OS scheduler did meanwhile.
            local late, hold = now - due, cpu - cpu_before
            if late > (out:get(id) or 0) then
                out:set(id, late)
            end
            if hold > (out:get("h" .. id) or 0) then
                out:set("h" .. id, hold)
            end
        end
        ngx.timer.at(0.001, probe, now + 0.001, clock(CPU))
    end
    ngx.timer.at(0.001, probe, clock() + 0.001, clock(CPU))
}
]]

local SERVER = [[
location = /scrape {
    content_by_lua_block {
        local c = package.loaded["bench.stall_counter"]
        if c then
            c:sync()
        end
        ngx.say("ok")
    }
}
location = /worst {
    content_by_lua_block {
        local out, late, hold = ngx.shared.stall_out, {}, {}
        for _, k in ipairs(out:get_keys(0)) do
            local t = k:sub(1, 1) == "h" and hold or late
            t[#t + 1] = out:get(k)
        end
        ngx.say(table.concat(late, " "), "|", table.concat(hold, " "))
    }
}
]]

local function run(mode)
    local stage = KEYS * 192 * 2 + 1048576
    local dict_mb = math.ceil(KEYS * 600 / 1e6) + 8
    local srv = nginx.start({
        workers = WORKERS,
        http = (HTTP:gsub("%${([%w_]+)}", {
            MODE = mode,
            KEYS = tostring(KEYS),
            DICT_MB = tostring(dict_mb),
            STAGE = tostring(stage),
            STAGE_MB = tostring(math.ceil(stage / 2 ^ 20) + 1),
            WARM = tostring(WARM),
            GC = GC,
        })),
        server = SERVER,
    })
    if SCRAPE > 0 then
        socket.sleep(WARM)
        local t0 = socket.gettime()
        local tick = t0
        while tick < t0 + SECS do
            local status = srv:get("/scrape", nil, 60)
            assert(status == 200, "GET /scrape: " .. tostring(status))
            tick = tick + SCRAPE
            socket.sleep(math.max(0, tick - socket.gettime()))
        end
    else
        socket.sleep(WARM + SECS)
    end
    local _, body = srv:get("/worst")
    srv:stop()
    local function worsts(text)
        local t = {}
        for v in (text or ""):gmatch("%S+") do
            t[#t + 1] = tonumber(v) * 1e3
        end
        table.sort(t)
        return t[#t] or 0 / 0, t[math.ceil(#t / 2)] or 0 / 0, #t
    end
    local late, hold = (body or ""):match("^([^|]*)|([^\n]*)")
    local worst, med, n = worsts(late)
    local hold_worst, hold_med = worsts(hold)
    return worst, med, n, hold_worst, hold_med
end

local function median(t)
    return stats.median(t) or 0 / 0
end

print(
    ("stall: %d workers, %d keys, %d s after %d s warm-up, %d rounds%s"):format(
        WORKERS,
        KEYS,
        SECS,
        WARM,
        ROUNDS,
        SCRAPE > 0 and (", a scrape every %g s"):format(SCRAPE) or ""
    )
)
-- Per contender, per round: the worst lateness over the workers, the
-- median of the per-worker worsts, and the same two for the hold.
local figures = { "worst", "median", "hold_worst", "hold_median" }
local got = {}
for _, mode in ipairs(MODES) do
    got[mode] = {}
    for _, f in ipairs(figures) do
        got[mode][f] = {}
    end
end
for round = 1, ROUNDS do
    for i = 1, #MODES do
        local mode = MODES[(i + round - 2) % #MODES + 1]
        local worst, med, n, hold_worst, hold_med = run(mode)
        local g = got[mode]
        table.insert(g.worst, worst)
        table.insert(g.median, med)
        table.insert(g.hold_worst, hold_worst)
        table.insert(g.hold_median, hold_med)
        io.stderr:write(
            (
                "stall: round %d %-8s late: worst %.1f ms, median %.1f ms; "
                .. "hold: worst %.2f ms, median %.2f ms (%d workers)\n"
            ):format(
                round,
                mode,
                worst,
                med,
                hold_worst,
                hold_med,
                n
            )
        )
    end
end
print(
    "            lateness (wall, run-queue waits included)   "
        .. "hold (CPU between two probe runs)"
)
-- The goal, with scrapes: this module's worst lateness (stage, direct)
-- within the control's plus 2 ms; the original is shown for comparison.
local control = got.control and median(got.control.worst)
local tally = { pass = 0, MISS = 0 }
for _, mode in ipairs(MODES) do
    local g = got[mode]
    local result = ""
    if SCRAPE > 0 and control and (mode == "stage" or mode == "direct") then
        local ok = median(g.worst) <= control + 2
        result = ("  goal <= %.1f ms: %s"):format(
            control + 2,
            ok and "pass" or "MISS"
        )
        tally[ok and "pass" or "MISS"] = tally[ok and "pass" or "MISS"] + 1
    end
    print(
        (
            "%-8s    worst %7.1f ms, median %7.1f ms"
            .. "          worst %6.2f ms, median %6.2f ms%s"
        ):format(
            mode,
            median(g.worst),
            median(g.median),
            median(g.hold_worst),
            median(g.hold_median),
            result
        )
    )
end
if SCRAPE > 0 and control then
    print(("scrape goals: %d pass, %d miss"):format(tally.pass, tally.MISS))
end
