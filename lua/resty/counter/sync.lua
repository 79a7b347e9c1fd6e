-- resty.counter.sync: the sync driver. At each sync this worker's buffer
-- is drained in place into the library (straight into the dict, or
-- published into the shared stage in batches), the stage is
-- folded, and the sync is ended in Rust, which decides its result. The
-- automatic sync and a sync() that may yield run in slices with a pause
-- between; a sync that cannot yield runs at once. The timer that drives
-- the automatic sync: resty.counter.timer.

local ngx = ngx
local tostring = tostring
local pairs = pairs

local abi = require("resty.counter.abi")
local stage = require("resty.counter.stage")
local log = require("resty.counter.log")

local _M = {}

-- The tuning constants of a sync (the table in docs/DESIGN.md).
local SLICE_SECONDS = 0.00025 -- work per slice of a sync
-- The pause between slices, taken only when the event loop has work
-- waiting (see pause). ngx.sleep(0) needs OpenResty's delayed-events nginx
-- patch; without it (Debian's nginx) it still waits for a timer cycle, but
-- logs a WARN each time. 1 ms lets the event loop run there too.
local SLICE_PAUSE = 0.001
local CLOCK_EVERY = 32 -- keys between two looks at the clock
local KEEP_MAX = 16384 -- larger buffers are kept only if steady
local FINISH_PASSES = 4 -- sync() that may yield: passes before one at once
local REFS_SLACK = 4096 -- slot refs kept beyond twice the keys of a drain
local GUARD_PERIOD = 1 -- a manual counter's timer: waits for exit
local LEASE_INTERVALS = 3 -- the fold lease lasts this many intervals

local has_ffi, ffi = abi.has_ffi, abi.ffi
-- With OpenResty's delayed-events patch (its queue is in the nginx binary),
-- ngx.sleep(0) yields to the event loop at once: pause 0 there.
if has_ffi then
    pcall(ffi.cdef, "extern char ngx_posted_delayed_events;")
    if
        pcall(function()
            return ffi.C.ngx_posted_delayed_events
        end)
    then
        SLICE_PAUSE = 0
    end
end

local RC_STORED = abi.RC_STORED
local STAGED, STAGE_FULL, BATCH = abi.STAGED, abi.STAGE_FULL, abi.BATCH
local incr_or_add = abi.incr_or_add
local stage_of, leave_stage, full_once =
    stage.stage_of, stage.leave_stage, stage.full_once
local report = log.report
local fold_lines, sync_lines = log.fold_lines, log.sync_lines

local lib, end_out, fold_out -- once the library is loaded
local batch_keys, batch_lens, batch_deltas, batch_rcs, batch_refs
local ref_ids, ref_deltas, ref_rcs
abi.bind(function(a)
    lib, end_out, fold_out = a.lib, a.end_out, a.fold_out
    batch_keys, batch_lens = a.batch_keys, a.batch_lens
    batch_deltas, batch_rcs = a.batch_deltas, a.batch_rcs
    batch_refs = a.batch_refs
    ref_ids, ref_deltas, ref_rcs = a.ref_ids, a.ref_deltas, a.ref_rcs
end)
local batch_strs = {} -- the same keys as Lua strings, for the fallback
local ref_strs = {} -- the keys of the refs batch

---------------------------------------------------------------------------
-- Flush (native): hand (key, delta) pairs to Rust; log.report logs what
-- happened to each.
---------------------------------------------------------------------------
-- Publishes the first m pairs of the batch arrays in one call; writes the
-- ones the stage refuses (full, too long) directly. Once all m are
-- handed over they leave the buffer t, then the outcomes are reported: a
-- sync that raises while reporting does not hand them over twice.
-- Each staged key's slot ref goes into self.refs, for the next sync's
-- publish_refs.
local function publish_batch(self, t, m, st)
    local staged = lib.resty_counter_stage_publish_batch(
        st,
        batch_keys,
        batch_lens,
        batch_deltas,
        m,
        batch_rcs,
        batch_refs
    )
    local all = staged == m
    if all then
        self.published = self.published + m
    else
        local add, h = lib.resty_counter_flusher_write, self.handle
        for i = 0, m - 1 do
            if staged >= 0 and batch_rcs[i] == STAGED then
                self.published = self.published + 1
                batch_rcs[i] = RC_STORED -- nothing to report
            else
                if staged >= 0 and batch_rcs[i] == STAGE_FULL then
                    full_once(self)
                end
                local key = batch_strs[i]
                self.fallback_writes = self.fallback_writes + 1
                batch_rcs[i] = add(h, key, #key, batch_deltas[i])
            end
        end
    end
    -- The batch's keys leave the buffer; a staged one's ref (0 for the
    -- others) is kept.
    local refs, nrefs = self.refs, self.nrefs
    for i = 0, m - 1 do
        local key = batch_strs[i]
        t[key] = nil
        if staged >= 0 and batch_refs[i] ~= 0 then
            refs[key], nrefs = batch_refs[i], nrefs + 1
        end
    end
    self.nrefs = nrefs
    if all then
        return
    end
    for i = 0, m - 1 do
        local rc = batch_rcs[i]
        if rc ~= RC_STORED then
            report(self, batch_strs[i], rc)
        end
    end
end

-- Adds (key, delta) to the keyed batch, m pairs long, and publishes it
-- when it fills; returns its new length.
local function add_keyed(self, t, st, m, key, delta)
    -- A Lua string converts to a pointer into itself; batch_strs keeps
    -- every key alive until the batch is published.
    batch_keys[m], batch_lens[m], batch_deltas[m] = key, #key, delta
    batch_strs[m] = key
    m = m + 1
    if m == BATCH then
        publish_batch(self, t, m, st)
        m = 0
    end
    return m
end

-- Publishes the first r pairs of the refs batch (keys staged at an earlier
-- sync, by the ref of their slot: no key read, no hash, no compare in
-- Rust) in one call; the staged ones leave the buffer t. A key whose ref is
-- stale (its slot was retired or reused meanwhile) or that did not go in
-- (full) is forgotten and added to the keyed batch, m pairs long, which is
-- published when it fills. When Rust says the refs expired (the stage has
-- reclaimed so many slots that a ref might name a slot reused under the
-- same generation), or on any error, every ref is forgotten and the whole
-- batch goes by key. Returns the keyed batch's new length.
local function publish_refs(self, t, r, st, m)
    local staged = lib.resty_counter_stage_publish_refs(
        st,
        ref_ids,
        ref_deltas,
        r,
        ref_rcs
    )
    if staged == r then
        self.published = self.published + r
        for i = 0, r - 1 do
            t[ref_strs[i]] = nil
        end
        return m
    end
    if staged < 0 then
        self.refs, self.nrefs = {}, 0
    end
    local refs = self.refs
    for i = 0, r - 1 do
        local key = ref_strs[i]
        if staged >= 0 and ref_rcs[i] == STAGED then
            self.published = self.published + 1
            t[key] = nil
        else
            if staged >= 0 then
                refs[key] = nil
                self.nrefs = self.nrefs - 1
            end
            m = add_keyed(self, t, st, m, key, ref_deltas[i])
        end
    end
    return m
end

-- The end of a slice of a sync: other runnable processes of this CPU get
-- it for a moment (sched_yield, at most once a millisecond: other workers,
-- when there are more than cores), then ngx.sleep(SLICE_PAUSE), but only
-- while the event loop has work waiting (an I/O event, a timer due, a
-- posted event: src/event_loop.rs); with nothing waiting the next slice
-- runs at once, as an idle worker's pause would only cost CPU (an idle
-- millisecond, then cold caches).
local function pause()
    if lib.resty_counter_slice_end() ~= 0 then
        ngx.sleep(SLICE_PAUSE)
    end
end

-- Retries the deltas pending from earlier syncs, a slice per call, with a
-- pause between, until none is left untried in this sync.
local function retry_sliced(self)
    while lib.resty_counter_flusher_retry(self.handle, SLICE_SECONDS) > 0 do
        pause()
    end
end

-- One pass over the buffer, in place: each key is handed over into the stage
-- `st` if given, BATCH keys per call (a key it refuses, full or too long, is
-- written directly), else straight into the dict, key by key (handing the
-- direct writes over in batches measured no faster: the dict's own write is
-- the cost), and leaves the buffer once handed over. The buffer stays the
-- table increments go into, as in the original: a second table swapped in at
-- each sync made the next interval's increments go into a cold hash part, and
-- cost more than the original's CPU with one or two workers (docs/DESIGN.md).
-- With a budget the pass pauses after about that many seconds of work, inside
-- the loop. Code that runs during a pause may increment the buffer: a key
-- already handed over waits for the next sync, one not yet reached is handed
-- over with its whole sum, so each increment is handed over once, whichever
-- pass reaches it (the automatic sync's and a sync() that came in during its
-- pause walk the same table). A new key may make the table grow (a rehash),
-- and then the pass can miss keys: they stay buffered, for the next pass.
-- Returns the keys handed over and whether the pass paused.
local function drain(self, budget, st)
    local t = self.buf
    local h, add = self.handle, lib.resty_counter_flusher_write
    local clock = lib.resty_counter_clock
    local deadline = budget and clock() + budget
    local n, m, r, paused = 0, 0, 0, false
    -- Every pass starts from the table's first key: LuaJIT compiles a
    -- pairs() loop as such only while every run of it does (one run that
    -- started from a key made that loop call next() per key, a hash
    -- lookup each, in every later drain).
    for key, delta in pairs(t) do
        if st then
            -- self.refs: a new table once they expired.
            local ref = self.refs[key]
            if ref then
                ref_ids[r], ref_deltas[r] = ref, delta
                ref_strs[r] = key
                r = r + 1
                if r == BATCH then
                    m = publish_refs(self, t, r, st, m)
                    r = 0
                end
            else
                m = add_keyed(self, t, st, m, key, delta)
            end
        else
            local rc = add(h, key, #key, delta)
            t[key] = nil
            if rc ~= RC_STORED then
                report(self, key, rc)
            end
        end
        n = n + 1
        if deadline and n % CLOCK_EVERY == 0 and clock() >= deadline then
            if r > 0 then
                m = publish_refs(self, t, r, st, m)
                r = 0
            end
            if m > 0 then
                publish_batch(self, t, m, st)
                m = 0
            end
            pause()
            -- The worker may have left the stage during the pause (exit):
            -- its handle is freed, so the rest goes straight into the dict.
            if st and self.stage ~= st then
                st = nil
            end
            paused = true
            deadline = clock() + budget
        end
    end
    if r > 0 then
        m = publish_refs(self, t, r, st, m)
    end
    if m > 0 then
        publish_batch(self, t, m, st)
    end
    return n, paused
end

-- The end of a sync's drain. The handed-over keys stay in the buffer as
-- dead entries, so the next interval's increments find their slots
-- without growing the table. A burst (more than KEEP_MAX keys and more
-- than twice the keys of the drain before) is not kept: what the pauses
-- left in it moves to a fresh table and the big one goes to the GC.
local function drained(self, n)
    local prev = self.last_drained or 0
    self.last_drained = n
    if n > KEEP_MAX and n > 2 * prev then
        local fresh = {}
        for key, delta in pairs(self.buf) do
            fresh[key] = delta
        end
        self.buf = fresh
    end
end

-- Logs what one fold call failed to write or evicted.
local function count_fold(self)
    local evicted, failed = fold_out.evicted, fold_out.failed
    -- This worker's running total is Rust's (stage_info's my_folded).
    -- Whether the sync succeeded is the flusher's to say (end_sync): the
    -- folded writes went through it.
    fold_lines(self, failed, evicted)
end

local function lease_ms(self)
    return math.floor((self.interval or GUARD_PERIOD) * LEASE_INTERVALS * 1000)
end

-- Folds the stage in slices of about SLICE_SECONDS with a pause between,
-- every delta going through the flusher like a direct write. mode 0: the
-- automatic fold, once per interval by the worker that holds (or takes)
-- the lease; others return at once. mode 2: a whole round whoever holds
-- the lease (a sync() that may yield).
local function fold_sliced(self, mode)
    local st = self.stage
    while st do
        local rc = lib.resty_counter_stage_fold(
            st,
            self.handle,
            mode or 0,
            lease_ms(self),
            SLICE_SECONDS,
            fold_out
        )
        if rc < 0 then
            return -- another worker holds the lease
        end
        count_fold(self)
        if rc == 1 then
            return
        end
        pause()
        if self.stage ~= st then
            return -- the worker left the stage meanwhile (exit)
        end
    end
end

-- The whole stage, once, without yielding (manual sync and exit).
local function fold_whole(self)
    local st = self.stage
    if not st then
        return
    end
    lib.resty_counter_stage_fold(
        st,
        self.handle,
        1,
        lease_ms(self),
        0,
        fold_out
    )
    count_fold(self)
end

-- Ends the sync in Rust, which decides whether it succeeded, counts it in
-- the error metric if it did not, and logs the sync's count lines from
-- what Rust returns (see "What syncs log").
local function end_sync(self)
    local r = end_out
    if
        lib.resty_counter_flusher_end(
            self.handle,
            self.error_metric and 1 or 0,
            r
        ) ~= RC_STORED
    then
        return false
    end
    local ok = r.ok ~= 0
    if not ok and self.error_metric then
        incr_or_add(self, self.error_metric, 1, 0)
    end
    sync_lines(self, r)
    return ok
end

-- Runs one sync: begins it in Rust, runs body(self), and ends it
-- whatever the body raises (an application's wrapped function, memory
-- pressure), so the next sync starts afresh and retries what is pending;
-- a drain the error cut short goes on where it stopped (see drain).
-- Returns the sync's result, or nil, the error and its traceback.
local function run_sync(self, body)
    lib.resty_counter_flusher_begin(self.handle)
    local trace
    local ok, err = xpcall(body, function(e)
        trace = debug.traceback(tostring(e), 2)
        return e
    end, self)
    local synced = end_sync(self)
    if not ok then
        return nil, err, trace
    end
    return synced
end

-- A complete sync that never yields: manual sync() and worker exit. This
-- worker's buffer goes straight into the dict, then the whole stage is
-- folded once, so that what any worker published is in the dict too. An
-- exiting worker then leaves the stage.
local function sync_now(self)
    lib.resty_counter_flusher_retry(self.handle, 0)
    drained(self, (drain(self, nil, nil)))
    if stage_of(self) then
        fold_whole(self)
        if ngx.worker.exiting() then
            leave_stage(self)
        end
    end
end

-- sync() where it may yield (YIELDING_PHASES, the worker not exiting): what
-- sync_now does, in slices of about SLICE_SECONDS with a pause between, so
-- that a collector's sync before each scrape never stalls the worker. This
-- worker's buffer goes into the dict directly, never through the stage, so
-- it is there when sync() returns: a pass that paused may have missed keys
-- (see drain), so passes go on until one runs without a pause, and after
-- FINISH_PASSES the last runs at once (it hands over only what the passes
-- before left: keys incremented or missed meanwhile). Then the whole stage
-- is folded once.
local YIELDING_PHASES = {
    rewrite = true,
    access = true,
    content = true,
    timer = true,
    preread = true,
}
local function sync_yielding(self)
    retry_sliced(self)
    local total, passes = 0, 0
    repeat
        passes = passes + 1
        local budget = passes <= FINISH_PASSES and SLICE_SECONDS or nil
        local n, paused = drain(self, budget)
        total = total + n
    until not paused
    drained(self, total)
    if stage_of(self) then
        fold_sliced(self, 2)
    end
end

-- The automatic sync: slices of about SLICE_SECONDS with a pause between
-- them when the event loop has work waiting, so thousands of keys never
-- stall the event loop. One pass: what it misses waits for the next sync.
local function sync_sliced(self)
    retry_sliced(self)
    local st = stage_of(self) or nil
    local n = drain(self, SLICE_SECONDS, st)
    drained(self, n)
    -- Refs of keys no longer changed (and of keys re-staged after their
    -- ref went stale) are dropped now and then, all at once.
    if st and self.nrefs > 2 * n + REFS_SLACK then
        self.refs, self.nrefs = {}, 0
    end
    fold_sliced(self)
end

_M.SLICE_PAUSE, _M.GUARD_PERIOD = SLICE_PAUSE, GUARD_PERIOD
_M.run_sync, _M.sync_now, _M.sync_yielding, _M.sync_sliced =
    run_sync, sync_now, sync_yielding, sync_sliced
_M.YIELDING_PHASES = YIELDING_PHASES

return _M
