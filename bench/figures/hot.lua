-- Hot path: ns per c:incr(key, 1), keys already in the buffer.

local common = require("figures.common")

local ngx = ngx
local now, get_keys, new_counter =
    common.now, common.get_keys, common.new_counter
local rotate, line, args, compile =
    common.rotate, common.line, common.args, common.compile
local ceil = math.ceil
local min = math.min
local max = math.max
local tonumber = tonumber
local concat = table.concat
local collectgarbage = collectgarbage

local M = {}

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
        st.fn = compile(common.INCR_PLAIN_SRC, "hot_" .. id)
    else
        -- Manual counters: nothing empties the buffer between rounds, so
        -- every timed increment finds its key, as within one interval.
        st.c = new_counter(name, "hot", nil)
        st.fn = compile(common.INCR_SRC, "hot_" .. id)
    end
    st.fn(st.c, get_keys(), n, 1) -- warm: keys in the buffer, trace made
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
    local order = rotate({ "proj", "ref", "plain" }, round)
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

return M
