//! The exported C ABI: where a count crosses from Lua into Rust.
//!
//! Each function is a short adapter from raw pointers to the safe core in
//! `flush.rs`, run inside `guard`, so no panic ever unwinds into nginx.
//! The one source of truth for these prototypes is the `ffi.cdef` block in
//! `lua/resty/counter/abi.lua`; `tests/abi.rs` fails when the two drift apart.
//!
//! Return codes (`int32_t`): `>= 0` describe what happened to a delta,
//! `< 0` are errors of the call itself. [`resty_counter_strerror`] names each.

use std::ffi::{c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::flush::{DictError, Flusher, Limits, MAX_KEY_LEN, Outcome, Rejected};
use crate::shdict::{OpenError, ShDict};

/// Bumped whenever a prototype or a code's meaning changes; the shim
/// refuses a library whose version differs from its own.
pub const ABI_VERSION: u32 = 14;

/// The delta reached the dict.
pub const RC_STORED: i32 = 0;
/// The delta reached the dict; other entries were evicted for it.
pub const RC_STORED_EVICTED: i32 = 1;
/// The dict is full; the delta is pending and retried at the next sync.
pub const RC_RETAINED: i32 = 2;
/// The key holds a non-number; the delta is dropped.
pub const RC_DROPPED_NOT_A_NUMBER: i32 = 3;
/// The dict is full and so is the pending cap; the delta is dropped.
pub const RC_DROPPED_CAP: i32 = 4;
/// The dict failed in another way; the delta is dropped.
pub const RC_DROPPED_OTHER: i32 = 5;
/// Merged with the delta pending for its key the sum is not finite; this
/// delta is dropped, the pending one kept.
pub const RC_DROPPED_OVERFLOW: i32 = 6;
/// The sum at the key was not finite: the key now holds the largest finite
/// number of its sign, and this delta is dropped.
pub const RC_DROPPED_NOT_FINITE: i32 = 7;
/// The dict is full and the delta was written through
/// (`resty_counter_write_through`): nothing keeps it; it is dropped.
pub const RC_DROPPED_NO_MEMORY: i32 = 8;
/// A required pointer argument was NULL.
pub const RC_NULL: i32 = -1;
/// Key empty or longer than 65535 bytes; nothing changed.
pub const RC_BAD_KEY: i32 = -2;
/// Delta NaN or infinite; nothing changed.
pub const RC_BAD_DELTA: i32 = -3;
/// No shared dict entry point in this process.
pub const RC_NO_SYMBOL: i32 = -4;
/// The dict's zone could not be found.
pub const RC_BAD_ZONE: i32 = -5;
/// A Rust panic was caught; nothing crossed into nginx.
pub const RC_PANIC: i32 = -6;
/// Another worker holds the stage's fold lease (`resty_counter_stage_fold`).
pub const RC_BUSY: i32 = -7;
/// The stage reclaimed so many slots since a handle's slot refs began that
/// a ref may name a slot reused under the same generation
/// (`resty_counter_stage_publish_refs`): forget every ref.
pub const RC_REFS_EXPIRED: i32 = -8;
/// The stage's attach errors, `RC_ATTACH` down to `RC_BAD_STAGE`
/// (`ffi_stage.rs`), one per kind of `zone::AttachError`.
pub const RC_ATTACH: i32 = -20;

/// What `resty_counter_flusher_end` reports about the sync it ends; the
/// cdef declares it as `resty_counter_sync_result`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SyncResult {
    /// 1 when every delta arrived and none is pending: the sync's result.
    pub ok: i32,
    /// Handed-over deltas that did not arrive (kept or dropped), the cap's
    /// drops apart; each got a per-key outcome code from `flusher_write`.
    pub failed: f64,
    /// Writes that evicted other entries: handed-over deltas (each got
    /// `RC_STORED_EVICTED`) and pending ones a retry wrote.
    pub evicted: f64,
    /// Deltas dropped because the dict was full and the pending cap reached.
    pub dropped_cap: f64,
    /// Pending deltas a retry found refused for good (or not finite).
    pub dropped_in_retry: f64,
    /// Keys still pending after the sync, and the sum of their deltas.
    pub pending_keys: f64,
    pub pending_sum: f64,
    /// The part of `evicted` that retries caused: no per-key code told
    /// the shim of them.
    pub evicted_in_retry: f64,
}

