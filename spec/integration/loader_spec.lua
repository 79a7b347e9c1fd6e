-- Loading the native library in a real nginx: a missing, empty, foreign,
-- truncated, other-ABI or other-release file gives a clear error from
-- new() naming the path, and never a signal; an upgrade by rename followed
-- by a reload is seen by the new workers (the master loads no library).

local nginx = require("spec.support.nginx")

local REPO = os.getenv("REPO") or "."
local LIB = REPO .. "/target/release/libresty_counter.so"

local function sh(cmd)
    local ok = os.execute(cmd)
    assert(ok == true or ok == 0, "failed: " .. cmd)
end

local function tmpdir()
    local p =
        io.popen('mktemp -d "${TMPDIR:-/tmp}/resty-counter-loader.XXXXXX"')
    local dir = p:read("*l")
    p:close()
    return dir
end

-- A stand-in library exporting the handshake with other values, built
-- with the system C compiler; `abi` nil: a foreign library (no handshake).
local function stub(path, abi, version)
    local src = path .. ".c"
    local f = assert(io.open(src, "w"))
    if abi then
        f:write(
            "#include <stdint.h>\n",
            "uint32_t resty_counter_abi_version(void) { return ",
            abi,
            "; }\n",
            'const char *resty_counter_version(void) { return "',
            version,
            '"; }\n'
        )
    else
        f:write("int some_other_library(void) { return 0; }\n")
    end
    f:close()
    sh("cc -shared -fPIC -o " .. path .. " " .. src)
    os.remove(src)
end

-- nginx whose workers look for the library only in `dir`; /t calls new()
-- and says whether it worked, or the error.
local function start(dir, init)
    local cpath = dir .. "/?.so"
    return nginx.start({
        workers = 1,
        http = [[
      lua_shared_dict d 1m;
      init_by_lua_block {
        package.cpath = "]] .. cpath .. [["
        ]] .. (init or "") .. [[
      }
    ]],
        server = [[
      location = /t {
        content_by_lua_block {
          package.cpath = "]] .. cpath .. [["
          local ok, err = pcall(function()
            return require("resty.counter").new("d"):stats().mode
          end)
          ngx.say(ok, " ", err)
        }
      }
      location = /i {
        content_by_lua_block {
          local c = COUNTER or require("resty.counter").new("d")
          c:incr("k")
          c:sync()
          ngx.say(ngx.shared.d:get("k"))
        }
      }
    ]],
    })
end

local function no_signal(srv)
    local log = srv:error_log()
    assert.is_nil(log:find("exited on signal", 1, true), log)
end

describe("the native library loader #integration", function()
    local dir

    before_each(function()
        dir = tmpdir()
    end)

    after_each(function()
        nginx.stop_all()
        sh("rm -rf " .. dir)
    end)

    local function refused(prepare, pattern)
        prepare(dir .. "/libresty_counter.so")
        local srv = start(dir)
        local status, body = srv:get("/t")
        assert.equal(200, status, body)
        assert.matches("^false .*" .. pattern, body)
        assert.matches(dir .. "/libresty_counter.so", body, 1, true)
        no_signal(srv)
        return body
    end

    it("refuses a truncated library (first 4 KiB) without a signal", function()
        refused(function(p)
            sh("head -c 4096 " .. LIB .. " > " .. p)
        end, "resty.counter: truncated or damaged library ")
    end)

    it("refuses a library cut in its middle", function()
        refused(function(p)
            sh("head -c 200000 " .. LIB .. " > " .. p)
        end, "truncated or damaged library .*past the file's")
    end)

    it("refuses an empty (0-byte) file", function()
        refused(function(p)
            sh(": > " .. p)
        end, "truncated or damaged library .*0 bytes")
    end)

    it("refuses a file that is not ELF", function()
        refused(function(p)
            sh("echo 'not a library' > " .. p)
        end, "truncated or damaged library .*not an ELF file")
    end)

    it("skips a foreign library and names it", function()
        refused(
            function(p)
                stub(p, nil)
            end,
            "cannot find libresty_counter.so in package.cpath; tried:.*"
                .. "not resty.counter's library"
        )
    end)

    it("refuses another ABI, naming both versions", function()
        local body = refused(function(p)
            stub(p, 99, "0.3.0")
        end, "is version 0.3.0 %(ABI 99%), but the shim ")
        assert.matches("counter.lua is version 0.3.0 (ABI ", body, 1, true)
        assert.matches("restart nginx", body, 1, true)
    end)

    it("refuses another release of the same ABI", function()
        refused(function(p)
            stub(p, 1, "0.2.9")
        end, "is version 0.2.9 %(ABI 1%), but the shim .* is version 0.3.0")
    end)

    it("keeps counting when `install` replaces the loaded library", function()
        local p = dir .. "/libresty_counter.so"
        sh("cp " .. LIB .. " " .. p)
        local srv = start(dir)
        local _, n = srv:get("/i")
        assert.equal("1\n", n)
        local inode = io.popen("stat -c %i " .. p):read("*l")
        sh("install -m 644 " .. LIB .. " " .. p)
        assert.not_equal(inode, io.popen("stat -c %i " .. p):read("*l"))
        for i = 2, 20 do
            _, n = srv:get("/i")
            assert.equal(i .. "\n", n)
        end
        no_signal(srv)
    end)

    it(
        "loads the library in the workers only, so a reload sees a "
            .. "library replaced by rename",
        function()
            local p = dir .. "/libresty_counter.so"
            sh("cp " .. LIB .. " " .. p)
            -- new() and a count in the master (init phase), as applications do.
            local srv = start(
                dir,
                [[
        COUNTER = require("resty.counter").new("d")
        COUNTER:incr("k")
    ]]
            )
            local status, body = srv:get("/t")
            assert.equal(200, status)
            assert.equal("true native\n", body)
            local _, n = srv:get("/i")
            assert.equal("2\n", n)

            -- Upgrade by rename to a library of another release, then reload.
            stub(p .. ".new", 2, "9.9.9")
            assert(os.rename(p .. ".new", p))
            srv:reload()
            status, body = srv:get("/t")
            assert.equal(200, status)
            assert.matches(
                "^false .*"
                    .. p:gsub("%p", "%%%0")
                    .. " is version 9%.9%.9 %(ABI 2%)",
                body
            )

            -- A worker whose first use is incr (the counter made in the master)
            -- says so in the log and keeps counting exactly in Lua.
            -- Each start of the master counts 1 in init: 3 starts and 2 requests.
            srv:reload()
            _, n = srv:get("/i")
            assert.equal("5\n", n)
            local log = srv:error_log()
            assert.matches("is version 9.9.9 (ABI 2)", log, 1, true)
            assert.matches('counting in Lua for shared dict "d"', log, 1, true)
            no_signal(srv)
        end
    )
end)
