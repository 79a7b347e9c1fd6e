-- resty.counter: per-worker counters flushed into an ngx.shared.DICT.
--
-- This file buffers counts in a Lua table per dict and worker (no FFI on
-- the request path), hands them to the Rust library at each sync (the
-- ffi.cdef block below is the ABI), and keeps the API. Where a count goes
-- from there, file by file: src/lib.rs.
--
-- A dict that is not a real shared dict (a Lua-table stub in unit tests), or
-- a Lua without ffi, runs the original pure-Lua algorithm instead.

local ngx = ngx
local type = type
local tostring = tostring
local tonumber = tonumber
local pairs = pairs
local next = next
local error = error
local setmetatable = setmetatable
local math_huge = math.huge

local _M = { _VERSION = "0.3.0" }
local mt = { __index = _M }

local ABI_VERSION = 10
local LIB_NAME = "libresty_counter"
local SLICE_SECONDS = 0.0005 -- work per slice of an automatic sync
-- The pause between slices, taken only when the event loop has work
-- waiting (see pause). ngx.sleep(0) needs OpenResty's delayed-events nginx
-- patch; without it (Debian's nginx) it still waits for a timer cycle, but
-- logs a WARN each time. 1 ms lets the event loop run there too.
local SLICE_PAUSE = 0.001
local CLOCK_EVERY = 32 -- keys between two looks at the clock
local KEEP_SPARE_MAX = 16384 -- larger buffers are recycled only if steady
local GUARD_PERIOD = 1 -- a manual counter's timer: waits for exit

local RC_STORED, RC_STORED_EVICTED, RC_RETAINED, RC_DROPPED_CAP = 0, 1, 2, 4
local STAGED, STAGE_FULL = 0, 1 -- resty_counter_stage_publish: in it, full
local LEASE_INTERVALS = 3 -- the fold lease lasts this many intervals
local FOLD_FIELDS = 3
local BATCH = 256 -- keys per resty_counter_stage_publish_batch

local clear_tab
do
    local ok, clear = pcall(require, "table.clear")
    clear_tab = ok and clear
        or function(t)
            for k in pairs(t) do
                t[k] = nil
            end
        end
end

local nkeys
do
    local ok, f = pcall(require, "table.nkeys")
    nkeys = ok and f
        or function(t)
            local n = 0
            for _ in pairs(t) do
                n = n + 1
            end
            return n
        end
end

local has_ffi, ffi = pcall(require, "ffi")
if has_ffi and not (ngx and ngx.config) then
    has_ffi = false -- plain LuaJIT outside nginx: no shared dict to write to
end
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

-- Whether this Lua VM lives for one request only (lua_code_cache off):
-- then a buffer would die with the request, and a timer would keep the
-- whole VM alive, so every increment writes straight to the dict instead.
-- A load marks both the process (its environment, via setenv: shared by
-- every VM of the process, invisible to the dict; per subsystem, whose
-- VMs differ) and the VM (its registry). A load that finds the process
-- marked with its own pid but the VM unmarked runs in a VM other than the
-- one that loaded first: a VM per request. The master's mark (init_by_lua)
-- carries the master's pid, so a worker's first load is not mistaken for
-- a second; a reload in the same VM (package.loaded cleared, as busted
-- does between spec files) finds the VM marked and buffers as usual.
local PER_REQUEST_VM = false
if has_ffi then
    local mark = "RESTY_COUNTER_LOADED_BY_" .. (ngx.config.subsystem or "http")
    local registry = debug.getregistry()
    local pid = tostring(ngx.worker.pid())
    if os.getenv(mark) == pid and not registry[mark] then
        -- In the init phase, a worker's per-request VM (init_by_lua runs
        -- again in each) has a worker id; the master's new VM at a reload
        -- has none.
        PER_REQUEST_VM = ngx.get_phase() ~= "init" or ngx.worker.id() ~= nil
    end
    registry[mark] = true
    pcall(ffi.cdef, "int setenv(const char *, const char *, int);")
    pcall(function()
        ffi.C.setenv(mark, pid, 1)
    end)
end