/// What `resty_counter_flusher_stats` reports, by name: the cdef declares
/// the same struct as `resty_counter_stats` (`tests/abi.rs` checks the two
/// agree). Every field is a double so Lua reads a plain number.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CStats {
    pub pending_keys: f64,
    pub pending_bytes: f64,
    pub pending_sum: f64,
    pub keys_flushed: f64,
    pub retries: f64,
    pub dropped_deltas: f64,
    pub dropped_permanent: f64,
    pub dropped_overflow: f64,
    pub evictions: f64,
    pub failed_writes: f64,
    pub syncs: f64,
    pub failed_syncs: f64,
    pub last_sync_seconds: f64,
}

/// One worker's flush state for one dict, opaque to C.
pub struct FlusherHandle {
    pub(crate) flusher: Flusher<ShDict>,
}

/// Asks the CPU to bring the cache line at `p` in, without waiting for
/// it: the stage's batch publish issues these for a group of keys so that
/// their misses overlap (`stage.rs`, `touch`). A no-op off x86_64.
#[cfg(not(loom))]
#[inline]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults, reads nothing into the
    // program and writes nothing, whatever the address; SSE, which it
    // needs, is part of the x86_64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Runs `f`, turning a panic into `on_panic`: every export's body.
pub(crate) fn guard<R>(on_panic: R, f: impl FnOnce() -> R) -> R {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(on_panic)
}

pub(crate) fn outcome_code(o: Outcome) -> i32 {
    match o {
        Outcome::Stored => RC_STORED,
        Outcome::StoredEvicted => RC_STORED_EVICTED,
        Outcome::Retained(_) => RC_RETAINED,
        Outcome::Dropped(DictError::NotANumber) => RC_DROPPED_NOT_A_NUMBER,
        Outcome::Dropped(DictError::NotFinite) => RC_DROPPED_NOT_FINITE,
        Outcome::Dropped(DictError::NoMemory) => RC_DROPPED_NO_MEMORY,
        Outcome::Dropped(_) => RC_DROPPED_OTHER,
        Outcome::DroppedCap => RC_DROPPED_CAP,
        Outcome::DroppedOverflow => RC_DROPPED_OVERFLOW,
    }
}

/// The ABI version this library implements.
#[unsafe(no_mangle)]
pub extern "C" fn resty_counter_abi_version() -> u32 {
    ABI_VERSION
}

/// This library's release (the crate version), a static NUL-terminated
/// string; the shim refuses a library whose release differs from its own.
#[unsafe(no_mangle)]
pub extern "C" fn resty_counter_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// A static, NUL-terminated message for a return code.
#[unsafe(no_mangle)]
pub extern "C" fn resty_counter_strerror(code: i32) -> *const c_char {
    let msg: &'static std::ffi::CStr = match code {
        RC_STORED => c"ok",
        RC_STORED_EVICTED => c"ok, evicted other entries",
        RC_RETAINED => c"no memory",
        RC_DROPPED_NOT_A_NUMBER => c"not a number",
        RC_DROPPED_CAP => c"no memory, retention cap full: dropped",
        RC_DROPPED_OTHER => c"shared dict error",
        RC_DROPPED_OVERFLOW => c"sum with the pending delta is not finite: dropped",
        RC_DROPPED_NOT_FINITE => c"sum in the dict is not finite: key saturated, delta dropped",
        RC_DROPPED_NO_MEMORY => c"no memory, written straight through: dropped",
        RC_NULL => c"NULL argument",
        RC_BAD_KEY => c"key must be 1 to 65535 bytes",
        RC_BAD_DELTA => c"delta must be a finite number",
        RC_NO_SYMBOL => c"no ngx_*_lua_ffi_shdict_incr in this process",
        RC_BAD_ZONE => c"bad shared dict zone",
        RC_PANIC => c"internal error (caught panic)",
        RC_BUSY => c"another worker holds the fold lease",
        RC_REFS_EXPIRED => c"the stage's slot refs expired",
        _ => other_message(code),
    };
    msg.as_ptr()
}

