-- The shared stage in a real nginx with 2+ workers (run by
-- spec/run-in-nginx): every worker attaches to the same region of the
-- stage zone, publishes into it, and one fold puts the exact sums into the
-- dict, which holds nothing but the counters.

local stage = require("spec.support.stage")
local http = require("spec.support.http")
local in_worker = require("spec.support.in_worker")
local not_at = in_worker.not_at

local DIRECTORY_KEY = "resty.counter.directory"

-- GET /__stage until `enough(seen)` holds or the deadline passes; `seen`
-- maps a worker pid to the list of its answers.
local function poll(path_for, enough, seconds)
    local seen = {}
    local deadline = ngx.now() + (seconds or 20)
    local i = 0
    repeat
        i = i + 1
        local status, body = http.get(path_for(i))
        assert.equal(200, status, body)
        local pid, offset, anchor, rc =
            body:match("^(%d+) (%d+) (%d+) (%-?%d+)")
        assert.truthy(pid, body)
        seen[pid] = seen[pid] or {}
        table.insert(seen[pid], {
            offset = tonumber(offset),
            anchor = tonumber(anchor),
            rc = tonumber(rc),
            i = i,
        })
        if enough(seen) then
            return seen
        end
        ngx.sleep(0.001)
        ngx.update_time()
    until ngx.now() > deadline
    return seen
end

local function workers_seen(seen)
    local n = 0
    for _ in pairs(seen) do
        n = n + 1
    end
    return n
end

-- Folds from this worker until the lease is ours (another worker's lease
-- expires within its 200 ms).
local function fold_all(h)
    local deadline = ngx.now() + 5
    repeat
        local rc = stage.fold(h, 200)
        if rc >= 0 then
            return rc
        end
        assert.equal(-7, rc, stage.strerror(rc))
        ngx.sleep(0.05)
        ngx.update_time()
    until ngx.now() > deadline
    error("fold lease never became free")
end

