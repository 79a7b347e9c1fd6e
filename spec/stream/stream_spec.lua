-- resty.counter in the stream subsystem: a `stream {}` block with its own
-- lua_shared_dict, counters made in init_worker_by_lua, counting in
-- content_by_lua and log_by_lua of TCP connections, on an nginx with
-- stream-lua-nginx-module (OpenResty). The dict is reached through the
-- ngx_stream_lua_ffi_shdict_* entry points (native mode).
--
-- The stream server reads one line per connection: "hit" counts one hit
-- (content phase) and, in the log phase, one "logged"; any other line is
-- Lua, run in the worker, whose result is the answer.
--
-- Debian's nginx has no stream lua module: the specs are then skipped with
-- a message, unless SPEC_REQUIRE_STREAM=1 (make test-openresty), which
-- makes that a failure.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local N = os.getenv("LONG") and 2000 or 400
local INTERVAL = 0.2

local STREAM = [[
  lua_shared_dict resty_counter_stage 8m;
  lua_shared_dict counters 4m;
  lua_shared_dict slow 4m;
  lua_shared_dict tiny 12k;
  init_worker_by_lua_block {
    local counter = require "resty.counter"
    package.loaded["stream_spec.counters"] = {
      -- automatic, with an error metric
      c = counter.new("counters", ]] .. INTERVAL .. [[, "sync_errors"),
      -- its first sync falls within the hour: only the exit flush delivers
      slow = counter.new("slow", 3600),
      -- manual, in a dict small enough to evict
      tiny = counter.new("tiny", nil, "sync_errors"),
    }
  }
]]

local STREAM_SERVER = [[
  content_by_lua_block {
    local sock = assert(ngx.req.socket())
    local line = assert(sock:receive("*l"))
    local k = package.loaded["stream_spec.counters"]
    if line == "hit" then
      k.c:incr("hits")
      k.slow:incr("hits")
      ngx.ctx.hit = true
      ngx.print(ngx.worker.pid())
      return
    end
    local ok, res = pcall(assert(loadstring(line)))
    ngx.print(ok and tostring(res) or ("error: " .. tostring(res)))
  }
  log_by_lua_block {
    if ngx.ctx.hit then
      package.loaded["stream_spec.counters"].c:incr("logged")
    end
  }
]]

local function start()
    return nginx.start({
        workers = 2,
        http = "",
        stream = STREAM,
        stream_server = STREAM_SERVER,
        stream_listen = "reuseport", -- the kernel spreads connections
    })
end

-- Runs one line of Lua in a stream worker; returns its answer.
local function eval(srv, code)
    local body, err = srv:tcp(code .. "\n")
    assert(body, err)
    assert(not body:find("^error: "), body)
    return body
end

local function dict_value(srv, dict, key)
    return eval(srv, ("return ngx.shared[%q]:get(%q)"):format(dict, key))
end

-- Polls until the dict holds `want` (or 10 s pass); returns what it holds.
local function wait_for(srv, dict, key, want)
    local socket = require("socket")
    local deadline = socket.gettime() + 10
    local got
    repeat
        got = dict_value(srv, dict, key)
        if got == tostring(want) then
            return got
        end
        socket.sleep(0.05)
    until socket.gettime() > deadline
    return got
end

-- N connections, one "hit" each; returns the set of worker pids that served.
local function hits(srv, n)
    local pids, served = {}, 0
    for _ = 1, n do
        local pid = assert(srv:tcp("hit\n"))
        pids[pid] = true
        served = served + 1
    end
    return pids, served
end