---------------------------------------------------------------------------
-- The ABI: the one source of truth for the library's prototypes.
---------------------------------------------------------------------------
local CDEF = [[
typedef struct resty_counter_flusher resty_counter_flusher;
uint32_t resty_counter_abi_version(void);
const char *resty_counter_version(void);
const char *resty_counter_strerror(int32_t code);
double resty_counter_clock(void);
int32_t resty_counter_loop_waiting(void);
resty_counter_flusher *resty_counter_flusher_new(const unsigned char *subsystem,
    size_t subsystem_len, void *zone_udata, int32_t *err);
void resty_counter_flusher_free(resty_counter_flusher *h);
int32_t resty_counter_flusher_write(resty_counter_flusher *h,
    const unsigned char *key, size_t key_len, double delta);
int32_t resty_counter_flusher_begin(resty_counter_flusher *h);
int32_t resty_counter_flusher_retry(resty_counter_flusher *h, double budget);
typedef struct {
    int32_t ok;
    double failed, evicted, dropped_cap, dropped_in_retry, pending_keys,
           pending_sum, evicted_in_retry;
} resty_counter_sync_result;
int32_t resty_counter_flusher_end(resty_counter_flusher *h,
    int32_t error_metric, resty_counter_sync_result *out);
int32_t resty_counter_incr(resty_counter_flusher *h, const unsigned char *key,
    size_t key_len, double value, double init, double *new_value);
typedef struct {
    double pending_keys, pending_bytes, pending_sum, keys_flushed, retries,
           dropped_deltas, dropped_permanent, dropped_overflow, evictions,
           failed_writes, syncs, failed_syncs, last_sync_seconds;
} resty_counter_stats;
int32_t resty_counter_flusher_stats(resty_counter_flusher *h,
    resty_counter_stats *out);
typedef struct resty_counter_stage resty_counter_stage;
const char *resty_counter_stage_strerror(int32_t code);
int32_t resty_counter_stage_transient(int32_t code);
resty_counter_stage *resty_counter_stage_attach(resty_counter_flusher *f,
    void *stage_udata, const unsigned char *stage_name, size_t stage_name_len,
    double stage_bytes, int32_t *err);
void resty_counter_stage_free(resty_counter_stage *h);
int32_t resty_counter_stage_publish(resty_counter_stage *h,
    const unsigned char *key, size_t key_len, double delta);
int32_t resty_counter_stage_publish_batch(resty_counter_stage *h,
    const unsigned char **keys, const size_t *lens, const double *deltas,
    uint32_t n, int32_t *rcs);
int32_t resty_counter_stage_fold(resty_counter_stage *h,
    resty_counter_flusher *f, int32_t whole, uint32_t lease_ms, double budget,
    double *out);
typedef struct {
    double offset, region_bytes, anchor, slots, key_bytes, created,
           lease_owner, published, folded, full, too_long, reclaimed,
           lost_events, lost_amount, fill, fold_rounds, takeovers, my_folded,
           pid, zone_regions, zone_region_bytes, orphans_lost_events,
           orphans_lost_amount;
} resty_counter_stage_report;
int32_t resty_counter_stage_info(resty_counter_stage *h,
    resty_counter_stage_report *out);
]]

-- The fields of resty_counter_stats, copied into stats() by name.
local STATS_FIELDS = {
    "pending_keys",
    "pending_bytes",
    "pending_sum",
    "keys_flushed",
    "retries",
    "dropped_deltas",
    "dropped_permanent",
    "dropped_overflow",
    "evictions",
    "failed_writes",
    "syncs",
    "failed_syncs",
    "last_sync_seconds",
}

local lib -- the loaded library, once a real shared dict needs it
local int32_out, stats_out, end_out, value_out, fold_out, info_out
local batch_keys, batch_lens, batch_deltas, batch_rcs
local batch_strs = {} -- the same keys as Lua strings, for the fallback

