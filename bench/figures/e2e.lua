-- End to end: five counters per request, the same handler shape for every
-- contender (bench/nginx.conf.in's /e2e/* locations).

local counter = require("resty.counter")
local reference = require("reference_counter")

local ngx = ngx
local concat = table.concat
local tostring = tostring

local M = {}

local E2E_KEYS = {
    'nginx_http_requests_total{host="bench",status="200"}',
    'nginx_http_request_size_bytes_total{host="bench"}',
    'nginx_http_response_size_bytes_total{host="bench"}',
    'nginx_http_request_duration_seconds_bucket{host="bench",le="0.005"}',
    'nginx_http_request_duration_seconds_count{host="bench"}',
}
local K1, K2, K3, K4, K5 = unpack(E2E_KEYS)
local e2e = {}

-- init_worker: the counters a real module would create once per worker.
function M.init_worker()
    if ngx.shared.e2e_proj then
        e2e.proj = counter.new("e2e_proj", 1)
        e2e.ref = reference.new("e2e_ref", 1)
        e2e.plain = ngx.shared.e2e_plain
    end
end

local function count5(c)
    c:incr(K1, 1)
    c:incr(K2, 112)
    c:incr(K3, 3)
    c:incr(K4, 1)
    c:incr(K5, 1)
end

local function count5_plain(d)
    d:incr(K1, 1, 0)
    d:incr(K2, 112, 0)
    d:incr(K3, 3, 0)
    d:incr(K4, 1, 0)
    d:incr(K5, 1, 0)
end

M.e2e = {
    none = function() end,
    proj = function()
        count5(e2e.proj)
    end,
    ref = function()
        count5(e2e.ref)
    end,
    plain = function()
        count5_plain(e2e.plain)
    end,
}

-- What the e2e counters hold, after their last sync.
function M.e2e_counts()
    local out = {}
    for _, name in ipairs({ "proj", "ref", "plain" }) do
        local d = ngx.shared["e2e_" .. name]
        out[#out + 1] = name .. "=" .. tostring(d:get(K1))
    end
    ngx.say(concat(out, " "))
end

return M
