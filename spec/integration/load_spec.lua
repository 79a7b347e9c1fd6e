-- Exact under concurrent load.
--
-- 2 and 4 workers, automatic sync every 0.2 s, wrk on loopback for a few
-- seconds over three routes. Each request adds, in log_by_lua, 1 to
-- `hits`, its bytes_sent to `bytes`, 1 to `route:<uri>` and 1 to `k:<n>`
-- (n cycles over a few thousand values, so that every sync has thousands of
-- keys and runs in slices that yield while requests keep arriving). Once
-- wrk has stopped, the dict is read (c:get only, no sync) until it matches
-- what the access log says was served, then read again after several more
-- intervals: nothing lost, nothing counted twice.
--
-- The original algorithm passes this test too (its sync never yields, so
-- there is nothing to interleave); here it guards the sliced sync.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local INTERVAL = 0.2
local SECONDS = H.LONG and 10 or 3
local ROTATING_KEYS = 4000

-- Bodies of different sizes, so `bytes` tells routes apart.
local ROUTES = { ["/r/a"] = 10, ["/r/b"] = 900, ["/r/c"] = 4000 }

local function config()
    local locations = {}
    for uri, size in pairs(ROUTES) do
        locations[#locations + 1] = ("location = %s { return 200 %q; }"):format(
            uri,
            ("x"):rep(size)
        )
    end
    return {
        http = [[
      lua_shared_dict resty_counter_stage 16m;
      lua_shared_dict load 16m;
      log_format counted '$pid $uri $arg_k $bytes_sent';
      init_worker_by_lua_block {
        local H = require "spec.integration.helpers"
        H.load_counter = require(H.NEW).new("load", ]]
            .. INTERVAL
            .. [[)
      }
    ]],
        server = [[
      access_log ${PREFIX}/logs/counted.log counted;
      log_by_lua_block {
        local uri = ngx.var.uri
        if uri:sub(1, 3) ~= "/r/" then
          return
        end
        local c = require("spec.integration.helpers").load_counter
        c:incr("hits")
        c:incr("bytes", tonumber(ngx.var.bytes_sent))
        c:incr("route:" .. uri)
        c:incr("k:" .. ngx.var.arg_k)
      }
      ]] .. table.concat(locations, "\n") .. [[

      location = /read {
        access_log off;
        content_by_lua_block {
          ngx.print(require("spec.integration.helpers")
                    .dump(ngx.shared.load))
        }
      }
    ]],
    }
end

-- wrk cycles over the routes and over k = 0..ROTATING_KEYS-1.
local WRK_SCRIPT = [[
local routes = { "/r/a", "/r/b", "/r/c", "/r/a" }
local n = math.random(0, 1000000)
request = function()
  n = n + 1
  return wrk.format("GET", routes[n % #routes + 1] .. "?k=" .. (n % ]] .. ROTATING_KEYS .. [[))
end
]]

-- What the access log says was served: the expected dict.
local function expected_from_log(path)
    local want, pids, lines = {}, {}, 0
    local function add(k, v)
        want[k] = (want[k] or 0) + v
    end
    for line in assert(io.lines(path)) do
        local pid, uri, k, bytes = line:match("^(%d+) (%S+) (%S+) (%d+)$")
        assert(pid, "unparsable access log line: " .. line)
        lines = lines + 1
        pids[pid] = true
        add("hits", 1)
        add("bytes", tonumber(bytes))
        add("route:" .. uri, 1)
        add("k:" .. k, 1)
    end
    local served_by = 0
    for _ in pairs(pids) do
        served_by = served_by + 1
    end
    return want, lines, served_by
end

-- Keys whose values differ, at most `limit` of them, for a readable failure.
local function differences(want, got, limit)
    local diff = {}
    for k, v in pairs(want) do
        if got[k] ~= v then
            diff[#diff + 1] = ("%s: log %s, dict %s"):format(
                k,
                v,
                tostring(got[k])
            )
        end
    end
    for k, v in pairs(got) do
        if want[k] == nil then
            diff[#diff + 1] = ("%s: not in log, dict %s"):format(k, tostring(v))
        end
    end
    table.sort(diff)
    return { unpack(diff, 1, math.min(#diff, limit or 10)) }, #diff
end

for _, workers in ipairs({ 2, 4 }) do
    describe(
        "#integration exact under concurrent load, " .. workers .. " workers",
        function()
            local srv

            setup(function()
                local c = config()
                c.workers = workers
                srv = nginx.start(c)
            end)

            teardown(function()
                if srv then
                    srv:stop()
                end
            end)

            it(
                "every counter equals the access log after wrk stops, and stays so",
                function()
                    local out = H.wrk({
                        url = srv.url,
                        script = WRK_SCRIPT,
                        seconds = SECONDS,
                        threads = 2,
                        connections = 16,
                    })
                    assert.truthy(out:find("requests in", 1, true), out)

                    local log_path = srv.prefix .. "/logs/counted.log"
                    local want, lines, served_by = expected_from_log(log_path)
                    if os.getenv("VERBOSE") then
                        print(workers .. " workers: " .. lines .. " requests")
                    end
                    assert.is_true(
                        lines > 1000,
                        "too few requests to mean anything:\n" .. out
                    )
                    assert.is_true(
                        served_by >= 2,
                        "only one worker served the load"
                    )

                    local got
                    local function read()
                        local status, body = srv:get("/read")
                        assert.equal(200, status)
                        got = H.parse_dump(body)
                        -- Every key, not only the totals: with the shared stage a fold in
                        -- slices can be between two keys when `hits` already matches.
                        return select(2, differences(want, got)) == 0
                    end
                    -- Every key, not only hits and bytes: a sliced sync may have
                    -- delivered those and still be draining other keys.
                    H.poll(10, function()
                        return read() and select(2, differences(want, got)) == 0
                    end)
                    local diff, n = differences(want, got)
                    assert.same({}, diff, n .. " keys differ")

                    -- Several more intervals: a delta flushed twice would show now.
                    H.sleep(4 * INTERVAL)
                    read()
                    diff, n = differences(want, got)
                    assert.same(
                        {},
                        diff,
                        n .. " keys differ after more intervals"
                    )
                    assert.same({}, H.crash_lines(srv:error_log()))
                end
            )
        end
    )
end