-- Loads the library on first native use in a worker (never in the master:
-- see new_state), through package.cpath; see resty.counter.loader.
local function load_library()
    if lib then
        return lib
    end
    if not pcall(ffi.typeof, "resty_counter_stats") then
        ffi.cdef(CDEF) -- once per Lua VM: it declares struct bodies
    end
    local l, err = require("resty.counter.loader").load(package.cpath, {
        name = LIB_NAME,
        abi = ABI_VERSION,
        version = _M._VERSION,
        shim = debug.getinfo(1, "S").source:gsub("^@", ""),
    })
    if not l then
        return nil, err
    end
    lib = l
    int32_out = ffi.new("int32_t[1]")
    stats_out = ffi.new("resty_counter_stats")
    end_out = ffi.new("resty_counter_sync_result")
    value_out = ffi.new("double[1]")
    fold_out = ffi.new("double[?]", FOLD_FIELDS)
    info_out = ffi.new("resty_counter_stage_report")
    batch_keys = ffi.new("const unsigned char *[?]", BATCH)
    batch_lens = ffi.new("size_t[?]", BATCH)
    batch_deltas = ffi.new("double[?]", BATCH)
    batch_rcs = ffi.new("int32_t[?]", BATCH)
    return lib
end

---------------------------------------------------------------------------
-- Per-dict state, one per dict and worker, shared by every new().
---------------------------------------------------------------------------
local states = setmetatable({}, { __mode = "k" })

-- A key as it goes into a log line: control and non-ASCII bytes escaped,
-- long keys cut, so one odd key cannot garble or truncate the error log.
local LOG_KEY_MAX = 200
local function printable(key)
    local cut = #key > LOG_KEY_MAX
    local s = cut and key:sub(1, LOG_KEY_MAX) or key
    s = s:gsub("[%c\\\128-\255]", function(c)
        return ("\\x%02x"):format(c:byte())
    end)
    if cut then
        s = s .. "...(" .. #key .. " bytes)"
    end
    return s
end

local function strerror(rc)
    return ffi.string(lib.resty_counter_strerror(rc))
end

---------------------------------------------------------------------------
-- What syncs log: bounded per worker and minute, whatever the interval.
---------------------------------------------------------------------------
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

-- A count line, standing for `n` events of `kind`: the rest of the
-- arguments are the line.
local function count_line(self, level, kind, n, ...)
    if may_log("count") then
        ngx.log(level, ...)
    else
        hold(self, level, kind, n)
    end
end

-- The lua-nginx-module versions whose shdict entry points have the
-- signatures src/shdict.rs calls (the 9-argument incr): 0.10.12 and later;
-- for the stream module, 0.0.5 (released with 0.10.13) and later. Versions
-- as ngx.config.ngx_lua_version gives them (0.10.12 is 10012). Read when
-- a dict's state is made, so a spec can stub the version before new().
local MIN_HTTP_LUA, MIN_STREAM_LUA = 10012, 5
local version_warned = false

local function lua_version_ok()
    local config = ngx.config
    local v = tonumber(config.ngx_lua_version)
    local stream = config.subsystem == "stream"
    if v and v >= (stream and MIN_STREAM_LUA or MIN_HTTP_LUA) then
        return true
    end
    if not version_warned then
        version_warned = true
        ngx.log(
            ngx.WARN,
            "resty.counter: ",
            stream and "stream-" or "",
            "lua-nginx-module version ",
            tostring(config.ngx_lua_version),
            " is outside the supported range (",
            stream and "0.0.5" or "0.10.12",
            " and later): counting in pure Lua"
        )
    end
    return false
end

local function is_real_shdict(dict)
    return has_ffi
        and type(dict) == "table"
        and type(dict[1]) == "userdata"
        and lua_version_ok()
end

local function new_native_handle(dict, name)
    local l, err = load_library()
    if not l then
        return nil, err
    end
    local subsystem = ngx.config.subsystem or "http"
    local h =
        l.resty_counter_flusher_new(subsystem, #subsystem, dict[1], int32_out)
    if h == nil then
        return nil,
            'resty.counter: cannot flush into shared dict "'
                .. name
                .. '": '
                .. strerror(int32_out[0])
    end
    return ffi.gc(h, function(p)
        l.resty_counter_flusher_free(p)
    end)
end

-- The dict's shared stage (src/stage.rs, docs/DESIGN.md): a region of the
-- stage zone, a lua_shared_dict of the module's own (STAGE_ZONE unless
-- new() names another in opts.stage_dict), so the counter dict holds only
-- counters. Attached at this worker's first native sync, never in the
-- master. Off with one worker (writing directly is cheaper there) and
-- without a stage zone; { stage = true/false } in new() decides instead.
-- One NOTICE per worker and dict says which mode runs. An attach that may
-- succeed later (no room yet: old workers' regions are reclaimed as they
-- exit; the directory busy) is tried again at a later sync, at most once
-- per STAGE_RETRY seconds; meanwhile this worker writes directly, and says
-- so from the second failure on.
local STAGE_ZONE = "resty_counter_stage"
local STAGE_RETRY = 1

