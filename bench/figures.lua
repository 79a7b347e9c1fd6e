-- The benchmark's figures, run inside an nginx worker (bench/nginx.conf.in
-- calls require("figures").<name>). One file per figure under figures/;
-- what they share is in figures/common.lua.
--
-- Contenders: "proj" (lua/resty/counter.lua), "ref" (reference_counter.lua,
-- the original's algorithm), "plain" (dict:incr per increment), "floor"
-- (sync only: direct ngx_http_lua_ffi_shdict_incr calls), "none" (stall and
-- end to end: no counter).

local common = require("figures.common")
local hot = require("figures.hot")
local sync = require("figures.sync")
local stall = require("figures.stall")
local contend = require("figures.contend")
local e2e = require("figures.e2e")

local ngx = ngx
local tostring = tostring

return {
    hot = hot.hot,
    sync = sync.sync,
    sync_check = sync.sync_check,
    stall = stall.stall,
    contend = contend.contend,
    e2e = e2e.e2e,
    e2e_counts = e2e.e2e_counts,

    init_worker = function()
        contend.init_worker()
        e2e.init_worker()
    end,

    info = function()
        ngx.say(
            string.format(
                "mode=%s jit=%s ngx_lua=%s nginx=%s workers=%d",
                common.MODE,
                jit.version,
                tostring(ngx.config.ngx_lua_version),
                tostring(ngx.config.nginx_version),
                ngx.worker.count()
            )
        )
    end,
}
