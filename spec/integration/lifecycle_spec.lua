-- The shim's lifecycle in a real nginx: the automatic sync survives a busy
-- timer table (its timer heals itself), increments made after the exit
-- flush still reach the dict, and a key cannot forge an error.log line.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local COMMON_SERVER = [[
  location = /read {
    content_by_lua_block {
      local d = ngx.shared[ngx.var.arg_dict or "d"]
      ngx.print(require("spec.integration.helpers").encode({
        v = d:get(ngx.var.arg_key) or 0 }))
    }
  }
]]

local function read(srv, key, dict)
    local status, body =
        srv:get("/read?key=" .. key .. "&dict=" .. (dict or "d"))
    assert.equal(200, status)
    return H.decode(body).v
end

-- Polls until the dict holds `want` for `key`; returns the last value.
local function wait_for(srv, key, want, timeout, dict)
    local last
    H.poll(timeout or 8, function()
        last = read(srv, key, dict)
        return last == want
    end)
    return last
end

describe("#integration the automatic sync heals itself", function()
    local srv

    after_each(nginx.stop_all)

    it(
        "keeps syncing when the application takes every freed pending-timer "
            .. "slot (lua_max_pending_timers 4)",
        function()
            srv = nginx.start({
                workers = 1,
                http = [[
      lua_max_pending_timers 4;
      lua_shared_dict d 20m;
      init_worker_by_lua_block {
        require("spec.integration.helpers").c =
          require("resty.counter").new("d", 0.2)
      }
    ]],
                server = COMMON_SERVER
                    .. [[
      location = /dirty {
        content_by_lua_block {
          local c = require("spec.integration.helpers").c
          for i = 1, 5000 do c:incr("k" .. i) end
        }
      }
      location = /grab {
        content_by_lua_block {
          -- Takes every pending-timer slot as soon as one is freed, for
          -- 2 s, and keeps thousands of keys dirty meanwhile. The grabbed
          -- timers all fire by 2.5 s.
          local c = require("spec.integration.helpers").c
          local noop = function() end
          local deadline = ngx.now() + 2
          local n = 0
          while ngx.now() < deadline do
            while ngx.timer.at(deadline - ngx.now() + 0.5, noop) do end
            n = n + 1
            if n % 50 == 0 then
              for i = 1, 5000 do c:incr("k" .. i) end
            end
            ngx.sleep(0.001)
            ngx.update_time()
          end
          ngx.say("ok")
        }
      }
      location = /five {
        content_by_lua_block {
          local c = require("spec.integration.helpers").c
          for _ = 1, 5 do c:incr("five") end
        }
      }
    ]],
            })
            assert.equal(200, (srv:get("/dirty")))
            assert.equal(200, (srv:get("/grab", nil, 10)))
            H.sleep(0.7) -- the grabbed timers fire and free their slots
            assert.equal(200, (srv:get("/five")))
            assert.equal(5, wait_for(srv, "five", 5))
        end
    )

    it(
        "keeps syncing after a run dropped by lua_max_running_timers 1",
        function()
            srv = nginx.start({
                workers = 1,
                http = [[
      lua_max_running_timers 1;
      lua_shared_dict d 1m;
      init_worker_by_lua_block {
        require("spec.integration.helpers").c =
          require("resty.counter").new("d", 0.2)
      }
    ]],
                server = COMMON_SERVER
                    .. [[
      location = /block {
        content_by_lua_block {
          -- An application timer that runs for 2 s: every other timer
          -- due meanwhile is dropped by nginx.
          assert(ngx.timer.at(0, function() ngx.sleep(2) end))
        }
      }
      location = /hit {
        content_by_lua_block {
          require("spec.integration.helpers").c:incr("hits")
        }
      }
    ]],
            })
            assert.equal(200, (srv:get("/block")))
            for _ = 1, 5 do
                assert.equal(200, (srv:get("/hit")))
            end
            H.sleep(2.2)
            assert.equal(5, wait_for(srv, "hits", 5))
        end
    )

    it(
        "counts every request under load with per-request application "
            .. "timers (default limits): counted == served",
        function()
            srv = nginx.start({
                workers = 1,
                http = [[
      lua_shared_dict d 50m;
      init_worker_by_lua_block {
        require("spec.integration.helpers").c =
          require("resty.counter").new("d", 0.1)
      }
    ]],
                server = COMMON_SERVER .. [[
      location = /load {
        content_by_lua_block {
          local c = require("spec.integration.helpers").c
          ngx.timer.at(0.05, function() end)
          local base = math.random(1, 20000)
          for i = base, base + 49 do c:incr("k" .. i) end
          c:incr("counted")
          ngx.shared.d:incr("served", 1, 0)
        }
      }
    ]],
            })
            local out = H.wrk({
                url = srv.url .. "/load",
                seconds = 4,
                connections = 64,
                script = "",
            })
            local served = read(srv, "served")
            assert.is_true(served > 0, out)
            local counted = wait_for(srv, "counted", served)
            print(("counted/served: %d/%d"):format(counted, served))
            assert.equal(served, counted)
        end
    )

    it(
        "a manual counter still flushes at reload after its guard timer's "
            .. "run was dropped (lua_max_running_timers 1)",
        function()
            srv = nginx.start({
                workers = 1,
                http = [[
      lua_max_running_timers 1;
      lua_shared_dict d 1m;
      init_worker_by_lua_block {
        require("spec.integration.helpers").c =
          require("resty.counter").new("d")
      }
    ]],
                server = COMMON_SERVER
                    .. [[
      location = /block {
        content_by_lua_block {
          -- An application timer that runs for 2.5 s: the guard's run due
          -- meanwhile is dropped by nginx.
          assert(ngx.timer.at(0, function() ngx.sleep(2.5) end))
        }
      }
      location = /hit {
        content_by_lua_block {
          require("spec.integration.helpers").c:incr("hits")
        }
      }
    ]],
            })
            assert.equal(200, (srv:get("/hit"))) -- "hits" is buffered from here
            assert.equal(200, (srv:get("/block")))
            H.sleep(2.7)
            for _ = 1, 4 do
                assert.equal(200, (srv:get("/hit")))
            end
            srv:reload()
            assert.equal(5, wait_for(srv, "hits", 5, 3))
        end
    )

    it(
        "a counter whose timer nginx refuses for good (lua_max_pending_timers "
            .. "1, two counters) writes every increment straight to the dict",
        function()
            srv = nginx.start({
                workers = 1,
                http = [[
      lua_max_pending_timers 1;
      lua_shared_dict d 1m;
      lua_shared_dict d2 1m;
      init_worker_by_lua_block {
        -- The first counter's timer takes the only slot, for good.
        local H = require "spec.integration.helpers"
        H.c = require("resty.counter").new("d", 0.1)
        H.c2 = require("resty.counter").new("d2", 0.1)
      }
    ]],
                server = COMMON_SERVER .. [[
      location = /both {
        content_by_lua_block {
          local H = require "spec.integration.helpers"
          for _ = 1, 100 do
            H.c:incr("k")
            H.c2:incr("k")
          end
        }
      }
    ]],
            })
            local function hundreds(n)
                for _ = 1, n do
                    assert.equal(200, (srv:get("/both")))
                end
            end
            hundreds(3)
            assert.equal(300, wait_for(srv, "k", 300, 5, "d2"))
            assert.equal(300, wait_for(srv, "k", 300, 5, "d"))
            srv:reload()
            hundreds(3)
            assert.equal(600, wait_for(srv, "k", 600, 5, "d2"))
            assert.equal(600, wait_for(srv, "k", 600, 5, "d"))
            srv:stop() -- its error.log whole
            assert.equal(
                2, -- one per generation of workers
                H.count_matches(
                    srv:error_log(),
                    'cannot start the timer of shared dict "d2"'
                )
            )
        end
    )

    it("logs a refused timer once and its recovery once", function()
        srv = nginx.start({
            workers = 1,
            http = [[
      lua_max_pending_timers 2;
      lua_shared_dict d 1m;
    ]],
            server = COMMON_SERVER
                .. [[
      location = /down {
        content_by_lua_block {
          -- Every pending-timer slot is taken (for 1 s) when the counter
          -- is created; its increments try to start the timer again
          -- meanwhile, and fail.
          local noop = function() end
          while ngx.timer.at(1, noop) do end
          local H = require "spec.integration.helpers"
          H.c = require("resty.counter").new("d", 0.2)
          for i = 1, 40 do
            H.c:incr("k" .. i)
            ngx.sleep(0.01)
          end
        }
      }
      location = /hit {
        content_by_lua_block {
          require("spec.integration.helpers").c:incr("hits")
        }
      }
    ]],
        })
        assert.equal(200, (srv:get("/down")))
        H.sleep(1.2) -- the application's timers have fired
        assert.equal(200, (srv:get("/hit")))
        assert.equal(1, wait_for(srv, "hits", 1))
        assert.equal(1, wait_for(srv, "k40", 1))
        local log = srv:error_log()
        local function count(plain)
            local n, at = 0, 1
            while true do
                local i = log:find(plain, at, true)
                if not i then
                    return n
                end
                n, at = n + 1, i + 1
            end
        end
        assert.equal(1, count('cannot start the timer of shared dict "d"'), log)
        assert.equal(1, count('the timer of shared dict "d" runs again'), log)
    end)
end)

