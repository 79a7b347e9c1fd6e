-- Increments written straight through into the dict (no buffer: while
-- nginx refuses the dict's timer, in a VM per request with lua_code_cache
-- off, after a worker's exit flush) that the dict refuses: nothing can keep
-- them, so each is dropped, and each drop shows in stats()
-- (`failed_writes`, `dropped_deltas`), in the error metric (+1 per drop)
-- and in a per-key WARN line that says it was dropped.
--
-- How the dict refuses: it is full of small entries touched in a shuffled
-- order, and each increment's key is 3000 bytes, so it needs a whole slab
-- page, which the 30 LRU evictions of one write never free ("no memory";
-- see spec/integration/full_dict_spec.lua). The error metric's key exists
-- before the dict fills and is touched last, so adding 1 to it needs no
-- memory and no eviction reaches it.

local nginx = require("spec.support.nginx")
local H = require("spec.integration.helpers")

local DROP = [[
  # Fills dict `full` (keeping the error metric `errors`), makes the
  # counter, increments three 3000-byte keys once each (steps 1, 2, 3),
  # and reports what stats() and the error metric say moved.
  location = /drop {
    content_by_lua_block {
      local H = require "spec.integration.helpers"
      local d = ngx.shared.full
      d:flush_all()
      d:flush_expired()
      assert(d:set("errors", 0))
      require("spec.support.fill").small(d)
      d:get("errors")
      local c = require("resty.counter").new("full", nil, "errors")
      local before = c:stats()
      local present = 0
      for i = 1, 3 do
        local key = string.char(96 + i):rep(3000)
        c:incr(key, i)
        if d:get(key) ~= nil then
          present = present + 1
        end
      end
      local after = c:stats()
      local out = { errors = d:get("errors"), present = present,
                    buffered = after.buffered_keys,
                    pending = after.pending_keys }
      for _, f in ipairs({ "failed_writes", "dropped_deltas",
                           "dropped_permanent", "keys_flushed" }) do
        out[f] = after[f] - before[f]
      end
      ngx.print(H.encode(out))
    }
  }
]]

local LINE = "err: no memory, written straight through: dropped"

local function check(srv, path)
    local status, body = srv:get(path or "/drop", nil, 30)
    assert.equal(200, status, body)
    local r = H.decode(body)
    -- Written through: nothing buffered, nothing kept, nothing stored.
    assert.equal(0, r.buffered, body)
    assert.equal(0, r.pending, body)
    assert.equal(0, r.present, body)
    -- Each of the three refused writes is a drop, counted once.
    assert.equal(3, r.failed_writes, body)
    assert.equal(3, r.dropped_deltas, body)
    assert.equal(0, r.dropped_permanent, body)
    assert.equal(0, r.keys_flushed, body)
    assert.equal(3, r.errors, body)
    return r
end

describe(
    "#integration an increment written through that the dict refuses",
    function()
        local srv

        after_each(nginx.stop_all)

        it(
            "is dropped, counted in stats() and in the error metric, and logged "
                .. "as dropped: while nginx refuses the timer (lua_max_pending_timers 1)",
            function()
                srv = nginx.start({
                    workers = 1,
                    http = [[
      lua_max_pending_timers 1;
      lua_shared_dict d 1m;
      lua_shared_dict full 256k;
      init_worker_by_lua_block {
        -- This counter's timer takes the only slot, for good: the timer
        -- of the counter on `full` is refused, so it writes through.
        require("spec.integration.helpers").c =
          require("resty.counter").new("d", 0.1)
      }
    ]],
                    server = DROP,
                })
                check(srv)
                srv:stop() -- its error.log whole
                local log = srv:error_log()
                assert.equal(
                    1,
                    H.count_matches(
                        log,
                        'cannot start the timer of shared dict "full"'
                    )
                )
                assert.equal(3, H.count_matches(log, LINE))
            end
        )

        it(
            "is dropped, counted in stats() and in the error metric, and logged "
                .. "as dropped: a VM per request (lua_code_cache off)",
            function()
                srv = nginx.start({
                    workers = 1,
                    http = [[
      lua_code_cache off;
      lua_shared_dict full 256k;
    ]],
                    server = DROP .. [[
  location = /load {
    content_by_lua_block { require "resty.counter" }
  }
    ]],
                })
                -- The worker's first VM buffers as usual; the next are per
                -- request.
                assert.equal(200, (srv:get("/load")))
                check(srv)
                srv:stop()
                assert.equal(3, H.count_matches(srv:error_log(), LINE))
            end
        )
    end
)
