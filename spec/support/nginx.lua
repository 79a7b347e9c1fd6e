-- Control a throwaway nginx from specs that run under plain LuaJIT,
-- outside nginx. The nginx is NGINX_BIN (default: `nginx` from PATH);
-- spec/support/flavor.lua knows what its configuration needs (load_module
-- lines, where resty.core lives), OpenResty or Debian's nginx.
--
--   local nginx = require "spec.support.nginx"
--   local srv = nginx.start{
--     workers = 2,                      -- worker_processes (default 1)
--     http    = [[ lua_shared_dict d 1m; ]],   -- lines for the http block
--     server  = [[ location /x { ... } ]],     -- lines for the server block
--     env     = { FOO = "bar", "PATH" },       -- `env` directives
--     process_env = { LD_PRELOAD = "/x.so" },  -- the environment nginx
--                          -- itself starts with (its workers inherit
--                          -- what it loads, not the variables)
--     user    = "nobody",               -- the `user` directive; default:
--                          -- root when started as root (see below)
--     lua_path = "...", lua_cpath = "...",     -- extra entries, searched
--                          -- after the project's own, before the defaults
--     prefix  = "/some/empty/dir",      -- optional; else mktemp -d
--     stream  = [[ lua_shared_dict d 1m; ]],   -- lines for a stream block
--     stream_server = [[ content_by_lua_block { ... } ]],
--                          -- lines for its server, which listens on
--                          -- srv.stream_port (needs nginx.flavor().stream_lua)
--     stream_listen = "reuseport",      -- parameters of its listen line
--   }
--   srv.port, srv.url ("http://127.0.0.1:<port>"), srv.prefix,
--   srv.master_pid, srv.workers, srv.stream_port
--   srv:get(path, headers?, timeout?) -> status, body, headers | nil, err
--   srv:tcp(data?, timeout?) -> one connection to the stream server: sends
--                            data, reads until nginx closes; body | nil, err
--   srv:worker_pids()     -> sorted pids of the workers accepting requests
--   srv:reload(opts?)     -> HUP; returns once every old worker has exited
--                            and the new ones answer; returns their pids
--                            (opts: a new configuration, as for start)
--   srv:upgrade()         -> binary upgrade: USR2, then WINCH and QUIT to
--                            the old master; returns once it is gone and
--                            the new workers answer; returns the old
--                            workers' pids (srv.master_pid: the new master)
--   srv:error_log()       -> error.log text (still available after stop)
--   srv:access_log_lines()-> access.log lines (idem; the readiness probe
--                            is not logged)
--   srv:stop()            -> QUIT, then TERM, then KILL; removes the prefix
--                            if start() made it; true if QUIT was enough
--   nginx.stop_all()      -> stops every server still running; call it in
--                            teardown (it also runs when the Lua state closes)
--   nginx.flavor()        -> spec/support/flavor.lua's facts: name
--                            ("openresty" or "debian"), version, stream_lua
--
-- start() raises an error with nginx's output, `nginx -t` and the tail of
-- error.log when nginx does not come up. Every wait polls with a deadline.
-- In `http`, `server`, `stream`, `stream_server` and `env` values, ${PORT},
-- ${STREAM_PORT}, ${PREFIX} and ${REPO} are replaced; any other ${name} is
-- left for nginx.
-- KEEP_NGINX=1 keeps the prefix (config, logs) after stop.
-- REPO overrides the repository root, found otherwise from this file's path.

local socket = require("socket")
local http_message = require("spec.support.http_message")
local flavor = require("spec.support.flavor")

local _M = {}

local Server = {}
Server.__index = Server

-- An exact-match location the harness probes to learn that a worker
-- answers; exact matches win over the caller's locations, and the probe
-- stays out of the access log.
local READY_PATH = "/__nginx_harness_ready"