describe("#integration increments after the exit flush", function()
    it(
        "reach the dict: 8 requests that increment 1 s after a reload",
        function()
            local srv = nginx.start({
                workers = 1,
                http = [[
      lua_shared_dict d 1m;
      lua_shared_dict m 1m;
      init_worker_by_lua_block {
        local H = require "spec.integration.helpers"
        H.auto = require("resty.counter").new("d", 3600)
        H.manual = require("resty.counter").new("m")
      }
    ]],
                server = COMMON_SERVER .. [[
      location = /late {
        content_by_lua_block {
          local H = require "spec.integration.helpers"
          ngx.sleep(1)
          H.auto:incr("late")
          H.manual:incr("late")
        }
      }
    ]],
            })
            local ok, err = pcall(function()
                for _ = 1, 8 do
                    os.execute(
                        "curl -s -o /dev/null '" .. srv.url .. "/late' &"
                    )
                end
                H.sleep(0.3)
                srv:reload()
                assert.equal(8, wait_for(srv, "late", 8, 3))
                assert.equal(8, wait_for(srv, "late", 8, 3, "m"))
            end)
            srv:stop()
            assert(ok, err)
        end
    )
end)

describe("#integration keys in error messages", function()
    it("cannot forge an error.log line through the overflow error", function()
        local srv = nginx.start({
            workers = 1,
            http = [[
      lua_shared_dict d 1m;
    ]],
            server = COMMON_SERVER .. [[
      location = /forge {
        content_by_lua_block {
          local c = require("resty.counter").new("d")
          local key = "x\n2026/01/01 00:00:00 [emerg] 1#1: forged"
          c:incr(key, 1e308)
          c:incr(key, 1e308)  -- overflows; not caught
        }
      }
    ]],
        })
        local status = srv:get("/forge")
        local log = srv:error_log()
        srv:stop()
        assert.equal(500, status)
        assert.matches("would overflow", log, 1, true)
        assert.is_nil(log:find("\n2026/01/01 00:00:00 [emerg]", 1, true), log)
    end)
end)

