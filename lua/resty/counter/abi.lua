-- resty.counter.abi: the library's ABI (the ffi.cdef block below is the
-- one source of truth for its prototypes), finding and loading it (through
-- resty.counter.loader), the cdata buffers the calls fill, the checks of
-- whether a dict can be flushed natively (ffi, the lua-nginx-module
-- version, a VM per request), and the one-key writes (reset and the error
-- metric; write-through). Loads in any Lua: without ffi or outside nginx,
-- has_ffi is false and nothing here is called.

local ngx = ngx
local type = type
local tostring = tostring
local tonumber = tonumber
local ipairs = ipairs

local _M = {}

local ABI_VERSION = 14
local LIB_NAME = "libresty_counter"

-- Codes of src/ffi.rs and src/ffi_stage.rs the shim tells apart, by the
-- same names (tests/abi.rs checks each against Rust's).
local RC_STORED, RC_STORED_EVICTED, RC_RETAINED, RC_DROPPED_CAP = 0, 1, 2, 4
local STAGED, STAGE_FULL = 0, 1 -- per pair of a publish: in it, full
local BATCH = 256 -- keys per resty_counter_stage_publish_batch and _refs
_M.RC_STORED, _M.RC_STORED_EVICTED = RC_STORED, RC_STORED_EVICTED
_M.RC_RETAINED, _M.RC_DROPPED_CAP = RC_RETAINED, RC_DROPPED_CAP
_M.STAGED, _M.STAGE_FULL, _M.BATCH = STAGED, STAGE_FULL, BATCH

local has_ffi, ffi = pcall(require, "ffi")
if has_ffi and not (ngx and ngx.config) then
    has_ffi = false -- plain LuaJIT outside nginx: no shared dict to write to
end
_M.has_ffi, _M.ffi = has_ffi, has_ffi and ffi or nil

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
_M.PER_REQUEST_VM = PER_REQUEST_VM

---------------------------------------------------------------------------
-- The ABI: the one source of truth for the library's prototypes.
---------------------------------------------------------------------------
local CDEF = [[
typedef struct resty_counter_flusher resty_counter_flusher;
uint32_t resty_counter_abi_version(void);
const char *resty_counter_version(void);
const char *resty_counter_strerror(int32_t code);
double resty_counter_clock(void);
int32_t resty_counter_slice_end(void);
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
int32_t resty_counter_write_through(resty_counter_flusher *h,
    const unsigned char *key, size_t key_len, double delta);
typedef struct {
    double pending_keys, pending_bytes, pending_sum, keys_flushed, retries,
           dropped_deltas, dropped_permanent, dropped_overflow, evictions,
           failed_writes, syncs, failed_syncs, last_sync_seconds;
} resty_counter_stats;
int32_t resty_counter_flusher_stats(resty_counter_flusher *h,
    resty_counter_stats *out);
typedef struct resty_counter_stage resty_counter_stage;
typedef struct {
    int32_t code, transient;
} resty_counter_attach_result;
resty_counter_stage *resty_counter_stage_attach(resty_counter_flusher *f,
    void *stage_udata, const unsigned char *stage_name, size_t stage_name_len,
    double stage_bytes, resty_counter_attach_result *err);
void resty_counter_stage_free(resty_counter_stage *h);
int32_t resty_counter_stage_publish_batch(resty_counter_stage *h,
    const unsigned char **keys, const size_t *lens, const double *deltas,
    uint32_t n, int32_t *rcs, double *refs);
int32_t resty_counter_stage_publish_refs(resty_counter_stage *h,
    const double *refs, const double *deltas, uint32_t n, int32_t *rcs);
typedef struct {
    double written, evicted, failed;
} resty_counter_fold_result;
int32_t resty_counter_stage_fold(resty_counter_stage *h,
    resty_counter_flusher *f, int32_t whole, uint32_t lease_ms, double budget,
    resty_counter_fold_result *out);
typedef struct {
    double offset, region_bytes, anchor, slots, key_bytes, lease_owner,
           published, folded, full, lost_events, lost_amount, fill, my_folded,
           pid, zone_regions, orphans_lost_events, orphans_lost_amount;
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
local int32_out, attach_out, stats_out, end_out, value_out, fold_out, info_out
local batch_keys, batch_lens, batch_deltas, batch_rcs, batch_refs
local ref_ids, ref_deltas, ref_rcs

-- Who reads the library and the buffers as upvalues: bind(f) calls
-- f(abi) once the library is loaded (at once if it is).
local binders = {}
function _M.bind(f)
    binders[#binders + 1] = f
    if lib then
        f(_M)
    end
end

-- What the loader checks the library against: the shim's release and
-- path (set by resty.counter when it loads this file).
_M.shim = { version = "?", path = "?" }

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
        version = _M.shim.version,
        shim = _M.shim.path,
    })
    if not l then
        return nil, err
    end
    lib = l
    int32_out = ffi.new("int32_t[1]")
    stats_out = ffi.new("resty_counter_stats")
    end_out = ffi.new("resty_counter_sync_result")
    value_out = ffi.new("double[1]")
    attach_out = ffi.new("resty_counter_attach_result")
    fold_out = ffi.new("resty_counter_fold_result")
    info_out = ffi.new("resty_counter_stage_report")
    batch_keys = ffi.new("const unsigned char *[?]", BATCH)
    batch_lens = ffi.new("size_t[?]", BATCH)
    batch_deltas = ffi.new("double[?]", BATCH)
    batch_rcs = ffi.new("int32_t[?]", BATCH)
    batch_refs = ffi.new("double[?]", BATCH)
    ref_ids = ffi.new("double[?]", BATCH)
    ref_deltas = ffi.new("double[?]", BATCH)
    ref_rcs = ffi.new("int32_t[?]", BATCH)
    _M.lib, _M.int32_out, _M.stats_out, _M.end_out =
        lib, int32_out, stats_out, end_out
    _M.value_out, _M.fold_out, _M.info_out = value_out, fold_out, info_out
    _M.attach_out = attach_out
    _M.batch_keys, _M.batch_lens = batch_keys, batch_lens
    _M.batch_deltas, _M.batch_rcs = batch_deltas, batch_rcs
    _M.batch_refs = batch_refs
    _M.ref_ids, _M.ref_deltas, _M.ref_rcs = ref_ids, ref_deltas, ref_rcs
    for _, f in ipairs(binders) do
        f(_M)
    end
    return lib
end

local function strerror(rc)
    return ffi.string(lib.resty_counter_strerror(rc))
end
_M.strerror, _M.STATS_FIELDS = strerror, STATS_FIELDS

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
_M.is_real_shdict, _M.new_native_handle = is_real_shdict, new_native_handle

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
_M.incr_or_add = incr_or_add

-- An increment written straight into the dict, while no buffer is kept
-- (see incr_slow): nil, or the message of the dict's refusal. The library
-- counts a refusal in stats() as a drop (nothing keeps it); without a
-- handle (the master, which has no stats) the Lua version above.
local function write_through(self, key, step)
    if not self.handle then
        local _, err = incr_or_add_lua(self.dict, key, step, 0)
        return err
    end
    local rc = lib.resty_counter_write_through(self.handle, key, #key, step)
    if rc == RC_STORED or rc == RC_STORED_EVICTED then
        return nil
    end
    return strerror(rc)
end
_M.write_through = write_through

return _M
