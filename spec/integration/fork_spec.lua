-- Counted once across fork.
--
-- init_by_lua (the master, before the workers fork) increments a key K
-- times; 4 workers then sync every 0.2 s. The dict must hold K, not 4 K.
-- Three counters:
--   fork_new   resty.counter, interval given in init_by_lua;
--   fork_new2  resty.counter, created in init_by_lua without an interval,
--              given one in init_worker_by_lua (how Kong-style code does it);
--   fork_orig  the original algorithm the same way as fork_new2 (it cannot
--              take an interval in init_by_lua: ngx.timer.every raises
--              "no request" there). Its buffer is copied into every worker
--              and each worker's timer flushes it: 4 K.
-- Requests served afterwards count normally on every counter.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local WORKERS = 4
local K = 1000
local INTERVAL = 0.2
local HITS = 40

local HTTP = [[
  lua_shared_dict fork_new 1m;
  lua_shared_dict fork_new2 1m;
  lua_shared_dict fork_orig 1m;
  init_by_lua_block {
    local H = require "spec.integration.helpers"
    local counters = {
      require(H.NEW).new("fork_new", ]] .. INTERVAL .. [[),
      require(H.NEW).new("fork_new2"),
      require(H.ORIGINAL).new("fork_orig"),
    }
    for _ = 1, ]] .. K .. [[ do
      for _, c in ipairs(counters) do
        c:incr("k")
      end
    end
  }
  init_worker_by_lua_block {
    local H = require "spec.integration.helpers"
    H.fork_counters = {
      require(H.NEW).new("fork_new", ]] .. INTERVAL .. [[),
      require(H.NEW).new("fork_new2", ]] .. INTERVAL .. [[),
      require(H.ORIGINAL).new("fork_orig", ]] .. INTERVAL .. [[),
    }
  }
]]

local SERVER = [[
  location = /hit {
    content_by_lua_block {
      for _, c in ipairs(require("spec.integration.helpers").fork_counters) do
        c:incr("w")
      end
    }
  }
  location = /read {
    content_by_lua_block {
      local t = {}
      for _, name in ipairs({ "fork_new", "fork_new2", "fork_orig" }) do
        t[name .. ".k"] = ngx.shared[name]:get("k") or 0
        t[name .. ".w"] = ngx.shared[name]:get("w") or 0
      end
      ngx.print(require("spec.integration.helpers").encode(t))
    }
  }
]]

describe("#integration counted once across fork", function()
    local srv

    setup(function()
        srv = nginx.start({ workers = WORKERS, http = HTTP, server = SERVER })
    end)

    teardown(function()
        if srv then
            srv:stop()
        end
    end)

    local function read()
        local status, body = srv:get("/read")
        assert.equal(200, status)
        return H.decode(body)
    end

    it(
        "init_by_lua increments reach the dict once, not once per worker",
        function()
            -- A worker takes its title after init_worker_by_lua (where it loads
            -- the library): wait for all of them rather than look once.
            assert.is_true(
                H.poll(10, function()
                    return #srv:worker_pids() == WORKERS
                end),
                "fewer than " .. WORKERS .. " workers"
            )
            for _ = 1, HITS do
                assert.equal(200, (srv:get("/hit")))
            end
            -- Wait until every counter has synced the requests' increments: by
            -- then every worker's timer has run at least once.
            local got = H.poll(10, function()
                local t = read()
                return t["fork_new.w"] == HITS
                    and t["fork_new2.w"] == HITS
                    and t["fork_orig.w"] == HITS
                    and t
            end)
            assert.is_table(got, "the requests' increments never arrived")
            H.sleep(3 * INTERVAL)
            got = read()
            assert.same({
                ["fork_new.k"] = K,
                ["fork_new.w"] = HITS,
                ["fork_new2.k"] = K,
                ["fork_new2.w"] = HITS,
                -- The original: once per worker.
                ["fork_orig.k"] = WORKERS * K,
                ["fork_orig.w"] = HITS,
            }, got)
        end
    )
end)
