-- The original lua-resty-counter's own scenarios, against a real 4-worker
-- nginx that loads this project through the loading contract
-- (lua_package_path <repo>/lua, lua_package_cpath <repo>/target/release).
-- Each scenario runs many times, so that every worker serves some of them.

local nginx = require("spec.support.nginx")

local WORKERS = 4
local RUNS = 12
local INTERVAL = 0.1

local SERVER = [[
    location = /incr {
        content_by_lua_block {
            require("resty.counter").new("auto", ]] .. INTERVAL .. [[)
                :incr(ngx.var.arg_key)
        }
    }

    # incr, then get after one interval (and a little)
    location = /s1 {
        content_by_lua_block {
            local c = require("resty.counter").new("auto", ]] .. INTERVAL .. [[)
            local key = "s1-" .. ngx.var.arg_run
            c:incr(key)
            ngx.sleep(]] .. 2.5 * INTERVAL .. [[)
            ngx.say(c:get(key))
        }
    }

    # three subrequests plus the request itself
    location = /s2 {
        content_by_lua_block {
            local c = require("resty.counter").new("auto", ]] .. INTERVAL .. [[)
            local key = "s2-" .. ngx.var.arg_run
            local sub = { "/incr", { args = { key = key } } }
            ngx.location.capture_multi({ sub, sub, sub })
            c:incr(key)
            ngx.sleep(]] .. 2.5 * INTERVAL .. [[)
            ngx.say(c:get(key))
        }
    }

    # incr, then reset(key, 1)
    location = /s3 {
        content_by_lua_block {
            local c = require("resty.counter").new("auto", ]] .. INTERVAL .. [[)
            local key = "s3-" .. ngx.var.arg_run
            c:incr(key)
            ngx.sleep(]] .. 2.5 * INTERVAL .. [[)
            ngx.say((c:reset(key, 1)))
        }
    }

    # reset(key, 1), then incr
    location = /s4 {
        content_by_lua_block {
            local c = require("resty.counter").new("auto", ]] .. INTERVAL .. [[)
            local key = "s4-" .. ngx.var.arg_run
            c:reset(key, 1)
            c:incr(key)
            ngx.sleep(]] .. 2.5 * INTERVAL .. [[)
            ngx.say(c:get(key))
        }
    }

    # a manual counter: nil, then sync() is true, then 1
    location = /s5 {
        content_by_lua_block {
            local c = require("resty.counter").new("manual")
            local key = "s5-" .. ngx.var.arg_run
            c:incr(key)
            ngx.say(tostring(c:get(key)), " ", tostring(c:sync()), " ",
                    tostring(c:get(key)))
        }
    }

    location = /pid {
        content_by_lua_block { ngx.say(ngx.worker.pid()) }
    }
]]

describe("the original's scenarios, 4 workers #integration", function()
    local srv

    setup(function()
        srv = nginx.start({
            workers = WORKERS,
            http = [[
                lua_shared_dict auto 1m;
                lua_shared_dict manual 1m;
            ]],
            server = SERVER,
        })
    end)

    teardown(function()
        nginx.stop_all()
    end)

    local function run_all(path, expected)
        for run = 1, RUNS do
            local status, body = srv:get(path .. "?run=" .. run)
            assert.equal(200, status, body)
            assert.equal(expected, body, path .. " run " .. run)
        end
    end

    it("incr, then get after one interval, gives 1", function()
        run_all("/s1", "1\n")
    end)

    it("three subrequests plus the request give 4", function()
        run_all("/s2", "4\n")
    end)

    it("incr, then reset(key, 1), gives 0", function()
        run_all("/s3", "0\n")
    end)

    it("reset, then incr, gives 1", function()
        run_all("/s4", "1\n")
    end)

    it(
        "a manual counter reads nil, then sync() is true, then reads 1",
        function()
            run_all("/s5", "nil true 1\n")
        end
    )

    it("served those from several workers, with a clean error log", function()
        local pids = {}
        for _ = 1, 40 do
            local _, body = srv:get("/pid")
            pids[body] = true
        end
        local n = 0
        for _ in pairs(pids) do
            n = n + 1
        end
        assert.is_true(n >= 2, "all requests went to one worker")
        local log = srv:error_log()
        assert.is_nil(log:find("%[error%]"), log)
        assert.is_nil(log:find("%[alert%]"), log)
    end)
end)

describe("a missing native library #integration", function()
    teardown(function()
        nginx.stop_all()
    end)

    it("is an error from new() that names every path tried", function()
        local srv = nginx.start({
            workers = 1,
            http = [[ lua_shared_dict d 1m; ]],
            server = [[
                location = /t {
                    content_by_lua_block {
                        -- before the first require in this fresh worker
                        package.cpath = "/nonexistent/a/?.so;"
                                        .. "/nonexistent/b/?.so"
                        local ok, err = pcall(function()
                            require("resty.counter").new("d")
                        end)
                        ngx.say(ok, " ", err)
                    }
                }
            ]],
        })
        local status, body = srv:get("/t")
        assert.equal(200, status)
        assert.matches(
            "^false .*: resty.counter: cannot find "
                .. "libresty_counter.so in package.cpath; tried:",
            body
        )
        assert.matches("/nonexistent/a/libresty_counter.so", body, 1, true)
        assert.matches("/nonexistent/b/libresty_counter.so", body, 1, true)
    end)
end)
