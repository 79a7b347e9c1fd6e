-- The shared stage survives `nginx -s reload`: it lives in the stage
-- zone, whose memory nginx reuses. Deltas published by the old workers are
-- folded by them as they exit (their counter's exit sync folds the whole
-- stage), into the exact sums; the new workers join the same region.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local N = 200

local HTTP = [[
  lua_shared_dict resty_counter_stage 4m;
  lua_shared_dict stage 4m;
]]

-- /stage: attach; ?key=K&delta=D publishes; ?fold=1 folds (waiting out
-- another worker's lease). Answers "pid offset rc".
local SERVER = [[
  location = /stage {
    content_by_lua_block {
      local stage = require "spec.support.stage"
      local h = assert(stage.attach("stage"))
      local rc = -100
      local key, delta = ngx.var.arg_key, tonumber(ngx.var.arg_delta)
      if key and delta then
        rc = stage.publish(h, key, delta)
      elseif ngx.var.arg_fold then
        for _ = 1, 100 do
          rc = stage.fold(h, 100)
          if rc >= 0 then
            break
          end
          ngx.sleep(0.05)
        end
      end
      local info = stage.info(h)
      ngx.say(("%d %d %d"):format(info.pid, info.offset, rc))
    }
  }
  location = /get {
    content_by_lua_block {
      ngx.say(ngx.shared.stage:get(ngx.var.arg_key) or "nil")
    }
  }
]]

describe("the shared stage across nginx -s reload", function()
    local srv

    after_each(nginx.stop_all)

    it("keeps its block and what the old workers published", function()
        srv = nginx.start({ workers = 2, http = HTTP, server = SERVER })
        local offsets, old_pids, sent = {}, {}, 0
        for i = 1, N do
            local delta = i % 5 + 1
            local status, body = srv:get("/stage?key=k&delta=" .. delta)
            assert.equal(200, status, body)
            local pid, offset, rc = body:match("^(%d+) (%d+) (%-?%d+)")
            assert.equal("0", rc, body)
            offsets[offset], old_pids[pid] = true, true
            sent = sent + delta
        end
        local _, first = next(offsets)
        assert.is_true(first)
        local offset = next(offsets)
        assert.is_nil(next(offsets, offset), "one region for every worker")

        -- The old workers exit: each folds the whole stage as it goes, so
        -- everything they published is in the dict once they are gone.
        srv:reload()
        local status, body
        H.poll(10, function()
            status, body = srv:get("/get?key=k")
            return tonumber(body) == sent
        end)
        assert.equal(sent, tonumber(body), "folded by the exiting workers")
        status, body = srv:get("/stage?fold=1")
        assert.equal(200, status, body)
        local pid, new_offset, rc = body:match("^(%d+) (%d+) (%-?%d+)")
        assert.is_nil(old_pids[pid], "answered by a new worker")
        assert.equal(offset, new_offset, "the same region after the reload")
        assert.equal(0, tonumber(rc), "nothing left to fold: " .. body)
        status, body = srv:get("/get?key=k")
        assert.equal(200, status)
        assert.equal(sent, tonumber(body))
        assert.same({}, H.crash_lines(srv:error_log()))
    end)
end)
