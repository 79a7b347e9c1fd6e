-- resty.counter.log: what syncs log, bounded per worker and minute
-- whatever the interval: each key's outcome (report), and the count lines
-- of a fold and of a sync's end (what Rust returned for them).

local ngx = ngx
local pairs = pairs
local ipairs = ipairs

local pure = require("resty.counter.pure")
local abi = require("resty.counter.abi")
local clear_tab, printable = pure.clear_tab, pure.printable

local _M = {}

-- Two classes of lines: per-key lines (a key whose write failed, or
-- evicted other entries, with the error metric) and count lines (what one
-- sync dropped, evicted or failed in all; a sync that raised). Each class
-- may log LOG_LINES[class] lines per LOG_WINDOW seconds in a worker, all
-- dicts together. Beyond that, lines are not logged but their events are
-- counted, per dict and kind; the first line the window holds back says so,
-- and the window's end (noticed by the next line or sync end, or by the
-- worker's exit flush) logs one summary line per dict with those counts.
-- So a short sync_interval no longer multiplies the volume.
local LOG_WINDOW = 60
local LOG_LINES = { key = 100, count = 20 }
local HELD_KINDS = { -- what a summary counts, in its order
    { "failed", " failed writes" },
    { "evicted", " evictions" },
    { "dropped_cap", " increments dropped at the pending cap" },
    { "dropped_retry", " pending increments refused for good when retried" },
    { "errors", " syncs that raised an error" },
}
local logbook = { start = nil, used = { key = 0, count = 0 }, held = {} }

