-- Helpers for the integration specs (spec/integration/*_spec.lua): one part
-- runs inside nginx workers (encode, escape, dump), the other in the busted
-- process that drives nginx from outside (decode, wrk, polling, /proc).
-- Required as "spec.integration.helpers" on both sides.

-- luacheck: globals ngx
local _M = {}

local concat, sort, format = table.concat, table.sort, string.format

-- Module names the scenarios run against.
_M.NEW = "resty.counter"
_M.ORIGINAL = "bench.reference_counter"

_M.LONG = os.getenv("LONG") == "1"

---------------------------------------------------------------------------
-- Both sides
---------------------------------------------------------------------------

-- Every byte outside [A-Za-z0-9_.-] as %XX: plain ASCII, one line, and
-- exactly what ngx.unescape_uri decodes back (it turns '+' into a space,
-- so '+' is escaped too).
function _M.escape(s)
    return (
        s:gsub("[^%w_%.%-]", function(c)
            return format("%%%02X", c:byte())
        end)
    )
end

function _M.unescape(s)
    return (
        s:gsub("%%(%x%x)", function(h)
            return string.char(tonumber(h, 16))
        end)
    )
end

local function num(v)
    if type(v) == "number" then
        return format("%.17g", v)
    end
    return tostring(v)
end
_M.num = num

-- A flat table as "name=value" lines, sorted, numbers at full precision.
function _M.encode(t)
    local lines = {}
    for k, v in pairs(t) do
        lines[#lines + 1] = tostring(k) .. "=" .. num(v)
    end
    sort(lines)
    return concat(lines, "\n") .. "\n"
end

function _M.decode(body)
    local t = {}
    for k, v in (body or ""):gmatch("([^=\n]+)=([^\n]*)") do
        t[k] = tonumber(v) or v
    end
    return t
end

---------------------------------------------------------------------------
-- Inside nginx
---------------------------------------------------------------------------

-- Every key of a dict with its value, as "escaped-key value" lines.
function _M.dump(dict)
    local lines = {}
    for _, k in ipairs(dict:get_keys(0)) do
        local v = dict:get(k)
        if v ~= nil then
            lines[#lines + 1] = _M.escape(k) .. " " .. num(v)
        end
    end
    sort(lines)
    return concat(lines, "\n") .. "\n"
end

-- Stats of a counter (when it has stats()) and the values of chosen keys,
-- `named` mapping a short name to a key, as one response body.
-- Inside nginx: flushes counter c now (manual), or waits until its own
-- timer has swapped the buffer out and drained it in slices (auto).
function _M.flushed(c, auto)
    if not auto then
        return c:sync()
    end
    repeat
        ngx.sleep(0.01)
    until c:stats().buffered_keys == 0
end

function _M.report(c, named)
    local t = {}
    if c.stats then
        for k, v in pairs(c:stats()) do
            t["stats." .. k] = v
        end
    end
    for name, key in pairs(named or {}) do
        local v = c:get(key)
        t["value." .. name] = v == nil and "nil" or v
    end
    t.pid = ngx.worker.pid()
    return _M.encode(t)
end

---------------------------------------------------------------------------
-- In the busted process
---------------------------------------------------------------------------

-- "escaped-key value" lines back into { raw key = number }.
function _M.parse_dump(body)
    local t = {}
    for k, v in (body or ""):gmatch("([^ \n]+) ([^\n]+)") do
        t[_M.unescape(k)] = tonumber(v) or v
    end
    return t
end

local function sh(cmd)
    local p = assert(io.popen(cmd .. " 2>&1"))
    local out = p:read("*a")
    local ok, _, code = p:close()
    if type(ok) == "number" then -- Lua 5.1 returns the status
        code = ok
    end
    return out, code
end
_M.sh = sh

function _M.write_file(path, text)
    local f = assert(io.open(path, "wb"))
    f:write(text)
    f:close()
end

function _M.read_file(path)
    local f = io.open(path, "rb")
    if not f then
        return nil
    end
    local s = f:read("*a")
    f:close()
    return s
end

function _M.sleep(seconds)
    require("socket").sleep(seconds)
end

-- Calls check() until it returns a truthy value or `timeout` seconds pass;
-- returns the last value. A wait, never an assertion on time.
function _M.poll(timeout, check)
    local socket = require("socket")
    local deadline = socket.gettime() + timeout
    while true do
        local v = check()
        if v or socket.gettime() > deadline then
            return v
        end
        socket.sleep(0.05)
    end
end

-- Runs wrk against `url` with a request script; returns its output.
function _M.wrk(opts)
    local script = os.tmpname()
    _M.write_file(script, opts.script)
    local out = sh(
        format(
            "wrk -t%d -c%d -d%ds --timeout 10s -s %s %s",
            opts.threads or 2,
            opts.connections or 16,
            opts.seconds or 3,
            script,
            opts.url
        )
    )
    os.remove(script)
    return out
end

-- Resident set size of a process in KiB, and its anonymous part.
function _M.rss_kib(pid)
    local status = assert(_M.read_file("/proc/" .. pid .. "/status"))
    return tonumber(status:match("VmRSS:%s*(%d+)")),
        tonumber(status:match("RssAnon:%s*(%d+)"))
end

-- CRC-32 (IEEE, as zlib and nginx's ngx_crc32_short): the hash a shared
-- dict files its keys under. Needs LuaJIT's `bit`.
local crc_table
function _M.crc32(s)
    local bit = require("bit")
    local band, bxor, rshift = bit.band, bit.bxor, bit.rshift
    if not crc_table then
        crc_table = {}
        for i = 0, 255 do
            local c = i
            for _ = 1, 8 do
                c = band(c, 1) == 1 and bxor(0xEDB88320, rshift(c, 1))
                    or rshift(c, 1)
            end
            crc_table[i] = c
        end
    end
    local c = 0xFFFFFFFF
    for i = 1, #s do
        c = bxor(crc_table[band(bxor(c, s:byte(i)), 0xFF)], rshift(c, 8))
    end
    return bit.tobit(bxor(c, 0xFFFFFFFF)) % 2 ^ 32
end

-- The number of keys of a table: the shim's own counter of them.
_M.count = require("resty.counter.pure").nkeys

-- The keys of `t` that share their CRC-32 with another key of `t`.
function _M.crc32_colliding(t)
    local by_crc, out = {}, {}
    for k in pairs(t) do
        local h = _M.crc32(k)
        by_crc[h] = by_crc[h] or {}
        table.insert(by_crc[h], k)
    end
    for _, keys in pairs(by_crc) do
        if #keys > 1 then
            for _, k in ipairs(keys) do
                out[k] = true
            end
        end
    end
    return out
end

-- Lines of an error log that mean a worker crashed or nginx gave up.
function _M.crash_lines(log)
    local bad = {}
    for line in log:gmatch("[^\n]+") do
        if
            line:find("exited on signal", 1, true)
            or line:find("[alert]", 1, true)
            or line:find("[emerg]", 1, true)
            or line:find("[crit]", 1, true)
        then
            bad[#bad + 1] = line
        end
    end
    return bad
end

function _M.count_matches(text, plain)
    local n, pos = 0, 1
    while true do
        local s, e = text:find(plain, pos, true)
        if not s then
            return n
        end
        n, pos = n + 1, e + 1
    end
end

return _M
