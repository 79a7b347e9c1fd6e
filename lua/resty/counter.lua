-- resty.counter: per-worker counters flushed into an ngx.shared.DICT.
--
-- This file buffers counts in a Lua table per dict and worker (no FFI on
-- the request path) and keeps the API, defined from the API down. At each
-- sync the buffer goes to the Rust library; where a count goes from there,
-- file by file: src/lib.rs. The rest of the shim, under resty/counter/:
--   abi.lua     the ABI (the ffi.cdef block), loading the library, the
--               cdata buffers, whether a dict is flushed natively
--   sync.lua    the sync driver: drain in place, publish, fold, end; slices
--   timer.lua   the timer, the exit flush, the master's write-through
--   stage.lua   attaching a dict to its shared stage
--   log.lua     what syncs log, bounded per worker and minute
--   pure.lua    the original pure-Lua algorithm, printable keys
--   loader.lua  finds, checks and loads the library file
--
-- A dict that is not a real shared dict (a Lua-table stub in unit tests), or
-- a Lua without ffi, runs the original pure-Lua algorithm instead.

local ngx = ngx
local type = type
local tostring = tostring
local tonumber = tonumber
local error = error
local setmetatable = setmetatable
local math_huge = math.huge

local _M = { _VERSION = "0.3.0" }
local mt = { __index = _M }

-- The parts of this file: loaded afresh with it, so that a reload of
-- resty.counter (unit tests do it between cases, with a new ngx) starts
-- all of their state afresh too, as when they were one file.
local PARTS = { "pure", "log", "abi", "stage", "sync", "timer" }
for _, part in ipairs(PARTS) do
    package.loaded["resty.counter." .. part] = nil
end
local abi = require("resty.counter.abi")
local sync = require("resty.counter.sync")
local timer = require("resty.counter.timer")
local log = require("resty.counter.log")
local pure = require("resty.counter.pure")

-- What the loader checks the library against.
abi.shim.version = _M._VERSION
abi.shim.path = debug.getinfo(1, "S").source:gsub("^@", "")

local RC_STORED, STATS_FIELDS = abi.RC_STORED, abi.STATS_FIELDS
local incr_or_add, new_native_handle = abi.incr_or_add, abi.new_native_handle
local write_through = abi.write_through
local run_sync, sync_now, sync_yielding, YIELDING_PHASES =
    sync.run_sync, sync.sync_now, sync.sync_yielding, sync.YIELDING_PHASES
local check_timer, still_in_master = timer.check_timer, timer.still_in_master
local failed_line = log.failed_line
local printable, nkeys, sync_lua = pure.printable, pure.nkeys, pure.sync_lua

---------------------------------------------------------------------------
-- Per-dict state, one per dict and worker, shared by every new().
---------------------------------------------------------------------------
local states = setmetatable({}, { __mode = "k" })

local check_interval, check_opts, new_state, incr_slow -- defined below

---------------------------------------------------------------------------
-- The API.
---------------------------------------------------------------------------
function _M.new(shdict_name, sync_interval, error_metric_name, opts)
    local shared = ngx and ngx.shared
    local dict = shared and shdict_name ~= nil and shared[shdict_name]
    if not dict then
        error('shared dict "' .. tostring(shdict_name) .. '" not defined', 2)
    end
    if sync_interval ~= nil then
        sync_interval = check_interval(sync_interval)
    end
    opts = check_opts(opts)

    local self = states[dict]
    if not self then
        local err
        self, err = new_state(dict, shdict_name)
        if not self then
            error(err, 2)
        end
        states[dict] = self
    end
    if error_metric_name ~= nil and self.error_metric == nil then
        self.error_metric = error_metric_name
    end
    if opts then -- the first new() that says wins, as for the interval
        if opts.stage ~= nil and self.stage_opt == nil then
            self.stage_opt = opts.stage
        end
        if opts.stage_bytes and not self.stage_bytes then
            self.stage_bytes = opts.stage_bytes
        end
        if opts.stage_dict and not self.stage_dict then
            self.stage_dict = opts.stage_dict
        end
    end

    if self.direct and not self.handle and ngx.get_phase() ~= "init" then
        -- This worker's first use of a dict made in the master.
        local h, err = new_native_handle(dict, shdict_name)
        if not h then
            error(err, 2)
        end
        self.handle = h
    end
    if self.native then
        if sync_interval and not self.interval then
            self.interval = sync_interval -- the guard's next run takes it
        end
        if not still_in_master(self) then
            check_timer(self)
        end
    elseif sync_interval and not self.interval then
        self.interval = sync_interval
        ngx.log(
            ngx.DEBUG,
            "start timer for shdict ",
            shdict_name,
            " on worker ",
            ngx.worker.id()
        )
        ngx.timer.every(sync_interval, sync_lua, self)
    end
    return self
