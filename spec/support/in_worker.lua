-- Helpers for the specs that run inside an nginx worker (spec/in_nginx/,
-- run by spec/run-in-nginx; the specs' Lua path has the repository root).
--
--   local w = require("spec.support.in_worker")
--   w.error_log_size()               -- bytes in the error log now
--   w.error_log_since(offset)        -- what it got since
--   w.not_at(d, prefix, k, want)     -- keys prefix..1 .. prefix..k of d
--                                    -- not at want (nil: at their index)
--   w.mid_sync(name, prefix, k, opts)
--       -- a counter on dict `name` (synced every 50 ms, new()'s opts)
--       -- with prefix..1 to prefix..k at 1, returned once its automatic
--       -- sync is between two of its slices
--   w.unique(name)                   -- name-<pid>-<time>-: keys no other
--                                    -- run or worker has made
--   w.wait_until(done, seconds)      -- sleeps 10 ms at a time until done()
--                                    -- or the seconds (10) have passed
-- luacheck: globals ngx
local ngx = ngx
local assert = require("luassert")

local _M = {}

local function error_log()
    return assert(io.open(ngx.config.prefix() .. "logs/error.log", "rb"))
end

function _M.error_log_since(offset)
    local f = error_log()
    f:seek("set", offset)
    local text = f:read("*a")
    f:close()
    return text
end

function _M.error_log_size()
    local f = error_log()
    local size = f:seek("end")
    f:close()
    return size
end

function _M.not_at(d, prefix, k, want)
    local n = 0
    for i = 1, k do
        if d:get(prefix .. i) ~= (want or i) then
            n = n + 1
        end
    end
    return n
end

-- The caller's 1 ms sleeps are timers falling due, so the sync pauses
-- after each slice, and the caller runs between two of them. Keys handed
-- over so far: published into the stage, or written straight into the
-- dict (the direct path).
function _M.mid_sync(name, prefix, k, opts)
    local c = require("resty.counter").new(name, 0.05, nil, opts)
    for i = 1, k do
        c:incr(prefix .. i, 1)
    end
    local handed = 0
    for _ = 1, 5000 do
        ngx.sleep(0.001)
        local s = c:stats()
        handed = (s.published or 0) + (s.keys_flushed or 0)
        if handed > 0 then
            break
        end
    end
    assert.is_true(
        handed > 0 and handed < k,
        "not between two slices: " .. handed .. " keys handed over"
    )
    return c
end

function _M.unique(name)
    return name .. "-" .. ngx.worker.pid() .. "-" .. ngx.now() .. "-"
end

function _M.wait_until(done, seconds)
    local deadline = ngx.now() + (seconds or 10)
    repeat
        ngx.sleep(0.01)
        ngx.update_time()
    until done() or ngx.now() > deadline
end

return _M
