-- HTTP/1.0 messages for the specs' two GET clients: spec/support/http.lua
-- (cosockets, inside nginx) and spec/support/nginx.lua (luasocket, outside).
-- Pure Lua, so both can require it.

local _M = {}

-- A GET request for 127.0.0.1, with optional extra headers.
function _M.request(path, headers)
    local lines = { "GET " .. path .. " HTTP/1.0", "Host: 127.0.0.1" }
    for name, value in pairs(headers or {}) do
        lines[#lines + 1] = name .. ": " .. value
    end
    return table.concat(lines, "\r\n") .. "\r\n\r\n"
end

-- status (number), body, headers (lower-case names); or nil, err.
function _M.parse(raw)
    local head, body = raw:match("^(.-)\r\n\r\n(.*)$")
    local status = tonumber(head and head:match("^HTTP/%d%.%d (%d%d%d)"))
    if not status then
        return nil, "malformed response: " .. raw:sub(1, 200)
    end
    local headers = {}
    for name, value in head:gmatch("\r\n([^:\r\n]+):[ \t]*([^\r\n]*)") do
        headers[name:lower()] = value
    end
    return status, body, headers
end

return _M
