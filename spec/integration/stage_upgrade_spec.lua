-- A binary upgrade (USR2, then WINCH and QUIT to the old master) with the
-- shared stage on.
--
-- The new master is a new process image: its shared zones are new memory,
-- so its dict starts empty, and the old dict lives on in the old master
-- until that one quits. Neither side may see the other's stage:
--   * the old workers, told to go (WINCH), write their buffers and fold
--     their stage into the old dict on the way out; nothing is logged lost;
--   * the new workers make and attach a stage of their own in the new
--     zone, and count exactly from zero;
--   * no crash, alert or emergency line in the log of either generation.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local WORKERS, N1, N2 = 2, 300, 400

local HTTP = [[
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

-- The worker processes of a master (after USR2 the new master is a child
-- of the old one too).
local function workers_of(master)
    local p = assert(io.popen("pgrep -P " .. master))
    local out = p:read("*a")
    p:close()
    local pids = {}
    for pid in out:gmatch("%d+") do
        local title = H.read_file("/proc/" .. pid .. "/cmdline") or ""
        if title:find("^nginx: worker process") then
            pids[#pids + 1] = tonumber(pid)
        end
    end
    return pids
end

local function alive(pid)
    local ok = os.execute("kill -0 " .. pid .. " 2>/dev/null")
    return ok == 0 or ok == true -- Lua 5.1 returns the status, 5.2+ true
end

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
    local srv, old_master, new_master

    -- Whatever point a failure stopped at: the old master, and a new one
    -- the harness does not know of yet (it is the old one's child and
    -- outlives it), are told to quit too.
    after_each(function()
        for _, master in ipairs({ old_master or 0, new_master or 0 }) do
            if master > 0 and alive(master) then
                os.execute("kill -QUIT " .. master)
                H.poll(10, function()
                    return not alive(master)
                end)
            end
        end
        old_master, new_master = nil, nil
        if srv then
            srv:stop()
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
            old_master = srv.master_pid
            local old_workers = hits(srv, N1)
            local state = settled(srv, N1, old_workers)
            assert.matches("^" .. N1 .. " 1 ", state)

            -- USR2: the old master renames its pid file and starts the new
            -- binary, which writes nginx.pid and starts its own workers.
            os.execute("kill -USR2 " .. old_master)
            local pid_file = srv.prefix .. "/logs/nginx.pid"
            H.poll(15, function()
                local text = H.read_file(pid_file)
                new_master = tonumber(text and text:match("%d+"))
                return new_master
                    and new_master ~= old_master
                    and #workers_of(new_master) == WORKERS
            end)
            -- The old workers go (WINCH): each writes its buffer and folds
            -- the old stage into the old dict on its way out.
            local leaving = workers_of(old_master)
            assert.equal(WORKERS, #leaving)
            os.execute("kill -WINCH " .. old_master)
            H.poll(15, function()
                for _, pid in ipairs(leaving) do
                    if alive(pid) then
                        return false
                    end
                end
                return true
            end)
            srv.master_pid = new_master

            -- Only the new workers serve now: their dict starts at zero.
            local new_workers = hits(srv, N2)
            for pid in pairs(new_workers) do
                assert.is_nil(old_workers[pid], "served by an old worker")
            end
            state = settled(srv, N2, new_workers)
            assert.matches("^" .. N2 .. " 1 ", state)

            os.execute("kill -QUIT " .. old_master)
            H.poll(15, function()
                return not alive(old_master)
            end)
            local log = srv:error_log()
            assert.same({}, H.crash_lines(log))
            assert.is_nil(log:find("lost", 1, true), "a loss line")
            assert.is_nil(log:find("no shared stage", 1, true))
        end
    )
end)