local POLL_INTERVAL = 0.02 -- seconds between polls of any wait
local START_TIMEOUT = 10
local RELOAD_TIMEOUT = 15
local STOP_TIMEOUT = 10
local KILL_TIMEOUT = 3
local REQUEST_TIMEOUT = 5
local RECEIVE_SLICE = 0.2 -- keeps long reads interruptible by Ctrl-C
local PORT_ATTEMPTS = 3

local running = {} -- servers started and not yet stopped

---------------------------------------------------------------------------
-- Small helpers: shell, files, waiting, processes
---------------------------------------------------------------------------

local function quote(s)
    return "'" .. tostring(s):gsub("'", [['\'']]) .. "'"
end

-- Runs a shell command; returns its combined output and exit code.
local function run(cmd)
    local pipe = assert(io.popen(cmd .. ' 2>&1; echo "__exit=$?"'))
    local out = pipe:read("*a")
    pipe:close()
    local text, code = out:match("^(.-)__exit=(%d+)%s*$")
    return text or out, tonumber(code) or -1
end

local function read_file(path)
    local f = io.open(path, "rb")
    if not f then
        return nil
    end
    local text = f:read("*a")
    f:close()
    return text
end

local function write_file(path, text)
    local f = assert(io.open(path, "wb"))
    assert(f:write(text))
    f:close()
end

