-- What every figure shares: the clock, the keys, the contenders, the CSV
-- line, the round's order and the per-contender copy of a timed loop.
--
-- Each figure answers one CSV line per measurement:
--
--   figure,mode,size,contender,round,metric,value,unit
--
-- (mode is "jit" or "interp", from jit.status() in this worker). bench/run
-- collects the lines; bench/summarize.lua takes medians and ratios.

local ffi = require("ffi")
local counter = require("resty.counter")
local reference = require("reference_counter")

local ngx = ngx
local C = ffi.C
local tonumber = tonumber
local tostring = tostring
local fmt = string.format

ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec_t;
int clock_gettime(int clk_id, bench_timespec_t *tp);
int ngx_http_lua_ffi_shdict_incr(void *zone, const unsigned char *key,
    size_t key_len, double *value, char **err, int has_init,
    double init, long init_ttl, int *forcible);
void *ngx_http_lua_ffi_shdict_udata_to_zone(void *zone_udata);
]])

local M = {}

local CLOCK_MONOTONIC = 1
local ts = ffi.new("bench_timespec_t")

-- Seconds on the monotonic clock (system-wide: comparable across workers).
function M.now()
    C.clock_gettime(CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

M.MODE = jit.status() and "jit" or "interp"

local MAX_KEYS = 100000
local keys

-- Keys shaped like Prometheus series (about 55 bytes), the same list in
-- every worker and figure.
function M.get_keys()
    if not keys then
        keys = {}
        for i = 1, MAX_KEYS do
            keys[i] = fmt(
                'bench_requests_total{route="/api/v1/item/%06d",'
                    .. 'code="200"}',
                i
            )
        end
    end
    return keys
end

-- A counter of contender `name` ("proj" or "ref") on dict `dict_name`;
-- interval nil: manual.
function M.new_counter(name, dict_name, interval)
    if name == "proj" then
        return counter.new(dict_name, interval)
    elseif name == "ref" then
        return reference.new(dict_name, interval)
    end
    error("unknown contender " .. tostring(name))
end

-- The contenders in the order of this round: rotated, so that none always
-- runs first (after a GC, on a cold cache) or last.
function M.rotate(list, round)
    local n, out = #list, {}
    local shift = (round - 1) % n
    for i = 1, n do
        out[i] = list[(i - 1 + shift) % n + 1]
    end
    return out
end

function M.line(out, figure, size, contender, round, metric, value, unit)
    out[#out + 1] = fmt(
        "%s,%s,%d,%s,%d,%s,%.6g,%s",
        figure,
        M.MODE,
        size,
        contender,
        round,
        metric,
        value,
        unit
    )
end

-- The request's arguments, its n (keys) and its round.
function M.args()
    local a = ngx.req.get_uri_args()
    return a, tonumber(a.n) or 0, tonumber(a.round) or 1
end

-- A fresh copy of a loop's code per contender: LuaJIT keeps traces per
-- prototype, so contenders never share (or fight over) one trace.
function M.compile(src, name)
    return assert(loadstring(src, "=" .. name))()
end

-- The increment loops of the hot path and the contention figure.
M.INCR_SRC = [[
return function(c, keys, n, passes)
    for _ = 1, passes do
        for i = 1, n do
            c:incr(keys[i], 1)
        end
    end
end
]]

M.INCR_PLAIN_SRC = [[
return function(dict, keys, n, passes)
    for _ = 1, passes do
        for i = 1, n do
            dict:incr(keys[i], 1, 0)
        end
    end
end
]]

return M