describe("#integration lua_code_cache off (a Lua VM per request)", function()
    local INITS = { "", 'init_by_lua_block { require "resty.counter" }' }
    for _, init in ipairs(INITS) do
        it(
            "counts exactly, logs no error and keeps the worker's memory bounded"
                .. (init == "" and "" or " (loaded by init_by_lua too)"),
            function()
                local N = 1500
                local srv = nginx.start({
                    workers = 1,
                    http = [[
        lua_code_cache off;
        lua_shared_dict counters 1m;
      ]] .. init,
                    server = COMMON_SERVER
                        .. [[
        location = /hit {
          content_by_lua_block {
            require("resty.counter").new("counters", 0.2):incr("hits")
          }
        }
      ]],
                })
                local ok, err = pcall(function()
                    local pid = srv:worker_pids()[1]
                    local function hit()
                        local status, err = srv:get("/hit")
                        assert.equal(200, status, err)
                    end
                    for _ = 1, 100 do
                        hit()
                    end
                    local before = H.rss_kib(pid)
                    for _ = 101, N do
                        hit()
                    end
                    local got = wait_for(srv, "hits", N, 5, "counters")
                    local after = H.rss_kib(pid)
                    print(
                        ("code cache off: %d/%d counted, worker RSS %d -> %d KiB"):format(
                            got,
                            N,
                            before,
                            after
                        )
                    )
                    assert.equal(N, got)
                    -- Generous: a VM kept alive per request costs far more (measured:
                    -- about 440 MB for 1,400 requests).
                    assert.is_true(
                        after - before < 32 * 1024,
                        ("RSS grew %d KiB"):format(after - before)
                    )
                    local errors = {}
                    for line in srv:error_log():gmatch("[^\n]+") do
                        if
                            (
                                line:find("%[error%]")
                                or line:find("%[crit%]")
                                or line:find("%[alert%]")
                                or line:find("%[emerg%]")
                            )
                            and not line:find("lua_code_cache is off", 1, true)
                        then
                            errors[#errors + 1] = line
                        end
                    end
                    assert.same({}, errors)
                end)
                srv:stop()
                assert(ok, err)
            end
        )
    end
end)