describe("the shared stage in nginx", function()
    local dict = ngx.shared.stage
    local workers = tonumber(os.getenv("SPEC_NGINX_WORKERS")) or 2

    it("runs with 2 or more workers", function()
        assert.is_true(workers >= 2, "run with --workers 2 or more")
    end)

    it("every worker attaches to the same region of the stage zone", function()
        local h = assert(stage.attach("stage"))
        local mine = stage.info(h)
        assert.is_true(mine.offset > 0)
        -- Half the 4 MiB dict, 192 bytes per slot, after the header and
        -- the registry of 128 workers.
        assert.equal(2 * 1024 * 1024, mine.region_bytes)
        assert.equal(
            math.floor((mine.region_bytes - 320 - 128 * 64) / 192),
            mine.slots
        )
        assert.equal(160, mine.key_bytes)
        local seen = poll(function()
            return "/__stage"
        end, function(s)
            return workers_seen(s) >= workers
        end)
        assert.equal(workers, workers_seen(seen))
        for _, answers in pairs(seen) do
            for _, a in ipairs(answers) do
                assert.equal(mine.offset, a.offset)
                assert.equal(mine.anchor, a.anchor)
            end
        end
    end)

    it("leaves the counter dict holding nothing but the counters", function()
        local h = assert(stage.attach("stage"))
        fold_all(h)
        local key = in_worker.unique("only-counters")
        assert.equal(0, stage.publish(h, key, 3))
        fold_all(h)
        assert.equal(3, dict:get(key))
        for _, k in ipairs(dict:get_keys(0)) do
            assert.is_truthy(
                k:find("^stage%-spec%-")
                    or k:find("^only%-counters%-")
                    or k:find("^published%-then%-sync%-"),
                "a key that is no counter: " .. ("%q"):format(k)
            )
        end
    end)

    it(
        "deltas published from every worker reach the dict exactly once",
        function()
            local h = assert(stage.attach("stage"))
            fold_all(h) -- start from an empty stage
            local key = in_worker.unique("stage-spec")
            local before = stage.info(h)
            local sent, n = 0, 0
            local seen = poll(function(i)
                local delta = i % 7 + 0.5
                sent = sent + delta
                n = n + 1
                return "/__stage?key=" .. key .. "&delta=" .. delta
            end, function(s)
                if workers_seen(s) < workers then
                    return false
                end
                for _, answers in pairs(s) do
                    if #answers < 5 then
                        return false
                    end
                end
                return true
            end)
            assert.equal(workers, workers_seen(seen))
            for _, answers in pairs(seen) do
                for _, a in ipairs(answers) do
                    assert.equal(0, a.rc, "staged")
                end
            end
            assert.is_nil(dict:get(key), "nothing in the dict before the fold")
            local written = fold_all(h)
            assert.is_true(written >= 1)
            assert.equal(sent, dict:get(key))
            local after = stage.info(h)
            assert.equal(n, after.published - before.published)
            assert.equal(written, after.my_folded - before.my_folded)
            -- A second fold finds nothing new for the key.
            fold_all(h)
            assert.equal(sent, dict:get(key))
        end
    )

    it(
        "a directory key deleted or overwritten is put back, and no second"
            .. " directory is made",
        function()
            local zone = ngx.shared.resty_counter_stage
            local h = assert(stage.attach("stage"))
            local offset = zone:get(DIRECTORY_KEY)
            assert.is_true(offset > 0)
            -- Overwritten: a new handle (as a new worker would) finds the
            -- directory by scanning the zone and puts the key back.
            zone:set(DIRECTORY_KEY, 12345)
            local h2 = assert(stage.attach("counters2"))
            assert.equal(offset, zone:get(DIRECTORY_KEY))
            -- Deleted: likewise.
            zone:delete(DIRECTORY_KEY)
            local h3 = assert(stage.attach("stats"))
            assert.equal(offset, zone:get(DIRECTORY_KEY))
            -- A string under the key: the folder's round end puts it back.
            zone:set(DIRECTORY_KEY, "not a number")
            local c = require("resty.counter").new("stage")
            assert.is_true(c:sync())
            assert.equal(offset, zone:get(DIRECTORY_KEY))
            assert.is_true(stage.info(h2).zone_regions >= 3)
            assert.equal(
                stage.info(h).zone_regions,
                stage.info(h3).zone_regions
            )
        end
    )

    it(
        "falls back when the stage zone is too small, is not the one named,"
            .. " or is the counter dict",
        function()
            local h, code, msg = stage.attach("stage", "stage_zone_tiny")
            assert.is_nil(h)
            assert.equal(
                "the stage zone is too small (64 KiB at least)",
                msg,
                code
            )
            h, code, msg =
                stage.attach("stage", "stage2", "resty_counter_stage")
            assert.is_nil(h)
            assert.equal(
                "the stage zone's name is not the one asked for (unknown nginx ABI)",
                msg,
                code
            )
            h, code, msg = stage.attach("stage", "stage")
            assert.is_nil(h)
            assert.equal("the stage zone is the counter dict itself", msg, code)
        end
    )

    it(
        "a slot ref adds into its key's slot; another generation's adds nothing",
        function()
            local h = assert(stage.attach("stage"))
            fold_all(h)
            local key = in_worker.unique("by-ref")
            local rc, ref = stage.publish(h, key, 1)
            assert.equal(0, rc)
            assert.is_true(ref >= 1 and ref < 2 ^ 53 and ref % 1 == 0, ref)
            assert.equal(0, stage.publish_ref(h, ref, 2))
            -- The generation is the ref's low bits: one more is a later claim.
            assert.equal(3, stage.publish_ref(h, ref + 1, 4))
            for _, bad in ipairs({ 0, 0.5, -ref, 2 ^ 53, 1 / 0, 0 / 0 }) do
                assert.equal(3, stage.publish_ref(h, bad, 8), tostring(bad))
            end
            assert.equal(3, stage.publish_ref(h, ref, 0 / 0), "a NaN delta")
            fold_all(h)
            assert.equal(3, dict:get(key))
        end
    )

    it(
        "an automatic sync publishes a key staged before by its slot's ref,"
            .. " and one whose ref went stale by key, exactly",
        function()
            local counter = require("resty.counter")
            local c = counter.new("stage", 0.05)
            local prefix = in_worker.unique("refs")
            local K = 600
            local function interval(want)
                local before = c:stats().published
                for i = 1, K do
                    c:incr(prefix .. i, 1)
                end
                in_worker.wait_until(function()
                    return c:stats().published >= before + K
                end)
                assert.equal(before + K, c:stats().published)
                assert.is_true(c:sync()) -- folds the whole stage
                assert.equal(
                    0,
                    not_at(dict, prefix, K, want),
                    "keys not at " .. want
                )
                local n = 0
                for _ in pairs(c.refs) do
                    n = n + 1
                end
                return n
            end
            assert.is_true(c:stats().stage)
            assert.equal(K, interval(1))
            assert.equal(K, c:stats().stage_refs)
            -- By ref: no key published again by key, so no ref made twice.
            assert.equal(K, interval(2))
            assert.equal(K, c:stats().stage_refs)
            -- Every ref one generation on, as if each slot had been
            -- retired and claimed again: all stale, all go by key.
            for k, r in pairs(c.refs) do
                c.refs[k] = r + 1
            end
            assert.equal(K, interval(3))
            assert.equal(K, c:stats().stage_refs)
        end
    )

    it(
        "a worker that leaves the stage while its automatic sync is between"
            .. " two slices writes the rest directly, exactly",
        function()
            local leave = ngx.shared.leave
            local h = assert(stage.attach("leave"))
            local log_at = in_worker.error_log_size()
            local prefix = in_worker.unique("leave")
            local K = 20000
            local c = in_worker.mid_sync("leave", prefix, K)
            assert.is_true(c:stats().published > 0, "by the stage")
            -- What an exit does: the handle is freed.
            require("resty.counter.stage").leave_stage(c)
            -- The automatic sync goes on after its pause, then ends.
            in_worker.wait_until(function()
                return c:stats().buffered_keys == 0
            end)
            assert.is_true(c:sync())
            fold_all(h) -- what was published before the leave
            assert.equal(0, not_at(leave, prefix, K, 1), "keys not at 1")
            assert.is_false(c:stats().stage)
            -- And the automatic sync went on without raising.
            assert.is_nil(
                in_worker
                    .error_log_since(log_at)
                    :find('dict "leave" raised', 1, true),
                "it raised"
            )
        end
    )

    it("c:sync() folds what any worker published before it returns", function()
        local counter = require("resty.counter")
        local h = assert(stage.attach("stage"))
        local c = counter.new("stage") -- manual: no timer folds
        fold_all(h)
        local key = in_worker.unique("published-then-sync")
        assert.equal(0, stage.publish(h, key, 5))
        assert.is_nil(dict:get(key))
        assert.is_true(c:sync())
        assert.equal(5, dict:get(key))
        local s = c:stats()
        assert.is_true(s.stage)
        assert.is_true(s.folded >= 1)
        assert.is_true(s.stage_fill >= 1)
    end)
end)