/// The message of a code outside the table above: a stage attach code, or
/// none.
fn other_message(code: i32) -> &'static std::ffi::CStr {
    #[cfg(not(loom))]
    if let Some(m) = crate::ffi_stage::attach_message(code) {
        return m;
    }
    #[cfg(loom)]
    let _ = code; // under loom there is no stage FFI (ffi_stage.rs)
    c"unknown code"
}

/// CLOCK_MONOTONIC, the one clock of the library: the shim's slice budget
/// (`resty_counter_clock`) and the stage's lease (`zone::now_ms`, shared by
/// every worker of the machine). `Instant`, which times durations inside
/// one call, reads the same clock on Linux.
pub(crate) fn monotonic() -> Option<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a valid local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (rc == 0).then(|| std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Seconds on a monotonic clock, for the shim's slice budget.
#[unsafe(no_mangle)]
pub extern "C" fn resty_counter_clock() -> f64 {
    monotonic().map_or(0.0, |d| d.as_secs_f64())
}

/// The least time between two `sched_yield`s at the end of a sync's
/// slices (see [`resty_counter_slice_end`]), in microseconds.
pub const YIELD_EVERY_US: u64 = 1000;

/// When this process last gave its CPU away at a slice's end (µs on
/// [`monotonic`]). A worker is one thread: nothing else races it.
static LAST_YIELD_US: AtomicU64 = AtomicU64::new(0);

/// Whether a slice's end at `now_us` gives the CPU away: yes when
/// `YIELD_EVERY_US` have passed since the last time `last` records (which
/// it then moves to `now_us`), or when there is no clock.
fn yield_due(last: &AtomicU64, now_us: Option<u64>) -> bool {
    let Some(now) = now_us else {
        return true;
    };
    if now.wrapping_sub(last.load(Ordering::Relaxed)) < YIELD_EVERY_US {
        return false;
    }
    last.store(now, Ordering::Relaxed);
    true
}

/// Ends a slice of a sync. First lets any other runnable process of this
/// CPU run (`sched_yield(2)`, which returns at once when there is none),
/// at most once per `YIELD_EVERY_US` of the sync's work: with more workers
/// than cores, a worker's sync does not keep the CPU for long from another
/// worker whose timers or requests are due. (A yield at every slice's end
/// cost the direct path about a tenth of its CPU with 4 workers on 2 cores:
/// each switch leaves the next slice cold caches.) Then says whether this
/// worker's event loop has work waiting (`event_loop.rs`): 1 waiting, 0
/// nothing waits, -1 cannot tell. The shim pauses (`ngx.sleep`) unless it
/// says 0.
#[unsafe(no_mangle)]
pub extern "C" fn resty_counter_slice_end() -> i32 {
    let now_us = monotonic().map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    if yield_due(&LAST_YIELD_US, now_us) {
        // SAFETY: sched_yield takes no arguments; its result (always 0 on
        // Linux) tells nothing to act on.
        unsafe { libc::sched_yield() };
    }
    guard(-1, || match crate::event_loop::waiting() {
        crate::event_loop::Waiting::Idle => 0,
        crate::event_loop::Waiting::Busy => 1,
        crate::event_loop::Waiting::Unknown => -1,
    })
}

/// Creates the flush state for one dict in this worker.
///
/// `subsystem` (`ngx.config.subsystem`, not NUL-terminated) picks the entry
/// point (`http` or `stream`, the meta module's as fallback); `zone_udata` is
/// `dict[1]`. Pending deltas are capped by [`Limits::default`].
///
/// # Safety
/// `subsystem` must point at `subsystem_len` readable bytes (or be NULL with
/// length 0); `zone_udata` must be `dict[1]` of a live shared dict; `err`
/// may be NULL, else it must be writable.
///
/// # Errors
/// Returns NULL and sets `*err` to `RC_NULL`, `RC_NO_SYMBOL`, `RC_BAD_ZONE`
/// or `RC_PANIC`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn resty_counter_flusher_new(
    subsystem: *const u8,
    subsystem_len: usize,
    zone_udata: *mut c_void,
    err: *mut i32,
) -> *mut FlusherHandle {
    let mut code = RC_PANIC;
    let handle = guard(ptr::null_mut(), || {
        // SAFETY: the caller guarantees subsystem_len readable bytes.
        let Some(sub) = (unsafe { bytes(subsystem, subsystem_len) }) else {
            code = RC_NULL;
            return ptr::null_mut();
        };
        // SAFETY: the caller guarantees zone_udata is dict[1] of a live dict.
        let dict = match unsafe { ShDict::open(sub, zone_udata) } {
            Ok(d) => d,
            Err(OpenError::NoSymbol) => {
                code = RC_NO_SYMBOL;
                return ptr::null_mut();
            }
            Err(OpenError::BadZone) => {
                code = RC_BAD_ZONE;
                return ptr::null_mut();
            }
        };
        code = RC_STORED;
        let flusher = Flusher::new(dict, Limits::default());
        Box::into_raw(Box::new(FlusherHandle { flusher }))
    });
    if !err.is_null() {
        // SAFETY: err is non-NULL and the caller guarantees it is writable.
        unsafe { *err = code };
    }
    handle
}

