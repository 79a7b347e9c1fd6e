-- The original lua-resty-counter's algorithm, written from its description
-- (not copied), as the yardstick of this project: `make bench` measures the
-- project side by side with it, and the specs run the same scenarios
-- against it to show where it loses or corrupts counts. Not a counter to
-- use: it keeps the original's weak points on purpose.
--
--   * one Lua table of increments per dict name, module-level, so it is
--     shared by every new() in a worker (and copied into each worker when
--     filled in the master before fork);
--   * incr adds into that table: no lock, no FFI, no input checks (a NaN
--     step poisons the key);
--   * sync() is `dict:incr(k, v, 0)` for every buffered key, then the
--     table is cleared, whatever each incr answered: a failed write is
--     logged and its delta is gone;
--   * automatic sync is `ngx.timer.every(interval, sync)`: the whole table
--     in one go, never yielding. The timer callback ignores `premature`,
--     so when a worker exits gracefully the every-timer still runs one last
--     sync; a counter without an interval has no timer and nothing flushes
--     it;
--   * no retention, no validation of keys or steps, no stats().

-- luacheck: globals ngx
local pairs = pairs
local tonumber = tonumber
local setmetatable = setmetatable

local clear_tab = require("table.clear") -- as the original: LuaJIT only

local _M = {}
local mt = { __index = _M }

local buffers = {} -- dict name -> { key -> summed step }
local timer_started = {} -- dict name -> true once this worker has a timer

local function sync(_, self) -- first argument (premature) ignored
    local ok = true
    for k, v in pairs(self.increments) do
        local _, err = self.dict:incr(k, v, 0)
        if err then
            ngx.log(
                ngx.WARN,
                "error increasing counter in shdict key: ",
                k,
                ", err: ",
                err
            )
            ok = false
        end
    end
    clear_tab(self.increments)
    return ok
end

function _M.new(shdict_name, sync_interval)
    local dict = ngx.shared[shdict_name]
    if not dict then
        error('shared dict "' .. tostring(shdict_name) .. '" not defined', 2)
    end
    buffers[shdict_name] = buffers[shdict_name] or {}
    local self = setmetatable({
        dict = dict,
        increments = buffers[shdict_name],
    }, mt)
    if sync_interval then
        sync_interval = tonumber(sync_interval)
        if not sync_interval or sync_interval < 0 then
            error("expect sync_interval to be a positive number", 2)
        end
        if not timer_started[shdict_name] then
            local ok, err = ngx.timer.every(sync_interval, sync, self)
            if not ok then
                ngx.log(ngx.ERR, "original counter: no sync timer: ", err)
            else
                timer_started[shdict_name] = true
            end
        end
    end
    return self
end

function _M:sync()
    return sync(false, self)
end

function _M:incr(key, step)
    step = step or 1
    local v = self.increments[key]
    if v then
        step = step + v
    end
    self.increments[key] = step
    return true
end

function _M:reset(key, number)
    if not number then
        return nil, "expect a number at #2"
    end
    return self.dict:incr(key, -number, number)
end

function _M:get(key)
    return self.dict:get(key)
end

function _M:get_keys(max_count)
    return self.dict:get_keys(max_count)
end

return _M
