-- Loading the native library in a real nginx: a missing, empty, foreign,
-- truncated, other-ABI or other-release file gives a clear error from
-- new() naming the path, and never a signal; an upgrade by rename followed
-- by a reload is seen by the new workers (the master loads no library).
-- A worker runs a private copy of the file (a memfd, else a temporary file
-- unlinked once loaded), so writing over the installed file in place
-- never reaches a running worker.

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

-- A shared object built from C `source` with the system compiler.
local function cc(path, source)
    local src = path .. ".c"
    local f = assert(io.open(src, "w"))
    f:write(source)
    f:close()
    sh("cc -shared -fPIC -o " .. path .. " " .. src)
    os.remove(src)
end

-- A stand-in library exporting the handshake with other values; `abi`
-- nil: a foreign library (no handshake).
local function stub(path, abi, version)
    if not abi then
        return cc(path, "int some_other_library(void) { return 0; }\n")
    end
    cc(
        path,
        "#include <stdint.h>\n"
            .. "uint32_t resty_counter_abi_version(void) { return "
            .. abi
            .. "; }\n"
            .. 'const char *resty_counter_version(void) { return "'
            .. version
            .. '"; }\n'
    )
end

-- For LD_PRELOAD: a memfd_create that fails as a kernel or a seccomp
-- policy without it does, and, with `no_tmp`, an mkstemp that fails too.
local function refusing(path, no_tmp)
    local fail = "{ errno = ENOSYS; return -1; }\n"
    cc(
        path,
        "#include <errno.h>\n"
            .. "int memfd_create(const char *n, unsigned int f) "
            .. fail
            .. (
                no_tmp
                    and "int mkstemp(char *t) " .. fail .. "int mkstemp64(char *t) " .. fail
                or ""
            )
    )
end

-- nginx whose workers look for the library only in `dir`; /t calls new()
-- and says whether it worked, or the error. `opts`: more options of
-- nginx.start (user, process_env).
local function start(dir, init, opts)
    local cpath = dir .. "/?.so"
    local o = {
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
    }
    for k, v in pairs(opts or {}) do
        o[k] = v
    end
    return nginx.start(o)
end

local function inode(path)
    return io.popen("stat -c %i " .. path):read("*l")
end

-- The lines of the workers' /proc/<pid>/maps that map the library: the
-- installed file, a memfd copy or a temporary copy.
local function library_mappings(srv, path)
    local lines = {}
    for _, pid in ipairs(srv:worker_pids()) do
        for line in io.lines("/proc/" .. pid .. "/maps") do
            if
                line:find(path, 1, true)
                or line:find("/memfd:libresty_counter.so", 1, true)
                or line:find("/lua_%w+ %(deleted%)$")
            then
                lines[#lines + 1] = line
            end
        end
    end
    return table.concat(lines, "\n")
end

-- Counts through /i from `from` to `to`, each answer the dict's value.
local function counts(srv, from, to)
    for i = from, to do
        local status, n = srv:get("/i")
        assert.equal(200, status, n)
        assert.equal(i .. "\n", n)
    end
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

    local function refused(prepare, pattern, opts)
        prepare(dir .. "/libresty_counter.so")
        local srv = start(dir, nil, opts)
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
        counts(srv, 1, 1)
        sh("install -m 644 " .. LIB .. " " .. p)
        counts(srv, 2, 20)
        no_signal(srv)
    end)

    -- Writing over the file in place (same inode, new bytes) used to reach
    -- every worker that mapped it: SIGBUS or SIGSEGV at its next call.
    local function survives_cp(opts)
        local p = dir .. "/libresty_counter.so"
        sh("cp " .. LIB .. " " .. p)
        local srv = start(dir, nil, opts)
        counts(srv, 1, 1)
        local maps = library_mappings(srv, p)
        assert.is_nil(maps:find(p, 1, true), maps)
        assert.not_equal("", maps)
        local before = inode(p)
        stub(dir .. "/other.so", 2, "9.9.9")
        sh("cp " .. dir .. "/other.so " .. p)
        assert.equal(before, inode(p))
        counts(srv, 2, 20) -- the running worker keeps its copy
        no_signal(srv)

        -- A reload reads the file now on disk: here, another release.
        srv:reload()
        local _, body = srv:get("/t")
        assert.matches("is version 9%.9%.9 %(ABI 2%)", body)
        sh("cp " .. LIB .. " " .. p) -- in place again, back to this release
        srv:reload()
        counts(srv, 21, 25)
        no_signal(srv)
        return maps
    end

    it(
        "survives `cp` over the loaded library in place (a memfd copy)",
        function()
            local maps = survives_cp()
            assert.matches(
                "/memfd:libresty_counter.so (deleted)",
                maps,
                1,
                true
            )
        end
    )

    it("loads a private copy in workers that run as nobody", function()
        sh("chmod 755 " .. dir)
        local maps = survives_cp({ user = "nobody nogroup" })
        assert.matches("/memfd:libresty_counter.so (deleted)", maps, 1, true)
    end)

    it(
        "falls back to a temporary file, unlinked, without memfd_create",
        function()
            local shim = dir .. "/refuse.so"
            refusing(shim)
            local maps = survives_cp({ process_env = { LD_PRELOAD = shim } })
            assert.matches("/lua_%w+ %(deleted%)", maps)
        end
    )

    it(
        "refuses, naming both reasons, when no private copy can be made",
        function()
            local shim = dir .. "/refuse.so"
            refusing(shim, true)
            local body = refused(
                function(p)
                    sh("cp " .. LIB .. " " .. p)
                end,
                "cannot make a private copy of ",
                {
                    process_env = { LD_PRELOAD = shim },
                }
            )
            assert.matches("memfd_create: ", body, 1, true)
            assert.matches("temporary file: ", body, 1, true)
        end
    )

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
