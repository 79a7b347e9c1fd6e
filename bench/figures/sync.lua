-- Sync: ns per key flushed, n keys dirty, every key already in the dict.

local common = require("figures.common")

local ngx = ngx
local now, get_keys, new_counter =
    common.now, common.get_keys, common.new_counter
local rotate, line, args, compile =
    common.rotate, common.line, common.args, common.compile
local min = math.min
local tonumber = tonumber
local concat = table.concat
local collectgarbage = collectgarbage

local M = {}

local ffi = require("ffi")
local C = ffi.C

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
local sync_writes = {} -- dict name -> times each key was written

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
    local order = rotate({ "proj", "ref", "floor" }, round)
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
                ngx.log(
                    ngx.ERR,
                    "bench: sync of ",
                    name,
                    " at ",
                    n,
                    " keys reported a failure"
                )
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
        line(out, "sync", n, name, round, "ok", all_ok[name] and 1 or 0, "bool")
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

return M
