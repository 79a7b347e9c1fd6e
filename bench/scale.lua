-- The scaling figure of `make bench`: CPU that counting + sync costs all
-- workers together, against the number of workers, and the dict writes per
-- interval, for each contender side by side in one run.
--
--   luajit bench/scale.lua                    (from the repository root)
--
-- Every worker dirties the same K keys once per second (an ngx.timer.every of
-- 1 s, half a second after the sync timers) and syncs every second. The CPU of
-- all workers is read from /proc/<pid>/schedstat over SCALE_SECS after a
-- warm-up; the "control" contender runs the same loop over the keys without
-- counting, and its CPU is subtracted from the others'. Contenders are
-- alternated round by round (the order rotates); the CPU figures are
-- medians over the rounds, and a ratio to the original is the median of
-- each round's own ratio (see paired_ratio).
--
-- Contenders:
--   control   the key loop alone
--   original  the original algorithm (bench/reference_counter.lua): every
--             worker writes every key into the dict each interval, so its
--             writes per interval are N x K by construction
--   project   resty.counter as configured by default, its stage sized for K
--             ({ stage_bytes = ... }: 4 slots of 192 bytes per key)
--   direct    resty.counter with the shared stage off (each worker flushes
--             its own keys into the dict)
--
-- Environment: SCALE_WORKERS ("1 2 4 16 32"), SCALE_KEYS ("20000 50000"),
-- SCALE_SECS (4), SCALE_WARM (3), SCALE_ROUNDS (3), SCALE_CONTENDERS,
-- SCALE_OUT (bench/results): scale.csv (every round) and scale.dat (the
-- medians, one block per K, for bench/scale.gp's scale.png).

package.path = "./?.lua;" .. package.path
local nginx = require("spec.support.nginx")
local socket = require("socket")
local stats = require("bench.stats")

local function list(name, default)
    local out = {}
    for word in (os.getenv(name) or default):gmatch("%S+") do
        out[#out + 1] = tonumber(word) or word
    end
    return out
end

local WORKERS = list("SCALE_WORKERS", "1 2 4 16 32")
local KEYS = list("SCALE_KEYS", "20000 50000")
local CONTENDERS = list("SCALE_CONTENDERS", "control original project direct")
local SECS = tonumber(os.getenv("SCALE_SECS")) or 4
local WARM = tonumber(os.getenv("SCALE_WARM")) or 3
local ROUNDS = tonumber(os.getenv("SCALE_ROUNDS")) or 3
local OUT = os.getenv("SCALE_OUT") or "bench/results"

-- What each worker runs: a 1-second timer that dirties every key once and
-- records how many dict writes this worker has made so far.
local HTTP = [[
lua_shared_dict resty_counter_stage ${STAGE_MB}m;
lua_shared_dict scale ${DICT_MB}m;
lua_shared_dict scale_stats 1m;
init_worker_by_lua_block {
    local mode, K = "${MODE}", ${KEYS}
    local contenders = require("bench.contenders")
    local keys = contenders.keys("scale_requests_total", K)
    local c = contenders.new(mode, "scale", ${STAGE_BYTES})
    local stats = ngx.shared.scale_stats
    local id = "w" .. ngx.worker.id()
    local writes, sink = 0, 0
    -- Half a second after the counters' sync timers: the keys are dirtied
    -- between two syncs, as requests spread over the interval mostly are.
    -- Dirtied at the moment of a sync, they would come in during its
    -- pauses, and a sync that yields would write many keys once for two
    -- intervals: fewer writes than in a real worker.
    local function dirty(premature)
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
        if mode == "original" then
            writes = writes + K
        elseif c then
            writes = c:stats().keys_flushed or 0
        end
        stats:set(id, writes)
        if mode ~= "original" and c then
            -- deltas the stage refused (full, key too long), written directly
            stats:set("d" .. id, c:stats().fallback_writes or 0)
        end
        stats:set("sink", sink)
    end
    assert(ngx.timer.at(0.5, function(premature)
        if not premature then
            assert(ngx.timer.every(1, dirty))
        end
    end))
}
]]

local SERVER = [[
location = /writes {
    content_by_lua_block {
        local stats, sum, direct = ngx.shared.scale_stats, 0, 0
        for _, k in ipairs(stats:get_keys(0)) do
            if k:sub(1, 1) == "w" then
                sum = sum + stats:get(k)
            elseif k:sub(1, 2) == "dw" then
                direct = direct + stats:get(k)
            end
        end
        ngx.say(sum, " ", direct)
    }
}
]]

-- CPU time of the workers in ns: the first field of /proc/<pid>/schedstat
-- (time on a CPU, in ns; /proc/<pid>/stat counts 10 ms ticks, too coarse
-- for a few seconds of a worker that syncs once per second).
local function cpu_ns(pids)
    local sum = 0
    for _, pid in ipairs(pids) do
        local f = io.open("/proc/" .. pid .. "/schedstat")
        if f then
            sum = sum + tonumber(f:read("*a"):match("^(%d+)"))
            f:close()
        end
    end
    return sum
end

-- Dict writes so far, and of those the deltas the stage refused.
local function writes(srv)
    local status, body = srv:get("/writes")
    assert(status == 200, "GET /writes: " .. tostring(status))
    local w, d = body:match("^(%d+) (%d+)")
    return tonumber(w), tonumber(d)
end

-- The stage holds each key once in a 192-byte slot. Four slots per key:
-- with 16+ workers on 2 cores the syncs run late, keys go idle for a fold
-- or two and are retired, and a retired slot is freed only once every
-- worker has moved on, so a key may hold two slots for a while; at two
-- slots per key the probes then overflowed and spilled to the direct path.
-- Its bytes come from the stage zone, declared for every contender (only
-- resty.counter with the stage on uses it); the dict is the same for all.
local function stage_bytes(k)
    return k * 192 * 4 + 1048576
end

local function measure(mode, n, k)
    local dict_mb = math.max(16, math.ceil(k * 600 / 1e6) + 8)
    local srv = nginx.start({
        workers = n,
        http = (HTTP:gsub("%${([%w_]+)}", {
            MODE = mode,
            KEYS = tostring(k),
            DICT_MB = tostring(dict_mb),
            STAGE_BYTES = tostring(stage_bytes(k)),
            STAGE_MB = tostring(math.ceil(stage_bytes(k) / 2 ^ 20) + 1),
        })),
        server = SERVER,
    })
    socket.sleep(WARM)
    local pids = srv:worker_pids()
    local w0, d0 = writes(srv)
    local c0, t0 = cpu_ns(pids), socket.gettime()
    socket.sleep(SECS)
    local w1, d1 = writes(srv)
    local c1, t1 = cpu_ns(pids), socket.gettime()
    local log = srv:error_log()
    srv:stop()
    local errors = select(2, log:gsub("%[error%]", ""))
        + select(2, log:gsub("%[alert%]", ""))
    local secs = t1 - t0
    return (c1 - c0) / 1e6 / secs, (w1 - w0) / secs, errors, (d1 - d0) / secs
end

local function median(t)
    return stats.median(t) or 0 / 0
end

os.execute("mkdir -p " .. OUT)
local csv = assert(io.open(OUT .. "/scale.csv", "w"))
csv:write("workers,keys,contender,round,cpu_ms_per_s,writes_per_s,errors\n")

local results = {} -- [n][k][mode] = { cpu = {...}, writes = {...} }
for _, n in ipairs(WORKERS) do
    results[n] = {}
    for _, k in ipairs(KEYS) do
        results[n][k] = {}
        for _, m in ipairs(CONTENDERS) do
            results[n][k][m] = { cpu = {}, writes = {}, errors = 0 }
        end
        for round = 1, ROUNDS do
            for i = 1, #CONTENDERS do
                local m = CONTENDERS[(i + round - 2) % #CONTENDERS + 1]
                local cpu, w, errs, direct = measure(m, n, k)
                local r = results[n][k][m]
                r.cpu[#r.cpu + 1], r.writes[#r.writes + 1] = cpu, w
                r.errors = r.errors + errs
                csv:write(
                    ("%d,%d,%s,%d,%.2f,%.0f,%d\n"):format(
                        n,
                        k,
                        m,
                        round,
                        cpu,
                        w,
                        errs
                    )
                )
                csv:flush()
                io.stderr:write(
                    (
                        "scale: N=%d K=%d %-8s round %d: %.1f ms/s, %.0f writes/s"
                        .. " (%.0f/s refused by the stage)\n"
                    ):format(n, k, m, round, cpu, w, direct)
                )
            end
        end
    end
end
csv:close()

-- The ratio to the original: each round runs every contender back to
-- back, so the round's own ratio, (contender - control) / (original -
-- control), cancels what drifts between rounds on a shared machine (a
-- neighbour's load moved whole rounds by 20% in earlier runs); the median
-- over rounds of those ratios.
local function paired_ratio(r, m)
    local ratios = {}
    for i = 1, #r[m].cpu do
        local c = r.control and r.control.cpu[i] or 0
        local o = r.original.cpu[i] - c
        if o > 0 then
            ratios[#ratios + 1] = (r[m].cpu[i] - c) / o
        end
    end
    return stats.median(ratios)
end

-- The goals. Never worse than the original, at any worker count: the
-- direct path (what runs without a stage zone) at most 1.05x; resty.counter
-- with the stage zone at most 1.05x with one worker (the direct path runs
-- there too), and below the original where sharing pays, with at most
-- 1.05 K dict writes per interval.
local STAGE_GOAL = { [1] = 1.05, [2] = 0.8, [4] = 0.4, [16] = 0.12, [32] = 0.1 }
local function goal(m, n, ratio, per_k)
    if m == "direct" then
        return "<= 1.05x", ratio <= 1.05 and "pass" or "MISS"
    end
    local g = STAGE_GOAL[n] or 1.05
    local ok = ratio <= g and (n == 1 or per_k <= 1.05)
    return ("<= %gx%s"):format(g, n > 1 and ", <= 1.05 K" or ""),
        ok and "pass" or "MISS"
end

-- Summary: CPU beyond the control, ratio to the original, writes per
-- interval as a multiple of K, and the goal of the project's row.
local blocks = {} -- [k] = { header, rows of scale.dat }
local tally = { pass = 0, MISS = 0 }
print(
    ("%-4s %-6s %-9s %12s %10s %14s %7s  %-19s %s"):format(
        "N",
        "K",
        "contender",
        "cpu ms/s",
        "x orig",
        "writes/(K)",
        "errors",
        "goal",
        "result"
    )
)
for _, n in ipairs(WORKERS) do
    for _, k in ipairs(KEYS) do
        local r = results[n][k]
        local control = r.control and median(r.control.cpu) or 0
        local row = { n }
        for _, m in ipairs(CONTENDERS) do
            if m ~= "control" then
                local cpu = median(r[m].cpu) - control
                local w = m == "original" and n * k or median(r[m].writes)
                local x = r.original and paired_ratio(r, m)
                local g, result = "", ""
                if (m == "project" or m == "direct") and x then
                    g, result = goal(m, n, x, w / k)
                    tally[result] = tally[result] + 1
                end
                print(
                    ("%-4d %-6d %-9s %12.1f %10s %14.2f %7d  %-19s %s"):format(
                        n,
                        k,
                        m,
                        cpu,
                        x and ("%.2fx"):format(x) or "-",
                        w / k,
                        r[m].errors,
                        g,
                        result
                    )
                )
                row[#row + 1] = ("%.2f"):format(cpu)
            end
        end
        if not blocks[k] then
            local head = { "workers" }
            for _, m in ipairs(CONTENDERS) do
                if m ~= "control" then
                    head[#head + 1] = ('"%s, %dk keys"'):format(m, k / 1000)
                end
            end
            blocks[k] = { table.concat(head, " ") }
        end
        table.insert(blocks[k], table.concat(row, " "))
    end
end
local plot = assert(io.open(OUT .. "/scale.dat", "w"))
for i, k in ipairs(KEYS) do
    plot:write(i > 1 and "\n\n" or "", table.concat(blocks[k], "\n"), "\n")
end
plot:close()
print(("scaling goals: %d pass, %d miss"):format(tally.pass, tally.MISS))