/// Frees a handle; NULL is a no-op. Pending deltas are discarded: the shim
/// never frees a handle while its dict is in use (handles live as long as
/// the worker).
///
/// # Safety
/// `h` must be NULL or a handle from `resty_counter_flusher_new` not freed
/// before.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn resty_counter_flusher_free(h: *mut FlusherHandle) {
    guard((), || {
        if !h.is_null() {
            // SAFETY: h came from Box::into_raw and is freed only here, once.
            drop(unsafe { Box::from_raw(h) });
        }
    })
}

/// Hands one delta over and writes it into the dict (init 0).
///
/// # Safety
/// `h` must be NULL or a live handle; `key` must point at `key_len`
/// readable bytes (any bytes, NUL included).
///
/// # Errors
/// `RC_NULL`, `RC_BAD_KEY`, `RC_BAD_DELTA` (nothing changed), `RC_PANIC`;
/// otherwise one of the `>= 0` outcome codes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn resty_counter_flusher_write(
    h: *mut FlusherHandle,
    key: *const u8,
    key_len: usize,
    delta: f64,
) -> i32 {
    // SAFETY: the caller's guarantees, passed on.
    unsafe { write_with(h, key, key_len, delta, Flusher::add) }
}

/// The body of the two write exports: `write` on the handle's flusher,
/// its outcome or refusal as a code.
///
/// # Safety
/// As for [`resty_counter_flusher_write`].
#[inline(always)]
unsafe fn write_with(
    h: *mut FlusherHandle,
    key: *const u8,
    key_len: usize,
    delta: f64,
    // A flusher's write: [`Flusher::add`] or [`Flusher::write_through`],
    // inlined into each export (no call through a pointer per key).
    write: impl FnOnce(&mut Flusher<ShDict>, &[u8], f64) -> Result<Outcome, Rejected>,
) -> i32 {
    guard(RC_PANIC, || {
        // SAFETY: h is NULL or live and not aliased during the call; the
        // caller guarantees key_len readable bytes at key.
        let Some((h, key)) = (unsafe { handle_and_key(h, key, key_len) }) else {
            return RC_NULL;
        };
        match write(&mut h.flusher, key, delta) {
            // The common outcome first: no jump table on a sync's hot path.
            Ok(Outcome::Stored) => RC_STORED,
            Ok(o) => outcome_code(o),
            Err(Rejected::BadKey) => RC_BAD_KEY,
            Err(Rejected::BadDelta) => RC_BAD_DELTA,
        }
    })
}

/// Starts a sync: times it and makes every pending delta due for a retry.
///
/// # Safety
/// `h` must be NULL or a live handle.
///
/// # Errors
/// `RC_NULL` or `RC_PANIC`; else `RC_STORED`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn resty_counter_flusher_begin(h: *mut FlusherHandle) -> i32 {
    guard(RC_PANIC, || {
        // SAFETY: h is NULL or live and not aliased during the call.
        let Some(h) = (unsafe { h.as_mut() }) else {
            return RC_NULL;
        };
        h.flusher.begin();
        RC_STORED
    })
}

