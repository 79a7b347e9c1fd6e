-- A binary upgrade (USR2, then WINCH and QUIT to the old master) with the
-- shared stage on.
--
-- The new master is a new process image: its shared zones are new memory,
-- so its dict starts empty, and the old dict lives on in the old master
-- until that one quits. Neither side may see the other's stage:
--   * the old workers, told to go (WINCH), write their buffers and fold
--     their stage into the old dict on the way out; nothing is logged lost;
--   * the new workers make and attach a stage of their own in the new
--     stage zone, and count exactly from zero;
--   * no crash, alert or emergency line in the log of either generation.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local WORKERS, N1, N2 = 2, 300, 400

local HTTP = [[
  lua_shared_dict resty_counter_stage 8m;
  lua_shared_dict counters 8m;
  init_worker_by_lua_block {
    counter = require("resty.counter").new("counters", 0.1)
  }
]]

-- /hit counts; /state answers "<dict value> <stage 1/0> <pid>" from
-- whichever worker takes the request.
local SERVER = [[
  location = /hit {
    content_by_lua_block {
      counter:incr("hits")
      ngx.say(ngx.worker.pid())
    }
  }
  location = /state {
    content_by_lua_block {
      local s = counter:stats()
      ngx.say(ngx.shared.counters:get("hits") or 0, " ",
              s.stage and 1 or 0, " ", ngx.worker.pid())
    }
  }
]]

local function hits(srv, n)
    local pids = {}
    for _ = 1, n do
        local status, body = srv:get("/hit")
        assert.equal(200, status, body)
        pids[tonumber(body)] = true
    end
    return pids
end

-- Polls /state until the dict shows `want` and every worker of `pids`
-- answered with its stage on.
local function settled(srv, want, pids)
    local on, last = {}, nil
    H.poll(15, function()
        local status, body = srv:get("/state")
        assert.equal(200, status, body)
        local value, stage, pid = body:match("^(%S+) (%d) (%d+)")
        last = body
        if stage == "1" then
            on[tonumber(pid)] = true
        end
        if tonumber(value) ~= want then
            return false
        end
        for p in pairs(pids) do
            if not on[p] then
                return false
            end
        end
        return true
    end)
    return last
end

describe("#integration the shared stage across a binary upgrade", function()
    local srv

    after_each(function()
        if srv then
            srv:stop() -- the old master too, if the upgrade did not finish
            srv = nil
        end
    end)

    it(
        "the new generation counts exactly in its own zone; the old one "
            .. "leaves without a loss line",
        function()
            srv = nginx.start({
                workers = WORKERS,
                http = HTTP,
                server = SERVER,
            })
            local old_workers = hits(srv, N1)
            local state = settled(srv, N1, old_workers)
            assert.matches("^" .. N1 .. " 1 ", state)

            -- USR2, WINCH, QUIT: the old workers write their buffers and
            -- fold the old stage into the old dict on their way out.
            local leaving = srv:upgrade()
            assert.equal(WORKERS, #leaving)

            -- Only the new workers serve now: their dict starts at zero.
            local new_workers = hits(srv, N2)
            for pid in pairs(new_workers) do
                assert.is_nil(old_workers[pid], "served by an old worker")
            end
            state = settled(srv, N2, new_workers)
            assert.matches("^" .. N2 .. " 1 ", state)

            local log = srv:error_log()
            assert.same({}, H.crash_lines(log))
            assert.is_nil(log:find("lost", 1, true), "a loss line")
            assert.is_nil(log:find("no shared stage", 1, true))
        end
    )
end)