local function mode_notice(self, level, ...)
    ngx.log(level, 'resty.counter: shared dict "', self.name, '": ', ...)
end

local function stage_of(self)
    local st = self.stage
    if st ~= nil then
        return st
    end
    if ngx.get_phase() == "init" then
        return false
    end
    local want = self.stage_opt
    local workers = ngx.worker.count()
    if want == nil then
        want = workers > 1
    end
    local zone_name = self.stage_dict or STAGE_ZONE
    local zone = ngx.shared[zone_name]
    if not want or not zone then
        self.stage = false
        if not want then
            mode_notice(
                self,
                ngx.NOTICE,
                "each sync writes into the dict directly (",
                workers == 1 and "one worker" or "stage = false",
                ")"
            )
        else
            mode_notice(
                self,
                self.stage_opt and ngx.WARN or ngx.NOTICE,
                workers,
                " workers each write into the dict directly: no stage zone;",
                ' "lua_shared_dict ',
                zone_name,
                ' 16m;" in the ',
                ngx.config.subsystem or "http",
                " block makes one write per key per interval"
            )
        end
        return false
    end
    local now = ngx.now()
    if self.stage_tried and now - self.stage_tried < STAGE_RETRY then
        return false
    end
    self.stage_tried = now
    local l = lib
    local h = l.resty_counter_stage_attach(
        self.handle,
        zone[1],
        zone_name,
        #zone_name,
        self.stage_bytes or 0,
        int32_out
    )
    if h == nil then
        local code = int32_out[0]
        local again = l.resty_counter_stage_transient(code) == 1
        -- A transient failure is logged from the second on: the first is
        -- usually workers that started together waiting for each other.
        self.stage_fails = (self.stage_fails or 0) + 1
        if not self.stage_warned and (not again or self.stage_fails > 1) then
            self.stage_warned = true
            mode_notice(
                self,
                ngx.WARN,
                'no shared stage in zone "',
                zone_name,
                '" (',
                ffi.string(l.resty_counter_stage_strerror(code)),
                "): this worker writes its counts into the dict directly",
                again and " until it can attach (tried again at later syncs)"
                    or ""
            )
        end
        if not again then
            self.stage = false
        end
        return false
    end
    self.stage = ffi.gc(h, function(p)
        l.resty_counter_stage_free(p)
    end)
    local r = l.resty_counter_stage_info(h, info_out) == 0 and info_out
    mode_notice(
        self,
        ngx.NOTICE,
        workers,
        ' workers share a stage in zone "',
        zone_name,
        '" (',
        r and tonumber(r.slots) or "?",
        " slots)",
        self.stage_warned and " now" or ""
    )
    if r and r.orphans_lost_events > 0 then
        ngx.log(
            ngx.ERR,
            'resty.counter: stage zone "',
            zone_name,
            '": ',
            tonumber(r.orphans_lost_events),
            " staged deltas (sum ",
            tonumber(r.orphans_lost_amount),
            ") were lost with regions whose workers were all killed,",
            " reclaimed to make room"
        )
    end
    return self.stage
end

-- Leaves the stage for good (worker exit): unregisters this worker and
-- gives the fold lease up. Later syncs of this worker write directly.
local function leave_stage(self)
    local st = self.stage
    if st then
        self.stage = false
        ffi.gc(st, nil)
        lib.resty_counter_stage_free(st)
    end
end

