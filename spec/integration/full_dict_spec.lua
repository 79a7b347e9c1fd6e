-- A full dict, and what stats() shows: one worker, manual
-- counters (no interval), so each sync is the one the spec asks for and
-- c:stats() describes the worker that served the request; one automatic
-- counter (dict mid_raise) for a sync that raises.
--
-- How a shared dict refuses a write: incr of a missing key allocates a
-- node; when the slab has no room it evicts up to 30 least recently used
-- entries, and answers "no memory" if that freed no slot of the right size.
--   * transient: the dict is full of small entries in shuffled LRU order
--     and the keys need whole pages (3000-byte keys), so 30 evictions never
--     free a page; after flush_all + flush_expired there is room;
--   * always full: a 12k dict cannot hold any key of 100 bytes even empty
--     (the spec checks this first), so those writes fail on every retry;
--   * evictions: a dict full of same-size entries, so each new key evicts
--     one of them and is stored (`forcible`); a pending 3000-byte key,
--     retried once the dict is full of 3000-byte entries, evicts one too.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local HTTP = [[
  lua_shared_dict mid_new 64k;
  lua_shared_dict mid_orig 64k;
  lua_shared_dict tiny 12k;
  lua_shared_dict tiny_bytes 12k;
  lua_shared_dict evict 64k;
  lua_shared_dict evict_retry 64k;
  lua_shared_dict mid_raise 64k;
  lua_shared_dict strdict 1m;
  lua_shared_dict strdict_stats 1m;
  init_worker_by_lua_block {
    local H = require "spec.integration.helpers"
    -- The counter of module `m` ("new" or "orig") on dict `d`, manual,
    -- with the error metric `em` if given.
    function H.full_counter()
      local m, d = ngx.var.arg_m or "new", ngx.var.arg_d
      local M = require(m == "orig" and H.ORIGINAL or H.NEW)
      return M.new(d, nil, ngx.var.arg_em), ngx.shared[d]
    end
    function H.big_key(i)
      return string.char(96 + i):rep(3000)
    end
    require("resty.counter").new("mid_raise", 0.1)
  }
]]

