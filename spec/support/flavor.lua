-- What the nginx under test needs in its configuration: the one place that
-- knows the two flavors. Plain Lua (no luasocket): spec/support/nginx.lua
-- uses it, and shell scripts read it through spec/support/nginx-conf.
--
--   NGINX_BIN         the nginx binary (default: `nginx` from PATH, which is
--                     Debian's nginx on the project's CI machine)
--   OPENRESTY_LUALIB  OpenResty's lualib (resty.core), when it is not at
--                     <bin>/../../lualib as in an OpenResty install and in
--                     tools/build-openresty's cache
--
-- Flavors, read from `nginx -V`:
--   openresty  lua-nginx-module built in (--add-module): no load_module
--              line; resty.core in OpenResty's lualib, which also goes on
--              lua_package_path explicitly so that no other copy shadows it
--   debian     lua-nginx-module as a dynamic module (Debian's
--              libnginx-mod-http-lua): load_module lines from the
--              --modules-path; resty.core from Debian's lua-resty-core

local _M = {}

local function run(cmd)
    local pipe = assert(io.popen(cmd .. " 2>&1"))
    local out = pipe:read("*a")
    pipe:close()
    return out
end

local function exists(path)
    local f = io.open(path)
    if f then
        f:close()
    end
    return f ~= nil
end

local function quote(s)
    return "'" .. tostring(s):gsub("'", [['\'']]) .. "'"
end

local function dirname(path)
    return path:match("^(.*)/[^/]*$") or "."
end

-- Lua path entries (;-separated) of the running Lua, without the "./"
-- ones: busted, luassert, penlight and luasocket for the specs that run
-- inside nginx.
local function host_entries(path)
    local kept = {}
    for entry in path:gmatch("[^;]+") do
        if not entry:find("^%./") then
            kept[#kept + 1] = entry
        end
    end
    return table.concat(kept, ";")
end

local function detect()
    local bin = os.getenv("NGINX_BIN")
    if not bin or bin == "" then
        bin = "nginx"
    end
    if not bin:find("/") then
        -- The path, not the name: a binary upgrade (USR2) re-executes the
        -- master's argv[0], which must name the file.
        local full = run("command -v " .. quote(bin)):gsub("%s+$", "")
        if full ~= "" then
            bin = full
        end
    end
    local V = run(quote(bin) .. " -V")
    local version = V:match("nginx version: (%S+)")
    if not version then
        error(
            "cannot run "
                .. bin
                .. " -V (set NGINX_BIN to an nginx binary): "
                .. V,
            0
        )
    end
    local f = {
        bin = bin,
        version = version,
        version_output = V,
        main = "", -- main-context lines (load_module)
        lualib = "", -- OpenResty's lualib, where resty.core should be
        lua_path = "", -- where resty.core lives, before any other entry
        lua_cpath = "",
        tool_path = host_entries(package.path),
        tool_cpath = host_entries(package.cpath),
    }
    local args = V:match("configure arguments:([^\n]*)") or ""
    local static_http = args:find("%-%-add%-module=%S*lua%-nginx%-module")
        or args:find("%-%-add%-module=%S*ngx_lua%-")
    local static_stream = args:find(
        "%-%-add%-module=%S*stream%-lua%-nginx%-module"
    ) or args:find("%-%-add%-module=%S*ngx_stream_lua")

    if static_http then
        f.name = "openresty"
        local lualib = os.getenv("OPENRESTY_LUALIB")
        if not lualib or lualib == "" then
            -- The file itself, not a link to it such as OpenResty's
            -- packages' /usr/bin/openresty.
            local file = run("readlink -f " .. quote(bin)):gsub("%s+$", "")
            lualib = dirname(dirname(dirname(file))) .. "/lualib"
        end
        f.lualib = lualib
        if exists(lualib .. "/resty/core.lua") then
            f.lua_path = lualib .. "/?.lua;" .. lualib .. "/?/init.lua"
            f.lua_cpath = lualib .. "/?.so"
        end
        f.stream_lua = static_stream ~= nil
    else
        f.name = "debian"
        local prefix = args:match("%-%-prefix=(%S+)") or "/usr/local/nginx"
        local modules = args:match("%-%-modules%-path=(%S+)")
            or (prefix .. "/modules")
        local lines = {}
        for _, m in ipairs({ "ndk_http_module.so", "ngx_http_lua_module.so" }) do
            if exists(modules .. "/" .. m) then
                lines[#lines + 1] = "load_module " .. modules .. "/" .. m .. ";"
            end
        end
        -- A dynamic stream lua module (none in Debian bookworm), with the
        -- stream module itself when that is dynamic too.
        if exists(modules .. "/ngx_stream_lua_module.so") then
            if args:find("%-%-with%-stream=dynamic") then
                table.insert(
                    lines,
                    1,
                    "load_module " .. modules .. "/ngx_stream_module.so;"
                )
            end
            lines[#lines + 1] = "load_module "
                .. modules
                .. "/ngx_stream_lua_module.so;"
            f.stream_lua = true
        else
            f.stream_lua = false
        end
        f.main = table.concat(lines, "\n")
        -- Debian's lua-resty-core, found on the host Lua's path.
        local core = package.searchpath
            and package.searchpath("resty.core", package.path)
        local dir = core and core:match("^(.*)/resty/core%.lua$")
            or "/usr/share/lua/5.1"
        f.lua_path = dir .. "/?.lua;" .. dir .. "/?/init.lua"
    end
    return f
end

local cached
-- The flavor of NGINX_BIN, detected once per process.
function _M.get()
    cached = cached or detect()
    return cached
end

return _M
