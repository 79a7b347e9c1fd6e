-- Bounded memory under key churn.
--
-- One worker (so every request reaches the worker measured) sees a million
-- distinct keys over time (LONG=1: five million): rounds of 10,000 new
-- keys, each round synced, then the dict emptied (flush_all +
-- flush_expired) so it never fills. Twice: with manual sync() after each
-- round, and with the automatic, sliced sync (interval 0.05 s, 200,000
-- keys; LONG=1: a million), the request waiting until the timer has
-- flushed the round. The worker's
-- VmRSS is read from /proc after warm-up rounds and again at the end,
-- each time after a full collectgarbage() in the worker; the growth must
-- stay under 20 MB. A memory bound, not a timing one.
--
-- The original algorithm is flat here too (it clears one Lua table); the
-- test guards what resty.counter adds: the Rust side (pending map, handed
-- over keys) must free what it flushed.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local KEYS_PER_ROUND = 10000
local ROUNDS = { manual = H.LONG and 500 or 100, auto = H.LONG and 100 or 20 }
local INTERVAL = 0.05
local WARMUP_ROUNDS = 5
local MAX_GROWTH_KIB = 20 * 1024

-- A burst: one interval with many distinct keys. Once flushed, the buffer
-- that held them must be freed, not kept for reuse (the shim recycles only
-- buffers of up to 16384 keys).
local BURST_KEYS = 200000
local MAX_BURST_HEAP_KIB = 2 * 1024

local HTTP = [[
  lua_shared_dict churn 8m;
  lua_shared_dict churn_auto 8m;
  lua_shared_dict burst_manual 64m;
  lua_shared_dict burst_auto 64m;
]]

local SERVER = [[
  location = /churn {
    content_by_lua_block {
      local H = require "spec.integration.helpers"
      local auto = ngx.var.arg_mode == "auto"
      local name = auto and "churn_auto" or "churn"
      local c = require(H.NEW).new(name, auto and ]] .. INTERVAL .. [[ or nil)
      local d = ngx.shared[name]
      local first, last = tonumber(ngx.var.arg_from), tonumber(ngx.var.arg_to)
      local n = ]] .. KEYS_PER_ROUND .. [[

      for round = first, last do
        local head = "churn:" .. round .. ":"
        for i = 1, n do
          c:incr(head .. i, 1)
        end
        H.flushed(c, auto)
        -- Every key of the round arrived, then the dict is emptied.
        local got = d:get(head .. n)
        if got ~= 1 then
          ngx.status = 500
          ngx.say("round ", round, ": last key holds ", tostring(got))
          return
        end
        d:flush_all()
        d:flush_expired()
      end
      ngx.print(H.report(c))
    }
  }
  # One burst of distinct keys, flushed, then the dict emptied; answers
  # the Lua heap (KiB, after full collections) before and after.
  location = /burst {
    content_by_lua_block {
      local H = require "spec.integration.helpers"
      local auto = ngx.var.arg_mode == "auto"
      local name = "burst_" .. ngx.var.arg_mode
      local c = require(H.NEW).new(name, auto and ]] .. INTERVAL .. [[ or nil)
      collectgarbage()
      collectgarbage()
      local before = collectgarbage("count")
      for i = 1, ]] .. BURST_KEYS .. [[ do
        c:incr("burst:" .. i)
      end
      H.flushed(c, auto)
      local d = ngx.shared[name]
      local last = d:get("burst:]] .. BURST_KEYS .. [[")
      d:flush_all()
      d:flush_expired()
      collectgarbage()
      collectgarbage()
      ngx.print(H.encode({ before = before, after = collectgarbage("count"),
                           last = last or "nil" }))
    }
  }
  location = /gc {
    content_by_lua_block {
      collectgarbage()
      collectgarbage()
      ngx.print(collectgarbage("count"))
    }
  }
]]

describe("#integration bounded memory under key churn", function()
    local srv

    setup(function()
        srv = nginx.start({ workers = 1, http = HTTP, server = SERVER })
    end)

    teardown(function()
        if srv then
            srv:stop()
        end
    end)

    local function churn(mode, from, to)
        for round = from, to do
            local status, body = srv:get(
                ("/churn?mode=%s&from=%d&to=%d"):format(mode, round, round),
                nil,
                30
            )
            assert.equal(200, status, body)
            if round == to then
                return H.decode(body)
            end
        end
    end

    local function measure(pid)
        local status, lua_kib = srv:get("/gc")
        assert.equal(200, status)
        local rss, anon = H.rss_kib(pid)
        return rss, anon, tonumber(lua_kib)
    end

    for _, mode in ipairs({ "manual", "auto" }) do
        it(
            ("a worker that sees %d distinct keys keeps flat memory (%s sync)"):format(
                ROUNDS[mode] * KEYS_PER_ROUND,
                mode
            ),
            function()
                local pid = srv:worker_pids()[1]
                churn(mode, 1, WARMUP_ROUNDS)
                local rss0, anon0, lua0 = measure(pid)

                local r =
                    churn(mode, WARMUP_ROUNDS + 1, WARMUP_ROUNDS + ROUNDS[mode])
                local rss1, anon1, lua1 = measure(pid)

                assert.equal(
                    pid,
                    srv:worker_pids()[1],
                    "the worker was replaced"
                )
                assert.equal(0, r["stats.pending_keys"])
                assert.equal(0, r["stats.pending_bytes"])
                assert.equal(0, r["stats.buffered_keys"])
                assert.equal(
                    (WARMUP_ROUNDS + ROUNDS[mode]) * KEYS_PER_ROUND,
                    r["stats.keys_flushed"]
                )
                local report = (
                    "%s: VmRSS %d -> %d KiB (%+d), RssAnon %d -> %d KiB, "
                    .. "Lua heap %d -> %d KiB"
                ):format(
                    mode,
                    rss0,
                    rss1,
                    rss1 - rss0,
                    anon0,
                    anon1,
                    lua0,
                    lua1
                )
                if os.getenv("VERBOSE") then
                    print(report)
                end
                assert.is_true(rss1 - rss0 < MAX_GROWTH_KIB, report)
            end
        )
    end

    for _, mode in ipairs({ "manual", "auto" }) do
        it(
            ("a burst of %d keys is freed once flushed (%s sync)"):format(
                BURST_KEYS,
                mode
            ),
            function()
                local status, body = srv:get("/burst?mode=" .. mode, nil, 60)
                assert.equal(200, status, body)
                local r = H.decode(body)
                assert.equal(1, r.last)
                local growth = r.after - r.before
                if os.getenv("VERBOSE") then
                    print(
                        ("burst %s: Lua heap %d -> %d KiB"):format(
                            mode,
                            r.before,
                            r.after
                        )
                    )
                end
                assert.is_true(
                    growth < MAX_BURST_HEAP_KIB,
                    ("Lua heap grew by %d KiB"):format(growth)
                )
            end
        )
    end
end)
