-- Nothing lost when a worker exits.
--
-- Two counters of resty.counter: one with a one-hour interval (its first
-- sync falls at a random point of the first hour, so within the test only
-- the exit flush can deliver) and one without an interval
-- (manual, never synced); and the same two of the original algorithm. N
-- requests increment all four; nothing has reached the dicts yet.
--
-- Reload (HUP): the old workers exit, the new ones read the dicts: both
-- resty.counter counters hold N. The original's manual counter holds
-- nothing (its increments died with the old workers); its interval counter
-- holds N, because its every-timer runs one last time, prematurely, when a
-- worker exits.
--
-- Quit: the dict dies with nginx, so a witness in the worker reads it at
-- exit: a premature timer of the spec's own that yields (ngx.sleep) so
-- the counters' own exit timers run first, then writes the dict's values
-- to a file the spec reads after nginx is gone.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local N = H.LONG and 2000 or 300

local COUNTERS = [[
  { name = "auto", mod = H.NEW, interval = 3600 },
  { name = "manual", mod = H.NEW },
  { name = "orig_auto", mod = H.ORIGINAL, interval = 3600 },
  { name = "orig_manual", mod = H.ORIGINAL },
]]

local HTTP = [[
  lua_shared_dict auto 1m;
  lua_shared_dict manual 1m;
  lua_shared_dict orig_auto 1m;
  lua_shared_dict orig_manual 1m;
  init_worker_by_lua_block {
    local H = require "spec.integration.helpers"
    H.exit_counters = {}
    for _, spec in ipairs({ ]] .. COUNTERS .. [[ }) do
      H.exit_counters[spec.name] = require(spec.mod).new(spec.name,
                                                          spec.interval)
    end
    local witness = os.getenv("EXIT_WITNESS")
    if witness then
      -- Runs when the worker exits (premature), after the counters' exit
      -- timers have run: it yields first, and they do not.
      assert(ngx.timer.at(7200, function(premature)
        if not premature then
          return
        end
        ngx.sleep(0.05)
        local f = assert(io.open(witness .. "/" .. ngx.worker.pid(), "w"))
        for name in pairs(H.exit_counters) do
          f:write(name, "=", tostring(ngx.shared[name]:get("hits")), "\n")
        end
        f:close()
      end))
    end
  }
]]

local SERVER = [[
  location = /hit {
    content_by_lua_block {
      for _, c in pairs(require("spec.integration.helpers").exit_counters) do
        c:incr("hits")
      end
      ngx.say(ngx.worker.pid())
    }
  }
  location = /read {
    content_by_lua_block {
      local t = {}
      for name in pairs(require("spec.integration.helpers").exit_counters) do
        t[name] = ngx.shared[name]:get("hits") or 0
      end
      ngx.print(require("spec.integration.helpers").encode(t))
    }
  }
]]

-- N requests, each on its own connection, so several workers serve them.
local function hit(srv, n)
    local pids = {}
    for _ = 1, n do
        local status, body = srv:get("/hit")
        assert.equal(200, status)
        pids[body] = true
    end
    return pids
end

local function read(srv)
    local status, body = srv:get("/read")
    assert.equal(200, status)
    return H.decode(body)
end

describe("#integration nothing lost when a worker exits", function()
    local srv

    after_each(function()
        if srv then
            srv:stop()
        end
    end)

    it(
        "reload (HUP): counters with and without interval hold every "
            .. "increment made before it",
        function()
            srv = nginx.start({ workers = 2, http = HTTP, server = SERVER })
            hit(srv, N)
            -- Nothing synced yet: only the exit flush can deliver.
            assert.same(
                { auto = 0, manual = 0, orig_auto = 0, orig_manual = 0 },
                read(srv)
            )

            srv:reload()
            local got = read(srv)
            assert.equal(N, got.auto)
            assert.equal(N, got.manual)
            -- The original: its every-timer runs one last sync at exit, but
            -- nothing flushes a counter without an interval.
            assert.equal(N, got.orig_auto)
            assert.equal(0, got.orig_manual)
            assert.same({}, H.crash_lines(srv:error_log()))
        end
    )

    it("quit: every increment is in the dict when the worker exits", function()
        local prefix = H.sh("mktemp -d /tmp/exit-spec.XXXXXX"):gsub("%s+$", "")
        local witness = prefix .. "/witness"
        assert(os.execute("mkdir " .. witness) == 0)
        srv = nginx.start({
            workers = 1,
            prefix = prefix,
            http = HTTP,
            server = SERVER,
            env = { EXIT_WITNESS = witness },
        })
        local pid = srv:worker_pids()[1]
        hit(srv, N)
        assert.same(
            { auto = 0, manual = 0, orig_auto = 0, orig_manual = 0 },
            read(srv)
        )

        assert.is_true(srv:stop(), "nginx did not quit gracefully")
        local text = H.read_file(witness .. "/" .. pid)
        local log = srv:error_log()
        os.execute("rm -rf '" .. prefix .. "'")
        assert(text, "the exiting worker wrote no witness file")
        local got = H.decode(text)
        assert.equal(N, got.auto)
        assert.equal(N, got.manual)
        assert.equal(N, got.orig_auto)
        assert.equal("nil", got.orig_manual)
        assert.same({}, H.crash_lines(log))
    end)
end)
