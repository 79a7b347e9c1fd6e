-- A full dict, and what stats() shows: one worker, manual
-- counters (no interval), so each sync is the one the spec asks for and
-- c:stats() describes the worker that served the request.
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
--     one of them and is stored (`forcible`).

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local HTTP = [[
  lua_shared_dict mid_new 64k;
  lua_shared_dict mid_orig 64k;
  lua_shared_dict tiny 12k;
  lua_shared_dict tiny_bytes 12k;
  lua_shared_dict evict 64k;
  lua_shared_dict strdict 1m;
  lua_shared_dict strdict_stats 1m;
  init_worker_by_lua_block {
    local H = require "spec.integration.helpers"
    -- The counter of module `m` ("new" or "orig") on dict `d`, manual.
    function H.full_counter()
      local m, d = ngx.var.arg_m or "new", ngx.var.arg_d
      return require(m == "orig" and H.ORIGINAL or H.NEW).new(d), ngx.shared[d]
    end
    function H.big_key(i)
      return string.char(96 + i):rep(3000)
    end
  }
]]

local SERVER = [[
  # Fills dict d with small numbers until it is full, then touches them in
  # a shuffled order, so the least recently used ones are spread over all
  # slab pages.
  location = /fill {
    content_by_lua_block {
      local d = ngx.shared[ngx.var.arg_d]
      local names = {}
      while true do
        local k = ("f%06d"):format(#names + 1)
        if not d:safe_set(k, 0) then
          break
        end
        names[#names + 1] = k
      end
      math.randomseed(7)
      for i = #names, 2, -1 do
        local j = math.random(i)
        names[i], names[j] = names[j], names[i]
      end
      for _, k in ipairs(names) do
        d:get(k)
      end
      ngx.say(#names)
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
      c:sync()
      ngx.print(H.report(c, { big1 = H.big_key(1), big2 = H.big_key(2),
                              big3 = H.big_key(3) }))
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
        "caps what a dict that stays full retains, counts what the cap drops, "
            .. "and logs it once per sync",
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
            -- Per-key lines stop at 100 per sync; a summary counts the rest.
            local per_key = H.count_matches(
                log,
                "error increasing counter in shdict key: 1:"
            )
            assert.is_true(per_key <= 100, per_key .. " per-key lines")
            assert.equal(1, H.count_matches(log, "9900 more keys failed"))
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
