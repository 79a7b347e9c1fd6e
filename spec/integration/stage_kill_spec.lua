-- kill -9 of workers under load, with the shared stage on (4 workers).
--
-- wrk sends requests for several seconds; each request adds 1 to `hits`
-- and 1 to one of a few thousand rotating keys in log_by_lua, and the
-- access log records its worker and time. Meanwhile the spec kills a
-- worker with SIGKILL every second or so, every other time the one that
-- holds the fold lease, and the master starts a new one.
--
-- Checked:
--   * at every read, the dict's `hits` is at most the requests logged by
--     then (read the dict first, then the log): never counted twice;
--   * after quiescence, the loss (logged requests minus `hits`) is at most
--     what the stage reports lost in flight plus what each killed worker
--     can have had buffered. A worker buffers what it served since its last
--     sync began, one interval ago when its timer runs on time; the bound
--     counts the requests it logged in the BUFFERED seconds before its
--     kill (several intervals: timers run late on a loaded 2-core box).

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")
local socket = require("socket")

local WORKERS = 4
local INTERVAL = 0.2
local SECONDS = 8
local KILLS = 5
local BUFFERED = 5 * INTERVAL

local HTTP = [[
  lua_shared_dict resty_counter_stage 16m;
  lua_shared_dict counters 16m;
  lua_shared_dict meta 1m;
  log_format counted '$pid $msec';
  init_worker_by_lua_block {
    local H = require "spec.integration.helpers"
    local c = require(H.NEW).new("counters", ]] .. INTERVAL .. [[)
    H.kill_counter = c
    local meta, pid = ngx.shared.meta, ngx.worker.pid()
    ngx.timer.every(0.05, function(premature)
      if premature then
        return
      end
      local s = c:stats()
      if s.lease_held then
        meta:set("lease", pid)
      end
      local lost = meta:get("lost") or 0
      if (s.lost_in_flight or 0) > lost then
        meta:set("lost", s.lost_in_flight)
      end
    end)
  }
]]

local SERVER = [[
  location = /hit {
    access_log ${PREFIX}/logs/counted.log counted;
    log_by_lua_block {
      local c = require("spec.integration.helpers").kill_counter
      c:incr("hits")
      c:incr("k:" .. (ngx.var.arg_k or "0"))
    }
    return 200 "ok";
  }
  location = /get {
    access_log off;
    content_by_lua_block {
      ngx.say(ngx.shared[ngx.var.arg_d]:get(ngx.var.arg_key) or 0)
    }
  }
]]

local WRK_SCRIPT = [[
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/hit?k=" .. (n % 3000))
end
]]

-- Requests logged: in total, and per pid at or after a time.
local function logged(srv)
    local text = H.read_file(srv.prefix .. "/logs/counted.log") or ""
    local lines = {}
    for pid, msec in text:gmatch("(%d+) ([%d%.]+)\n") do
        lines[#lines + 1] = { pid = pid, t = tonumber(msec) }
    end
    return lines
end

local function get(srv, dict, key)
    local status, body = srv:get("/get?d=" .. dict .. "&key=" .. key)
    assert.equal(200, status, body)
    return tonumber(body)
end

describe("#integration kill -9 with the shared stage", function()
    local srv

    after_each(nginx.stop_all)

    it(
        "never counts twice and loses at most what killed workers buffered",
        function()
            srv =
                nginx.start({ workers = WORKERS, http = HTTP, server = SERVER })
            local script = os.tmpname()
            H.write_file(script, WRK_SCRIPT)
            local out = os.tmpname()
            os.execute(
                ("wrk -t2 -c16 -d%ds --timeout 5s -s %s %s/hit > %s 2>&1 &"):format(
                    SECONDS,
                    script,
                    srv.url,
                    out
                )
            )
            local kills, killed_lease = {}, 0
            local over = {}
            local start = socket.gettime()
            for i = 1, KILLS do
                -- Reads while the load runs: the dict never exceeds what was served.
                local until_t = start + i * (SECONDS - 1) / (KILLS + 1)
                repeat
                    local v = get(srv, "counters", "hits")
                    local n = #logged(srv)
                    if v > n then
                        over[#over + 1] = v .. " > " .. n
                    end
                    socket.sleep(0.1)
                until socket.gettime() >= until_t
                local pids = srv:worker_pids()
                local victim
                if i % 2 == 1 then
                    victim = get(srv, "meta", "lease")
                    if victim == 0 then
                        victim = nil
                    else
                        killed_lease = killed_lease + 1
                    end
                end
                victim = victim or pids[math.random(#pids)]
                kills[#kills + 1] =
                    { pid = tostring(victim), t = socket.gettime() }
                os.execute("kill -9 " .. victim)
            end
            H.poll(SECONDS + 10, function()
                return (H.read_file(out) or ""):find("requests in", 1, true)
            end)
            os.remove(script)
            assert.is_true(
                killed_lease >= 1,
                "the lease holder was never killed"
            )

            -- Quiescence: the dict stops changing.
            local last, v = -1, nil
            H.poll(20, function()
                socket.sleep(4 * INTERVAL)
                v = get(srv, "counters", "hits")
                local still = v == last
                last = v
                return still
            end)
            local lines = logged(srv)
            assert.same({}, over, "the dict exceeded what was served")
            assert.is_true(v <= #lines, v .. " > " .. #lines)
            local buffered = 0
            for _, k in ipairs(kills) do
                for _, l in ipairs(lines) do
                    if l.pid == k.pid and l.t >= k.t - BUFFERED then
                        buffered = buffered + 1
                    end
                end
            end
            local lost_in_flight = get(srv, "meta", "lost")
            local loss = #lines - v
            if os.getenv("VERBOSE") then
                print(
                    (
                        "served %d, counted %d, loss %d, bound %d buffered + %d in "
                        .. "flight"
                    ):format(
                        #lines,
                        v,
                        loss,
                        buffered,
                        lost_in_flight
                    )
                )
            end
            assert.is_true(#lines > 1000, "too few requests: " .. #lines)
            assert.is_true(
                loss <= buffered + lost_in_flight,
                ("loss %d > %d buffered + %d in flight"):format(
                    loss,
                    buffered,
                    lost_in_flight
                )
            )
            os.remove(out)
        end
    )
end)