/// Retries pending deltas for at most `budget` seconds (`<= 0`: no limit).
/// Returns how many are left untried in this sync (0: done).
///
/// # Safety
/// `h` must be NULL or a live handle.
///
/// # Errors
/// `RC_NULL` or `RC_PANIC` (negative).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn resty_counter_flusher_retry(h: *mut FlusherHandle, budget: f64) -> i32 {
    guard(RC_PANIC, || {
        // SAFETY: h is NULL or live and not aliased during the call.
        let Some(h) = (unsafe { h.as_mut() }) else {
            return RC_NULL;
        };
        let budget = (budget > 0.0 && budget.is_finite())
            .then(|| std::time::Duration::from_secs_f64(budget));
        i32::try_from(h.flusher.retry(budget)).unwrap_or(i32::MAX)
    })
}

/// Ends a sync and writes what became of it into `*out` (see
/// [`SyncResult`]). `error_metric` is non-zero when the counter has an
/// error metric: then a write that evicted other entries fails the sync.
///
/// # Safety
/// `h` must be NULL or a live handle and `out` NULL or writable, neither
/// aliased during the call.
///
/// # Errors
/// `RC_NULL` or `RC_PANIC`; else `RC_STORED`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn resty_counter_flusher_end(
    h: *mut FlusherHandle,
    error_metric: i32,
    out: *mut SyncResult,
) -> i32 {
    guard(RC_PANIC, || {
        // SAFETY: h and out are NULL or live and not aliased, by the contract.
        let Some((h, out)) = (unsafe { handle_and_out(h, out) }) else {
            return RC_NULL;
        };
        let end = h.flusher.end(error_metric != 0);
        *out = SyncResult {
            ok: i32::from(end.ok),
            failed: end.failed as f64,
            evicted: end.evicted as f64,
            dropped_cap: end.dropped_cap as f64,
            dropped_in_retry: end.dropped_in_retry as f64,
            pending_keys: end.pending_keys as f64,
            pending_sum: end.pending_sum,
            evicted_in_retry: end.evicted_in_retry as f64,
        };
        RC_STORED
    })
}

/// Writes one increment straight into the dict (init 0), outside any
/// sync: the shim's write-through, while it keeps no buffer (its timer
/// refused, after its exit flush, a Lua VM per request). A refusal drops
/// the delta and counts it in the handle's statistics
/// ([`Flusher::write_through`]); the sync's result is not touched.
///
/// # Safety
/// `h` must be NULL or a live handle; `key` must point at `key_len`
/// readable bytes (any bytes, NUL included).
///
/// # Errors
/// `RC_NULL`, `RC_BAD_KEY`, `RC_BAD_DELTA` (nothing changed), `RC_PANIC`;
/// else `RC_STORED`, `RC_STORED_EVICTED` or a drop: `RC_DROPPED_NO_MEMORY`,
/// `RC_DROPPED_NOT_A_NUMBER`, `RC_DROPPED_NOT_FINITE`, `RC_DROPPED_OTHER`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn resty_counter_write_through(
    h: *mut FlusherHandle,
    key: *const u8,
    key_len: usize,
    delta: f64,
) -> i32 {
    // SAFETY: the caller's guarantees, passed on.
    unsafe { write_with(h, key, key_len, delta, Flusher::write_through) }
}

