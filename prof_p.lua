package.path = "./?.lua;" .. package.path
local nginx = require("spec.support.nginx")
local socket = require("socket")
local HTTP = [[
lua_shared_dict scale ${DICT_MB}m;
lua_shared_dict scale_stats 1m;
init_worker_by_lua_block {
    if ngx.worker.id() == 1 then local p = require("jit.p"); p.start("vl2i1", "/tmp/prof/jitp.txt"); ngx.timer.at(7, function() p.stop() end) end
    local mode, K = "${MODE}", ${KEYS}
    local keys = {}
    for i = 1, K do
        keys[i] = 'scale_requests_total{route="r' .. i .. '",code="200"}'
    end
    local c
    if mode == "original" then
        c = require("bench.reference_counter").new("scale", 1)
    elseif mode == "project" then
        c = assert(require("resty.counter").new("scale", 1, nil,
                                                { stage_bytes = ${STAGE_BYTES} }))
    elseif mode == "direct" then
        c = assert(require("resty.counter").new("scale", 1, nil,
                                                { stage = false }))
    end
    local stats = ngx.shared.scale_stats
    local id = "w" .. ngx.worker.id()
    local writes, sink = 0, 0
    assert(ngx.timer.every(1, function(premature)
        if premature then
            return
        end
        if c then
            for i = 1, K do
                c:incr(keys[i], 1)
            end
        else
            for i = 1, K do
                sink = sink + #keys[i]
            end
        end
        if mode == "original" then
            writes = writes + K
        elseif c then
            writes = c:stats().keys_flushed or 0
        end
        stats:set(id, writes)
        if c and c.stats and mode ~= "original" then local s = c:stats(); stats:set("s" .. id, (function(t) local o = {} for k2, v2 in pairs(t) do o[#o+1] = k2 .. "=" .. tostring(v2) end table.sort(o) return table.concat(o, " ") end)(s)) end
        stats:set("sink", sink)
    end))
}
]]
local SERVER = [[
location = /s { content_by_lua_block { ngx.say(ngx.shared.scale_stats:get("s" .. ngx.var.args)) } }
location = /writes {
    content_by_lua_block {
        local stats, sum = ngx.shared.scale_stats, 0
        for _, k in ipairs(stats:get_keys(0)) do
            if k:sub(1, 1) == "w" then
                sum = sum + stats:get(k)
            end
        end
        ngx.say(sum)
    }
}
]]
local mode, n, k = arg[1], tonumber(arg[2]), tonumber(arg[3])
local secs = tonumber(arg[4] or 5)
local sb = k * 192 * 4 + 1048576
local dict_mb = math.max(16, math.ceil(k * 600 / 1e6) + 8) + math.ceil(sb / 2 ^ 20)
local srv = nginx.start({ workers = n, http = (HTTP:gsub("%${([%w_]+)}", {MODE = mode, KEYS = tostring(k), DICT_MB = tostring(dict_mb), STAGE_BYTES = tostring(sb)})), server = SERVER })
socket.sleep(3)
local pids = srv:worker_pids()
local function ns()
  local s = 0
  for _, p in ipairs(pids) do local f = io.open("/proc/"..p.."/schedstat"); s = s + tonumber(f:read("*a"):match("%d+")); f:close() end
  return s
end
local cmd = os.getenv("PERF")
local a = ns()
if cmd then os.execute(cmd:gsub("PIDS", table.concat(pids, ","))) else socket.sleep(secs) end
local b = ns()
print(mode, n, k, ("cpu %.1f ms/s"):format((b - a) / 1e6 / secs))
local _, body = srv:get("/writes"); print("writes", body)
if os.getenv("STATS") then for i = 0, n - 1 do local _, b = srv:get("/s?w" .. i); print(b) end end
for l in srv:error_log():gmatch("[^\n]+") do if l:find("stage") or l:find("%[error%]") or l:find("%[warn%]") then print(l) end end
srv:stop()
