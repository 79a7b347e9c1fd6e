-- The pure-Lua path: what Kong's and nginx-lua-prometheus's unit tests see.
-- They run outside nginx (plain Lua 5.1/5.2, or LuaJIT), with a minimal
-- `ngx` table (no ngx.config, no ngx.INFO) whose log counts every line,
-- and Lua-table stand-ins for the shared dicts. Run under both LuaJIT and
-- plain Lua by `make test-lua`.

local function stub_dict()
    local dict = { data = {}, evict = {} }

    function dict.incr(self, key, value, init)
        local cur = self.data[key]
        if cur == nil then
            if init == nil then
                return nil, "not found"
            end
            cur = init
        end
        if type(cur) ~= "number" then
            return nil, "not a number"
        end
        self.data[key] = cur + value
        return self.data[key], nil, self.evict[key] or false
    end

    function dict.get(self, key)
        return self.data[key]
    end

    function dict.get_keys(self, max)
        local keys = {}
        for k in pairs(self.data) do
            if max and max > 0 and #keys >= max then
                break
            end
            keys[#keys + 1] = k
        end
        return keys
    end

    return dict
end

local function fresh_env()
    local env = { logs = {}, timers = {} }
    env.ngx = {
        WARN = 5,
        ERR = 4,
        DEBUG = 8,
        shared = { counters = stub_dict(), other = stub_dict() },
        worker = {
            id = function()
                return 0
            end,
        },
        timer = {
            every = function(interval, fn, arg)
                env.timers[#env.timers + 1] = { interval, fn, arg }
                return true
            end,
        },
    }
    function env.ngx.log(level, ...)
        env.logs[#env.logs + 1] = { level, table.concat({ ... }) }
    end
    return env
end

describe("resty.counter without nginx #unit", function()
    local counter, env

    before_each(function()
        env = fresh_env()
        _G.ngx = env.ngx
        package.loaded["resty.counter"] = nil
        counter = require("resty.counter")
    end)

    after_each(function()
        _G.ngx = nil
        package.loaded["resty.counter"] = nil
    end)

    it("has the version of the rockspec it ships in", function()
        local pipe = assert(io.popen("ls resty-counter-*.rockspec"))
        local names = pipe:read("*a")
        pipe:close()
        local version = names:match("resty%-counter%-([%d%.]+)%-%d+%.rockspec")
        assert.is_string(version, "no rockspec found")
        assert.equal(version, counter._VERSION)
    end)

    it("counts, syncs and reads through the stub dict", function()
        local c = counter.new("counters")
        assert.is_true(c:incr("a"))
        assert.is_true(c:incr("a", 2))
        assert.is_true(c:incr("b", -0.5))
        assert.is_nil(c:get("a"))
        assert.is_true(c:sync())
        assert.equal(3, c:get("a"))
        assert.equal(-0.5, c:get("b"))
        assert.same({}, env.logs)
        local keys = c:get_keys()
        table.sort(keys)
        assert.same({ "a", "b" }, keys)
        assert.equal(2, #c:get_keys(0))
    end)

    it(
        "shares one buffer and one timer per dict, and new() does not grow",
        function()
            local c1 = counter.new("counters", 1)
            local c2 = counter.new("counters", "2")
            assert.equal(c1, c2)
            c1:incr("k")
            assert.is_true(c2:sync())
            assert.equal(1, c2:get("k"))
            collectgarbage()
            collectgarbage()
            local before = collectgarbage("count")
            for _ = 1, 10000 do
                counter.new("counters", 1)
            end
            collectgarbage()
            collectgarbage()
            assert.is_true(collectgarbage("count") - before < 64)
            assert.equal(1, #env.timers)
            assert.equal(1, env.timers[1][1]) -- the first interval wins
            -- the original's debug line, once
            assert.equal(1, #env.logs)
            assert.equal(env.ngx.DEBUG, env.logs[1][1])
        end
    )

    it("the timer syncs like the original's", function()
        local c = counter.new("counters", 0.5)
        c:incr("t", 3)
        local t = env.timers[1]
        t[2](false, t[3])
        assert.equal(3, c:get("t"))
    end)

    it(
        "rejects undefined dicts and bad intervals at the caller's level",
        function()
            -- through a Lua frame, so that level 2 has a position to report
            local ok, err = pcall(function()
                counter.new("nope")
            end)
            assert.is_false(ok)
            assert.matches('shared dict "nope" not defined', err, 1, true)
            assert.matches("pure_lua_spec.lua:%d+:", err)
            ok, err = pcall(counter.new, nil)
            assert.is_false(ok)
            assert.matches('shared dict "nil" not defined', err, 1, true)
            for _, bad in ipairs({ 0, -1, "abc", 0 / 0, math.huge }) do
                ok, err = pcall(counter.new, "counters", bad)
                assert.is_false(ok)
                assert.matches(
                    "expect sync_interval to be a positive number",
                    err,
                    1,
                    true
                )
            end
        end
    )

    it("rejects bad keys and steps and keeps the counter intact", function()
        local c = counter.new("counters")
        c:incr("k", 1)
        local bad = {
            { nil, 1 },
            { {}, 1 },
            { true, 1 },
            { "", 1 },
            { string.rep("x", 65536), 1 },
            { 0 / 0, 1 },
            { "k", 0 / 0 },
            { "k", math.huge },
            { "k", -math.huge },
            { "k", "2" },
            { "k", {} },
        }
        for i, args in ipairs(bad) do
            local ok, err = pcall(function()
                c:incr(args[1], args[2])
            end)
            assert.is_false(ok, "case " .. i)
            assert.matches("^.-pure_lua_spec.lua:%d+: bad ", err)
        end
        assert.is_true(c:sync())
        assert.equal(1, c:get("k"))
        assert.is_nil(c:get(""))
    end)

    it(
        "counts a number key as its tostring, and keys may hold NUL bytes",
        function()
            local c = counter.new("counters")
            c:incr(1)
            c:incr("1", 2)
            c:incr("a\0b", 4)
            c:incr(string.rep("k", 65535))
            assert.is_true(c:sync())
            assert.equal(3, c:get("1"))
            assert.equal(4, c:get("a\0b"))
            assert.is_nil(c:get("a"))
            assert.equal(1, c:get(string.rep("k", 65535)))
        end
    )

    it("reset is incr(key, -n, n) and leaves the buffer alone", function()
        local c = counter.new("counters")
        c:incr("r", 5)
        local v, err, forcible = c:reset("r", 1)
        assert.equal(0, v)
        assert.is_nil(err)
        assert.is_false(forcible)
        local nv, nerr = c:reset("r")
        assert.is_nil(nv)
        assert.equal("expect a number at #2", nerr)
        assert.is_true(c:sync())
        assert.equal(5, c:get("r"))
    end)

    it("a failing key fails alone, with the original's WARN line", function()
        local c = counter.new("counters")
        env.ngx.shared.counters.data.s = "a string"
        c:incr("s")
        c:incr("n")
        assert.is_false(c:sync())
        assert.equal(1, c:get("n"))
        assert.equal(1, #env.logs)
        assert.equal(env.ngx.WARN, env.logs[1][1])
        assert.equal(
            "error increasing counter in shdict key: s, err: " .. "not a number",
            env.logs[1][2]
        )
    end)

    it(
        "error_metric_name counts failed syncs and logs each eviction once",
        function()
            local c = counter.new("counters", nil, "sync_errors")
            env.ngx.shared.counters.evict.e = true
            c:incr("e")
            c:incr("ok")
            assert.is_false(c:sync())
            assert.equal(1, c:get("sync_errors"))
            assert.equal(1, c:get("e"))
            assert.equal(1, #env.logs)
            assert.equal(env.ngx.ERR, env.logs[1][1])
            assert.equal(
                "increasing counter in shdict: lru eviction: key=e",
                env.logs[1][2]
            )
            env.ngx.shared.counters.evict.e = nil
            c:incr("e")
            assert.is_true(c:sync())
            assert.equal(1, c:get("sync_errors"))
        end
    )

    it(
        "without error_metric_name an eviction is silent, as originally",
        function()
            local c = counter.new("counters")
            env.ngx.shared.counters.evict.e = true
            c:incr("e")
            assert.is_true(c:sync())
            assert.same({}, env.logs)
        end
    )
end)
