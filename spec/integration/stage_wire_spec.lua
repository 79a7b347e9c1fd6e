-- The shared stage wired into the automatic sync, in a real nginx.
--
-- With more than one worker and a stage zone (lua_shared_dict
-- resty_counter_stage), each worker's sync publishes its buffer into the
-- dict's region of the stage zone, and once per interval the lease holder
-- folds it into the dict: one dict write per key per interval, whatever
-- the number of workers. Here:
--   * 4 workers dirty the same K keys every interval: counts exact, and the
--     dict writes (keys_flushed summed over the workers) per interval stay
--     within 1.05 K, where the direct path makes 4 K;
--   * kill -9 of random workers (the lease holder among them) under load:
--     the dict never exceeds the requests served, and the loss after
--     quiescence stays within what the stage reports lost in flight plus
--     what the killed workers can have had buffered;
--   * a stage too small for the keys sends the overflow down the direct
--     path: exact counts;
--   * { stage = false }, 1 worker, and no stage zone take the direct path,
--     each with one NOTICE per worker that says so;
--   * a stage zone too small for a stage falls back, with one WARN per
--     worker, and counts exactly;
--   * key churn (every round new keys, 9 times as many as the stage has
--     slots over the run): idle slots are reclaimed, so the stage keeps
--     taking the new keys instead of filling up and sending them down the
--     direct path; exact counts;
--   * a stage zone with no room at the first sync: the workers write
--     directly and attach at a later sync once there is room.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local WORKERS = 4
local INTERVAL = 0.1

-- Every worker adds 1 to keys k1..kK once per interval for `rounds`
-- rounds (a timer), and copies its stats into the `meta` dict under
-- "<field>:<pid>" each interval. The stage zone is `zone` large (default
-- 16m; false: none).
local function bump_http(dict_size, k, rounds, opts, rotate, zone)
    if zone == nil then
        zone = "16m"
    end
    return (
        zone and "  lua_shared_dict resty_counter_stage " .. zone .. ";\n" or ""
    )
        .. [[
  lua_shared_dict counters ]]
        .. dict_size
        .. [[;
  lua_shared_dict meta 1m;
  init_worker_by_lua_block {
    local c = require("resty.counter").new("counters", ]]
        .. INTERVAL
        .. [[, nil, ]]
        .. opts
        .. [[)
    local meta = ngx.shared.meta
    local rounds, pid = 0, ngx.worker.pid()
    ngx.timer.every(]]
        .. INTERVAL
        .. [[, function(premature)
      if premature then
        return
      end
      if rounds < ]]
        .. rounds
        .. [[ then
        rounds = rounds + 1
        local prefix = ]]
        .. (rotate and '"r" .. rounds .. ":k"' or '"k"')
        .. [[

        for i = 1, ]]
        .. k
        .. [[ do
          c:incr(prefix .. i)
        end
        meta:incr("bumps", 1, 0)
      end
      local s = c:stats()
      meta:set("kf:" .. pid, s.keys_flushed)
      meta:set("stage:" .. pid, s.stage and 1 or 0)
      meta:set("published:" .. pid, s.published)
      meta:set("fallback:" .. pid, s.fallback_writes)
      meta:set("fill:" .. pid, s.stage_fill or 0)
    end)
  }
]]
end

local DUMP = [[
  location = /dump {
    content_by_lua_block {
      ngx.print(require("spec.integration.helpers")
                .dump(ngx.shared[ngx.var.arg_d]))
    }
  }
]]

-- { field = { pid = value } } from the meta dict.
local function meta(srv)
    local status, body = srv:get("/dump?d=meta")
    assert.equal(200, status, body)
    local t = {}
    for k, v in pairs(H.parse_dump(body)) do
        local field, pid = k:match("^(%a+):(%d+)$")
        if field then
            t[field] = t[field] or {}
            t[field][pid] = v
        else
            t[k] = v
        end
    end
    return t
end

local function sum(t)
    local n = 0
    for _, v in pairs(t or {}) do
        n = n + v
    end
    return n
end

