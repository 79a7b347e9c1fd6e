-- The shared stage's exports (src/ffi_stage.rs) from Lua, for specs: one
-- attachment per dict and worker, cached in this module.
--
--   local stage = require "spec.support.stage"
--   local h, err = stage.attach("stage")     -- handle, or nil, code, message
--                                            -- (its region of the stage zone
--                                            -- resty_counter_stage, or of
--                                            -- the zone named second)
--   stage.publish(h, key, delta)             -- 0 staged, 1 full, 2 too long
--   stage.fold(h, lease_ms)                  -- written count or negative code
--                                            -- (folds through a flusher of
--                                            -- the same dict, as a sync does)
--   stage.info(h)                            -- table of named fields
-- luacheck: globals ngx
local ngx = ngx
local ffi = require("ffi")
local counter = require("resty.counter")

local _M = {}

-- The fields of resty_counter_stage_report (the shim's cdef).
local INFO = {
    "offset",
    "region_bytes",
    "anchor",
    "slots",
    "key_bytes",
    "created",
    "lease_owner",
    "published",
    "folded",
    "full",
    "too_long",
    "reclaimed",
    "lost_events",
    "lost_amount",
    "fill",
    "fold_rounds",
    "takeovers",
    "my_folded",
    "pid",
    "zone_regions",
    "zone_region_bytes",
    "orphans_lost_events",
    "orphans_lost_amount",
}

local lib
local handles = {}
local flushers = {}
local err_out = ffi.new("int32_t[1]")
local fold_out = ffi.new("double[3]")
local info_out -- a resty_counter_stage_report, once the cdef is declared

-- The library; `dict_name` (default "counters") names any shared dict of
-- this nginx, for the new() that loads it and declares the shim's cdef.
function _M.lib(dict_name)
    if not lib then
        assert(counter.new(dict_name or "counters"))
        local path =
            assert(package.searchpath("libresty_counter", package.cpath))
        lib = ffi.load(path)
    end
    return lib
end

function _M.strerror(code)
    return ffi.string(_M.lib().resty_counter_stage_strerror(code))
end

-- Attaches the dict `dict_name` to its region of the stage zone
-- `zone_name` (default resty_counter_stage), or of the dict `zone_udata`
-- comes from while the zone is named `zone_name` (to test the name check);
-- cached per pair.
function _M.attach(dict_name, zone_name, zone_udata_of)
    zone_name = zone_name or "resty_counter_stage"
    local key = dict_name .. "\0" .. zone_name .. "\0" .. (zone_udata_of or "")
    if handles[key] then
        return handles[key]
    end
    local l = _M.lib(dict_name)
    local sub = ngx.config.subsystem or "http"
    local f = assert(
        l.resty_counter_flusher_new(
            sub,
            #sub,
            ngx.shared[dict_name][1],
            err_out
        )
    )
    f = ffi.gc(f, function(p)
        l.resty_counter_flusher_free(p)
    end)
    local zone = ngx.shared[zone_udata_of or zone_name]
    local h = l.resty_counter_stage_attach(
        f,
        zone[1],
        zone_name,
        #zone_name,
        0,
        err_out
    )
    if h == nil then
        return nil, err_out[0], _M.strerror(err_out[0])
    end
    h = ffi.gc(h, function(p)
        l.resty_counter_stage_free(p)
    end)
    flushers[h] = f
    handles[key] = h
    return h
end

function _M.publish(h, key, delta)
    return _M.lib().resty_counter_stage_publish(h, key, #key, delta)
end

-- One whole round (the manual sync's fold): folds even when another
-- worker holds the lease.
function _M.fold(h, lease_ms)
    local rc = _M.lib()
        .resty_counter_stage_fold(h, flushers[h], 1, lease_ms or 200, 0, fold_out)
    if rc < 0 then
        return rc
    end
    return tonumber(fold_out[0])
end

function _M.info(h)
    local l = _M.lib()
    info_out = info_out or ffi.new("resty_counter_stage_report")
    local rc = l.resty_counter_stage_info(h, info_out)
    assert(rc == 0, "stage_info: " .. tostring(rc))
    local t = {}
    for _, name in ipairs(INFO) do
        t[name] = info_out[name]
    end
    return t
end

return _M