end

function _M.incr(self, key, step)
    local buf = self.buf
    local v = buf[key]
    if v then
        -- The common step first: a buffered value is always finite, and a
        -- finite value plus 1 is finite, so no type() call and no check.
        if step == nil or step == 1 then
            buf[key] = v + 1
            return true
        end
        if type(step) == "number" then
            v = v + step
            if v - v == 0 then -- finite: not NaN, not +-inf
                buf[key] = v
                return true
            end
        end
    end
    if step == nil then
        step = 1
    end
    local ok = incr_slow(self, key, step) -- not a tail call: see incr_slow
    return ok
end

-- The first increment of a key in an interval, and every bad input.
-- Errors name the caller of incr (level 3: incr calls this, not as a tail
-- call, because PUC Lua 5.1 leaves no position for a tail-called frame).
function incr_slow(self, key, step)
    local kt = type(key)
    if kt == "number" then
        if key ~= key then
            error("bad key: NaN", 3)
        end
        key = tostring(key)
    elseif kt ~= "string" then
        error("bad key: string or number expected, got " .. kt, 3)
    end
    local len = #key
    if len == 0 or len > 65535 then
        error("bad key: length must be 1 to 65535 bytes, got " .. len, 3)
    end
    if type(step) ~= "number" then
        error("bad step: number expected, got " .. type(step), 3)
    end
    if step ~= step or step == math_huge or step == -math_huge then
        error("bad step: finite number expected, got " .. tostring(step), 3)
    end

    local through = self.write_through or still_in_master(self)
    if not through and self.native and not self.timer then
        check_timer(self) -- the timer is down: try again (rate-limited)
        through = not self.timer
    end
    if through then
        -- Before the fork (master), after the exit flush, while nginx
        -- refuses the timer, or in a VM per request: no timer will flush a
        -- buffer, so write straight to the dict. Nothing keeps an
        -- increment the dict refuses here: it is dropped, and the library
        -- counts it in stats(); the error metric takes 1 per drop, as for
        -- a failed sync (not in the master, which has no stats). A refused
        -- write of the error metric itself is not counted again.
        local err = write_through(self, key, step)
        if err then
            failed_line(self, key, err)
            if self.error_metric and self.handle then
                incr_or_add(self, self.error_metric, 1, 0)
            end
        end
        return true
    end

    local buf = self.buf
    local sum = (buf[key] or 0) + step
    if sum - sum ~= 0 then
        error('bad step: counter "' .. printable(key) .. '" would overflow', 3)
    end
    buf[key] = sum
    return true
end

function _M.sync(self)
    if self.native then
        if not self.handle then
            return true -- the master, or a worker before its first incr
        end
        check_timer(self)
        local yielding = YIELDING_PHASES[ngx.get_phase()]
            and not ngx.worker.exiting()
        local synced, err =
            run_sync(self, yielding and sync_yielding or sync_now)
        if synced == nil then
            error(err, 0) -- the sync was ended first: the next is clean
        end
        return synced
    end
    return sync_lua(false, self)
end