/// `dict:incr(key, value, init)` on this handle's dict, the CRC-safe way
/// the flush writes (incr without init, then add): for `reset` and the
/// error metric. Writes the new value into `*new_value` (when not NULL).
/// A sum that would not be finite is refused: the key is saturated, as the
/// flush does.
///
/// # Safety
/// `h` must be NULL or a live handle; `key` must point at `key_len`
/// readable bytes; `new_value` NULL or writable.
///
/// # Errors
/// `RC_NULL`, `RC_BAD_KEY`, `RC_BAD_DELTA` (value, init or their sum not
/// finite; nothing changed), `RC_PANIC`; `RC_RETAINED` (no memory; nothing
/// is kept), `RC_DROPPED_NOT_A_NUMBER`, `RC_DROPPED_NOT_FINITE`,
/// `RC_DROPPED_OTHER`; else `RC_STORED` or `RC_STORED_EVICTED`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn resty_counter_incr(
    h: *mut FlusherHandle,
    key: *const u8,
    key_len: usize,
    value: f64,
    init: f64,
    new_value: *mut f64,
) -> i32 {
    guard(RC_PANIC, || {
        // SAFETY: h is NULL or live and not aliased during the call; the
        // caller guarantees key_len readable bytes at key.
        let Some((h, key)) = (unsafe { handle_and_key(h, key, key_len) }) else {
            return RC_NULL;
        };
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return RC_BAD_KEY;
        }
        if !(value.is_finite() && init.is_finite() && (init + value).is_finite()) {
            return RC_BAD_DELTA;
        }
        match h.flusher.dict_mut().incr_or_add(key, value, init) {
            Ok((v, w)) => {
                // SAFETY: new_value is NULL or writable, by the contract.
                if let Some(out) = unsafe { new_value.as_mut() } {
                    *out = v;
                }
                if w.evicted {
                    RC_STORED_EVICTED
                } else {
                    RC_STORED
                }
            }
            Err(DictError::NoMemory) => RC_RETAINED,
            Err(DictError::NotANumber) => RC_DROPPED_NOT_A_NUMBER,
            Err(DictError::NotFinite) => RC_DROPPED_NOT_FINITE,
            Err(DictError::Other) => RC_DROPPED_OTHER,
        }
    })
}

/// Writes this handle's statistics into `*out` (see [`CStats`]);
/// `pending_sum` is the sum of the pending deltas.
///
/// # Safety
/// `h` must be NULL or a live handle and `out` NULL or writable, neither
/// aliased during the call.
///
/// # Errors
/// `RC_NULL` or `RC_PANIC`; else `RC_STORED`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn resty_counter_flusher_stats(
    h: *mut FlusherHandle,
    out: *mut CStats,
) -> i32 {
    guard(RC_PANIC, || {
        // SAFETY: h and out are NULL or live and not aliased, by the contract.
        let Some((h, out)) = (unsafe { handle_and_out(h, out) }) else {
            return RC_NULL;
        };
        let s = h.flusher.stats();
        *out = CStats {
            pending_keys: s.pending_keys as f64,
            pending_bytes: s.pending_bytes as f64,
            pending_sum: h.flusher.pending_sum(),
            keys_flushed: s.keys_flushed as f64,
            retries: s.retries as f64,
            dropped_deltas: s.dropped_deltas as f64,
            dropped_permanent: s.dropped_permanent as f64,
            dropped_overflow: s.dropped_overflow as f64,
            evictions: s.evictions as f64,
            failed_writes: s.failed_writes as f64,
            syncs: s.syncs as f64,
            failed_syncs: s.failed_syncs as f64,
            last_sync_seconds: s.last_sync_ns as f64 * 1e-9,
        };
        RC_STORED
    })
}

/// A borrowed byte slice from a C (pointer, length); `None` for a NULL
/// pointer with a non-zero length.
///
/// # Safety
/// `p` must be NULL or point at `len` readable bytes that outlive the use.
pub(crate) unsafe fn bytes<'a>(p: *const u8, len: usize) -> Option<&'a [u8]> {
    if p.is_null() {
        return (len == 0).then_some(&[][..]);
    }
    // SAFETY: p is non-NULL and the caller guarantees len readable bytes.
    Some(unsafe { std::slice::from_raw_parts(p, len) })
}

/// The handle and the key of an export that takes both; `None` for a NULL
/// handle, or a NULL key with a non-zero length.
///
/// # Safety
/// `h` must be NULL or live and not aliased during the call; `key` must be
/// NULL or point at `key_len` readable bytes that outlive the use.
pub(crate) unsafe fn handle_and_key<'a, T>(
    h: *mut T,
    key: *const u8,
    key_len: usize,
) -> Option<(&'a mut T, &'a [u8])> {
    // SAFETY: by this function's contract.
    unsafe { Some((h.as_mut()?, bytes(key, key_len)?)) }
}

