-- resty.counter.pure: what runs in any Lua, with or without ffi and
-- nginx: table.clear and table.nkeys (or plain-Lua stand-ins), keys made
-- printable for log lines, and the original pure-Lua algorithm that a dict
-- which is not a real shared dict (a Lua-table stub in unit tests), a Lua
-- without ffi, or a worker that cannot load the library counts with.

local pairs = pairs

local _M = {}

local clear_tab
do
    local ok, clear = pcall(require, "table.clear")
    clear_tab = ok and clear
        or function(t)
            for k in pairs(t) do
                t[k] = nil
            end
        end
end

local nkeys
do
    local ok, f = pcall(require, "table.nkeys")
    nkeys = ok and f
        or function(t)
            local n = 0
            for _ in pairs(t) do
                n = n + 1
            end
            return n
        end
end

-- A key as it goes into a log line: control and non-ASCII bytes escaped,
-- long keys cut, so one odd key cannot garble or truncate the error log.
local LOG_KEY_MAX = 200
local function printable(key)
    local cut = #key > LOG_KEY_MAX
    local s = cut and key:sub(1, LOG_KEY_MAX) or key
    s = s:gsub("[%c\\\128-\255]", function(c)
        return ("\\x%02x"):format(c:byte())
    end)
    if cut then
        s = s .. "...(" .. #key .. " bytes)"
    end
    return s
end

_M.clear_tab, _M.nkeys, _M.printable = clear_tab, nkeys, printable

---------------------------------------------------------------------------
-- Sync (pure Lua): the original algorithm, for stub dicts and plain Lua.
---------------------------------------------------------------------------
-- Signature of an ngx.timer callback: (premature, self).
function _M.sync_lua(_, self)
    local ok = true
    for k, v in pairs(self.buf) do
        local _, err, forcible = self.dict:incr(k, v, 0)
        if forcible and self.error_metric then
            ngx.log(
                ngx.ERR,
                "increasing counter in shdict: lru eviction: key=",
                printable(k)
            )
            ok = false
        end
        if err then
            ngx.log(
                ngx.WARN,
                "error increasing counter in shdict key: ",
                printable(k),
                ", err: ",
                err
            )
            ok = false
        end
    end
    clear_tab(self.buf)
    if not ok and self.error_metric then
        self.dict:incr(self.error_metric, 1, 0)
    end
    return ok
end

return _M
