-- The benchmark's figures, run inside an nginx worker (bench/nginx.conf.in).
--
-- Each figure is a URI under /bench/ whose content handler runs one round
-- of every contender, in an order that rotates with the round, and answers
-- one CSV line per measurement:
--
--   figure,mode,size,contender,round,metric,value,unit
--
-- (mode is "jit" or "interp", from jit.status() in this worker). bench/run
-- collects the lines; bench/summarize.lua takes medians and ratios.
--
-- Contenders: "proj" (lua/resty/counter.lua), "ref" (reference_counter.lua,
-- the original's algorithm), "plain" (dict:incr per increment), "floor"
-- (sync only: direct ngx_http_lua_ffi_shdict_incr calls), "none" (stall and
-- end to end: no counter), and optional variants of the project's shim
-- (bench/patches/*.diff applied by bench/run).

local ffi = require "ffi"
local counter = require "resty.counter"
local reference = require "reference_counter"

local ngx = ngx
local C = ffi.C
local floor = math.floor
local ceil = math.ceil
local min = math.min
local max = math.max
local tonumber = tonumber
local tostring = tostring
local concat = table.concat
local sort = table.sort
local next = next
local fmt = string.format
local collectgarbage = collectgarbage

ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec_t;
int clock_gettime(int clk_id, bench_timespec_t *tp);
int ngx_http_lua_ffi_shdict_incr(void *zone, const unsigned char *key,
    size_t key_len, double *value, char **err, int has_init,
    double init, long init_ttl, int *forcible);
void *ngx_http_lua_ffi_shdict_udata_to_zone(void *zone_udata);
]]

local M = {}

local CLOCK_MONOTONIC = 1
local ts = ffi.new("bench_timespec_t")

-- Seconds on the monotonic clock (system-wide: comparable across workers).
local function now()
    C.clock_gettime(CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
M.now = now

local MODE = jit.status() and "jit" or "interp"

---------------------------------------------------------------------------
-- Keys, contenders, variants
---------------------------------------------------------------------------
local MAX_KEYS = 100000
local keys

-- Keys shaped like Prometheus series (about 55 bytes), the same list in
-- every worker and figure.
local function get_keys()
    if not keys then
        keys = {}
        for i = 1, MAX_KEYS do
            keys[i] = fmt('bench_requests_total{route="/api/v1/item/%06d",'
                          .. 'code="200"}', i)
        end
    end
    return keys
end

local variants = {}      -- name -> shim module
local variant_names = {} -- in load order
local variant_figures = {}  -- name -> "hot sync ..." (where it competes)

-- Called from init_by_lua with { {name, path, figures}, ... }: copies of
-- the project's shim with a patch applied, loaded under their own names.
function M.setup(opts)
    for _, v in ipairs(opts.variants or {}) do
        local name, path = v[1], v[2]
        local chunk = assert(loadfile(path))
        variants[name] = chunk()
        variant_names[#variant_names + 1] = name
        variant_figures[name] = " " .. (v[3] or "") .. " "
    end
end

-- The list with, after "proj", the variants that compete in `figure`.
local function with_variants(list, figure)
    local out = {}
    for i = 1, #list do
        out[#out + 1] = list[i]
        if list[i] == "proj" then
            for _, name in ipairs(variant_names) do
                if variant_figures[name]:find(" " .. figure .. " ", 1, true)
                then
                    out[#out + 1] = name
                end
            end
        end
    end
    return out
end

-- A counter of contender `name` on dict `dict_name`; interval nil: manual.
local function new_counter(name, dict_name, interval)
    if name == "proj" then
        return counter.new(dict_name, interval)
    elseif name == "ref" then
        return reference.new(dict_name, interval)
    end
    local v = variants[name]
    if v then
        return v.new(dict_name, interval)
    end
    error("unknown contender " .. tostring(name))
end

-- The contenders in the order of this round: rotated, so that none always
-- runs first (after a GC, on a cold cache) or last.
local function rotate(list, round)
    local n, out = #list, {}
    local shift = (round - 1) % n
    for i = 1, n do
        out[i] = list[(i - 1 + shift) % n + 1]
    end
    return out
end

local function line(out, figure, size, contender, round, metric, value,
                    unit)
    out[#out + 1] = fmt("%s,%s,%d,%s,%d,%s,%.6g,%s", figure, MODE, size,
                        contender, round, metric, value, unit)
end

local function args()
    local a = ngx.req.get_uri_args()
    return a, tonumber(a.n) or 0, tonumber(a.round) or 1
end

-- A fresh copy of a loop's code per contender: LuaJIT keeps traces per
-- prototype, so contenders never share (or fight over) one trace.
local function compile(src, name)
    return assert(loadstring(src, "=" .. name))()
end

---------------------------------------------------------------------------
-- hot path: ns per c:incr(key, 1), keys already in the buffer
---------------------------------------------------------------------------
local HOT_SRC = [[
return function(c, keys, n, passes)
    for _ = 1, passes do
        for i = 1, n do
            c:incr(keys[i], 1)
        end
    end
end
]]

local HOT_PLAIN_SRC = [[
return function(dict, keys, n, passes)
    for _ = 1, passes do
        for i = 1, n do
            dict:incr(keys[i], 1, 0)
        end
    end
end
]]

local hot_states = {}

local function hot_state(name, n)
    local id = name .. ":" .. n
    local st = hot_states[id]
    if st then
        return st
    end
    st = {}
    if name == "plain" then
        st.c = ngx.shared.hot
        st.fn = compile(HOT_PLAIN_SRC, "hot_" .. id)
    else
        -- Manual counters: nothing empties the buffer between rounds, so
        -- every timed increment finds its key, as within one interval.
        st.c = new_counter(name, "hot", nil)
        st.fn = compile(HOT_SRC, "hot_" .. id)
    end
    st.fn(st.c, get_keys(), n, 1)  -- warm: keys in the buffer, trace made
    hot_states[id] = st
    return st
end

-- One round: `reps` repetitions, each running every contender once in the
-- round's order; a contender's figure for the round is its fastest
-- repetition (on a shared machine interference only ever adds time). The
-- median over rounds is taken by summarize.lua.
function M.hot()
    local a, n, round = args()
    local ops = tonumber(a.ops) or 1e6
    local plain_ops = tonumber(a.plain_ops) or ops / 50
    local reps = tonumber(a.reps) or 1
    local k = get_keys()
    local order = rotate(with_variants({ "proj", "ref", "plain" }, "hot"),
                         round)
    local best = {}
    for _ = 1, reps do
        for _, name in ipairs(order) do
            local st = hot_state(name, n)
            local want = name == "plain" and plain_ops or ops
            local passes = max(1, ceil(want / n))
            collectgarbage()
            local t0 = now()
            st.fn(st.c, k, n, passes)
            local t1 = now()
            local ns = (t1 - t0) * 1e9 / (n * passes)
            best[name] = min(best[name] or ns, ns)
        end
    end
    local out = {}
    for _, name in ipairs(order) do
        line(out, "hot", n, name, round, "ns_per_incr", best[name], "ns")
    end
    ngx.print(concat(out, "\n"), "\n")
end

---------------------------------------------------------------------------
-- sync: ns per key flushed, n keys dirty, every key already in the dict
---------------------------------------------------------------------------
local FILL_SRC = [[
return function(c, keys, n)
    for i = 1, n do
        c:incr(keys[i], 1)
    end
end
]]

-- The floor: what writing n deltas into the dict costs with nothing but a
-- Lua loop of direct calls to lua-nginx-module's C entry point. It walks a
-- Lua table of the same keys with next(), as every buffered counter does,
-- so that all contenders write in the same (hash) order: the order alone
-- moves the dict's cost by about 10% at 100k keys (bench/README.md).
local FLOOR_SRC = [[
local C = require("ffi").C
local next = next
return function(zone, t, value, err, forcible)
    local bad = 0
    for k, v in next, t do
        value[0] = v
        local rc = C.ngx_http_lua_ffi_shdict_incr(zone, k, #k, value, err, 1,
                                                  0, 0, forcible)
        if rc ~= 0 then
            bad = bad + 1
        end
    end
    return bad
end
]]

local sync_states = {}
local sync_writes = {}   -- dict name -> times each key was written

local function sync_state(name, n)
    local id = name .. ":" .. n
    local st = sync_states[id]
    if st then
        return st
    end
    local dict_name = "sync_" .. n
    st = { dict_name = dict_name }
    if name == "floor" then
        local dict = ngx.shared[dict_name]
        st.zone = C.ngx_http_lua_ffi_shdict_udata_to_zone(dict[1])
        st.fn = compile(FLOOR_SRC, "floor_" .. n)
        st.t = {}
        local k = get_keys()
        for i = 1, n do
            st.t[k[i]] = 1
        end
        st.value = ffi.new("double[1]")
        st.err = ffi.new("char *[1]")
        st.forcible = ffi.new("int[1]")
    else
        st.c = new_counter(name, dict_name, nil)
        st.fill = compile(FILL_SRC, "fill_" .. id)
    end
    sync_states[id] = st
    return st
end

-- One round, `reps` repetitions as in M.hot: fill the contender's buffer
-- with n keys (not timed), then time its sync.
function M.sync()
    local a, n, round = args()
    local reps = tonumber(a.reps) or 1
    local k = get_keys()
    local order = rotate(with_variants({ "proj", "ref", "floor" }, "sync"),
                         round)
    local best, all_ok = {}, {}
    for _ = 1, reps do
        for _, name in ipairs(order) do
            local st = sync_state(name, n)
            local t0, t1, ok
            if name == "floor" then
                collectgarbage()
                t0 = now()
                ok = st.fn(st.zone, st.t, st.value, st.err, st.forcible) == 0
                t1 = now()
            else
                st.fill(st.c, k, n)
                collectgarbage()
                t0 = now()
                ok = st.c:sync()
                t1 = now()
            end
            if not ok then
                ngx.log(ngx.ERR, "bench: sync of ", name, " at ", n,
                        " keys reported a failure")
            end
            sync_writes[st.dict_name] = (sync_writes[st.dict_name] or 0) + 1
            local ns = (t1 - t0) * 1e9 / n
            best[name] = min(best[name] or ns, ns)
            all_ok[name] = (all_ok[name] ~= false) and ok
        end
    end
    local out = {}
    for _, name in ipairs(order) do
        line(out, "sync", n, name, round, "ns_per_key", best[name], "ns")
        line(out, "sync", n, name, round, "ok", all_ok[name] and 1 or 0,
             "bool")
    end
    ngx.print(concat(out, "\n"), "\n")
end

-- Every key of the figure holds exactly the number of writes made to it:
-- each contender's sync (and the floor) added 1 per key per round.
function M.sync_check()
    local _, n = args()
    local dict_name = "sync_" .. n
    local dict = ngx.shared[dict_name]
    local want = sync_writes[dict_name] or 0
    local k = get_keys()
    local wrong = 0
    for i = 1, n do
        if dict:get(k[i]) ~= want then
            wrong = wrong + 1
        end
    end
    local out = {}
    line(out, "sync", n, "all", 0, "wrong_keys", wrong, "keys")
    line(out, "sync", n, "all", 0, "expected_value", want, "count")
    ngx.print(concat(out, "\n"), "\n")
end

---------------------------------------------------------------------------
-- order (optional, BENCH_ONLY=order): does the order of the writes matter?
-- The floor's loop over the same n keys in three orders: a Lua table's hash
-- order (what every buffered counter writes in), creation order (the order
-- the dict's nodes were allocated in: the cache's best case), and the order
-- of the dict's red-black tree (CRC32 of the key).
---------------------------------------------------------------------------
local ORDER_SRC = [[
local C = require("ffi").C
return function(zone, list, n, value, err, forcible)
    for i = 1, n do
        local k = list[i]
        value[0] = 1
        C.ngx_http_lua_ffi_shdict_incr(zone, k, #k, value, err, 1, 0, 0,
                                       forcible)
    end
end
]]
local order_states = {}

function M.order()
    local a, n, round = args()
    local reps = tonumber(a.reps) or 1
    local st = order_states[n]
    if not st then
        local k = get_keys()
        local created, t, hashed, crc = {}, {}, {}, {}
        for i = 1, n do
            created[i] = k[i]
            t[k[i]] = 1
            crc[k[i]] = ngx.crc32_short(k[i])
        end
        for key in next, t do
            hashed[#hashed + 1] = key
        end
        local sorted = {}
        for i = 1, n do
            sorted[i] = created[i]
        end
        sort(sorted, function(x, y) return crc[x] < crc[y] end)
        -- The dict's nodes are allocated in creation order, as when keys
        -- first appear one after the other; then each order is timed.
        local dict = ngx.shared["order_" .. n]
        for i = 1, n do
            dict:incr(created[i], 1, 0)
        end
        st = {
            zone = C.ngx_http_lua_ffi_shdict_udata_to_zone(dict[1]),
            lists = { hash = hashed, created = created, crc32 = sorted },
            fns = {},
            value = ffi.new("double[1]"),
            err = ffi.new("char *[1]"),
            forcible = ffi.new("int[1]"),
        }
        for name in pairs(st.lists) do
            st.fns[name] = compile(ORDER_SRC, "order_" .. name .. n)
        end
        order_states[n] = st
    end
    local best = {}
    local order = rotate({ "hash", "created", "crc32" }, round)
    for _ = 1, reps do
        for _, name in ipairs(order) do
            collectgarbage()
            local t0 = now()
            st.fns[name](st.zone, st.lists[name], n, st.value, st.err,
                         st.forcible)
            local ns = (now() - t0) * 1e9 / n
            best[name] = min(best[name] or ns, ns)
        end
    end
    local out = {}
    for _, name in ipairs(order) do
        line(out, "order", n, name, round, "ns_per_key", best[name], "ns")
    end
    ngx.print(concat(out, "\n"), "\n")
end

---------------------------------------------------------------------------
-- stall: how late a 1 ms probe fires while a feeder dirties n keys per
-- interval and the contender's automatic sync runs
---------------------------------------------------------------------------
local stall_counters = {}
local stall_warm = {}  -- "contender:n" -> a run at this size happened

local function stall_counter(name, interval)
    local c = stall_counters[name]
    if c then
        return c
    end
    if name == "none" then
        -- The probe's own noise floor: the feeder's work, no sync at all.
        local t = {}
        c = {
            incr = function(_, key, step)
                t[key] = (t[key] or 0) + step
                return true
            end,
        }
    else
        local dict_name = name == "ref" and "stall_ref" or "stall_proj"
        c = new_counter(name, dict_name, interval)
    end
    stall_counters[name] = c
    return c
end

local FEED_SRC = [[
return function(c, keys, n, i, todo)
    for _ = 1, todo do
        i = i + 1
        if i > n then
            i = 1
        end
        c:incr(keys[i], 1)
    end
    return i
end
]]
local feed_fns = {}

-- Dirties n distinct keys per interval, paced in 1 ms steps so that the
-- feeder itself never holds the event loop for long.
local function feeder(st, c, n, interval)
    local feed = feed_fns[st.name]
    if not feed then
        feed = compile(FEED_SRC, "feed_" .. st.name)
        feed_fns[st.name] = feed
    end
    local k = get_keys()
    local rate = n / interval
    local chunk_max = ceil(rate * 0.004)
    local start = now()
    local done, i = 0, 0
    while not st.stop do
        local todo = min(floor((now() - start) * rate) - done, chunk_max)
        if todo > 0 then
            i = feed(c, k, n, i, todo)
            done = done + todo
        end
        ngx.sleep(0.001)
    end
    st.fed = done
    st.fed_seconds = now() - start
end

local function probe(st)
    local lat, at = {}, {}
    local last = now()
    st.start = last
    while not st.stop do
        ngx.sleep(0.001)
        local t = now()
        lat[#lat + 1] = t - last - 0.001
        at[#at + 1] = t
        last = t
    end
    st.lat, st.at = lat, at
end

-- The worst lateness within each sync interval of the probe's run: one
-- figure per automatic sync, so that a rare hiccup of the (shared,
-- virtual) machine weighs as one interval, not as the whole run.
local function per_interval_worst(st, interval, intervals)
    local worst = {}
    for i = 1, intervals do
        worst[i] = 0
    end
    for i = 1, #st.lat do
        local w = min(intervals, floor((st.at[i] - st.start) / interval) + 1)
        worst[w] = max(worst[w], st.lat[i])
    end
    return worst
end

-- The same question asked through the network: every 1 ms, a keep-alive
-- HTTP request to this very worker (answered by nginx's `return`, no Lua).
-- Its lateness is the whole cycle's: the 1 ms sleep plus the round trip,
-- minus 1 ms. A sync that lets due timers run but starves I/O fools the
-- timer probe, not this one.
local PING = "GET /bench/ping HTTP/1.1\r\nHost: bench\r\n\r\n"

local function io_probe(st, port)
    local lat, at = {}, {}
    st.lat, st.at = lat, at
    local sock = ngx.socket.tcp()
    sock:settimeout(10000)
    local ok, err = sock:connect("127.0.0.1", port)
    if not ok then
        st.err = err
        return
    end
    local headers_end = sock:receiveuntil("\r\n\r\n")
    local last = now()
    st.start = last
    while not st.stop do
        ngx.sleep(0.001)
        local sent
        sent, err = sock:send(PING)
        local body = sent and headers_end() and sock:receive(3)
        if not body then
            st.err = err or "short answer"
            break
        end
        local t = now()
        lat[#lat + 1] = t - last - 0.001
        at[#at + 1] = t
        last = t
    end
    sock:close()
end

local function percentile(sorted, p)
    return sorted[max(1, ceil(#sorted * p))]
end

function M.stall()
    local a, n, round = args()
    local name = a.contender
    local interval = tonumber(a.interval) or 0.5
    local intervals = tonumber(a.intervals) or 3
    local c = stall_counter(name, interval)
    get_keys()
    collectgarbage()
    if a.gc == "stop" then  -- diagnostic: is a stall the Lua GC's?
        collectgarbage("stop")
    end

    local st = { name = name }
    local flushed0 = c.stats and c:stats().keys_flushed
    local feed_thread = ngx.thread.spawn(feeder, st, c, n, interval)
    -- Every sync from here on is a full one. A contender's first run at a
    -- size waits one interval more: its buffer tables grow to n keys once
    -- (a rehash of tens of thousands of keys, a startup cost, not a sync's).
    local id = name .. ":" .. n
    ngx.sleep((stall_warm[id] and 1 or 2) * interval + 0.1)
    stall_warm[id] = true
    local pst, ist = {}, {}
    local probe_thread = ngx.thread.spawn(probe, pst)
    local io_thread = ngx.thread.spawn(io_probe, ist, ngx.var.server_port)
    ngx.sleep(intervals * interval)
    pst.stop, ist.stop = true, true
    ngx.thread.wait(probe_thread)
    ngx.thread.wait(io_thread)
    if ist.err then
        ngx.log(ngx.ERR, "bench: I/O probe failed: ", ist.err)
    end
    st.stop = true
    ngx.thread.wait(feed_thread)
    local s = c.stats and c:stats()
    -- The last dirty keys flush within an interval, during the next run's
    -- warm-up, before its probes start.
    ngx.sleep(0.3)
    if a.gc == "stop" then
        collectgarbage("restart")
    end

    local out = {}
    for _, w in ipairs(per_interval_worst(pst, interval, intervals)) do
        line(out, "stall", n, name, round, "interval_worst_ms", w * 1e3, "ms")
    end
    local lat = pst.lat
    local over = 0
    for i = 1, #lat do
        if lat[i] > 0.002 then
            over = over + 1
        end
    end
    if a.debug then
        local d = {}
        for i = 1, #lat do
            if lat[i] > 0.0015 then
                d[#d + 1] = fmt("%d:%.2f", i, lat[i] * 1e3)
            end
        end
        ngx.log(ngx.WARN, "bench: stall ", name, " ", n, " late: ",
                concat(d, " "))
    end
    sort(lat)
    line(out, "stall", n, name, round, "worst_ms", lat[#lat] * 1e3, "ms")
    line(out, "stall", n, name, round, "p99_ms", percentile(lat, 0.99) * 1e3,
         "ms")
    line(out, "stall", n, name, round, "median_ms",
         percentile(lat, 0.5) * 1e3, "ms")
    for _, w in ipairs(per_interval_worst(ist, interval, intervals)) do
        line(out, "stall", n, name, round, "io_interval_worst_ms", w * 1e3,
             "ms")
    end
    local il = ist.lat
    if #il > 0 then
        sort(il)
        line(out, "stall", n, name, round, "io_worst_ms", il[#il] * 1e3, "ms")
        line(out, "stall", n, name, round, "io_p99_ms",
             percentile(il, 0.99) * 1e3, "ms")
        line(out, "stall", n, name, round, "io_median_ms",
             percentile(il, 0.5) * 1e3, "ms")
    end
    line(out, "stall", n, name, round, "probe_ticks", #lat, "count")
    line(out, "stall", n, name, round, "ticks_over_2ms", over, "count")
    line(out, "stall", n, name, round, "dirty_per_interval",
         st.fed / st.fed_seconds * interval, "keys")
    if s then
        line(out, "stall", n, name, round, "last_sync_ms",
             (s.last_sync_seconds or 0) * 1e3, "ms")
        line(out, "stall", n, name, round, "keys_flushed",
             (s.keys_flushed or 0) - (flushed0 or 0), "keys")
    end
    ngx.print(concat(out, "\n"), "\n")
end

---------------------------------------------------------------------------
-- contention: every worker increments the same keys at the same moment
---------------------------------------------------------------------------
local CONTEND_KEYS = 64
local contend_states = {}

local function contend_state(name)
    local st = contend_states[name]
    if st then
        return st
    end
    st = {}
    if name == "plain" then
        st.c = ngx.shared.contend
        st.fn = compile(HOT_PLAIN_SRC, "contend_" .. name)
    else
        st.c = new_counter(name, "contend", nil)
        st.fn = compile(HOT_SRC, "contend_" .. name)
    end
    -- Warm (trace made, buffer built) on other keys than the timed ones,
    -- so that the exactness check counts the timed increments only.
    local k, warm = get_keys(), {}
    for i = 1, CONTEND_KEYS do
        warm[i] = k[CONTEND_KEYS + i]
    end
    st.fn(st.c, warm, CONTEND_KEYS, 1)
    if st.c.sync then
        st.c:sync()
    end
    contend_states[name] = st
    return st
end

-- One worker's part of job `go`: wait for every worker at a barrier, then
-- time the loop (and, for buffered counters, the sync that makes the
-- counts visible in the dict).
local function contend_job(ctl, go)
    local name = ctl:get("impl")
    local ops = ctl:get("ops")
    local st = contend_state(name)
    local passes = max(1, ceil(ops / CONTEND_KEYS))
    local k = get_keys()
    collectgarbage()
    local workers = ngx.worker.count()
    local ready = "ready:" .. go
    ctl:incr(ready, 1, 0)
    local deadline = now() + 5
    while (ctl:get(ready) or 0) < workers and now() < deadline do
        -- spin: both workers leave the barrier within microseconds
    end
    local t0 = now()
    st.fn(st.c, k, CONTEND_KEYS, passes)
    if st.c.sync then
        st.c:sync()
    end
    local t1 = now()
    local id = ngx.worker.id()
    ctl:set(fmt("res:%d:%d", go, id),
            fmt("%.17g,%.17g,%.17g", (t1 - t0) * 1e9 / (passes * CONTEND_KEYS),
                t0, t1))
end

local function contend_poller(premature)
    if premature then
        return
    end
    local ctl = ngx.shared.ctl
    local seen = ctl:get("go") or 0
    while not ngx.worker.exiting() do
        local go = ctl:get("go") or 0
        if go > seen then
            seen = go
            local ok, err = pcall(contend_job, ctl, go)
            if not ok then
                ngx.log(ngx.ERR, "bench: contention job failed: ", err)
            end
        end
        ngx.sleep(0.002)
    end
end

local function total(dict)
    local k, sum = get_keys(), 0
    for i = 1, CONTEND_KEYS do
        sum = sum + (dict:get(k[i]) or 0)
    end
    return sum
end

function M.contend()
    local a, _, round = args()
    local name = a.contender
    local ops = tonumber(a.ops) or 1e6
    local ctl = ngx.shared.ctl
    local workers = ngx.worker.count()
    local before = total(ngx.shared.contend)
    ctl:set("impl", name)
    ctl:set("ops", ops)
    local go = ctl:incr("go", 1, 0)
    local res = {}
    local deadline = now() + 60
    while now() < deadline do
        local got = 0
        for id = 0, workers - 1 do
            res[id] = ctl:get(fmt("res:%d:%d", go, id))
            if res[id] then
                got = got + 1
            end
        end
        if got == workers then
            break
        end
        ngx.sleep(0.005)
    end
    local sum, starts, ends, durs = 0, {}, {}, {}
    for id = 0, workers - 1 do
        if not res[id] then
            ngx.status = 500
            ngx.say("worker ", id, " did not answer")
            return
        end
        local ns, t0, t1 = res[id]:match("([^,]+),([^,]+),([^,]+)")
        sum = sum + tonumber(ns)
        starts[#starts + 1], ends[#ends + 1] = tonumber(t0), tonumber(t1)
        durs[#durs + 1] = tonumber(t1) - tonumber(t0)
    end
    sort(starts)
    sort(ends)
    sort(durs)
    -- Share of the longest worker's run during which all ran at once.
    local overlap = max(0, ends[1] - starts[#starts]) / durs[#durs]
    local passes = max(1, ceil(ops / CONTEND_KEYS))
    local added = total(ngx.shared.contend) - before
    local out = {}
    line(out, "contention", CONTEND_KEYS, name, round, "ns_per_incr",
         sum / workers, "ns")
    line(out, "contention", CONTEND_KEYS, name, round, "overlap",
         overlap, "share")
    line(out, "contention", CONTEND_KEYS, name, round, "exact",
         added == workers * passes * CONTEND_KEYS and 1 or 0, "bool")
    ngx.print(concat(out, "\n"), "\n")
end

---------------------------------------------------------------------------
-- end to end: five counters per request
---------------------------------------------------------------------------
local E2E_KEYS = {
    'nginx_http_requests_total{host="bench",status="200"}',
    'nginx_http_request_size_bytes_total{host="bench"}',
    'nginx_http_response_size_bytes_total{host="bench"}',
    'nginx_http_request_duration_seconds_bucket{host="bench",le="0.005"}',
    'nginx_http_request_duration_seconds_count{host="bench"}',
}
local K1, K2, K3, K4, K5 = unpack(E2E_KEYS)
local e2e = {}

-- init_worker: the counters a real module would create once per worker.
function M.init_worker()
    if ngx.shared.ctl then
        local ok, err = ngx.timer.at(0, contend_poller)
        if not ok then
            ngx.log(ngx.ERR, "bench: cannot start the poller: ", err)
        end
    end
    if ngx.shared.e2e_proj then
        e2e.proj = counter.new("e2e_proj", 1)
        e2e.ref = reference.new("e2e_ref", 1)
        e2e.plain = ngx.shared.e2e_plain
    end
end

local function count5(c)
    c:incr(K1, 1)
    c:incr(K2, 112)
    c:incr(K3, 3)
    c:incr(K4, 1)
    c:incr(K5, 1)
end

local function count5_plain(d)
    d:incr(K1, 1, 0)
    d:incr(K2, 112, 0)
    d:incr(K3, 3, 0)
    d:incr(K4, 1, 0)
    d:incr(K5, 1, 0)
end

M.e2e = {
    none = function() end,
    proj = function() count5(e2e.proj) end,
    ref = function() count5(e2e.ref) end,
    plain = function() count5_plain(e2e.plain) end,
}

-- What the e2e counters hold, after their last sync.
function M.e2e_counts()
    local out = {}
    for _, name in ipairs({ "proj", "ref", "plain" }) do
        local d = ngx.shared["e2e_" .. name]
        out[#out + 1] = name .. "=" .. tostring(d:get(K1))
    end
    ngx.say(concat(out, " "))
end

---------------------------------------------------------------------------
function M.info()
    ngx.say(fmt("mode=%s jit=%s ngx_lua=%s nginx=%s workers=%d variants=%s",
                MODE, jit.version, tostring(ngx.config.ngx_lua_version),
                tostring(ngx.config.nginx_version), ngx.worker.count(),
                concat(variant_names, "+")))
end

return M
