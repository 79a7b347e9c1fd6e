-- Proves that specs run by spec/run-in-nginx execute inside a real nginx
-- worker: a real shared dict, a yielding ngx.sleep, timers, the configured
-- worker count, and HTTP requests to other locations of the same server.
-- luacheck: globals ngx
local http = require("spec.support.http")

describe("the in-nginx harness", function()
    it("exposes ngx.shared.counters as a real shared dict", function()
        local dict = ngx.shared.counters
        assert.equal("userdata", type(dict[1]))
        dict:delete("harness_spec:x")
        assert.equal(1, dict:incr("harness_spec:x", 1, 0))
        assert.equal(1, dict:get("harness_spec:x"))
    end)

    it("lets a spec yield with ngx.sleep", function()
        ngx.update_time()
        local started = ngx.now()
        ngx.sleep(0.01)
        ngx.update_time()
        assert.is_true(ngx.now() - started >= 0.009)
    end)

    it("runs timers while a spec sleeps", function()
        local fired = false
        assert(ngx.timer.at(0, function(premature)
            fired = not premature
        end))
        for _ = 1, 100 do
            if fired then
                break
            end
            ngx.sleep(0.01)
        end
        assert.is_true(fired)
    end)

    it("runs with the configured number of workers", function()
        local configured = tonumber(os.getenv("SPEC_NGINX_WORKERS"))
        assert.is_number(configured)
        assert.equal(configured, ngx.worker.count())
    end)

    it("reaches other locations of the same server", function()
        local status, body = http.get("/__ping")
        assert.equal(200, status)
        assert.equal("pong\n", body)
    end)
end)
