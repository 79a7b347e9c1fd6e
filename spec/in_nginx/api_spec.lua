-- The API against real shared dicts, inside an nginx worker (run by
-- spec/run-in-nginx): the native path, where Rust writes into the dict.

local counter = require("resty.counter")

local in_worker = require("spec.support.in_worker")
local error_log_since, error_log_size, not_at, mid_sync =
    in_worker.error_log_since,
    in_worker.error_log_size,
    in_worker.not_at,
    in_worker.mid_sync

local function count(text, plain)
    local n, from = 0, 1
    while true do
        local at = text:find(plain, from, true)
        if not at then
            return n
        end
        n, from = n + 1, at + #plain
    end
end

describe("resty.counter in nginx", function()
    local dict = ngx.shared.counters
    local c

    before_each(function()
        c = counter.new("counters")
        c:sync()
        dict:flush_all()
        dict:flush_expired()
    end)

    it("runs natively on a real shared dict", function()
        assert.equal("native", c:stats().mode)
    end)

    it("buffers until sync, then the dict holds the sums", function()
        assert.is_true(c:incr("a"))
        assert.is_true(c:incr("a", 2))
        assert.is_true(c:incr("b", -1.25))
        assert.is_nil(c:get("a"))
        assert.equal(2, c:stats().buffered_keys)
        assert.is_true(c:sync())
        assert.equal(3, c:get("a"))
        assert.equal(-1.25, c:get("b"))
        local keys = c:get_keys(0)
        table.sort(keys)
        assert.same({ "a", "b" }, keys)
        assert.equal(0, c:stats().buffered_keys)
    end)

    it("new() is one object per dict, with no growth", function()
        local first = counter.new("counters", 1)
        collectgarbage()
        collectgarbage()
        local before = collectgarbage("count")
        for _ = 1, 100000 do
            assert(counter.new("counters", 2) == first)
        end
        collectgarbage()
        collectgarbage()
        assert.is_true(collectgarbage("count") - before < 64)
        assert.equal(1, first:stats().sync_interval)
    end)

    it(
        "one timer per dict and worker, whatever new() is called with",
        function()
            local function timers()
                return ngx.timer.pending_count() + ngx.timer.running_count()
            end
            local before = timers()
            counter.new("stats") -- manual: a timer that waits for exit
            counter.new("stats", 0.5):incr("t")
            for i = 1, 1000 do
                counter.new("stats", i % 2 == 0 and 1 or nil)
            end
            assert.equal(before + 1, timers())
            assert.equal(0.5, counter.new("stats"):stats().sync_interval)
            -- the guard of the manual counter syncs the later interval
            local deadline = ngx.now() + 5
            while ngx.shared.stats:get("t") ~= 1 and ngx.now() < deadline do
                ngx.sleep(0.05)
                ngx.update_time()
            end
            assert.equal(1, ngx.shared.stats:get("t"))
        end
    )

    it(
        "throws at the caller's level for a missing dict or bad interval",
        function()
            local ok, err = pcall(function()
                counter.new("no_such_dict")
            end)
            assert.is_false(ok)
            assert.matches(
                'api_spec.lua:%d+: shared dict "no_such_dict" not ' .. "defined",
                err
            )
            for _, bad in ipairs({ 0, -1, "x", 0 / 0 }) do
                ok, err = pcall(function()
                    counter.new("counters", bad)
                end)
                assert.is_false(ok)
                assert.matches(
                    "api_spec.lua:%d+: expect sync_interval to be a "
                        .. "positive number",
                    err
                )
            end
        end
    )

    it("refuses bad keys and steps, and corrupts nothing", function()
        -- 1e300 + 1e308 differs from 1e308: the sum shows that the first
        -- 1e308 and the earlier step both arrived.
        c:incr("k", 1e300)
        local bad = {
            { nil, 1 },
            { {}, 1 },
            { false, 1 },
            { "", 1 },
            { string.rep("x", 65536), 1 },
            { 0 / 0, 1 },
            { "k", 0 / 0 },
            { "k", 1 / 0 },
            { "k", -1 / 0 },
            { "k", "1" },
            { "k", 1e308 },
            { "k", 1e308 },
        }
        local errors = 0
        for _, args in ipairs(bad) do
            local ok, err = pcall(function()
                c:incr(args[1], args[2])
            end)
            if not ok then
                errors = errors + 1
                assert.matches("api_spec.lua:%d+: bad ", err)
            end
        end
        -- all but the first 1e308, which fits; the second would overflow
        assert.equal(#bad - 1, errors)
        assert.is_true(c:sync())
        assert.equal(1e300 + 1e308, c:get("k"))
        assert.is_true(c:get("k") > 1e308)
        assert.is_nil(c:get(""))
    end)

    it("counts number keys as their tostring; keys are bytes", function()
        c:incr(1)
        c:incr("1", 2)
        c:incr(1.5)
        c:incr("a\0b", 4)
        c:incr("a\0c", 8)
        local long = string.rep("\255", 65535)
        c:incr(long, 16)
        assert.is_true(c:sync())
        assert.equal(3, c:get("1"))
        assert.equal(1, c:get("1.5"))
        assert.equal(4, c:get("a\0b"))
        assert.equal(8, c:get("a\0c"))
        assert.is_nil(c:get("a"))
        assert.equal(16, c:get(long))
    end)

    it("reset is dict:incr(key, -n, n) and leaves the buffer alone", function()
        c:incr("r", 5)
        local v, err, forcible = c:reset("r", 1)
        assert.equal(0, v)
        assert.is_nil(err)
        assert.is_false(forcible)
        assert.same({ nil, "expect a number at #2" }, { c:reset("r") })
        assert.is_true(c:sync())
        assert.equal(5, c:get("r"))
        assert.equal(2, c:reset("r", 3))
    end)

    it("a key that holds a string fails alone, logged once", function()
        dict:set("s", "a string")
        local log_at = error_log_size()
        c:incr("s")
        c:incr("n1")
        c:incr("n2", 2)
        assert.is_false(c:sync())
        assert.equal("a string", c:get("s"))
        assert.equal(1, c:get("n1"))
        assert.equal(2, c:get("n2"))
        local log = error_log_since(log_at)
        assert.equal(
            1,
            count(
                log,
                "error increasing counter in shdict key: "
                    .. "s, err: not a number"
            )
        )
        local s = c:stats()
        assert.is_true(s.dropped_permanent >= 1)
        assert.equal(0, s.pending_keys)
        -- the next sync is clean again
        c:incr("n1")
        assert.is_true(c:sync())
    end)

    it("keeps deltas a full dict refused, and delivers them later", function()
        -- A dict full of small entries: evicting 30 of them frees no slab
        -- page for a larger key, so nginx answers "no memory".
        local small = ngx.shared.full
        small:flush_all()
        small:flush_expired()
        local fillers = 0
        while small:safe_set("f" .. fillers + 1, 1) do
            fillers = fillers + 1
        end
        local sc = counter.new("full")
        local prefix = string.rep("k", 300)
        for i = 1, 20 do
            sc:incr(prefix .. i, i)
            sc:incr(prefix .. i, 0.5)
        end
        local log_at = error_log_size()
        assert.is_false(sc:sync())
        local s = sc:stats()
        assert.is_true(s.pending_keys > 0, "nothing was refused")
        assert.is_true(count(error_log_since(log_at), "err: no memory") > 0)

        -- Room returns: every refused delta arrives, exactly once.
        for i = 1, fillers do
            small:delete("f" .. i)
        end
        assert.is_true(sc:sync())
        for i = 1, 20 do
            assert.equal(i + 0.5, small:get(prefix .. i), "key " .. i)
        end
        s = sc:stats()
        assert.equal(0, s.pending_keys)
        assert.is_true(s.retries > 0)
        assert.equal(0, s.dropped_deltas)
        small:flush_all()
        small:flush_expired()
    end)

    it(
        "a pending delta the dict refuses for good at retry fails the sync, "
            .. "logged, counted and in the error metric",
        function()
            local small = ngx.shared.full
            small:flush_all()
            small:flush_expired()
            local fillers = 0
            while small:safe_set("f" .. fillers + 1, 1) do
                fillers = fillers + 1
            end
            local sc = counter.new("full", nil, "sync_errors")
            local key = string.rep("p", 300)
            sc:incr(key, 1)
            assert.is_false(sc:sync())
            assert.equal(1, sc:stats().pending_keys)
            for i = 1, fillers do
                small:delete("f" .. i)
            end
            -- The key turns into a string before the retry.
            assert.is_true(small:set(key, "a string"))
            local errors = small:get("sync_errors") or 0
            local dropped = sc:stats().dropped_permanent
            local log_at = error_log_size()
            assert.is_false(sc:sync())
            local s = sc:stats()
            assert.equal(0, s.pending_keys)
            assert.equal(dropped + 1, s.dropped_permanent)
            assert.equal(errors + 1, small:get("sync_errors"))
            assert.equal(
                1,
                count(
                    error_log_since(log_at),
                    "refused 1 pending " .. "increments for good when retried"
                )
            )
            small:flush_all()
            small:flush_expired()
        end
    )

    it(
        "a delta whose sum with its pending delta overflows is dropped and "
            .. "reported; the pending one stays",
        function()
            local small = ngx.shared.full
            small:flush_all()
            small:flush_expired()
            local fillers = 0
            while small:safe_set("f" .. fillers + 1, 1) do
                fillers = fillers + 1
            end
            local sc = counter.new("full")
            local key = string.rep("o", 300)
            sc:incr(key, 1e308)
            assert.is_false(sc:sync())
            assert.equal(1, sc:stats().pending_keys)
            local before = sc:stats().dropped_overflow
            sc:incr(key, 1e308)
            local log_at = error_log_size()
            assert.is_false(sc:sync())
            assert.equal(before + 1, sc:stats().dropped_overflow)
            assert.equal(
                1,
                count(
                    error_log_since(log_at),
                    "sum with the pending " .. "delta is not finite"
                )
            )
            for i = 1, fillers do
                small:delete("f" .. i)
            end
            assert.is_true(sc:sync())
            assert.equal(1e308, small:get(key))
            assert.equal(0, sc:stats().pending_keys)
            small:flush_all()
            small:flush_expired()
        end
    )

    it(
        "a sum that would leave the finite range saturates the key and is "
            .. "reported; the dict never holds inf",
        function()
            c:incr("big", 1e308)
            assert.is_true(c:sync())
            local dropped = c:stats().dropped_overflow
            local log_at = error_log_size()
            c:incr("big", 1e308)
            c:incr("fine", 1)
            assert.is_false(c:sync())
            assert.equal(1.7976931348623157e308, dict:get("big"))
            assert.equal(1, dict:get("fine"))
            assert.equal(dropped + 1, c:stats().dropped_overflow)
            assert.equal(
                1,
                count(
                    error_log_since(log_at),
                    "key: big, err: sum " .. "in the dict is not finite"
                )
            )
            c:incr("neg", -1e308)
            assert.is_true(c:sync())
            c:incr("neg", -1e308)
            assert.is_false(c:sync())
            assert.equal(-1.7976931348623157e308, dict:get("neg"))
        end
    )

    it("error_metric_name: evictions fail the sync and count once", function()
        local small = ngx.shared.full
        small:flush_all()
        small:flush_expired()
        local sc = counter.new("full", nil, "sync_errors")
        -- Fill the dict with plain entries, so that new keys evict them.
        for i = 1, 10000 do
            if not small:safe_set("filler-" .. i, i) then
                break
            end
        end
        local log_at = error_log_size()
        sc:incr("evictor")
        assert.is_false(sc:sync())
        assert.equal(1, sc:get("evictor"))
        assert.equal(1, sc:get("sync_errors"))
        local log = error_log_since(log_at)
        assert.equal(
            1,
            count(
                log,
                "increasing counter in shdict: lru " .. "eviction: key=evictor"
            )
        )
        assert.equal(0, count(log, "error increasing counter"))
        assert.is_true(sc:stats().evictions >= 1)
        small:flush_all()
        small:flush_expired()
    end)

    it(
        "error_metric_name: eviction lines stop at the worker's 100 per-key "
            .. "lines a minute, one line says the rest are counted; the metric "
            .. "counts the sync once",
        function()
            local small = ngx.shared.full
            small:flush_all()
            small:flush_expired()
            local sc = counter.new("full", nil, "sync_errors")
            for i = 1, 10000 do
                if not small:safe_set("filler-" .. i, i) then
                    break
                end
            end
            local log_at = error_log_size()
            for i = 1, 300 do
                sc:incr("evictor-" .. i)
            end
            assert.is_false(sc:sync())
            local evicted = sc:stats().evictions
            assert.is_true(
                evicted > 100,
                "too few evictions to test: " .. evicted
            )
            -- Earlier specs of this file may have spent some of the minute.
            local log = error_log_since(log_at)
            local lines = count(log, "lru eviction: key=evictor-")
            assert.is_true(lines >= 1 and lines <= 100, lines .. " lines")
            assert.equal(
                1,
                count(log, "logged 100 per-key lines in this minute")
            )
            assert.equal(1, sc:get("sync_errors"))
            small:flush_all()
            small:flush_expired()
        end
    )

    it("the automatic sync delivers without a manual sync", function()
        local c2 = counter.new("counters2", 0.05)
        ngx.shared.counters2:delete("auto")
        c2:incr("auto", 7)
        local deadline = ngx.now() + 5
        while c2:get("auto") == nil and ngx.now() < deadline do
            ngx.sleep(0.02)
            ngx.update_time()
        end
        assert.equal(7, c2:get("auto"))
        assert.is_true(c2:stats().syncs >= 1)
    end)

    it(
        "reset refuses non-finite numbers and never makes a value "
            .. "non-finite",
        function()
            -- NaN keeps the original's message for a non-number.
            for _, n in ipairs({
                "inf",
                "-inf",
                math.huge,
                -math.huge,
                0 / 0,
                "nan",
            }) do
                local num = tonumber(n)
                local want = (not num or num ~= num) and "expect a number at #2"
                    or "expect a finite number at #2"
                local v, err = c:reset("new", n)
                assert.is_nil(v)
                assert.equal(want, err)
                v, err = c:reset("r", n)
                assert.is_nil(v)
                assert.equal(want, err)
            end
            assert.is_nil(dict:get("new"))
            -- A value at the edge: the result would leave the double range.
            dict:set("edge", -1e308)
            local v, err = c:reset("edge", 1e308)
            assert.is_nil(v)
            assert.equal("reset would overflow the value of key", err)
            assert.equal(-1e308, dict:get("edge"))
            -- inf written by other code: reset(key, get(key)) is refused and
            -- the value stays a number (inf), not NaN.
            dict:set("inf", math.huge)
            v, err = c:reset("inf", c:get("inf"))
            assert.is_nil(v)
            assert.equal("expect a finite number at #2", err)
            v, err = c:reset("inf", 1)
            assert.is_nil(v)
            assert.equal("value of key is not a finite number", err)
            assert.equal(math.huge, dict:get("inf"))
            assert.equal(0, c:reset("fin", 0))
        end
    )

    it(
        "outside the supported lua-nginx-module versions, counts in pure "
            .. "Lua and warns once naming the version",
        function()
            local config = ngx.config -- stubbed for this test, then restored
            local real = config.ngx_lua_version
            local offset = error_log_size()
            rawset(config, "ngx_lua_version", 10011) -- 0.10.11: 8-arg incr
            local ok, g = pcall(counter.new, "gated")
            rawset(config, "ngx_lua_version", real)
            assert(ok, g)
            assert.equal("lua", g:stats().mode)
            g:incr("a")
            g:incr("a", 2)
            assert.is_true(g:sync())
            assert.equal(3, ngx.shared.gated:get("a"))
            -- the pure-Lua sync escapes the keys it logs
            local forged = "s\n2026/01/01 00:00:00 [info] 1#1: forged"
            ngx.shared.gated:set(forged, "not a number")
            g:incr(forged)
            g:sync()
            local log = error_log_since(offset)
            assert.equal(
                1,
                count(
                    log,
                    "lua-nginx-module version 10011 is "
                        .. "outside the supported range"
                )
            )
            assert.equal(1, count(log, "shdict key: s\\x0a2026/01/01"))
            assert.is_nil(log:find("\n2026/01/01 00:00:00 [info]", 1, true))
            -- the running version passes the gate
            assert.equal("native", counter.new("counters"):stats().mode)
        end
    )

    it(
        "sync() where it may yield (a scrape in the content phase) yields "
            .. "between slices and returns with everything written",
        function()
            local K = 30000
            for i = 1, K do
                c:incr("y" .. i, i)
            end
            -- A 0 s timer runs at the event loop's next turn: during sync()
            -- only if sync() yields to the loop.
            local in_sync, seen = false, false
            local function probe(premature)
                seen = not premature and in_sync
            end
            in_sync = true
            assert(ngx.timer.at(0, probe))
            assert.is_true(c:sync())
            in_sync = false
            assert.is_true(seen, "the event loop never ran during sync()")
            assert.equal(
                0,
                not_at(dict, "y", K),
                "keys not in the dict when sync() returned"
            )
        end
    )

    it(
        "sync() where it may yield pauses only when the event loop has work "
            .. "waiting: none, no pause",
        function()
            -- ngx.now() is the event loop's clock, updated at each of its
            -- turns: unchanged across sync() means the loop never ran, so
            -- no slice paused. 5,000 new keys take several slices. Another
            -- timer of this worker may fall due during a sync (counters2's
            -- runs every 50 ms), and then it pauses, rightly: five tries.
            local K = 5000
            local never_ran, wrong = false, 0
            for try = 1, 5 do
                for i = 1, K do
                    c:incr("w" .. try .. "-" .. i, 1)
                end
                local before = ngx.now()
                assert.is_true(c:sync())
                if ngx.now() == before then
                    never_ran = true
                    wrong = not_at(dict, "w" .. try .. "-", K, 1)
                    break
                end
            end
            assert.is_true(never_ran, "sync() paused with nothing waiting")
            assert.equal(0, wrong, "keys not in the dict when sync() returned")
        end
    )

    it(
        "sync() where it may yield pauses for a request waiting on a socket",
        function()
            local http = require("spec.support.http")
            local K = 5000
            for i = 1, K do
                c:incr("v" .. i, 1)
            end
            -- A light thread sends a request to this server and waits for
            -- the answer on its socket. Whichever worker serves it, this
            -- worker has I/O waiting while sync() runs (the connection to
            -- accept, or the answer to read), and the thread sees the
            -- answer during the sync only if a slice pauses for it. A
            -- timer falling due makes a slice pause too; 5,000 keys keep
            -- the sync short enough for that to be rare. Five tries.
            local during = false
            for _ = 1, 5 do
                local in_sync, answered_in_sync = false, false
                local t = ngx.thread.spawn(function()
                    local status = http.get("/__ping")
                    answered_in_sync = status == 200 and in_sync
                end)
                in_sync = true
                assert.is_true(c:sync())
                in_sync = false
                ngx.thread.wait(t)
                if answered_in_sync then
                    during = true
                    break
                end
                for i = 1, K do
                    c:incr("v" .. i, 1)
                end
            end
            assert.is_true(during, "the request waited for sync() to end")
        end
    )

    it(
        "a sync() that takes over the automatic sync's drain between two "
            .. "of its slices hands each key over once",
        function()
            local K = 40000
            local tc = mid_sync("takeover", "t", K, { stage = false })
            assert.is_true(tc:sync())
            local td = ngx.shared.takeover
            local wrong = not_at(td, "t", K, 1)
            -- The automatic sync's last slice may still run: let it end.
            ngx.sleep(0.2)
            wrong = wrong + not_at(td, "t", K, 1)
            assert.equal(0, wrong, "keys not exactly 1")
            assert.equal(K, tc:stats().keys_flushed)
        end
    )

    it(
        "a burst's automatic sync keeps what came in during its pauses",
        function()
            -- 40,000 keys at the first sync: a burst, whose big table goes
            -- to the GC at the drain's end. Increments made between two of
            -- its slices to keys it already handed over must move with the
            -- buffer to the fresh table.
            local K = 40000
            local bc = mid_sync("burst", "b", K, { stage = false })
            for i = 1, K do
                bc:incr("b" .. i, 1)
            end
            local bd = ngx.shared.burst
            local wrong
            for _ = 1, 100 do
                ngx.sleep(0.05)
                wrong = not_at(bd, "b", K, 2)
                if wrong == 0 then
                    break
                end
            end
            assert.equal(0, wrong, "keys not at 2")
            assert.equal(0, bc:stats().buffered_keys)
        end
    )

    it(
        "a sync drains the buffer in place: increments go into one table, "
            .. "sync after sync",
        function()
            -- Two tables swapped at each sync cost a worker twice the CPU
            -- of the original's one (docs/DESIGN.md); the buffer stays.
            local buf = c.buf
            for round = 1, 3 do
                for i = 1, 1000 do
                    c:incr("p" .. i, 1)
                end
                assert.is_true(c:sync())
                assert.equal(buf, c.buf, "a new buffer after sync " .. round)
                assert.equal(0, c:stats().buffered_keys)
                assert.equal(round, dict:get("p1000"))
            end
        end
    )

    it(
        "sync() where it may yield writes every key buffered before it, "
            .. "when new keys make the buffer grow during its pauses",
        function()
            local K = 20000
            for i = 1, K do
                c:incr("g" .. i, 1)
            end
            -- 0 s timers fall due during sync(), so its slices pause, and
            -- each adds 20,000 new keys to the buffer being drained: the
            -- table grows (a rehash), and a pass under way can miss keys.
            local in_sync, grown = false, 0
            local function grow(premature)
                if premature or not in_sync then
                    return
                end
                grown = grown + 1
                for i = 1, 20000 do
                    c:incr("n" .. grown .. "-" .. i, 1)
                end
                if grown < 3 then
                    assert(ngx.timer.at(0, grow))
                end
            end
            in_sync = true
            assert(ngx.timer.at(0, grow))
            assert.is_true(c:sync())
            in_sync = false
            assert.is_true(grown > 0, "no keys came in during sync()")
            assert.equal(
                0,
                not_at(dict, "g", K, 1),
                "keys not in the dict when sync() returned"
            )
            -- What came in during the sync is written once, by now or next.
            assert.is_true(c:sync())
            for g = 1, grown do
                for i = 1, 20000, 997 do
                    assert.equal(1, dict:get("n" .. g .. "-" .. i))
                end
            end
        end
    )

    it(
        "sync() where it cannot yield (log phase) runs to the end at once",
        function()
            local http = require("spec.support.http")
            local status, body = http.get("/__sync_in_log?n=20000")
            assert.equal(200, status, body)
            local done
            for _ = 1, 100 do
                done = ngx.shared.counters2:get("log-sync-done")
                if done then
                    break
                end
                ngx.sleep(0.05)
            end
            assert.equal("true 20000", done)
        end
    )
end)