---------------------------------------------------------------------------
-- Flush (native): hand (key, delta) pairs to Rust, report what happened.
---------------------------------------------------------------------------
-- Logs one key's outcome (through key_line); Rust counts and decides the
-- sync's result, and end_sync logs the count lines.
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
    key_line(
        self,
        ngx.WARN,
        "failed",
        key,
        "error increasing counter in shdict key: ",
        ", err: "
            .. strerror(rc)
            .. (rc == RC_RETAINED and " (kept, retried at the next sync)" or "")
    )
end

-- Says once per worker and dict that the stage's region is full: what does
-- not fit is written directly, exactly; stats().stage_full counts it.
local function full_once(self)
    if self.full_logged then
        return
    end
    self.full_logged = true
    mode_notice(
        self,
        ngx.WARN,
        "the shared stage is full: keys that do not fit are written into",
        " the dict directly (see stats().stage_full); a larger stage zone,",
        " or opts.stage_bytes, stages them"
    )
end

-- Publishes the first m pairs of the batch arrays in one call; writes the
-- ones the stage refuses (full, too long) directly. Once all m are
-- handed over, self.cursor moves past them, then the outcomes are
-- reported: a sync that raises while reporting does not hand them over
-- twice when the next one goes on.
local function publish_batch(self, m, st)
    local staged = lib.resty_counter_stage_publish_batch(
        st,
        batch_keys,
        batch_lens,
        batch_deltas,
        m,
        batch_rcs
    )
    if staged == m then
        self.published = self.published + m
        self.cursor = batch_strs[m - 1]
        return
    end
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
    self.cursor = batch_strs[m - 1]
    for i = 0, m - 1 do
        local rc = batch_rcs[i]
        if rc ~= RC_STORED then
            report(self, batch_strs[i], rc)
        end
    end
end

-- The pause between two slices of a sync: ngx.sleep(SLICE_PAUSE), but
-- only while the event loop has work waiting (an I/O event, a timer due,
-- a posted event: src/event_loop.rs); with nothing waiting the next slice
-- runs at once, as an idle worker's pause would only cost CPU (an idle
-- millisecond, then cold caches).
local function pause()
    if lib.resty_counter_loop_waiting() ~= 0 then
        ngx.sleep(SLICE_PAUSE)
    end
end

