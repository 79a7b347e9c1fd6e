-- The shared stage lives in a zone of its own (lua_shared_dict
-- resty_counter_stage), so a counter dict holds exactly what the original
-- module puts there. Here, with the stage on:
--   * an exporter in the style of nginx-lua-prometheus (get_keys(0), sort,
--     "key value" lines) prints only valid Prometheus text lines, one per
--     counter;
--   * a reset loop that deletes every key leaves the dict empty: nothing
--     comes back;
--   * a dict holds as many counter keys before its first eviction as with
--     the original (1m and 10m, ~45-byte keys);
--   * reloads that resize the counter dict, change the worker count, and
--     find the stage zone's directory key overwritten or deleted leak
--     nothing: the stage zone's free space comes back, and counts stay
--     exact.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local INTERVAL = 0.1

-- Whether `line` is a Prometheus text-format sample line:
-- name{label="value",...} number (no timestamp).
local function prometheus_sample(line)
    local name, rest = line:match("^([%a_:][%w_:]*)(.*)$")
    if not name then
        return false, "no metric name"
    end
    if rest:sub(1, 1) == "{" then
        local pos = 2
        while rest:sub(pos, pos) ~= "}" do
            local label, after = rest:match('^([%a_][%w_]*)="()', pos)
            if not label then
                return false, "bad label at " .. pos
            end
            pos = after
            while true do
                local c = rest:sub(pos, pos)
                if c == "" or c == "\n" then
                    return false, "unterminated label value"
                elseif c == "\\" then
                    pos = pos + 2
                elseif c == '"' then
                    pos = pos + 1
                    break
                else
                    pos = pos + 1
                end
            end
            if rest:sub(pos, pos) == "," then
                pos = pos + 1
            end
        end
        rest = rest:sub(pos + 1)
    end
    local value = rest:match("^ (%S+)$")
    if not value or not tonumber(value) then
        return false, "no value"
    end
    if line:find("%z") or line:find("[\1-\31]") then
        return false, "control byte"
    end
    return true
end

local EXPORTER = [[
  lua_shared_dict resty_counter_stage 16m;
  lua_shared_dict metrics 1m;
  init_worker_by_lua_block {
    metrics = require("resty.counter").new("metrics", ]] .. INTERVAL .. [[)
  }
]]

