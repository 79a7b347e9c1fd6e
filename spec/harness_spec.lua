-- Proves spec/support/nginx.lua: it starts a real multi-worker nginx,
-- reloads it, and stops it without leaving a process or a file behind.
-- Runs under plain LuaJIT: luajit /usr/bin/busted spec/harness_spec.lua
local nginx = require("spec.support.nginx")

local PID_LOCATION = [[
  location = /pid {
    content_by_lua_block {
      ngx.say(ngx.worker.pid(), " ", os.getenv("HARNESS_GREETING"), " ${PORT}")
    }
  }
]]

-- Read /proc directly rather than trusting the module under test.
local function process_exists(pid)
    local f = io.open("/proc/" .. pid .. "/stat")
    if not f then
        return false
    end
    local stat = f:read("*a")
    f:close()
    return stat:match(".*%) (%a)") ~= "Z"
end

local function dir_exists(path)
    local ok = os.rename(path, path)
    return ok == true
end

local function contains(list, value)
    for _, v in ipairs(list) do
        if v == value then
            return true
        end
    end
    return false
end

local function start()
    return nginx.start({
        workers = 2,
        server = PID_LOCATION,
        env = { HARNESS_GREETING = "hello" },
    })
end

-- Returns the worker pid that answered GET /pid.
local function get_pid(srv)
    local status, body = srv:get("/pid")
    assert.equal(200, status)
    local pid, greeting, port = body:match("^(%d+) (%S+) (%d+)\n$")
    assert.equal("hello", greeting)
    assert.equal(srv.port, tonumber(port))
    return tonumber(pid)
end

describe("spec.support.nginx", function()
    after_each(function()
        nginx.stop_all()
    end)

    it("serves requests from its workers", function()
        local srv = start()
        local workers = srv:worker_pids()
        assert.equal(2, #workers)
        assert.equal("http://127.0.0.1:" .. srv.port, srv.url)
        assert.is_true(contains(workers, get_pid(srv)))
        assert.is_true(contains(workers, get_pid(srv)))
        assert.equal(2, #srv:access_log_lines())
        assert.matches("start worker process", srv:error_log(), 1, true)
    end)

    it("reloads: every old worker exits and new ones answer", function()
        local srv = start()
        local old = srv:worker_pids()
        local new = srv:reload()
        assert.equal(2, #new)
        for _, pid in ipairs(old) do
            assert.is_false(process_exists(pid))
            assert.is_false(contains(new, pid))
        end
        assert.is_true(contains(new, get_pid(srv)))
    end)

    it(
        "stops: the master and workers exit and the prefix is removed",
        function()
            local srv = start()
            local master, workers = srv.master_pid, srv:worker_pids()
            assert.is_true(process_exists(master))
            assert.is_true(dir_exists(srv.prefix))
            assert.is_true(srv:stop())
            assert.is_false(process_exists(master))
            for _, pid in ipairs(workers) do
                assert.is_false(process_exists(pid))
            end
            assert.is_false(dir_exists(srv.prefix))
            assert.matches("exit", srv:error_log(), 1, true)
        end
    )

    it(
        "starts on another port when its first is taken, and its error log is the running nginx's",
        function()
            local socket = require("socket")
            local holder = assert(socket.bind("127.0.0.1", 0))
            local _, taken = holder:getsockname()
            taken = tonumber(taken)
            local probe = nginx.free_port
            local offered = false
            nginx.free_port = function()
                if offered then
                    return probe()
                end
                offered = true
                return taken
            end
            local ok, srv = pcall(start)
            nginx.free_port = probe
            holder:close()
            assert(ok, srv)
            assert.is_true(offered)
            assert.are_not.equal(taken, srv.port)
            get_pid(srv)
            local log = srv:error_log()
            assert.is_nil(log:find("[emerg]", 1, true), log)
        end
    )

    it("fails to start with nginx's own diagnosis and cleans up", function()
        local ok, err = pcall(nginx.start, { server = "no_such_directive on;" })
        assert.is_false(ok)
        assert.matches('unknown directive "no_such_directive"', err, 1, true)
        assert.matches("nginx -t", err, 1, true)
        local prefix = err:match("prefix: (%S+)")
        assert.is_string(prefix)
        assert.is_false(dir_exists(prefix))
    end)

    it(
        "configures the flavor of NGINX_BIN: its resty.core, its modules",
        function()
            local flavor = nginx.flavor()
            local srv = nginx.start({
                server = [[
      location = /core {
        content_by_lua_block {
          ngx.print(debug.getinfo(require("resty.core.base").get_string_buf, "S").source)
        }
      }
    ]],
            })
            local status, source = srv:get("/core")
            srv:stop()
            assert.equal(200, status)
            -- resty.core comes from where the flavor says (OpenResty's lualib,
            -- never Debian's copy that is also on the host Lua's path).
            local dir = flavor.lua_path:match("^([^;]*)/%?%.lua")
            assert.is_string(dir)
            assert.equal("@" .. dir .. "/resty/core/base.lua", source)
            -- load_module lines exactly when lua-nginx-module is not built in.
            local built_in = flavor.version_output:find(
                "%-%-add%-module=%S*lua%-nginx%-module"
            ) ~= nil
            assert.equal(built_in, flavor.main == "")
            assert.equal(built_in and "openresty" or "debian", flavor.name)
        end
    )
end)
