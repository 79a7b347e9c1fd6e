-- A tiny HTTP/1.0 GET client for specs running inside nginx
-- (spec/run-in-nginx). It talks to 127.0.0.1 on the port of the server
-- that runs the specs, so specs can reach the locations of
-- spec/in_nginx/locations.conf.
--
--   local http = require "spec.support.http"
--   local status, body, headers = http.get("/__ping")
--   http.get(path, { headers = { ["X-A"] = "1" }, timeout = 5000, port = 8080 })
--
-- Returns status (number), body, headers (lower-case names), or nil, err.
-- The port comes from ngx.var.server_port; timers have no request, so
-- there it is the port seen by an earlier call, or opts.port.
-- luacheck: globals ngx
local ngx = ngx
local http_message = require("spec.support.http_message")

local _M = {}

local DEFAULT_TIMEOUT_MS = 10000
local server_port

function _M.port()
    if not server_port then
        if ngx.get_phase() == "timer" then
            error(
                "http.get in a timer: no server port known yet, pass opts.port",
                3
            )
        end
        server_port = tonumber(ngx.var.server_port)
    end
    return server_port
end

local function exchange(sock, port, request)
    local ok, err = sock:connect("127.0.0.1", port)
    if not ok then
        return nil, "connect: " .. err
    end
    ok, err = sock:send(request)
    if not ok then
        return nil, "send: " .. err
    end
    local raw
    raw, err = sock:receive("*a")
    if not raw then
        return nil, "receive: " .. err
    end
    return raw
end

function _M.get(path, opts)
    opts = opts or {}
    local port = opts.port or _M.port()
    local sock = ngx.socket.tcp()
    sock:settimeout(opts.timeout or DEFAULT_TIMEOUT_MS)
    local request = http_message.request(path, opts.headers)
    local raw, err = exchange(sock, port, request)
    sock:close()
    if not raw then
        return nil, "GET " .. path .. ": " .. err
    end
    return http_message.parse(raw)
end

return _M
