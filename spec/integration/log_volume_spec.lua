-- What the syncs log is bounded per worker and minute, whatever the
-- sync_interval: at most 100 per-key lines and 20 count lines a minute per
-- worker; past either, one line says the rest are counted, and the end of
-- the minute (here: the worker's exit) logs one summary line per dict with
-- the counts of what was not logged. Both tests sync every 0.1 s.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local KEY_LINES, COUNT_LINES = 100, 20

-- The error.log lines of each worker pid, in order.
local function lines_by_pid(log)
    local by = {}
    for line in log:gmatch("[^\n]+") do
        local pid = line:match("^%S+ %S+ %[%a+%] (%d+)#")
        if pid then
            by[pid] = by[pid] or {}
            table.insert(by[pid], line)
        end
    end
    return by
end

local function is_key_line(line)
    return line:find("error increasing counter in shdict key: ", 1, true)
        or line:find("lru eviction: key=", 1, true)
end

local COUNT_MARKS = {
    "evicted other entries",
    "the pending cap is reached",
    "pending increments for good when retried",
    "keys folded from the stage",
    "raised an error",
}

local function is_count_line(line)
    for _, mark in ipairs(COUNT_MARKS) do
        if line:find(mark, 1, true) then
            return true
        end
    end
    return false
end

local SUMMARY = ": not logged in the last "

-- Splits one worker's lines into minutes: each minute that held lines back
-- ends with its summary lines. Returns, per minute, the per-key and count
-- lines logged, the "counted instead" notes and the summary lines.
local function minutes(lines)
    local out, cur = {}, nil
    for _, line in ipairs(lines) do
        local summary = line:find(SUMMARY, 1, true)
        if not cur or (#cur.summaries > 0 and not summary) then
            cur = { key = 0, count = 0, notes = 0, summaries = {} }
            out[#out + 1] = cur
        end
        if summary then
            table.insert(cur.summaries, line)
        elseif is_key_line(line) then
            cur.key = cur.key + 1
        elseif is_count_line(line) then
            cur.count = cur.count + 1
        elseif line:find("the next are counted instead", 1, true) then
            cur.notes = cur.notes + 1
        end
    end
    return out
end

describe("#integration log volume", function()
    after_each(function()
        nginx.stop_all()
    end)

    it(
        "a dict under sustained pressure (2 workers, interval 0.1 s, 5000 "
            .. "keys in a 256k dict, an error metric, wrk) logs at most 100 "
            .. "per-key and 20 count lines a minute per worker, then sums up "
            .. "the rest",
        function()
            local srv = nginx.start({
                workers = 2,
                http = [[
      lua_shared_dict pressed 256k;
      init_worker_by_lua_block {
        require("spec.integration.helpers").c =
          require("resty.counter").new("pressed", 0.1, "errors")
      }
    ]],
                server = [[
      location = /hit {
        content_by_lua_block {
          require("spec.integration.helpers").c:incr("key:" .. ngx.var.arg_k)
        }
      }
    ]],
            })
            local out = H.wrk({
                url = srv.url .. "/hit",
                seconds = H.LONG and 8 or 3,
                script = [[
request = function()
  return wrk.format("GET", "/hit?k=" .. math.random(5000))
end
]],
            })
            srv:stop()
            local log = srv:error_log()
            local size = #log
            print(
                ("log volume: %d bytes of error.log after wrk:\n%s"):format(
                    size,
                    out
                )
            )
            assert.same({}, H.crash_lines(log))
            local workers = 0
            for pid, lines in pairs(lines_by_pid(log)) do
                for i, m in ipairs(minutes(lines)) do
                    local where = ("worker %s, minute %d"):format(pid, i)
                    assert.is_true(m.key <= KEY_LINES, where .. ": " .. m.key)
                    assert.is_true(
                        m.count <= COUNT_LINES,
                        where .. ": " .. m.count
                    )
                    assert.is_true(m.notes <= 2, where)
                end
                local held = false
                for _, line in ipairs(lines) do
                    if
                        line:find('shared dict "pressed"' .. SUMMARY, 1, true)
                    then
                        held = true
                        assert.matches("%): %d+ evictions", line)
                    end
                end
                if held then
                    workers = workers + 1
                end
            end
            assert.is_true(
                workers >= 1,
                "no worker summed up what it held back"
            )
            assert.is_true(size <= 1024 * 1024, size .. " bytes")
        end
    )

    it(
        "the summary counts exactly what was not logged: logged lines plus "
            .. "the summary's count equal stats().dropped_permanent",
        function()
            local srv = nginx.start({
                workers = 1,
                http = [[
      lua_shared_dict strings 1m;
      init_worker_by_lua_block {
        require("spec.integration.helpers").c =
          require("resty.counter").new("strings", 0.1)
      }
    ]],
                server = [[
      # 20 keys that hold strings, incremented for 30 intervals: each sync
      # fails once per key ("not a number"), about 600 per-key failures.
      location = /fail {
        content_by_lua_block {
          local c = require("spec.integration.helpers").c
          local d = ngx.shared.strings
          for i = 1, 20 do
            d:set("s" .. i, "text")
          end
          for _ = 1, 30 do
            for i = 1, 20 do
              c:incr("s" .. i)
            end
            ngx.sleep(0.1)
          end
          local H = require "spec.integration.helpers"
          H.flushed(c, true)
          ngx.print(H.report(c))
        }
      }
    ]],
            })
            local status, body = srv:get("/fail", nil, 30)
            assert.equal(200, status, body)
            local dropped = H.decode(body)["stats.dropped_permanent"]
            assert.is_true(dropped > KEY_LINES, body)
            srv:stop()
            local log = srv:error_log()
            local logged = H.count_matches(log, ", err: not a number")
            assert.equal(KEY_LINES, logged)
            local held = log:match(
                'shared dict "strings": not logged in the last %d+ s %([^)]*%): '
                    .. "(%d+) failed writes"
            )
            print(
                ("not a number: %d logged + %s summed up, of %d"):format(
                    logged,
                    tostring(held),
                    dropped
                )
            )
            assert.equal(dropped, logged + tonumber(held or 0), log:sub(-2000))
        end
    )
end)
