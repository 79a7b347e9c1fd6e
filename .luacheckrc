-- luacheck configuration for `make lint` (`luacheck lua spec bench examples`).
-- Everything is checked as code that runs in an nginx worker (ngx_lua:
-- LuaJIT plus ngx, ndk, coroutine.*); scripts that run under plain LuaJIT
-- use a subset of that, so one std serves both.
std = "ngx_lua"
max_line_length = 100

-- busted specs: describe, it, assert, spy, ...
files["spec"] = { std = "+busted" }

-- The shim's interval check, `not (n > 0)`, is meant: unlike `n <= 0` it is
-- true for NaN, which must be refused too.
files["lua/resty/counter.lua"] = { ignore = { "581" } }

-- wrk scripts run in wrk's own Lua (LuaJIT), which reads these globals.
files["examples/traffic.lua"] = {
    std = "luajit",
    globals = { "wrk", "setup", "init", "delay", "request", "response", "done" },
}
