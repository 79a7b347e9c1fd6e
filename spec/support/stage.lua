-- The shared stage's exports (src/ffi_stage.rs) from Lua, for specs: one
-- attachment per dict and worker, cached in this module.
--
--   local stage = require "spec.support.stage"
--   local h, err = stage.attach("stage")     -- handle, or nil, code, message
--                                            -- (its region of the stage zone
--                                            -- resty_counter_stage, or of
--                                            -- the zone named second)
--   stage.publish(h, key, delta)             -- 0 staged, 1 full, 2 too long
--                                            -- (a batch of one pair), and
--                                            -- the slot's ref when staged
--   stage.publish_ref(h, ref, delta)         -- 0 staged, 1 full, 3 stale
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
    "lease_owner",
    "published",
    "folded",
    "full",
    "lost_events",
    "lost_amount",
    "fill",
    "my_folded",
    "pid",
    "zone_regions",
    "orphans_lost_events",
    "orphans_lost_amount",
}

local lib
local handles = {}
local flushers = {}
local err_out = ffi.new("int32_t[1]")
local one_key = ffi.new("const unsigned char *[1]")
local one_len = ffi.new("size_t[1]")
local one_delta = ffi.new("double[1]")
local one_rc = ffi.new("int32_t[1]")
local one_ref = ffi.new("double[1]")
-- Structs of the shim's cdef, once it is declared (by _M.lib).
local attach_out, fold_out, info_out

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
    return ffi.string(_M.lib().resty_counter_strerror(code))
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
    attach_out = attach_out or ffi.new("resty_counter_attach_result")
    local h = l.resty_counter_stage_attach(
        f,
        zone[1],
        zone_name,
        #zone_name,
        0,
        attach_out
    )
    if h == nil then
        return nil, attach_out.code, _M.strerror(attach_out.code)
    end
    h = ffi.gc(h, function(p)
        l.resty_counter_stage_free(p)
    end)
    flushers[h] = f
    handles[key] = h
    return h
end

function _M.publish(h, key, delta)
    one_key[0], one_len[0], one_delta[0] = key, #key, delta
    local rc = _M.lib()
        .resty_counter_stage_publish_batch(h, one_key, one_len, one_delta, 1, one_rc, one_ref)
    if rc < 0 then
        return rc
    end
    return one_rc[0], one_ref[0]
end

-- A batch of one pair by slot ref: 0 staged, 1 full, 3 stale, or a
-- negative code.
function _M.publish_ref(h, ref, delta)
    one_ref[0], one_delta[0] = ref, delta
    local rc = _M.lib()
        .resty_counter_stage_publish_refs(h, one_ref, one_delta, 1, one_rc)
    if rc < 0 then
        return rc
    end
    return one_rc[0]
end

-- One whole round (the manual sync's fold): folds even when another
-- worker holds the lease.
function _M.fold(h, lease_ms)
    fold_out = fold_out or ffi.new("resty_counter_fold_result")
    local rc = _M.lib()
        .resty_counter_stage_fold(h, flushers[h], 1, lease_ms or 200, 0, fold_out)
    if rc < 0 then
        return rc
    end
    return fold_out.written
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
