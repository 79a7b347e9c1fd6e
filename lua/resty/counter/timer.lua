-- resty.counter.timer: when a buffer is flushed. The timer of each dict
-- and worker (automatic syncs, the exit flush), and the write-through that
-- runs while no timer will flush a buffer: in the master before the fork,
-- and after the exit flush.

local ngx = ngx
local tostring = tostring
local next = next

local abi = require("resty.counter.abi")
local sync = require("resty.counter.sync")
local log = require("resty.counter.log")
local pure = require("resty.counter.pure")

local _M = {}

local GUARD_PERIOD = sync.GUARD_PERIOD
local run_sync, sync_now, sync_sliced =
    sync.run_sync, sync.sync_now, sync.sync_sliced
local count_line, close_window, logbook =
    log.count_line, log.close_window, log.logbook
local new_native_handle = abi.new_native_handle
local sync_lua = pure.sync_lua -- the fallback when a worker cannot load the library

-- Logs a sync that raised, with the traceback: once per error (a count
-- line, so within the per-minute bound).
local function log_raised(self, trace)
    count_line(
        self,
        ngx.ERR,
        "errors",
        1,
        'resty.counter: a sync of shared dict "',
        self.name,
        '" raised an error (the sync was ended; the next starts afresh): ',
        trace
    )
end

-- One timer per dict and worker, always a repeating one (ngx.timer.every):
-- nginx re-arms a repeating timer itself, before it checks
-- lua_max_running_timers and without the lua_max_pending_timers check, so
-- a busy timer table can drop a run but never stops it. With a
-- sync_interval it syncs every interval, in slices. A manual counter's
-- timer (the guard) runs each GUARD_PERIOD and does nothing until the
-- worker exits; if a later new() gives the counter an interval, the guard
-- syncs on its runs once the interval has passed (so such a counter syncs
-- at most once per GUARD_PERIOD). Either way the timer flushes when the
-- worker exits: lua-nginx-module runs pending timers at once, with
-- premature = true, when a worker shuts down.
-- A timer nginx refused is started again by the next new(), sync() or
-- first increment of a key; meanwhile no buffer is kept: every increment
-- goes straight into the dict (incr_slow), so none waits for a timer that
-- may never come.
local tick
local REARM_EVERY = 0.1 -- seconds between two tries while down

-- After the exit flush nothing syncs again: write straight to the dict.
-- The log lines the window held back are summed up before the worker goes.
local function exit_flush(self)
    self.write_through = true
    local synced, _, trace = run_sync(self, sync_now)
    if synced == nil then
        log_raised(self, trace)
    end
    if next(logbook.held) then
        close_window(ngx.now())
    end
    return synced
end

local function timer_down(self, err)
    self.timer = false
    if not self.timer_down then
        self.timer_down = true
        ngx.log(
            ngx.ERR,
            "resty.counter: cannot start the timer of shared ",
            'dict "',
            self.name,
            '": ',
            err,
            "; retrying at the next ",
            "new(), sync() or increment, which meanwhile writes into the",
            " dict directly"
        )
    end
end

-- Starts the timer. A dict has one at most: a new one is started only
-- after nginx refused the last (timer_down), which then never runs.
local function start_timer(self)
    if self.timer or self.write_through or ngx.get_phase() == "init" then
        return
    end
    if ngx.worker.exiting() then
        return exit_flush(self) -- no timer will run: flush now
    end
    local now = ngx.now()
    if self.timer_tried and now - self.timer_tried < REARM_EVERY then
        return
    end
    self.timer_tried = now
    local period = self.interval or GUARD_PERIOD
    local ok, err = ngx.timer.every(period, tick, self)
    if not ok then
        return timer_down(self, err)
    end
    self.timer, self.timer_period, self.tick_synced = true, period, now
    if self.timer_down then
        self.timer_down = nil
        ngx.log(
            ngx.NOTICE,
            'resty.counter: the timer of shared dict "',
            self.name,
            '" runs again'
        )
    end
end

-- Starts the timer again if it is down; cheap enough for incr's slow path.
local function check_timer(self)
    if not self.timer then
        return start_timer(self)
    end
end

tick = function(premature, self)
    if premature or ngx.worker.exiting() then
        if not self.write_through then
            return exit_flush(self)
        end
        return
    end
    local interval = self.interval
    if not interval then
        return -- manual: waits for exit
    end
    if self.timer_period ~= interval then
        -- The guard of a counter given an interval later: sync when due.
        local now = ngx.now()
        if now - self.tick_synced < interval then
            return
        end
        self.tick_synced = now
    end
    if self.syncing then
        return -- the previous sync still runs
    end
    self.syncing = true
    local ok, synced, _, trace = pcall(run_sync, self, sync_sliced)
    self.syncing = nil
    if not ok then -- raised while ending the sync (end_sync's lines)
        log_raised(self, tostring(synced))
    elseif synced == nil then
        log_raised(self, trace)
    end
    if ngx.worker.exiting() and not self.write_through then
        return exit_flush(self)
    end
end

-- A counter made in the master (init_by_lua) writes through until the
-- fork. At its first use in a worker it starts buffering: the worker loads
-- the library (or, if it cannot, counts with the pure-Lua algorithm) and
-- starts its timer.
local function start_buffering(self)
    self.direct = false
    if not self.handle then
        local h, err = new_native_handle(self.dict, self.name)
        if not h then
            -- Loud, and no count lost: this worker runs the original
            -- pure-Lua algorithm for this dict.
            ngx.log(
                ngx.ERR,
                err,
                '; counting in Lua for shared dict "',
                self.name,
                '" in this worker'
            )
            self.native = false
            if self.interval then
                ngx.timer.every(self.interval, sync_lua, self)
            end
            return
        end
        self.handle = h
    end
    start_timer(self)
end

-- Whether this native counter still writes straight into the dict because
-- it is in the master before the fork (see new_state); in a worker, the
-- first call starts buffering and returns false.
local function still_in_master(self)
    if not self.direct then
        return false
    end
    if ngx.get_phase() == "init" then
        return true
    end
    start_buffering(self)
    return false
end

_M.log_raised, _M.check_timer = log_raised, check_timer
_M.still_in_master = still_in_master

return _M