-- Logs a summary line per dict with what the window held back, if
-- anything, and starts a new window at `now`.
local function close_window(now)
    local seconds = math.floor(now - (logbook.start or now) + 0.5)
    for name, held in pairs(logbook.held) do
        local parts = {}
        for _, kind in ipairs(HELD_KINDS) do
            local n = held[kind[1]]
            if n then
                parts[#parts + 1] = ("%.17g%s"):format(n, kind[2])
            end
        end
        ngx.log(
            held.level,
            'resty.counter: shared dict "',
            name,
            '": not logged in the last ',
            seconds,
            " s (a worker logs at most ",
            LOG_LINES.key,
            " per-key and ",
            LOG_LINES.count,
            " count lines a minute): ",
            table.concat(parts, ", ")
        )
    end
    clear_tab(logbook.held)
    logbook.start, logbook.used.key, logbook.used.count = now, 0, 0
end

-- Starts a new window when the current one is over.
local function roll_window()
    local now = ngx.now()
    local start = logbook.start
    if not start then
        logbook.start = now
    elseif now - start >= LOG_WINDOW then
        close_window(now)
    end
end

-- Whether a line of `class` may be logged now (then it is counted).
local function may_log(class)
    roll_window()
    local used = logbook.used
    local n = used[class]
    used[class] = n + 1
    if n < LOG_LINES[class] then
        return true
    end
    if n == LOG_LINES[class] then
        ngx.log(
            ngx.WARN,
            "resty.counter: this worker logged ",
            n,
            class == "key" and " per-key" or " count",
            " lines in this minute: the next are counted instead, and",
            " summed up at its end"
        )
    end
    return false
end

-- Counts `n` events of `kind` in `self`'s dict that were not logged; the
-- summary takes the most severe level held back.
local function hold(self, level, kind, n)
    local held = logbook.held[self.name]
    if not held then
        held = { level = level }
        logbook.held[self.name] = held
    end
    held[kind] = (held[kind] or 0) + n
    if level < held.level then -- ngx.ERR < ngx.WARN
        held.level = level
    end
end

-- A per-key line: `head`, the key made printable, then `tail`.
local function key_line(self, level, kind, key, head, tail)
    if may_log("key") then
        ngx.log(level, head, printable(key), tail)
    else
        hold(self, level, kind, 1)
    end
end

-- The per-key line of a write into the dict that failed with `err`.
local function failed_line(self, key, err)
    key_line(
        self,
        ngx.WARN,
        "failed",
        key,
        "error increasing counter in shdict key: ",
        ", err: " .. err
    )
end

-- A count line, standing for `n` events of `kind`: the rest of the
-- arguments are the line.
local function count_line(self, level, kind, n, ...)
    if may_log("count") then
        ngx.log(level, ...)
    else
        hold(self, level, kind, n)
    end
end

-- The count lines of one fold call: `failed` keys not written, `evicted`
-- writes that evicted other entries (those with the error metric only).
function _M.fold_lines(self, failed, evicted)
    if failed > 0 then
        count_line(
            self,
            ngx.WARN,
            "failed",
            failed,
            "resty.counter: ",
            failed,
            " keys folded from the ",
            'stage could not be written into shared dict "',
            self.name,
            '" (kept pending or dropped: see stats())'
        )
    end
    if evicted > 0 and self.error_metric then
        count_line(
            self,
            ngx.ERR,
            "evicted",
            evicted,
            "resty.counter: folding the stage into shared ",
            'dict "',
            self.name,
            '" evicted other entries ',
            evicted,
            " times"
        )
    end
end

-- The count lines of a sync's end, from what Rust returned in `r` (a
-- resty_counter_sync_result); then a window that is over logs its summary.
function _M.sync_lines(self, r)
    local name = self.name
    if r.dropped_in_retry > 0 then
        count_line(
            self,
            ngx.ERR,
            "dropped_retry",
            r.dropped_in_retry,
            'resty.counter: shared dict "',
            name,
            '" refused ',
            r.dropped_in_retry,
            " pending increments for ",
            "good when retried: dropped"
        )
    end
    if r.dropped_cap > 0 then
        count_line(
            self,
            ngx.ERR,
            "dropped_cap",
            r.dropped_cap,
            'resty.counter: shared dict "',
            name,
            '" is full and the pending cap is reached: dropped ',
            r.dropped_cap,
            " increments in this sync"
        )
    end
    -- With the error metric each eviction of a first write had its line
    -- (report, count_fold); a retry's has none: one line for them.
    if r.evicted_in_retry > 0 and self.error_metric then
        count_line(
            self,
            ngx.ERR,
            "evicted",
            r.evicted_in_retry,
            "resty.counter: retrying the pending keys of shared dict ",
            '"',
            name,
            '" evicted other entries ',
            r.evicted_in_retry,
            " times"
        )
    end
    if r.evicted > 0 and not self.error_metric then
        count_line(
            self,
            ngx.WARN,
            "evicted",
            r.evicted,
            'resty.counter: flushing into shared dict "',
            name,
            '" evicted other entries ',
            r.evicted,
            " times: the dict is too small"
        )
    end
    if r.pending_keys > 0 and ngx.worker.exiting() then
        -- The last sync of this worker: what is pending now is lost.
        -- Always logged: once per worker and dict.
        ngx.log(
            ngx.ERR,
            "resty.counter: worker exiting: ",
            r.pending_keys,
            " keys with pending increments ",
            "summing ",
            r.pending_sum,
            ' could not be written to shared dict "',
            name,
            '": lost'
        )
    end
    roll_window() -- a window over logs its summary now, not at a later line
end

local RC_STORED_EVICTED, RC_RETAINED = abi.RC_STORED_EVICTED, abi.RC_RETAINED
local RC_DROPPED_CAP, strerror = abi.RC_DROPPED_CAP, abi.strerror

-- Logs one key's outcome of a sync's hand-over (through key_line); Rust
-- counts and decides the sync's result, and end_sync logs the count lines.
local function report(self, key, rc)
    if rc == RC_STORED_EVICTED then
        if self.error_metric then
            key_line(
                self,
                ngx.ERR,
                "evicted",
                key,
                "increasing counter in shdict: lru eviction: key=",
                ""
            )
        end
        return
    end
    if rc == RC_DROPPED_CAP then
        return -- one count line per sync, from end_sync
    end
    failed_line(
        self,
        key,
        strerror(rc)
            .. (rc == RC_RETAINED and " (kept, retried at the next sync)" or "")
    )
end

_M.logbook, _M.close_window, _M.roll_window = logbook, close_window, roll_window
_M.key_line, _M.failed_line, _M.count_line = key_line, failed_line, count_line
_M.report = report

return _M
