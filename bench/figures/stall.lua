-- Stall: how late a 1 ms probe fires while a feeder dirties n keys per
-- interval and the contender's automatic sync runs.

local common = require("figures.common")

local ngx = ngx
local now, get_keys, new_counter =
    common.now, common.get_keys, common.new_counter
local line, args, compile = common.line, common.args, common.compile
local floor = math.floor
local ceil = math.ceil
local min = math.min
local max = math.max
local tonumber = tonumber
local concat = table.concat
local sort = table.sort
local fmt = string.format
local collectgarbage = collectgarbage

local M = {}

local stall_counters = {}
local stall_warm = {} -- "contender:n" -> a run at this size happened

-- The pending case: a dict too small to hold even one of these keys (an
-- empty 12k dict refuses a 100-byte key: spec/integration/full_dict_spec.lua),
-- so every delta written to it is refused ("no memory"), stays pending and
-- is retried at each sync.
local PENDING_DICT = "stall_full"
local pending_keys

local function get_pending_keys()
    if not pending_keys then
        pending_keys = {}
        local pad = ("x"):rep(60)
        for i, key in ipairs(get_keys()) do
            pending_keys[i] = key:sub(1, -2) .. ',pad="' .. pad .. '"}'
        end
    end
    return pending_keys
end

-- The contender's counter, one per contender and case.
local function stall_counter(name, interval, pending)
    local id = name .. (pending and ":pending" or "")
    local c = stall_counters[id]
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
    elseif pending then
        c = new_counter(name, PENDING_DICT, interval)
    else
        local dict_name = name == "ref" and "stall_ref" or "stall_proj"
        c = new_counter(name, dict_name, interval)
    end
    stall_counters[id] = c
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
    local feed = feed_fns[st.id]
    if not feed then
        feed = compile(FEED_SRC, "feed_" .. st.id)
        feed_fns[st.id] = feed
    end
    local k = st.keys
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
    -- pending=1: the dict is full, every delta stays pending (see above).
    local pending = a.pending == "1"
    local figure = pending and "stall_pending" or "stall"
    local c = stall_counter(name, interval, pending)
    local keys = pending and get_pending_keys() or get_keys()
    collectgarbage()
    if a.gc == "stop" then -- diagnostic: is a stall the Lua GC's?
        collectgarbage("stop")
    end

    local st = { id = name .. (pending and "_pending" or ""), keys = keys }
    local flushed0 = c.stats and c:stats().keys_flushed
    local feed_thread = ngx.thread.spawn(feeder, st, c, n, interval)
    -- Every sync from here on is a full one. A contender's first run at a
    -- size waits one interval more: its buffer tables grow to n keys once
    -- (a rehash of tens of thousands of keys, a startup cost, not a sync's).
    local id = st.id .. ":" .. n
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
        line(out, figure, n, name, round, "interval_worst_ms", w * 1e3, "ms")
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
        ngx.log(
            ngx.WARN,
            "bench: stall ",
            name,
            " ",
            n,
            " late: ",
            concat(d, " ")
        )
    end
    sort(lat)
    line(out, figure, n, name, round, "worst_ms", lat[#lat] * 1e3, "ms")
    line(
        out,
        figure,
        n,
        name,
        round,
        "p99_ms",
        percentile(lat, 0.99) * 1e3,
        "ms"
    )
    line(
        out,
        figure,
        n,
        name,
        round,
        "median_ms",
        percentile(lat, 0.5) * 1e3,
        "ms"
    )
    for _, w in ipairs(per_interval_worst(ist, interval, intervals)) do
        line(out, figure, n, name, round, "io_interval_worst_ms", w * 1e3, "ms")
    end
    local il = ist.lat
    if #il > 0 then
        sort(il)
        line(out, figure, n, name, round, "io_worst_ms", il[#il] * 1e3, "ms")
        line(
            out,
            figure,
            n,
            name,
            round,
            "io_p99_ms",
            percentile(il, 0.99) * 1e3,
            "ms"
        )
        line(
            out,
            figure,
            n,
            name,
            round,
            "io_median_ms",
            percentile(il, 0.5) * 1e3,
            "ms"
        )
    end
    line(out, figure, n, name, round, "probe_ticks", #lat, "count")
    line(out, figure, n, name, round, "ticks_over_2ms", over, "count")
    line(
        out,
        figure,
        n,
        name,
        round,
        "dirty_per_interval",
        st.fed / st.fed_seconds * interval,
        "keys"
    )
    if s then
        line(
            out,
            figure,
            n,
            name,
            round,
            "last_sync_ms",
            (s.last_sync_seconds or 0) * 1e3,
            "ms"
        )
        line(
            out,
            figure,
            n,
            name,
            round,
            "keys_flushed",
            (s.keys_flushed or 0) - (flushed0 or 0),
            "keys"
        )
        line(
            out,
            figure,
            n,
            name,
            round,
            "pending_keys",
            s.pending_keys or 0,
            "keys"
        )
        line(out, figure, n, name, round, "retries", s.retries or 0, "keys")
    end
    ngx.print(concat(out, "\n"), "\n")
end

return M
