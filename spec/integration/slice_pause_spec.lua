-- The pause between the slices of an automatic sync follows the nginx:
-- where ngx.sleep(0) yields to the event loop (OpenResty's delayed-events
-- patch), the pause is 0; elsewhere (Debian's nginx) ngx.sleep(0) would
-- log a WARN each time, so the pause is 1 ms and no such WARN appears.
-- The spec asks nginx itself which case it is: one ngx.sleep(0), then the
-- error log. It runs on every flavor.

local nginx = require("spec.support.nginx")

local KEYS = 20000
local NO_PATCH_WARN = "called without delayed events patch"

local HTTP = [[
  lua_shared_dict counters 16m;
  init_worker_by_lua_block {
    require("resty.counter").new("counters", 0.05)
  }
]]

local SERVER = [[
  location = /probe {
    content_by_lua_block {
      ngx.sleep(0)
      ngx.say("slept")
    }
  }
  location = /pause {
    content_by_lua_block {
      ngx.print(require("resty.counter").new("counters"):stats().slice_pause)
    }
  }
  location = /fill {
    content_by_lua_block {
      local c = require("resty.counter").new("counters")
      for i = 1, ]] .. KEYS .. [[ do
        c:incr("k" .. i)
      end
      ngx.say("filled")
    }
  }
  location = /count {
    content_by_lua_block {
      local d, n = ngx.shared.counters, 0
      for i = 1, ]] .. KEYS .. [[ do
        n = n + (d:get("k" .. i) or 0)
      end
      ngx.print(n)
    }
  }
]]

local function warns(srv)
    local _, n = srv:error_log():gsub(NO_PATCH_WARN, "")
    return n
end

describe("the pause between sync slices", function()
    local srv

    before_each(function()
        srv = nginx.start({ workers = 1, http = HTTP, server = SERVER })
    end)

    after_each(function()
        srv:stop()
    end)

    it(
        "is 0 where ngx.sleep(0) yields, 1 ms elsewhere, and never logs its WARN",
        function()
            assert.equal(200, (srv:get("/probe")))
            local patched = warns(srv) == 0
            local status, pause = srv:get("/pause")
            assert.equal(200, status)
            assert.equal(
                patched and "0" or "0.001",
                pause,
                nginx.flavor().name
                    .. ": ngx.sleep(0) "
                    .. (patched and "yields" or "warns")
            )

            -- A sliced sync of many keys: exact, and no sleep(0) WARN of ours.
            local before = warns(srv)
            assert.equal(200, (srv:get("/fill")))
            local socket = require("socket")
            local deadline = socket.gettime() + 10
            local body
            repeat
                local _
                _, body = srv:get("/count")
                if body == tostring(KEYS) then
                    break
                end
                socket.sleep(0.05)
            until socket.gettime() > deadline
            assert.equal(tostring(KEYS), body)
            assert.equal(before, warns(srv))
        end
    )
end)