local EXPORTER_SERVER = [[
  location = /hit {
    content_by_lua_block {
      metrics:incr('http_requests_total{route="/r' .. ngx.var.arg_r
                   .. '",code="200"}')
      ngx.say("ok")
    }
  }
  location = /metrics {
    content_by_lua_block {
      metrics:sync()
      local dict = ngx.shared.metrics
      local keys = dict:get_keys(0)
      table.sort(keys)
      for _, k in ipairs(keys) do
        ngx.print(k, " ", dict:get(k), "\n")
      end
    }
  }
  location = /reset {
    content_by_lua_block {
      local dict = ngx.shared.metrics
      for _, k in ipairs(dict:get_keys(0)) do
        dict:delete(k)
      end
      ngx.say(#dict:get_keys(0))
    }
  }
]]

describe("#integration the stage's own zone", function()
    local srv

    after_each(nginx.stop_all)

    it(
        "an exporter's scrape prints only valid Prometheus lines, one per "
            .. "counter; a reset loop leaves the dict empty",
        function()
            srv = nginx.start({
                workers = 4,
                http = EXPORTER,
                server = EXPORTER_SERVER,
            })
            local ROUTES, N = 20, 400
            for i = 1, N do
                local status = srv:get("/hit?r=" .. i % ROUTES)
                assert.equal(200, status)
            end
            local body
            -- Every worker's buffer reaches the dict within two intervals.
            H.poll(10, function()
                local status
                status, body = srv:get("/metrics")
                assert.equal(200, status)
                local total = 0
                for v in body:gmatch(" (%d+)\n") do
                    total = total + tonumber(v)
                end
                return total == N
            end)
            local lines = 0
            for line in body:gmatch("([^\n]*)\n") do
                local ok, why = prometheus_sample(line)
                assert.is_true(ok, ("%s: %q"):format(why or "", line))
                lines = lines + 1
            end
            assert.equal(ROUTES, lines, body)
            local log = srv:error_log()
            assert.equal(
                4,
                H.count_matches(
                    log,
                    'share a stage in zone "resty_counter_stage"'
                )
            )

            local status, left = srv:get("/reset")
            assert.equal(200, status)
            assert.equal("0", left:match("%d+"))
            H.sleep(5 * INTERVAL)
            status, body = srv:get("/metrics")
            assert.equal(200, status)
            assert.equal("", body, "a key came back after the reset")
            assert.same({}, H.crash_lines(srv:error_log()))
        end
    )

    it(
        "a dict holds as many counter keys before its first eviction as "
            .. "with the original (1m and 10m)",
        function()
            srv = nginx.start({
                workers = 2,
                http = [[
  lua_shared_dict resty_counter_stage 64m;
  lua_shared_dict new_1m 1m;
  lua_shared_dict orig_1m 1m;
  lua_shared_dict new_10m 10m;
  lua_shared_dict orig_10m 10m;
]],
                server = [[
  location = /fill {
    content_by_lua_block {
      local name, step = ngx.var.arg_d, tonumber(ngx.var.arg_step)
      local c = name:sub(1, 4) == "new_"
        and require("resty.counter").new(name)
        or require("]]
                    .. H.ORIGINAL
                    .. [[").new(name)
      local dict = ngx.shared[name]
      local written = 0
      while true do
        for i = written + 1, written + step do
          -- 45-byte keys, as a labelled metric name
          c:incr(('http_requests_total{route="/r%010d",c="2"}'):format(i))
        end
        c:sync()
        if #dict:get_keys(0) < written + step then
          break -- this batch evicted
        end
        written = written + step
      end
      local stats = c.stats and c:stats()
      ngx.say(written, " ", stats and tostring(stats.stage) or "-")
    }
  }
]],
            })
            for _, size in ipairs({ { "1m", 10 }, { "10m", 100 } }) do
                local held = {}
                for _, kind in ipairs({ "orig", "new" }) do
                    local status, body = srv:get(
                        "/fill?d="
                            .. kind
                            .. "_"
                            .. size[1]
                            .. "&step="
                            .. size[2],
                        nil,
                        120
                    )
                    assert.equal(200, status, body)
                    local n, stage = body:match("^(%d+) (%S+)")
                    held[kind] = tonumber(n)
                    if kind == "new" then
                        assert.equal("true", stage, "the stage is on")
                    end
                end
                io.stderr:write(
                    ("capacity %s: %d counter keys, the original %d\n"):format(
                        size[1],
                        held.new,
                        held.orig
                    )
                )
                assert.is_true(
                    held.new >= 0.99 * held.orig,
                    ("%s: %d keys, the original %d"):format(
                        size[1],
                        held.new,
                        held.orig
                    )
                )
            end
            assert.same({}, H.crash_lines(srv:error_log()))
        end
    )

    it(
        "reloads that resize the dict and change the worker count, with the "
            .. "directory key overwritten then deleted, leak nothing",
        function()
            local function conf(workers, dict_size)
                return {
                    workers = workers,
                    http = [[
  lua_shared_dict resty_counter_stage 8m;
  lua_shared_dict cyc ]]
                        .. dict_size
                        .. [[;
  init_worker_by_lua_block {
    cyc = require("resty.counter").new("cyc", ]]
                        .. INTERVAL
                        .. [[)
  }
]],
                    server = [[
  location = /hit {
    content_by_lua_block {
      cyc:incr("hits")
      ngx.say("ok")
    }
  }
  location = /state {
    content_by_lua_block {
      local s = cyc:stats()
      ngx.say(ngx.shared.cyc:get("hits") or 0, " ",
              ngx.shared.resty_counter_stage:free_space(), " ",
              s.stage and 1 or 0)
    }
  }
  location = /forge {
    content_by_lua_block {
      local z = ngx.shared.resty_counter_stage
      assert(z:set("resty.counter.directory", 12345))
      assert(z:delete("resty.counter.directory"))
      ngx.say("ok")
    }
  }
]],
                }
            end
            -- Waits until the dict holds `want` hits and the worker that
            -- answers uses the stage; returns the zone's free space then.
            local function settle(want)
                local free
                H.poll(15, function()
                    local _, body = srv:get("/state")
                    local hits, f, staged = body:match("^(%S+) (%d+) (%d)")
                    free = tonumber(f)
                    return tonumber(hits) == want and staged == "1"
                end)
                return free
            end
            srv = nginx.start(conf(2, "1m"))
            local frees = {}
            for cycle = 1, 6 do
                for _ = 1, 50 do
                    assert.equal(200, (srv:get("/hit")))
                end
                -- Each reload below resizes the dict: a new zone, empty.
                assert.equal(50, tonumber(settle(50) and 50), "exact")
                -- The orphaned region of the previous dict is freed by a
                -- sweep at a fold's end, within a few intervals.
                H.sleep(5 * INTERVAL)
                frees[cycle] = settle(50)
                assert.equal(200, (srv:get("/forge")))
                srv:reload(
                    conf(
                        cycle % 2 == 0 and 2 or 3,
                        cycle % 2 == 0 and "1m" or "2m"
                    )
                )
            end
            for cycle = 2, #frees do
                assert.is_true(
                    frees[cycle] >= frees[2],
                    ("free space %d after cycle %d, %d after cycle 2"):format(
                        frees[cycle],
                        cycle,
                        frees[2]
                    )
                )
            end
            assert.same({}, H.crash_lines(srv:error_log()))
        end
    )
end)
