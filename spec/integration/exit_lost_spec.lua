-- A worker that exits with deltas a full dict still refuses tries them once
-- more, then says what it loses: how many keys, and their sum.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local HTTP = [[
  lua_shared_dict tiny 256k;
  init_worker_by_lua_block {
    require("spec.integration.helpers").tiny =
      require("resty.counter").new("tiny")
  }
]]

local SERVER = [[
  location = /fill {
    content_by_lua_block {
      -- Small entries fill every slab page: a larger key finds no room.
      local d, n = ngx.shared.tiny, 0
      while d:safe_set("f" .. n, 1) do
        n = n + 1
      end
      -- Reads in strides reorder the LRU queue, so that what each failed
      -- write evicts (the 30 oldest) is spread over many pages and frees
      -- none: the dict stays full for the whole spec.
      for start = 0, 15 do
        for i = start, n - 1, 16 do
          d:get("f" .. i)
        end
      end
      ngx.say(n)
    }
  }
  location = /hit {
    content_by_lua_block {
      local c = require("spec.integration.helpers").tiny
      c:incr(string.rep("a", 300), 5)
      c:incr(string.rep("b", 300), 2.5)
      ngx.say(tostring(c:sync()), " ", c:stats().pending_keys)
    }
  }
]]

describe("#integration worker exit with a full dict", function()
    local srv

    after_each(function()
        if srv then
            srv:stop()
        end
    end)

    it("logs how many pending keys it loses and their sum", function()
        srv = nginx.start({ workers = 1, http = HTTP, server = SERVER })
        local status = srv:get("/fill")
        assert.equal(200, status)
        local body
        status, body = srv:get("/hit")
        assert.equal(200, status)
        assert.equal("false 2\n", body)
        assert.is_true(srv:stop(), "nginx did not quit gracefully")
        local log = srv:error_log()
        srv = nil
        assert.equal(
            1,
            H.count_matches(
                log,
                "worker exiting: 2 keys with "
                    .. "pending increments summing 7.5 "
                    .. "could not be written to shared "
                    .. 'dict "tiny": lost'
            )
        )
        assert.same({}, H.crash_lines(log))
    end)
end)