/// The handle and the out-struct of an export that fills one (sync result,
/// stats, stage report); `None` if either is NULL.
///
/// # Safety
/// `h` must be NULL or live and not aliased during the call; `out` NULL or
/// writable and not aliased during the call.
pub(crate) unsafe fn handle_and_out<'a, T, O>(
    h: *mut T,
    out: *mut O,
) -> Option<(&'a mut T, &'a mut O)> {
    // SAFETY: by this function's contract.
    unsafe { Some((h.as_mut()?, out.as_mut()?)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn a_slice_end_yields_the_cpu_at_most_once_per_yield_every() {
        let last = AtomicU64::new(0);
        let t0 = 5 * YIELD_EVERY_US;
        assert!(yield_due(&last, Some(t0)));
        assert!(!yield_due(&last, Some(t0)));
        assert!(!yield_due(&last, Some(t0 + YIELD_EVERY_US - 1)));
        assert!(yield_due(&last, Some(t0 + YIELD_EVERY_US)));
        assert!(!yield_due(&last, Some(t0 + YIELD_EVERY_US + 1)));
        // No clock: every slice's end yields, as before the limit.
        assert!(yield_due(&last, None));
        assert!(yield_due(&last, None));
    }

    #[test]
    fn guard_turns_panics_into_codes() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let rc = guard(RC_PANIC, || -> i32 { panic!("boom") });
        std::panic::set_hook(prev);
        assert_eq!(rc, RC_PANIC);
        assert_eq!(guard(RC_PANIC, || 7), 7);
    }

    #[test]
    fn every_export_answers_null_handles() {
        // SAFETY: NULL handles are part of every export's contract.
        unsafe {
            assert_eq!(
                resty_counter_flusher_write(ptr::null_mut(), c"k".as_ptr().cast(), 1, 1.0),
                RC_NULL
            );
            assert_eq!(resty_counter_flusher_begin(ptr::null_mut()), RC_NULL);
            assert_eq!(resty_counter_flusher_retry(ptr::null_mut(), 0.0), RC_NULL);
            let mut res = SyncResult::default();
            assert_eq!(
                resty_counter_flusher_end(ptr::null_mut(), 1, &mut res),
                RC_NULL
            );
            let mut out = CStats::default();
            assert_eq!(
                resty_counter_flusher_stats(ptr::null_mut(), &mut out),
                RC_NULL
            );
            assert_eq!(
                resty_counter_incr(ptr::null_mut(), b"k".as_ptr(), 1, 1.0, 0.0, ptr::null_mut()),
                RC_NULL
            );
            assert_eq!(
                resty_counter_write_through(ptr::null_mut(), b"k".as_ptr(), 1, 1.0),
                RC_NULL
            );
            resty_counter_flusher_free(ptr::null_mut());
        }
    }

    #[test]
    fn incr_checks_key_and_numbers_through_the_abi() {
        let mut h = test_handle();
        let hp: *mut FlusherHandle = &mut *h;
        let mut v = f64::NAN;
        // SAFETY: hp is live for the whole test; keys are valid slices.
        unsafe {
            assert_eq!(
                resty_counter_incr(hp, ptr::null(), 0, 1.0, 0.0, &mut v),
                RC_BAD_KEY
            );
            let long = vec![b'x'; MAX_KEY_LEN + 1];
            assert_eq!(
                resty_counter_incr(hp, long.as_ptr(), long.len(), 1.0, 0.0, &mut v),
                RC_BAD_KEY
            );
            for (value, init) in [(f64::NAN, 0.0), (1.0, f64::INFINITY), (f64::MAX, f64::MAX)] {
                assert_eq!(
                    resty_counter_incr(hp, b"k".as_ptr(), 1, value, init, &mut v),
                    RC_BAD_DELTA
                );
            }
            assert!(v.is_nan(), "a refused call wrote a value");
            assert_eq!(
                resty_counter_incr(hp, b"k".as_ptr(), 1, 2.0, 0.0, &mut v),
                RC_STORED
            );
            assert_eq!(v, 2.0);
        }
    }

    #[test]
    fn new_outside_nginx_reports_why() {
        let mut err = 0;
        let mut udata = 0u8;
        // SAFETY: valid subsystem bytes, a readable udata, a writable err.
        let h = unsafe {
            resty_counter_flusher_new(
                b"http".as_ptr(),
                4,
                (&mut udata as *mut u8).cast(),
                &mut err,
            )
        };
        assert!(h.is_null());
        assert_eq!(err, RC_NO_SYMBOL);
        // SAFETY: a NULL zone and a NULL subsystem with length 3 are refused.
        let h = unsafe { resty_counter_flusher_new(ptr::null(), 3, ptr::null_mut(), &mut err) };
        assert!(h.is_null());
        assert_eq!(err, RC_NULL);
        // SAFETY: err may be NULL.
        let h = unsafe {
            resty_counter_flusher_new(b"http".as_ptr(), 4, ptr::null_mut(), ptr::null_mut())
        };
        assert!(h.is_null());
    }

    #[test]
    fn add_checks_key_and_delta_through_the_abi() {
        let mut h = test_handle();
        let hp: *mut FlusherHandle = &mut *h;
        // SAFETY: hp is live for the whole test; keys are valid slices.
        unsafe {
            assert_eq!(
                resty_counter_flusher_write(hp, ptr::null(), 0, 1.0),
                RC_BAD_KEY
            );
            assert_eq!(
                resty_counter_flusher_write(hp, ptr::null(), 5, 1.0),
                RC_NULL
            );
            assert_eq!(
                resty_counter_flusher_write(hp, b"k".as_ptr(), 1, f64::NAN),
                RC_BAD_DELTA
            );
            assert_eq!(
                resty_counter_flusher_write(hp, b"k\0x".as_ptr(), 3, 2.0),
                RC_STORED
            );
            assert_eq!(resty_counter_flusher_begin(hp), RC_STORED);
            assert_eq!(resty_counter_flusher_retry(hp, 0.0), 0);
            let mut res = SyncResult::default();
            assert_eq!(resty_counter_flusher_end(hp, 1, &mut res), RC_STORED);
            assert_eq!(res.ok, 1);
            assert_eq!(res.failed, 0.0);
            assert_eq!(resty_counter_flusher_end(hp, 1, ptr::null_mut()), RC_NULL);
            let mut out = CStats {
                pending_sum: f64::NAN,
                ..CStats::default()
            };
            assert_eq!(resty_counter_flusher_stats(hp, &mut out), RC_STORED);
            assert_eq!(out.keys_flushed, 1.0);
            assert_eq!(out.syncs, 1.0);
            assert_eq!(out.pending_sum, 0.0);
            assert_eq!(resty_counter_flusher_stats(hp, ptr::null_mut()), RC_NULL);
        }
    }

    #[test]
    fn every_code_has_a_message() {
        // SAFETY: strerror returns a static NUL-terminated string.
        let unknown = unsafe { CStr::from_ptr(resty_counter_strerror(i32::MIN)) };
        let mut seen = std::collections::HashSet::new();
        for code in RC_REFS_EXPIRED..=RC_DROPPED_NO_MEMORY {
            // SAFETY: as above.
            let msg = unsafe { CStr::from_ptr(resty_counter_strerror(code)) };
            assert_ne!(msg, unknown, "code {code} falls to the catch-all");
            assert!(seen.insert(msg.to_bytes()), "code {code} shares a message");
        }
        // SAFETY: as above.
        let msg = unsafe { CStr::from_ptr(resty_counter_strerror(RC_RETAINED)) };
        assert_eq!(msg.to_bytes(), b"no memory");
    }

    #[test]
    fn a_slice_end_that_cannot_look_at_the_loop_says_so() {
        // No nginx in this process: -1, so the shim pauses after the slice
        // as it would without the look, rather than 0 (never pause).
        assert_eq!(resty_counter_slice_end(), -1);
    }

    #[test]
    fn clock_is_monotonic() {
        let a = resty_counter_clock();
        let b = resty_counter_clock();
        assert!(a > 0.0 && b >= a);
    }

    /// A handle over a stand-in dict that accepts everything.
    fn test_handle() -> Box<FlusherHandle> {
        use crate::shdict::tests_support::accepting_dict;
        Box::new(FlusherHandle {
            flusher: Flusher::new(accepting_dict(), Limits::default()),
        })
    }
}