local function bad_log_lines(log)
    local bad = {}
    for line in log:gmatch("[^\n]+") do
        if
            line:find("%[error%]")
            or line:find("%[crit%]")
            or line:find("%[alert%]")
            or line:find("%[emerg%]")
            or line:find("exited on signal")
        then
            bad[#bad + 1] = line
        end
    end
    return bad
end

local flavor = nginx.flavor()

describe("resty.counter in a stream {} block", function()
    if not flavor.stream_lua then
        local why = flavor.bin
            .. " ("
            .. flavor.version
            .. ", "
            .. flavor.name
            .. ") has no stream lua module"
        if os.getenv("SPEC_REQUIRE_STREAM") == "1" then
            it("runs (SPEC_REQUIRE_STREAM=1)", function()
                error(why .. ": the stream specs cannot run", 0)
            end)
        else
            io.stderr:write(
                "stream specs skipped: ",
                why,
                " (make test-openresty runs them)\n"
            )
            pending("skipped: " .. why)
        end
        return
    end

    local srv

    before_each(function()
        srv = start()
    end)

    after_each(function()
        if srv then
            srv:stop()
            assert.same({}, bad_log_lines(srv:error_log()))
        end
    end)

    it(
        "runs native in the stream subsystem, made in init_worker_by_lua",
        function()
            assert.equal(
                "stream native 0.2",
                eval(
                    srv,
                    'local c = package.loaded["stream_spec.counters"].c '
                        .. "local s = c:stats() "
                        .. 'return ngx.config.subsystem .. " " .. s.mode '
                        .. '.. " " .. s.sync_interval'
                )
            )
        end
    )

    it(
        "counts exactly over hundreds of connections, content and log phase, 2 workers",
        function()
            local pids, served = hits(srv, N)
            assert.equal(N, served)
            assert.equal(2, H.count(pids), "both workers served connections")
            assert.equal(tostring(N), wait_for(srv, "counters", "hits", N))
            assert.equal(tostring(N), wait_for(srv, "counters", "logged", N))
            -- Never twice: two more intervals change nothing.
            require("socket").sleep(3 * INTERVAL)
            assert.equal(tostring(N), dict_value(srv, "counters", "hits"))
            assert.equal(tostring(N), dict_value(srv, "counters", "logged"))
            assert.equal("nil", dict_value(srv, "counters", "sync_errors"))
            assert.equal(
                "true",
                eval(
                    srv,
                    "return tostring(package.loaded"
                        .. '["stream_spec.counters"].c:stats().stage)'
                ),
                "through the stage zone of the stream block"
            )
        end
    )

    it(
        "loses nothing on reload: the exit flush runs in stream workers",
        function()
            hits(srv, N)
            assert.equal("nil", dict_value(srv, "slow", "hits"))
            srv:reload()
            assert.equal(tostring(N), wait_for(srv, "slow", "hits", N))
            assert.equal(tostring(N), wait_for(srv, "counters", "hits", N))
            assert.equal(tostring(N), wait_for(srv, "counters", "logged", N))
            assert.matches(
                "stream native",
                eval(
                    srv,
                    'return ngx.config.subsystem .. " " .. '
                        .. 'package.loaded["stream_spec.counters"].c:stats().mode'
                )
            )
        end
    )

    it(
        "refuses bad keys and steps with an error, and corrupts nothing",
        function()
            local answer = eval(
                srv,
                [[local t = package.loaded["stream_spec.counters"].tiny ]]
                    .. [[t:incr("k", 2) ]]
                    .. [[local e = {} ]]
                    .. [[for _, a in ipairs({ { nil, 1 }, { "", 1 }, { 0/0, 1 }, { "k", 0/0 }, ]]
                    .. [[{ "k", 1/0 }, { "k", "1" }, { {}, 1 } }) do ]]
                    .. [[local ok, err = pcall(t.incr, t, a[1], a[2]) ]]
                    .. [[e[#e + 1] = ok and "accepted" or err:match("bad %a+") end ]]
                    .. [[local synced = t:sync() ]]
                    .. [[return table.concat(e, ",") .. " " ]]
                    .. [[.. tostring(synced) .. " " .. t:get("k")]]
            )
            assert.equal(
                "bad key,bad key,bad key,bad step,bad step,bad step,bad key true 2",
                answer
            )
        end
    )

    it("counts a failed sync in the error metric", function()
        local answer = eval(
            srv,
            [[local t = package.loaded["stream_spec.counters"].tiny ]]
                .. [[local d = ngx.shared.tiny ]]
                .. [[for i = 1, 10000 do if not d:safe_set("filler-" .. i, i) then break end end ]]
                .. [[t:incr("evictor") ]]
                .. [[local ok = t:sync() ]]
                .. [[return tostring(ok) .. " " .. tostring(t:get("evictor")) .. " " ]]
                .. [[.. tostring(t:get("sync_errors")) .. " " ]]
                .. [[.. tostring(t:stats().evictions >= 1)]]
        )
        assert.equal("false 1 1 true", answer)
        -- The eviction is in the log once, as in http.
        local log = srv:error_log()
        local _, n = log:gsub("lru eviction: key=evictor", "")
        assert.equal(1, n)
        -- An error line the after_each check must not count as a failure.
        srv:stop()
        srv = nil
    end)
end)