-- Subtracts number from key's value. Refuses a non-finite number, and a
-- key whose value is not a finite number or would leave the double range
-- (checked against the value read just before: a concurrent increment in
-- that instant is not covered), with nil, err: reset never makes a value
-- non-finite.
function _M.reset(self, key, number)
    number = tonumber(number)
    if not number or number ~= number then
        return nil, "expect a number at #2" -- the original's message
    end
    if number - number ~= 0 then
        return nil, "expect a finite number at #2"
    end
    local cur = self.dict:get(key)
    if cur ~= nil then
        if type(cur) ~= "number" or cur - cur ~= 0 then
            return nil, "value of key is not a finite number"
        end
        local after = cur - number
        if after - after ~= 0 then
            return nil, "reset would overflow the value of key"
        end
    end
    if self.native then
        return incr_or_add(self, key, -number, number)
    end
    return self.dict:incr(key, -number, number)
end

function _M.get(self, key)
    return self.dict:get(key)
end

function _M.get_keys(self, max_count)
    return self.dict:get_keys(max_count)
end

-- What this worker holds and has done for this dict; every field is
-- described in docs/API.md ("c:stats()").
function _M.stats(self)
    local s = {
        mode = self.native and "native" or "lua",
        buffered_keys = nkeys(self.buf),
        sync_interval = self.interval,
        slice_pause = sync.SLICE_PAUSE,
    }
    if self.native and self.handle then
        local lib, stats_out, info_out = abi.lib, abi.stats_out, abi.info_out
        if
            lib.resty_counter_flusher_stats(self.handle, stats_out)
            == RC_STORED
        then
            for _, field in ipairs(STATS_FIELDS) do
                s[field] = stats_out[field]
            end
        end
        s.stage = self.stage and true or false
        s.published = self.published
        s.folded = 0 -- deltas this worker folded (stage_info's my_folded)
        s.fallback_writes = self.fallback_writes
        s.stage_refs = self.nrefs or 0
        if
            self.stage
            and lib.resty_counter_stage_info(self.stage, info_out) == 0
        then
            local r = info_out
            s.lease_held = r.lease_owner == r.pid
            s.folded = r.my_folded
            s.stage_fill = r.fill
            s.stage_slots = r.slots
            s.stage_full = r.full
            s.stage_orphans_lost = r.orphans_lost_amount
            s.lost_in_flight = r.lost_amount
            s.lost_in_flight_events = r.lost_events
        else
            s.lease_held = false
        end
    end
    return s
end

---------------------------------------------------------------------------
-- What new() needs.
---------------------------------------------------------------------------
function check_interval(sync_interval)
    local n = tonumber(sync_interval)
    if not n or not (n > 0) or n == math_huge then
        error("expect sync_interval to be a positive number", 3)
    end
    return n
end

function new_state(dict, name)
    local self = setmetatable({
        dict = dict,
        name = name,
        buf = {},
        native = abi.is_real_shdict(dict),
        published = 0, -- deltas this worker handed to the stage
        fallback_writes = 0, -- deltas the stage refused, written directly
    }, mt)
    if self.native then
        -- A VM per request: no buffer, no timer (see PER_REQUEST_VM).
        self.write_through = abi.PER_REQUEST_VM
        -- In the master, before fork: write through, so that a count made
        -- in init_by_lua is not copied into, and flushed by, every worker.
        -- The master loads no library: each worker loads the file on disk
        -- at its first native use, so a reload after an upgrade runs the
        -- new file (or refuses it), never the master's old mapping.
        self.direct = ngx.get_phase() == "init"
        if not self.direct then
            local h, err = new_native_handle(dict, name)
            if not h then
                return nil, err
            end
            self.handle = h
        end
    end
    return self
end

function check_opts(opts)
    if opts == nil then
        return nil
    end
    if type(opts) ~= "table" then
        error("expect options to be a table", 3)
    end
    if opts.stage ~= nil and type(opts.stage) ~= "boolean" then
        error("expect options.stage to be a boolean", 3)
    end
    local b = opts.stage_bytes
    if b ~= nil and (type(b) ~= "number" or not (b >= 1) or b == math_huge) then
        error("expect options.stage_bytes to be a positive number", 3)
    end
    local z = opts.stage_dict
    if z ~= nil and (type(z) ~= "string" or not ngx.shared[z]) then
        error(
            'options.stage_dict: shared dict "'
                .. tostring(z)
                .. '" not defined',
            3
        )
    end
    return opts
end

return _M
