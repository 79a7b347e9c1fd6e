-- The original lua-resty-counter's algorithm, written for this benchmark
-- from its description, so that the project is measured side by side
-- against it in the same nginx:
--
--   * one Lua table per dict and worker holds the increments;
--   * incr adds into that table (no lock, no FFI);
--   * sync walks the table with pairs(), writes each (key, delta) with
--     dict:incr(key, delta, 0), then clears the table;
--   * the automatic sync is ngx.timer.every(interval, sync): the whole
--     table in one go, never yielding.
--
-- It keeps the original's weak points on purpose (no input checks, a NaN
-- step poisons the key, a failed write is lost): it is a yardstick, not a
-- counter to use.

local ngx = ngx
local pairs = pairs
local error = error
local tostring = tostring
local setmetatable = setmetatable
local clear_tab = require "table.clear"

local _M = { _VERSION = "reference" }
local mt = { __index = _M }

local states = {}  -- dict name -> the one state of this worker

local function sync(_, self)
    local dict, t = self.dict, self.increments
    local ok = true
    for k, v in pairs(t) do
        local _, err = dict:incr(k, v, 0)
        if err then
            ngx.log(ngx.WARN, "error increasing counter in shdict key: ", k,
                    ", err: ", err)
            ok = false
        end
    end
    clear_tab(t)
    return ok
end

function _M.new(shdict_name, sync_interval)
    local dict = ngx.shared[shdict_name]
    if not dict then
        error("shared dict \"" .. tostring(shdict_name) .. "\" not defined", 2)
    end
    local self = states[shdict_name]
    if not self then
        self = setmetatable({ dict = dict, increments = {} }, mt)
        states[shdict_name] = self
        if sync_interval then
            local ok, err = ngx.timer.every(sync_interval, sync, self)
            if not ok then
                error("cannot start the sync timer: " .. tostring(err), 2)
            end
        end
    end
    return self
end

function _M:incr(key, step)
    local t = self.increments
    t[key] = (t[key] or 0) + (step or 1)
    return true
end

function _M:sync()
    return sync(false, self)
end

function _M:get(key)
    return self.dict:get(key)
end

return _M