-- Waits until every worker did all its rounds and every key holds
-- workers * rounds; returns the keys that do not.
local function exact(srv, workers, k, rounds)
    local wrong
    H.poll(20, function()
        if (meta(srv).bumps or 0) < workers * rounds then
            return false
        end
        local status, body = srv:get("/dump?d=counters")
        assert.equal(200, status)
        local got = H.parse_dump(body)
        wrong = {}
        for i = 1, k do
            if got["k" .. i] ~= workers * rounds then
                wrong[#wrong + 1] = "k" .. i .. "=" .. tostring(got["k" .. i])
            end
        end
        return #wrong == 0
    end)
    return wrong
end

describe("#integration the shared stage in the sync", function()
    local srv

    after_each(nginx.stop_all)

    it(
        "4 workers sharing K keys: exact counts, about K dict writes per "
            .. "interval",
        function()
            local K, ROUNDS, WINDOW = 2000, 100, 6
            srv = nginx.start({
                workers = WORKERS,
                server = DUMP,
                http = bump_http("16m", K, ROUNDS, "nil"),
            })
            -- Past the start (every worker attached, the lease taken), then a
            -- window of WINDOW seconds of steady load.
            H.poll(10, function()
                return H.count(meta(srv).kf or {}) == WORKERS
            end)
            H.sleep(1)
            local m1 = meta(srv)
            H.sleep(WINDOW)
            local m2 = meta(srv)
            assert.is_true(
                (m2.bumps or 0) < WORKERS * ROUNDS,
                "window under load"
            )
            local writes = sum(m2.kf) - sum(m1.kf)
            local per_interval = writes / (WINDOW / INTERVAL)
            assert.is_true(
                per_interval <= 1.05 * K,
                ("%.0f dict writes per interval for %d keys"):format(
                    per_interval,
                    K
                )
            )
            assert.is_true(
                per_interval >= 0.5 * K,
                "the fold writes: " .. per_interval
            )
            assert.equal(WORKERS, sum(m2.stage), "every worker uses the stage")
            assert.is_true(sum(m2.published) > 0)
            assert.equal(0, sum(m2.fallback))
            assert.same({}, exact(srv, WORKERS, K, ROUNDS))
            local _, body = srv:get("/dump?d=counters")
            local keys = 0
            for key in pairs(H.parse_dump(body)) do
                assert.truthy(key:match("^k%d+$"), "not a counter: " .. key)
                keys = keys + 1
            end
            assert.equal(K, keys, "the dict holds the counters, nothing else")
            assert.equal(
                WORKERS,
                H.count_matches(
                    srv:error_log(),
                    'shared dict "counters": 4 workers share a stage in zone '
                        .. '"resty_counter_stage"'
                ),
                "one NOTICE per worker"
            )
            assert.same({}, H.crash_lines(srv:error_log()))
        end
    )

    it("{ stage = false } writes directly: about workers x K writes", function()
        local K, ROUNDS = 500, 30
        srv = nginx.start({
            workers = WORKERS,
            server = DUMP,
            http = bump_http("4m", K, ROUNDS, "{ stage = false }"),
        })
        assert.same({}, exact(srv, WORKERS, K, ROUNDS))
        local m = meta(srv)
        assert.equal(0, sum(m.stage))
        assert.equal(0, sum(m.published))
        -- Every worker wrote every key of every round (fewer only when one
        -- sync took two rounds' increments at once).
        assert.is_true(
            sum(m.kf) > 1.5 * K * ROUNDS,
            "direct writes " .. sum(m.kf)
        )
    end)

    it(
        "a stage too small for the keys: the overflow is written directly, "
            .. "exact counts",
        function()
            local K, ROUNDS = 1500, 20
            srv = nginx.start({
                workers = WORKERS,
                server = DUMP,
                http = bump_http("8m", K, ROUNDS, "{ stage_bytes = 65536 }"),
            })
            assert.same({}, exact(srv, WORKERS, K, ROUNDS))
            local m = meta(srv)
            assert.equal(WORKERS, sum(m.stage))
            assert.is_true(sum(m.published) > 0, "some keys staged")
            assert.is_true(sum(m.fallback) > 0, "some keys written directly")
        end
    )

    it("1 worker writes directly", function()
        local K, ROUNDS = 500, 20
        srv = nginx.start({
            workers = 1,
            server = DUMP,
            http = bump_http("4m", K, ROUNDS, "nil"),
        })
        assert.same({}, exact(srv, 1, K, ROUNDS))
        local m = meta(srv)
        assert.equal(0, sum(m.stage))
        assert.equal(0, sum(m.published))
        assert.is_nil(srv:error_log():find("no shared stage", 1, true))
        assert.equal(
            1,
            H.count_matches(
                srv:error_log(),
                'shared dict "counters": each sync writes into the dict '
                    .. "directly (one worker)"
            )
        )
    end)

    it(
        "no stage zone: the direct path, and one NOTICE per worker with the "
            .. "line that turns the stage on",
        function()
            local K, ROUNDS = 500, 20
            srv = nginx.start({
                workers = WORKERS,
                server = DUMP,
                http = bump_http("4m", K, ROUNDS, "nil", false, false),
            })
            assert.same({}, exact(srv, WORKERS, K, ROUNDS))
            local m = meta(srv)
            assert.equal(0, sum(m.stage))
            local log = srv:error_log()
            assert.equal(
                WORKERS,
                H.count_matches(
                    log,
                    'shared dict "counters": 4 workers '
                        .. "each write into the dict directly: no stage zone; "
                        .. '"lua_shared_dict resty_counter_stage 16m;" in the '
                        .. "http block makes one write per key per interval"
                )
            )
            assert.is_nil(log:find("[warn]", 1, true), "a NOTICE, no WARN")
            assert.same({}, H.crash_lines(log))
        end
    )

    it(
        "a stage zone too small for a stage: one WARN per worker, exact counts",
        function()
            local K, ROUNDS = 500, 20
            srv = nginx.start({
                workers = WORKERS,
                server = DUMP,
                http = bump_http("4m", K, ROUNDS, "nil", false, "64k"),
            })
            assert.same({}, exact(srv, WORKERS, K, ROUNDS))
            local m = meta(srv)
            assert.equal(0, sum(m.stage))
            local warns = 0
            for line in srv:error_log():gmatch("[^\n]+") do
                if
                    line:find(
                        'shared dict "counters": no shared stage in zone '
                            .. '"resty_counter_stage" (the stage zone is too '
                            .. "small (64 KiB at least))",
                        1,
                        true
                    )
                then
                    assert.truthy(line:find("[warn]", 1, true), line)
                    warns = warns + 1
                end
            end
            assert.is_true(
                warns >= 1 and warns <= WORKERS,
                warns .. " WARN lines"
            )
            assert.same({}, H.crash_lines(srv:error_log()))
        end
    )

    it(
        "key churn: idle slots are reclaimed, the stage keeps taking new "
            .. "keys, exact counts",
        function()
            -- 128 KiB: 638 slots. 50 new keys per round, 120 rounds: 6,000
            -- distinct keys, 9 times the slots. Without reclaim the stage
            -- is full after about 13 rounds and the rest is written
            -- directly.
            local K, ROUNDS = 50, 120
            srv = nginx.start({
                workers = WORKERS,
                server = DUMP,
                http = bump_http(
                    "16m",
                    K,
                    ROUNDS,
                    "{ stage_bytes = 131072 }",
                    true
                ),
            })
            H.poll(40, function()
                return (meta(srv).bumps or 0) >= WORKERS * ROUNDS
            end)
            local status, body, got
            H.poll(10, function()
                status, body = srv:get("/dump?d=counters")
                assert.equal(200, status)
                got = H.parse_dump(body)
                return got["r" .. ROUNDS .. ":k" .. K] == WORKERS
            end)
            local wrong = {}
            for r = 1, ROUNDS do
                for i = 1, K do
                    local key = "r" .. r .. ":k" .. i
                    if got[key] ~= WORKERS then
                        wrong[#wrong + 1] = key .. "=" .. tostring(got[key])
                    end
                end
            end
            assert.same({}, wrong)
            local m = meta(srv)
            local published, fallback = sum(m.published), sum(m.fallback)
            assert.is_true(
                fallback <= 0.05 * published,
                ("%d deltas written directly, %d staged"):format(
                    fallback,
                    published
                )
            )
            for pid, fill in pairs(m.fill) do
                assert.is_true(fill < 638, pid .. ": stage fill " .. fill)
            end
            assert.same({}, H.crash_lines(srv:error_log()))
        end
    )

    it(
        "a stage zone with no room at the first sync: the workers attach "
            .. "later, one WARN and one NOTICE each, exact counts",
        function()
            -- The master fills the stage zone with filler keys, so every
            -- worker's first attach finds no room; after 25 rounds worker 0
            -- deletes them, and every later sync may attach. A worker logs
            -- from its second failure on (a second apart): the first is
            -- most often workers starting together.
            local K, ROUNDS = 50, 40
            local http = bump_http(
                "4m",
                K,
                ROUNDS,
                "{ stage_bytes = 1048576 }",
                false,
                "4m"
            ) .. [[
  init_by_lua_block {
    local d = ngx.shared.resty_counter_stage
    local filler = string.rep("x", 1000)
    local i = 0
    while true do
      i = i + 1
      local ok, err = d:safe_set("f" .. i, filler)
      if not ok then
        assert(err == "no memory", err)
        break
      end
    end
  }
]]
            http = http:gsub(
                'meta:incr%("bumps", 1, 0%)',
                [[meta:incr("bumps", 1, 0)
        if rounds == 25 and ngx.worker.id() == 0 then
          local d = ngx.shared.resty_counter_stage
          for _, key in ipairs(d:get_keys(0)) do
            if key:sub(1, 1) == "f" then
              d:delete(key)
            end
          end
        end]]
            )
            srv = nginx.start({ workers = 2, server = DUMP, http = http })
            assert.same({}, exact(srv, 2, K, ROUNDS))
            local m = meta(srv)
            assert.equal(2, sum(m.stage), "every worker attached at last")
            assert.is_true(sum(m.published) > 0, "counts went through it")
            local log = srv:error_log()
            local warns = H.count_matches(
                log,
                "(no room left in the stage zone for this dict): this worker "
                    .. "writes its counts into the dict directly until"
            )
            assert.equal(2, warns, "one WARN per worker")
            assert.equal(warns, H.count_matches(log, "slots) now"))
            assert.same({}, H.crash_lines(log))
        end
    )
end)
