-- Contention: every worker increments the same keys at the same moment.

local common = require("figures.common")

local ngx = ngx
local now, get_keys, new_counter =
    common.now, common.get_keys, common.new_counter
local line, args, compile = common.line, common.args, common.compile
local ceil = math.ceil
local max = math.max
local tonumber = tonumber
local concat = table.concat
local sort = table.sort
local fmt = string.format
local collectgarbage = collectgarbage

local M = {}

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
        st.fn = compile(common.INCR_PLAIN_SRC, "contend_" .. name)
    else
        st.c = new_counter(name, "contend", nil)
        st.fn = compile(common.INCR_SRC, "contend_" .. name)
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
    ctl:set(
        fmt("res:%d:%d", go, id),
        fmt(
            "%.17g,%.17g,%.17g",
            (t1 - t0) * 1e9 / (passes * CONTEND_KEYS),
            t0,
            t1
        )
    )
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
    line(
        out,
        "contention",
        CONTEND_KEYS,
        name,
        round,
        "ns_per_incr",
        sum / workers,
        "ns"
    )
    line(
        out,
        "contention",
        CONTEND_KEYS,
        name,
        round,
        "overlap",
        overlap,
        "share"
    )
    line(
        out,
        "contention",
        CONTEND_KEYS,
        name,
        round,
        "exact",
        added == workers * passes * CONTEND_KEYS and 1 or 0,
        "bool"
    )
    ngx.print(concat(out, "\n"), "\n")
end

-- init_worker: the poller that runs each worker's part of a job.
function M.init_worker()
    if ngx.shared.ctl then
        local ok, err = ngx.timer.at(0, contend_poller)
        if not ok then
            ngx.log(ngx.ERR, "bench: cannot start the poller: ", err)
        end
    end
end

return M