-- Hands the drained buffer over: into the stage `st` if given, BATCH keys
-- per call (a key it refuses, full or too long, is written directly), else
-- straight into the dict, key by key (handing the direct writes over in
-- batches measured no faster: the dict's own write is the cost). With a
-- budget, pauses after about that many seconds of work, inside the loop:
-- LuaJIT compiles a pairs() loop as such only while every run of that loop
-- starts from the table's first key, so the loop goes on where it paused
-- instead of starting again from a key (that made this loop call next()
-- per key, a hash lookup each, in every later drain). self.cursor is the
-- last key handed over, set before anything that may raise. Returns once
-- the buffer is done (self.draining is nil), or when another sync took the
-- drain over during a pause (a manual sync() that finishes it between two
-- slices of the automatic one): a drain that starts on a buffer another
-- left under way goes on from self.cursor, with next(), so each key is
-- handed over once.
local function drain(self, budget, st)
    local t, from = self.draining, self.cursor
    local turn = (self.drain_turn or 0) + 1
    self.drain_turn = turn
    local h, add = self.handle, lib.resty_counter_flusher_write
    local clock = lib.resty_counter_clock
    local deadline = budget and clock() + budget
    local n, m = 0, 0
    -- One key; false once another drain has taken over during a pause.
    local function hand(key, delta)
        if st then
            -- A Lua string converts to a pointer into itself; `t` keeps
            -- every key alive until the batch is published.
            batch_keys[m], batch_lens[m], batch_deltas[m] = key, #key, delta
            batch_strs[m] = key
            m = m + 1
            if m == BATCH then
                publish_batch(self, m, st)
                m = 0
            end
        else
            local rc = add(h, key, #key, delta)
            self.cursor = key
            if rc ~= RC_STORED then
                report(self, key, rc)
            end
        end
        n = n + 1
        if deadline and n % CLOCK_EVERY == 0 and clock() >= deadline then
            if m > 0 then
                publish_batch(self, m, st)
                m = 0
            end
            pause()
            deadline = clock() + budget
            return self.drain_turn == turn
        end
        return true
    end
    if from == nil then
        for key, delta in pairs(t) do
            if not hand(key, delta) then
                return
            end
        end
    else
        for key, delta in next, t, from do
            if not hand(key, delta) then
                return
            end
        end
    end
    if m > 0 then
        publish_batch(self, m, st)
    end
    self.draining, self.cursor = nil, nil
    -- Recycle the buffer unless it was a burst: a fresh table regrows by
    -- rehashing, a multi-millisecond step on the request path when every
    -- interval dirties ~100k keys. A big buffer after a burst (more than
    -- twice the keys of the drain before) is freed instead.
    local prev = self.last_drained or 0
    self.last_drained = n
    if n <= KEEP_SPARE_MAX or n <= 2 * prev then
        clear_tab(t)
        self.spare = t
    end
end

-- Moves the live buffer aside for draining; increments go to a fresh one.
local function swap(self)
    local t = self.buf
    if next(t) == nil then
        return false
    end
    local fresh = self.spare or {}
    self.spare = nil
    self.buf = fresh
    self.draining, self.cursor = t, nil
    return true
end

-- The same in Lua, for the master (init_by_lua), which loads no library:
-- incr without init, then add, which copies the key before linking it.
local function incr_or_add_lua(dict, key, value, init)
    for _ = 1, 3 do
        local v, err = dict:incr(key, value)
        if v or err ~= "not found" then
            return v, err, false
        end
        local ok, add_err, forcible = dict:add(key, init + value)
        if ok then
            return init + value, nil, forcible
        end
        if add_err ~= "exists" then
            return nil, add_err, forcible
        end
    end
    return nil, "key keeps vanishing", false
end

-- dict:incr(key, value, init) on a real shared dict, written by the
-- library the CRC-safe way (see src/shdict.rs): v, err, forcible.
-- Without a handle (the master), the Lua version above.
local function incr_or_add(self, key, value, init)
    if key == nil then
        return nil, "nil key"
    end
    if type(key) ~= "string" then
        key = tostring(key)
    end
    if not self.handle then
        return incr_or_add_lua(self.dict, key, value, init)
    end
    local rc =
        lib.resty_counter_incr(self.handle, key, #key, value, init, value_out)
    if rc == RC_STORED or rc == RC_STORED_EVICTED then
        return tonumber(value_out[0]), nil, rc == RC_STORED_EVICTED
    end
    return nil, strerror(rc), false
end

-- Counts what one fold call wrote and logs what failed or evicted.
local function count_fold(self)
    local written, evicted, failed =
        tonumber(fold_out[0]), tonumber(fold_out[1]), tonumber(fold_out[2])
    self.folded = self.folded + written
    -- Whether the sync succeeded is the flusher's to say (end_sync): the
    -- folded writes went through it.
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

-- A complete sync that never yields: manual sync() and worker exit. This
-- worker's buffer goes straight into the dict, then the whole stage is
-- folded once, so that what any worker published is in the dict too. An
-- exiting worker then leaves the stage.
local function sync_now(self)
    lib.resty_counter_flusher_retry(self.handle, 0)
    if self.draining then
        drain(self, nil, nil)
    end
    if swap(self) then
        drain(self, nil, nil)
    end
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
-- it is there when sync() returns; a drain the automatic sync left between
-- two of its slices is finished here (both go on from self.cursor, so each
-- key is handed over once). Then the whole stage is folded once.
local YIELDING_PHASES = {
    rewrite = true,
    access = true,
    content = true,
    timer = true,
    preread = true,
}
local function sync_yielding(self)
    while lib.resty_counter_flusher_retry(self.handle, SLICE_SECONDS) > 0 do
        pause()
    end
    -- A drain left under way, then this worker's buffer as of now.
    local swapped = false
    repeat
        while self.draining do
            drain(self, SLICE_SECONDS)
        end
        swapped = not swapped and swap(self)
    until not swapped
    if stage_of(self) then
        fold_sliced(self, 2)
    end
end

-- The automatic sync: slices of about SLICE_SECONDS with a pause between
-- them when the event loop has work waiting, so thousands of keys never
-- stall the event loop.
local function sync_sliced(self)
    while lib.resty_counter_flusher_retry(self.handle, SLICE_SECONDS) > 0 do
        pause()
    end
    if not self.draining then
        swap(self)
    end
    -- A manual sync() may finish the drain between two slices: sync_now at
    -- once, sync_yielding in slices of its own; both go on from
    -- self.cursor, so each key is handed over once, and draining is nil
    -- when the drain is done, whoever finished it.
    stage_of(self)
    while self.draining do
        drain(self, SLICE_SECONDS, self.stage)
    end
    fold_sliced(self)
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

-- Starts the timer. Each start is a new generation: an older timer still
-- scheduled retires when it runs.
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
    local gen = (self.gen or 0) + 1
    local period = self.interval or GUARD_PERIOD
    local ok, err = ngx.timer.every(period, tick, self, gen)
    if not ok then
        return timer_down(self, err)
    end
    self.gen, self.timer, self.timer_period, self.tick_synced =
        gen, true, period, now
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

tick = function(premature, self, gen)
    if premature or ngx.worker.exiting() then
        if not self.write_through then
            return exit_flush(self)
        end
        return
    end
    if gen ~= self.gen then
        return -- a retired timer
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

local sync_lua -- the fallback when a worker cannot load the library

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

---------------------------------------------------------------------------
-- Sync (pure Lua): the original algorithm, for stub dicts and plain Lua.
---------------------------------------------------------------------------
function sync_lua(_, self)
    local ok = true
    for k, v in pairs(self.buf) do
        local _, err, forcible = self.dict:incr(k, v, 0)
        if forcible and self.error_metric then
            ngx.log(
                ngx.ERR,
                "increasing counter in shdict: lru eviction: key=",
                printable(k)
            )
            ok = false
        end
        if err then
            ngx.log(
                ngx.WARN,
                "error increasing counter in shdict key: ",
                printable(k),
                ", err: ",
                err
            )
            ok = false
        end
    end
    clear_tab(self.buf)
    if not ok and self.error_metric then
        self.dict:incr(self.error_metric, 1, 0)
    end
    return ok
end

---------------------------------------------------------------------------
-- The API.
---------------------------------------------------------------------------
local function check_interval(sync_interval)
    local n = tonumber(sync_interval)
    if not n or not (n > 0) or n == math_huge then
        error("expect sync_interval to be a positive number", 3)
    end
    return n
end

local function new_state(dict, name)
    local self = setmetatable({
        dict = dict,
        name = name,
        buf = {},
        native = is_real_shdict(dict),
        published = 0, -- deltas this worker handed to the stage
        folded = 0, -- deltas this worker folded from the stage
        fallback_writes = 0, -- deltas the stage refused, written directly
    }, mt)
    if self.native then
        -- A VM per request: no buffer, no timer (see PER_REQUEST_VM).
        self.write_through = PER_REQUEST_VM
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

local function check_opts(opts)
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

-- The first increment of a key in an interval, and every bad input.
-- Errors name the caller of incr (level 3: incr calls this, not as a tail
-- call, because PUC Lua 5.1 leaves no position for a tail-called frame).
local function incr_slow(self, key, step)
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
        -- Before the fork (master), after the exit flush, or while nginx
        -- refuses the timer: no timer will flush a buffer, so write
        -- straight to the dict.
        local _, err = incr_or_add(self, key, step, 0)
        if err then
            key_line(
                self,
                ngx.WARN,
                "failed",
                key,
                "error increasing counter in shdict key: ",
                ", err: " .. err
            )
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
        buffered_keys = nkeys(self.buf)
            + (self.draining and nkeys(self.draining) or 0),
        sync_interval = self.interval,
        slice_pause = SLICE_PAUSE,
    }
    if self.native and self.handle then
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
        s.folded = self.folded
        s.fallback_writes = self.fallback_writes
        if
            self.stage
            and lib.resty_counter_stage_info(self.stage, info_out) == 0
        then
            local r = info_out
            s.lease_held = r.lease_owner == r.pid
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

return _M