local SERVER = [[
  # Fills dict d with small numbers until it is full, then touches them in
  # a shuffled order, so the least recently used ones are spread over all
  # slab pages.
  location = /fill {
    content_by_lua_block {
      local fill = require("spec.support.fill")
      ngx.say(fill.small(ngx.shared[ngx.var.arg_d]))
    }
  }
  # Fills dict d with 3000-byte keys until it is full: each takes a page,
  # as a counter's 3000-byte key does, so writing one evicts one.
  location = /fill_big {
    content_by_lua_block {
      local d = ngx.shared[ngx.var.arg_d]
      local n = 0
      while d:safe_set(("F%05d"):format(n + 1) .. ("f"):rep(2994), 0) do
        n = n + 1
      end
      ngx.say(n)
    }
  }
  # The next line an automatic sync logs about a failed key raises, once,
  # as a function the application wrapped might.
  location = /raise_once {
    content_by_lua_block {
      local log = ngx.log
      ngx.log = function(level, ...)
        local head = ...
        if tostring(head):find("error increasing counter", 1, true) then
          ngx.log = log
          error("raised by the spec")
        end
        return log(level, ...)
      end
    }
  }
  # n increments of big key i, buffered for the automatic sync.
  location = /incr_big {
    content_by_lua_block {
      local H = require "spec.integration.helpers"
      local c = H.full_counter()
      for _ = 1, tonumber(ngx.var.arg_n) do
        c:incr(H.big_key(tonumber(ngx.var.arg_i)))
      end
    }
  }
  location = /peek {
    content_by_lua_block {
      local H = require "spec.integration.helpers"
      local c, d = H.full_counter()
      local v = d:get(H.big_key(tonumber(ngx.var.arg_i)))
      local st = c:stats()
      ngx.print(H.encode({ v = v or "nil", pending = st.pending_keys,
                           syncs = st.syncs }))
    }
  }
  location = /room {
    content_by_lua_block {
      local d = ngx.shared[ngx.var.arg_d]
      d:flush_all()
      d:flush_expired()
    }
  }
  # Three keys of 3000 bytes, steps 1, 2, 3, then a sync.
  location = /big {
    content_by_lua_block {
      local H = require "spec.integration.helpers"
      local c = H.full_counter()
      local named = {}
      for i = 1, 3 do
        c:incr(H.big_key(i), i)
        named["big" .. i] = H.big_key(i)
      end
      c:sync()
      ngx.print(H.report(c, named))
    }
  }
  location = /sync {
    content_by_lua_block {
      local H = require "spec.integration.helpers"
      local c = H.full_counter()
      local ok = c:sync()
      ngx.print(H.report(c, { big1 = H.big_key(1), big2 = H.big_key(2),
                              big3 = H.big_key(3), errors = "errors" }),
                "sync=", tostring(ok), "\n")
    }
  }
  # Can an empty dict d hold a key of `len` bytes?
  location = /fits {
    content_by_lua_block {
      local d = ngx.shared[ngx.var.arg_d]
      local key = ("x"):rep(tonumber(ngx.var.arg_len))
      local ok, err = d:incr(key, 1, 0)
      d:delete(key)
      ngx.print(ok and "yes" or err, " ", #d:get_keys(0))
    }
  }
  # n distinct keys of `len` bytes, then a sync.
  location = /many {
    content_by_lua_block {
      local H = require "spec.integration.helpers"
      local c = H.full_counter()
      local len, n = tonumber(ngx.var.arg_len), tonumber(ngx.var.arg_n)
      local head = ngx.var.arg_round .. ":"
      for i = 1, n do
        local k = head .. i
        c:incr(k .. ("y"):rep(len - #k))
      end
      c:sync()
      ngx.print(H.report(c))
    }
  }
  location = /evict {
    content_by_lua_block {
      local H = require "spec.integration.helpers"
      local c = H.full_counter()
      local named = {}
      for i = 1, 10 do
        local k = ("c%06d"):format(i)
        c:incr(k, i)
        named[k] = k
      end
      c:sync()
      ngx.print(H.report(c, named))
    }
  }
  location = /strkey {
    content_by_lua_block {
      local H = require "spec.integration.helpers"
      local c, d = H.full_counter()
      d:set("str", "text")
      local named = { str = "str" }
      c:incr("str", 1)
      for i = 1, 50 do
        c:incr("n" .. i, i)
        named["n" .. i] = "n" .. i
      end
      c:sync()
      ngx.print(H.report(c, named))
    }
  }
]]

local STATS_FIELDS = {
    "pending_keys",
    "pending_bytes",
    "keys_flushed",
    "retries",
    "dropped_deltas",
    "dropped_permanent",
    "evictions",
    "failed_writes",
    "syncs",
    "failed_syncs",
    "last_sync_seconds",
    "dropped_overflow",
}

describe("#integration full dict", function()
    local srv

    setup(function()
        srv = nginx.start({ workers = 1, http = HTTP, server = SERVER })
    end)

    teardown(function()
        if srv then
            srv:stop()
        end
    end)

    local function get(path)
        local status, body = srv:get(path, nil, 30)
        assert.equal(200, status, body)
        return H.decode(body), body
    end

    it(
        "keeps transient failures pending, retries them, and delivers them "
            .. "exactly once room returns",
        function()
            local _, filled = get("/fill?d=mid_new")
            assert.is_true(tonumber(filled) > 100, filled)

            local r = get("/big?d=mid_new")
            assert.equal(3, r["stats.pending_keys"])
            assert.equal(0, r["stats.keys_flushed"])
            assert.equal(0, r["stats.retries"])
            assert.equal(1, r["stats.failed_syncs"])
            assert.same(
                { "nil", "nil", "nil" },
                { r["value.big1"], r["value.big2"], r["value.big3"] }
            )

            r = get("/sync?d=mid_new")
            assert.equal(3, r["stats.pending_keys"])
            assert.equal(3, r["stats.retries"])

            -- More increments of the same keys merge into the pending ones.
            r = get("/big?d=mid_new")
            assert.equal(3, r["stats.pending_keys"])
            assert.equal(0, r["stats.dropped_deltas"])

            get("/room?d=mid_new")
            r = get("/sync?d=mid_new")
            assert.equal(0, r["stats.pending_keys"])
            assert.equal(0, r["stats.pending_bytes"])
            assert.equal(3, r["stats.keys_flushed"])
            assert.same(
                { 2, 4, 6 },
                { r["value.big1"], r["value.big2"], r["value.big3"] }
            )
        end
    )

    it("the original loses the increments that met a full dict", function()
        get("/fill?d=mid_orig")
        get("/big?m=orig&d=mid_orig")
        get("/big?m=orig&d=mid_orig")
        get("/room?d=mid_orig")
        local r = get("/sync?m=orig&d=mid_orig")
        assert.same(
            { "nil", "nil", "nil" },
            { r["value.big1"], r["value.big2"], r["value.big3"] }
        )
    end)

    it(
        "counts and logs the evictions a sync causes, and stores its keys",
        function()
            get("/fill?d=evict")
            local r = get("/evict?d=evict")
            assert.is_true(r["stats.evictions"] > 0)
            assert.equal(10, r["stats.keys_flushed"])
            assert.equal(0, r["stats.pending_keys"])
            for i = 1, 10 do
                assert.equal(i, r[("value.c%06d"):format(i)])
            end
            assert.truthy(
                srv:error_log():find(
                    'flushing into shared dict "evict" '
                        .. "evicted other entries "
                        .. r["stats.evictions"]
                        .. " times",
                    1,
                    true
                )
            )
        end
    )

    it(
        "reports an eviction a retry causes like one a first write causes: "
            .. "logged and counted in the error metric",
        function()
            local q = "?d=evict_retry&em=errors"
            get("/fill" .. q)
            local r = get("/big" .. q) -- 3 keys of 3000 bytes: no memory
            assert.equal(3, r["stats.pending_keys"])
            get("/room" .. q)
            local _, filled = get("/fill_big" .. q)
            assert.is_true(tonumber(filled) > 5, filled)
            r = get("/sync" .. q) -- each retried key evicts one entry
            assert.same(
                { 1, 2, 3 },
                { r["value.big1"], r["value.big2"], r["value.big3"] }
            )
            assert.equal(0, r["stats.pending_keys"])
            assert.equal(3, r["stats.evictions"])
            assert.equal("false", r.sync)
            assert.equal(1, r["value.errors"])
            assert.truthy(
                srv:error_log():find(
                    'retrying the pending keys of shared dict "evict_retry" '
                        .. "evicted other entries 3 times",
                    1,
                    true
                )
            )
        end
    )

    it(
        "a sync that raises does not wedge the next: the pending key lands "
            .. "once the dict has room, and the error is logged once",
        function()
            local q = "?d=mid_raise&i=1"
            get("/fill" .. q)
            get("/raise_once" .. q)
            get("/incr_big" .. q .. "&n=5")
            local log = H.poll(5, function()
                local text = srv:error_log()
                return text:find("raised by the spec", 1, true) and text
            end)
            assert.truthy(log, "the sync did not raise")
            -- Two more syncs meet the full dict: the key stays pending.
            local r
            H.poll(5, function()
                r = get("/peek" .. q)
                return r.syncs >= 3
            end)
            assert.equal("nil", r.v)
            assert.equal(1, r.pending)
            get("/room" .. q)
            H.poll(5, function()
                r = get("/peek" .. q)
                return r.v ~= "nil"
            end)
            assert.equal(5, r.v)
            assert.equal(0, r.pending)
            H.sleep(0.5) -- five more syncs: nothing lands twice
            assert.equal(5, get("/peek" .. q).v)
            log = srv:error_log()
            assert.equal(1, H.count_matches(log, "raised by the spec"))
            assert.equal(
                1,
                H.count_matches(
                    log,
                    'a sync of shared dict "mid_raise" raised an error'
                )
            )
            assert.matches("raised by the spec\nstack traceback:", log, 1, true)
        end
    )

    it("a key holding a string fails alone; every other key arrives", function()
        local r = get("/strkey?d=strdict")
        assert.equal("text", r["value.str"])
        for i = 1, 50 do
            assert.equal(i, r["value.n" .. i])
        end
        assert.equal(1, r["stats.dropped_permanent"])
        assert.equal(0, r["stats.pending_keys"])
        assert.equal(50, r["stats.keys_flushed"])
        assert.truthy(
            srv:error_log():find(
                "error increasing counter in shdict key: str, err: not a number",
                1,
                true
            )
        )
    end)

    it("stats() reports every field, and they move with each sync", function()
        -- Its own dict: two syncs here, whatever other tests ran.
        local r = get("/strkey?d=strdict_stats")
        assert.equal(1, r["stats.syncs"])
        assert.equal(50, r["stats.keys_flushed"])
        r = get("/strkey?d=strdict_stats")
        for _, field in ipairs(STATS_FIELDS) do
            assert.is_number(r["stats." .. field], field)
        end
        assert.equal(2, r["stats.syncs"])
        assert.equal(100, r["stats.keys_flushed"])
        assert.equal(2, r["stats.dropped_permanent"])
        assert.equal(2, r["stats.failed_writes"])
        assert.equal(2, r["stats.failed_syncs"])
        assert.is_true(r["stats.last_sync_seconds"] >= 0)
        for i = 1, 50 do
            assert.equal(2 * i, r["value.n" .. i])
        end
        -- The original has no stats() at all.
        local orig = get("/strkey?m=orig&d=strdict_stats")
        assert.is_nil(orig["stats.syncs"])
        assert.same({}, H.crash_lines(srv:error_log()))
    end)
end)

-- The pending cap, each test on a server of its own: the per-minute bound
-- on log lines is per worker, and the first test spends it.
describe("#integration full dict: the pending cap", function()
    local srv

    before_each(function()
        srv = nginx.start({ workers = 1, http = HTTP, server = SERVER })
    end)

    after_each(function()
        srv:stop()
    end)

    local function get(path)
        local status, body = srv:get(path, nil, 30)
        assert.equal(200, status, body)
        return H.decode(body), body
    end

    it(
        "caps what a dict that stays full retains, counts what the cap drops, "
            .. "and logs it within the per-minute bound, then sums it up",
        function()
            local _, fits = get("/fits?d=tiny&len=100")
            assert.equal(
                "no memory 0",
                fits,
                "precondition: an empty 12k dict must refuse a 100-byte key"
            )

            local r = get("/many?d=tiny&round=1&len=100&n=12000")
            assert.equal(10000, r["stats.pending_keys"]) -- the key cap
            assert.equal(2000, r["stats.dropped_deltas"])
            r = get("/many?d=tiny&round=2&len=100&n=12000")
            assert.equal(10000, r["stats.pending_keys"])
            assert.equal(10000, r["stats.retries"])
            assert.equal(14000, r["stats.dropped_deltas"])

            srv:stop() -- the exit flush sums up what the minute held back
            local log = srv:error_log()
            assert.equal(2, H.count_matches(log, "the pending cap is reached"))
            assert.equal(
                1,
                H.count_matches(log, "dropped 2000 increments in this sync")
            )
            assert.equal(
                1,
                H.count_matches(log, "dropped 12000 increments in this sync")
            )
            -- 10,000 keys failed (kept pending) in round 1: 100 per-key
            -- lines, one line saying the rest are counted, and at the end
            -- one summary with the 9,900 not logged.
            assert.equal(
                100,
                H.count_matches(
                    log,
                    "error increasing counter in shdict key: 1:"
                )
            )
            assert.equal(
                1,
                H.count_matches(log, "logged 100 per-key lines in this minute")
            )
            assert.equal(
                1,
                H.count_matches(
                    log,
                    'shared dict "tiny": not logged in the last '
                )
            )
            assert.matches(
                'shared dict "tiny": not logged in the last %d+ s %([^)]*%): '
                    .. "9900 failed writes",
                log
            )
        end
    )

    it("caps retention in bytes too", function()
        local _, fits = get("/fits?d=tiny_bytes&len=1000")
        assert.equal("no memory 0", fits)
        local r = get("/many?d=tiny_bytes&round=1&len=1000&n=9000")
        local cap = 8 * 1024 * 1024
        assert.is_true(r["stats.pending_bytes"] <= cap)
        assert.is_true(r["stats.pending_bytes"] > cap - 2000, "cap not reached")
        assert.is_true(r["stats.pending_keys"] < 9000)
        assert.equal(9000 - r["stats.pending_keys"], r["stats.dropped_deltas"])
    end)
end)