local function tail(text, n)
    local lines = {}
    for line in (text or ""):gmatch("[^\n]+") do
        lines[#lines + 1] = line
    end
    return table.concat(lines, "\n", math.max(1, #lines - n + 1))
end

-- Polls `check` until it returns a truthy value or `timeout` seconds pass.
local function wait_until(timeout, check)
    local deadline = socket.gettime() + timeout
    repeat
        local value = check()
        if value then
            return value
        end
        socket.sleep(POLL_INTERVAL)
    until socket.gettime() > deadline
    return check()
end

-- A pid is alive while /proc has it and it is not a zombie.
local function pid_alive(pid)
    local stat = read_file("/proc/" .. pid .. "/stat")
    local state = stat and stat:match(".*%) (%a)")
    return state ~= nil and state ~= "Z" and state ~= "X"
end

local function signal(pid, name)
    run("kill -" .. name .. " " .. pid)
end

local function wait_gone(pids, timeout)
    return wait_until(timeout, function()
        for _, pid in ipairs(pids) do
            if pid_alive(pid) then
                return false
            end
        end
        return true
    end)
end

local function find_repo()
    local env = os.getenv("REPO")
    if env and env ~= "" then
        return env
    end
    local src = debug.getinfo(1, "S").source:gsub("^@", "")
    if src:sub(1, 1) ~= "/" then
        src = "./" .. src
    end
    local dir = assert(
        src:match("^(.*)/spec/support/nginx%.lua$"),
        "cannot find the repo root from " .. src
    )
    local out, code = run("cd " .. quote(dir) .. " && pwd -P")
    assert(code == 0, out)
    return (out:gsub("%s+$", ""))
end

local REPO = find_repo()

-- A port the kernel picks as unused. Another process may still take it
-- before nginx binds it: Server:launch then tries another. A field so that
-- harness_spec can offer a taken port first.
function _M.free_port()
    local sock = assert(socket.bind("127.0.0.1", 0))
    local _, port = sock:getsockname()
    sock:close()
    return tonumber(port)
end

---------------------------------------------------------------------------
-- HTTP/1.0 client over luasocket
---------------------------------------------------------------------------

local function receive_all(sock, timeout)
    local deadline = socket.gettime() + timeout
    local chunks = {}
    sock:settimeout(RECEIVE_SLICE)
    repeat
        local data, err, partial = sock:receive("*a")
        chunks[#chunks + 1] = data or partial
        if data then
            return table.concat(chunks)
        elseif err ~= "timeout" then
            return nil, err
        end
    until socket.gettime() > deadline
    return nil, "timeout after " .. timeout .. "s"
end

local function http_get(port, path, headers, timeout)
    local sock = socket.tcp()
    sock:settimeout(timeout)
    local ok, err = sock:connect("127.0.0.1", port)
    if ok then
        ok, err = sock:send(http_message.request(path, headers))
    end
    local raw
    if ok then
        raw, err = receive_all(sock, timeout)
    end
    sock:close()
    if not raw then
        return nil, "GET " .. path .. ": " .. tostring(err)
    end
    return http_message.parse(raw)
end

---------------------------------------------------------------------------
-- Configuration
---------------------------------------------------------------------------

local CONF_TEMPLATE = [[
# Generated by spec/support/nginx.lua for one throwaway test server.
${MAIN}
${USER}
worker_processes ${WORKERS};
daemon on;
pid ${PREFIX}/logs/nginx.pid;
error_log ${PREFIX}/logs/error.log info;
${ENV}

events {
    worker_connections 1024;
}

http {
    default_type text/plain;
    access_log ${PREFIX}/logs/access.log;
    client_body_temp_path ${PREFIX}/tmp/client_body;
    proxy_temp_path ${PREFIX}/tmp/proxy;
    fastcgi_temp_path ${PREFIX}/tmp/fastcgi;
    uwsgi_temp_path ${PREFIX}/tmp/uwsgi;
    scgi_temp_path ${PREFIX}/tmp/scgi;
    lua_package_path "${LUA_PATH}";
    lua_package_cpath "${LUA_CPATH}";

${HTTP}

    server {
        listen 127.0.0.1:${PORT};

        location = ${READY_PATH} {
            access_log off;
            return 204;
        }

${SERVER}
    }
}
${STREAM_BLOCK}
]]

local STREAM_TEMPLATE = [[
stream {
    lua_package_path "${LUA_PATH}";
    lua_package_cpath "${LUA_CPATH}";

${STREAM}

    server {
        listen 127.0.0.1:${STREAM_PORT}${STREAM_LISTEN};
${STREAM_SERVER}
    }
}
]]

-- Replaces ${NAME} for the names in `vars` only.
local function expand(text, vars)
    return (
        text:gsub("%${([%w_]+)}", function(name)
            return vars[name]
        end)
    )
end

local function running_as_root()
    local out = run("id -u")
    return out:match("^%s*0%s*$") ~= nil
end

-- A master started as root runs its workers as `nobody`, who can read
-- neither the 0700 prefix made by mktemp nor, often, the repository.
-- These are throwaway servers on loopback, so the workers stay root.
local function user_directive(user)
    if user then
        return "user " .. user .. ";"
    end
    return running_as_root() and "user root;" or ""
end

local function env_directives(env, vars)
    local lines = {}
    for key, value in pairs(env or {}) do
        if type(key) == "number" then
            lines[#lines + 1] = "env " .. value .. ";"
        else
            lines[#lines + 1] = 'env "'
                .. key
                .. "="
                .. expand(tostring(value), vars)
                .. '";'
        end
    end
    table.sort(lines)
    return table.concat(lines, "\n")
end

-- The project's loading contract, then the flavor's resty.core; the
-- caller's extra entries come after them, so an installed copy never
-- shadows the tree under test, and before the defaults (";;").
local LUA_PATH = "${REPO}/lua/?.lua;${REPO}/?.lua"
local LUA_CPATH = "${REPO}/target/release/?.so"

local function search_path(entries, extra, vars)
    local kept = {}
    for _, e in ipairs(entries) do
        if e and e ~= "" then
            kept[#kept + 1] = (expand(e, vars):gsub(";+$", ""))
        end
    end
    if extra and extra ~= "" then
        kept[#kept + 1] = (expand(extra, vars):gsub(";+$", ""))
    end
    return table.concat(kept, ";") .. ";;"
end

local function render_conf(srv, opts)
    local f = flavor.get()
    local vars = {
        PORT = tostring(srv.port),
        PREFIX = srv.prefix,
        REPO = REPO,
        STREAM_PORT = tostring(srv.stream_port),
    }
    local lua_path = search_path({ LUA_PATH, f.lua_path }, opts.lua_path, vars)
    local lua_cpath =
        search_path({ LUA_CPATH, f.lua_cpath }, opts.lua_cpath, vars)
    local stream_block = ""
    if srv.stream_port then
        stream_block = expand(STREAM_TEMPLATE, {
            LUA_PATH = lua_path,
            LUA_CPATH = lua_cpath,
            STREAM = expand(opts.stream or "", vars),
            STREAM_SERVER = expand(opts.stream_server or "", vars),
            STREAM_PORT = vars.STREAM_PORT,
            STREAM_LISTEN = opts.stream_listen and " " .. opts.stream_listen
                or "",
        })
    end
    return expand(CONF_TEMPLATE, {
        MAIN = f.main,
        USER = user_directive(opts.user),
        WORKERS = tostring(srv.workers),
        PREFIX = srv.prefix,
        ENV = env_directives(opts.env, vars),
        LUA_PATH = lua_path,
        LUA_CPATH = lua_cpath,
        HTTP = expand(opts.http or "", vars),
        SERVER = expand(opts.server or "", vars),
        PORT = vars.PORT,
        READY_PATH = READY_PATH,
        STREAM_BLOCK = stream_block,
    })
end

---------------------------------------------------------------------------
-- Server lifecycle
---------------------------------------------------------------------------

function Server:conf_path()
    return self.prefix .. "/conf/nginx.conf"
end

function Server:log_path(name)
    return self.prefix .. "/logs/" .. name .. ".log"
end

function Server:nginx_command(extra)
    local env = {}
    for name, value in pairs(self.process_env or {}) do
        env[#env + 1] = name .. "=" .. quote(value)
    end
    table.sort(env)
    return table.concat({
        #env > 0 and "env " .. table.concat(env, " ") or "",
        quote(flavor.get().bin),
        extra or "",
        "-p",
        quote(self.prefix),
        "-c",
        quote(self:conf_path()),
        "-e",
        quote(self:log_path("error")),
    }, " ")
end

-- Everything that helps explain a failure: the reason, `nginx -t`, and
-- the end of error.log.
function Server:diagnose(reason)
    local test_out = run(self:nginx_command("-t"))
    return table.concat({
        reason,
        "prefix: " .. self.prefix,
        "nginx -t:\n" .. test_out,
        "error.log (tail):\n" .. tail(self:error_log(), 30),
    }, "\n")
end

function Server:ready()
    local status = http_get(self.port, READY_PATH, nil, 1)
    return status == 204
end

function Server:read_master_pid()
    local text = read_file(self.prefix .. "/logs/nginx.pid")
    return tonumber(text and text:match("%d+"))
end

-- Launches nginx on a fresh port; retries when the port was taken between
-- the probe and nginx's bind. Returns nil, message on failure.
function Server:launch(opts)
    local out
    for _ = 1, PORT_ATTEMPTS do
        self.port = _M.free_port()
        self.url = "http://127.0.0.1:" .. self.port
        if opts.stream or opts.stream_server then
            self.stream_port = _M.free_port()
        end
        write_file(self:conf_path(), render_conf(self, opts))
        local code
        out, code = run(self:nginx_command())
        if code == 0 then
            return true
        elseif not out:find("Address already in use", 1, true) then
            break
        end
        -- The failed attempt's log goes aside: error.log is the running
        -- nginx's (specs read it for [emerg] lines).
        local log = self:log_path("error")
        os.rename(log, log .. ".port-" .. self.port)
    end
    return nil, "nginx failed to start:\n" .. out
end

-- Removes the prefix if start() created it (KEEP_NGINX=1 keeps it).
function Server:remove_prefix()
    if not self.owns_prefix then
        return
    elseif os.getenv("KEEP_NGINX") == "1" then
        io.stderr:write(
            "KEEP_NGINX=1: nginx prefix kept at ",
            self.prefix,
            "\n"
        )
    else
        run("rm -rf " .. quote(self.prefix))
    end
end

function Server:fail_start(reason)
    local message = self:diagnose(reason)
    self:stop()
    error(message, 3)
end

local function make_prefix(opts)
    if opts.prefix then
        return opts.prefix, false
    end
    local out, code = run(
        "mktemp -d "
            .. quote((os.getenv("TMPDIR") or "/tmp") .. "/nginx-spec.XXXXXX")
    )
    assert(code == 0, "mktemp failed: " .. out)
    return (out:gsub("%s+$", "")), true
end

function _M.start(opts)
    opts = opts or {}
    if (opts.stream or opts.stream_server) and not flavor.get().stream_lua then
        error(
            flavor.get().bin
                .. " has no stream lua module (stream-lua-nginx-module)",
            2
        )
    end
    local srv = setmetatable(
        { workers = opts.workers or 1, process_env = opts.process_env },
        Server
    )
    srv.prefix, srv.owns_prefix = make_prefix(opts)
    srv.repo = REPO
    run(
        "mkdir -p "
            .. quote(srv.prefix .. "/conf")
            .. " "
            .. quote(srv.prefix .. "/logs")
            .. " "
            .. quote(srv.prefix .. "/tmp")
    )

    running[srv] = true
    local ok, err = srv:launch(opts)
    if not ok then
        srv:fail_start(err)
    end
    srv.master_pid = wait_until(START_TIMEOUT, function()
        return srv:read_master_pid()
    end)
    if not srv.master_pid then
        srv:fail_start(
            "nginx wrote no pid file within " .. START_TIMEOUT .. "s"
        )
    end
    if
        not wait_until(START_TIMEOUT, function()
            return srv:ready()
        end)
    then
        srv:fail_start(
            "nginx did not answer on port "
                .. srv.port
                .. " within "
                .. START_TIMEOUT
                .. "s"
        )
    end
    -- A worker takes its title only after init_worker_by_lua, which may load
    -- libraries: wait until every worker is up, so worker_pids() is whole.
    if
        not wait_until(START_TIMEOUT, function()
            return #srv:worker_pids() == srv.workers
        end)
    then
        srv:fail_start(
            "not all "
                .. srv.workers
                .. " workers started within "
                .. START_TIMEOUT
                .. "s"
        )
    end
    return srv
end

function Server:get(path, headers, timeout)
    return http_get(self.port, path, headers, timeout or REQUEST_TIMEOUT)
end

-- One TCP connection to the stream server: sends `data` (if any), then
-- reads until nginx closes the connection.
function Server:tcp(data, timeout)
    timeout = timeout or REQUEST_TIMEOUT
    local sock = socket.tcp()
    sock:settimeout(timeout)
    local ok, err =
        sock:connect("127.0.0.1", assert(self.stream_port, "no stream server"))
    if ok and data and data ~= "" then
        ok, err = sock:send(data)
    end
    local body
    if ok then
        body, err = receive_all(sock, timeout)
    end
    sock:close()
    if not body then
        return nil, "tcp: " .. tostring(err)
    end
    return body
end

-- Pids of the workers of `master` that accept requests (not those shutting
-- down; after USR2 the new master is a child of the old one too).
local function worker_pids_of(master)
    local pids = {}
    if not master then
        return pids
    end
    local out = run("pgrep -P " .. master)
    for pid in out:gmatch("%d+") do
        local title = read_file("/proc/" .. pid .. "/cmdline") or ""
        if
            title:find("^nginx: worker process")
            and not title:find("shutting down")
        then
            pids[#pids + 1] = tonumber(pid)
        end
    end
    table.sort(pids)
    return pids
end

function Server:worker_pids()
    return worker_pids_of(self.master_pid)
end

-- Sends HUP, then waits until every old worker has exited and the full
-- set of new workers answers. Returns the new worker pids. With `opts`
-- (as for start: workers, http, server, ...), the configuration is
-- rewritten from them first, so the reload changes it.
function Server:reload(opts)
    local old = self:worker_pids()
    if opts then
        self.workers = opts.workers or self.workers
        write_file(self:conf_path(), render_conf(self, opts))
    end
    signal(self.master_pid, "HUP")
    local done = wait_until(RELOAD_TIMEOUT, function()
        return wait_gone(old, 0)
            and #self:worker_pids() == self.workers
            and self:ready()
    end)
    if not done then
        error(
            self:diagnose(
                "nginx reload did not complete within " .. RELOAD_TIMEOUT .. "s"
            ),
            2
        )
    end
    return self:worker_pids()
end

-- A binary upgrade as nginx documents it: USR2 (the master re-executes
-- its binary, which starts a new master with its own workers), then WINCH
-- (the old workers finish and exit) and QUIT to the old master. Returns,
-- once the old master is gone and the new workers answer, the pids of the
-- old workers; srv.master_pid is then the new master. Until the old master
-- is gone, stop() ends it too.
function Server:upgrade()
    local old_master, old_workers = self.master_pid, self:worker_pids()
    self.old_master = old_master
    signal(old_master, "USR2")
    local new_master
    local function step(done, what)
        if not done then
            error(
                self:diagnose(
                    "binary upgrade: "
                        .. what
                        .. " not within "
                        .. RELOAD_TIMEOUT
                        .. "s"
                ),
                3
            )
        end
    end
    step(
        wait_until(RELOAD_TIMEOUT, function()
            new_master = self:read_master_pid()
            return new_master ~= old_master
                and #worker_pids_of(new_master) == self.workers
        end),
        "a new master with its workers"
    )
    self.master_pid = new_master
    signal(old_master, "WINCH")
    step(wait_gone(old_workers, RELOAD_TIMEOUT), "the old workers gone")
    signal(old_master, "QUIT")
    step(wait_gone({ old_master }, RELOAD_TIMEOUT), "the old master gone")
    self.old_master = nil
    step(
        wait_until(RELOAD_TIMEOUT, function()
            return self:ready()
        end),
        "the new workers answering"
    )
    return old_workers
end

function Server:error_log()
    return self.final_error_log or read_file(self:log_path("error")) or ""
end

function Server:access_log_lines()
    local text = self.final_access_log
        or read_file(self:log_path("access"))
        or ""
    local lines = {}
    for line in text:gmatch("[^\n]+") do
        lines[#lines + 1] = line
    end
    return lines
end

-- QUIT, then TERM, then KILL (master and workers), each with a deadline.
-- Returns true when a graceful QUIT was enough.
local function terminate(master, workers)
    local all = { master, unpack(workers) }
    signal(master, "QUIT")
    if wait_gone(all, STOP_TIMEOUT) then
        return true
    end
    signal(master, "TERM")
    if not wait_gone(all, KILL_TIMEOUT) then
        for _, pid in ipairs(all) do
            signal(pid, "KILL")
        end
        wait_gone(all, KILL_TIMEOUT)
    end
    return false
end

-- Stops nginx; the logs stay readable through error_log() and
-- access_log_lines() after the prefix is removed. Idempotent.
function Server:stop()
    if self.stopped then
        return self.graceful
    end
    self.stopped = true
    running[self] = nil
    self.graceful = true
    if self.master_pid and pid_alive(self.master_pid) then
        self.graceful = terminate(self.master_pid, self:worker_pids())
    end
    local old = self.old_master -- a binary upgrade that did not finish
    if old and pid_alive(old) then
        self.graceful = terminate(old, worker_pids_of(old)) and self.graceful
    end
    self.final_error_log = read_file(self:log_path("error")) or ""
    self.final_access_log = read_file(self:log_path("access")) or ""
    self:remove_prefix()
    return self.graceful
end

-- Stops every server this module started and did not stop yet.
function _M.stop_all()
    local servers = {}
    for srv in pairs(running) do
        servers[#servers + 1] = srv
    end
    for _, srv in ipairs(servers) do
        srv:stop()
    end
end

_M.repo = REPO
_M.pid_alive = pid_alive
_M.flavor = flavor.get

-- Last line of defence: when the Lua state closes (the busted process
-- exits, even after an error), stop whatever is still running.
local sentinel = newproxy(true)
getmetatable(sentinel).__gc = _M.stop_all
_M._sentinel = sentinel

return _M
