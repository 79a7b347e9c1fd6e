//! Exported functions of the shared stage (`stage.rs`, `zone.rs`): attach,
//! publish, fold, info. Short adapters from raw pointers, each inside the
//! same panic guard as `ffi.rs`. Declared at the end of the shim's cdef;
//! `tests/abi.rs` checks both files against it.
//!
//! Codes: [`resty_counter_stage_publish_batch`] says per pair `STAGED`,
//! `STAGE_FULL` or `STAGE_TOO_LONG` (write those two directly); errors are
//! codes of the one space of `ffi.rs`, named by `resty_counter_strerror`,
//! the attach errors among them (`RC_ATTACH` down).

use std::ffi::{CStr, c_void};
use std::ptr;

use crate::ffi::{
    FlusherHandle, RC_ATTACH, RC_BUSY, RC_NULL, RC_PANIC, RC_REFS_EXPIRED, bytes, guard,
    handle_and_out,
};
use crate::flush::{Outcome, Rejected};
use crate::stage::{Lease, Published, REF_SPAN, Stage, Worker};
use crate::zone::{AttachError, ZoneStage, alive, now_ms};

/// Per pair of a publish: the delta is in the stage.
pub const STAGED: i32 = 0;
/// Per pair of a publish: no slot for it (write it directly).
pub const STAGE_FULL: i32 = 1;
/// Per pair of a publish: the key is longer than the stage takes, or NULL
/// (write it directly).
pub const STAGE_TOO_LONG: i32 = 2;
/// Per pair of a publish by ref: the ref no longer names the key's slot
/// (publish it by key).
pub const STAGE_STALE: i32 = 3;

const ATTACH_ERRORS: [AttachError; 12] = [
    AttachError::NoSlab,
    AttachError::BadZone,
    AttachError::NameMismatch,
    AttachError::Implausible,
    AttachError::SameZone,
    AttachError::ZoneTooSmall,
    AttachError::NoMemory,
    AttachError::BadOffset,
    AttachError::RegistryFull,
    AttachError::Dict,
    AttachError::Busy,
    AttachError::DirectoryFull,
];
/// A stage header that does not match (any layout error).
pub const RC_BAD_STAGE: i32 = RC_ATTACH - ATTACH_ERRORS.len() as i32;

/// What `resty_counter_stage_attach` says of itself, declared in the cdef
/// as `resty_counter_attach_result`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttachResult {
    /// 0 attached, else an error code (`RC_NULL`, `RC_PANIC`, an attach
    /// code), named by `resty_counter_strerror`.
    pub code: i32,
    /// 1 if the attach may succeed later (no room in the stage zone yet,
    /// registry full, the directory busy): try again at a later sync.
    pub transient: i32,
}

/// What one `resty_counter_stage_fold` call did, declared in the cdef as
/// `resty_counter_fold_result`. The running totals are the flusher's
/// (`resty_counter_flusher_stats`) and the stage's (`stage_info`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FoldResult {
    /// Deltas written into the dict.
    pub written: f64,
    /// Of those, written with evictions of other entries.
    pub evicted: f64,
    /// Deltas not written (kept pending or dropped; the flusher's stats
    /// tell which).
    pub failed: f64,
}

/// Slots folded between two looks at the clock in a budgeted fold.
const FOLD_CHUNK: usize = 64;

/// One worker's attachment to one dict's stage, opaque to C.
pub struct StageHandle {
    zs: ZoneStage,
    cursor: usize,
    whole_cursor: Option<usize>,
    folded: u64,
    /// The stage's reclaims when the refs this handle gave began.
    refs_since: u64,
}

fn attach_code(e: AttachError) -> i32 {
    match ATTACH_ERRORS.iter().position(|x| *x == e) {
        Some(i) => RC_ATTACH - i as i32,
        None => RC_BAD_STAGE,
    }
}

/// The message of an attach code (`RC_ATTACH` down to `RC_BAD_STAGE`), for
/// `resty_counter_strerror`; `None` for any other code.
pub(crate) fn attach_message(code: i32) -> Option<&'static CStr> {
    match code {
        RC_BAD_STAGE => Some(c"the stage header does not match"),
        c if c <= RC_ATTACH && c > RC_BAD_STAGE => {
            Some(ATTACH_ERRORS[(RC_ATTACH - c) as usize].message())
        }
        _ => None,
    }
}

/// Finds or makes, in the stage zone `stage_udata` (`dict[1]` of the
/// `lua_shared_dict` named `stage_name`), the region of the dict the
/// flusher `f` writes into, and registers this worker in it. A region made
/// now takes `stage_bytes` bytes of the stage zone (0: half the dict's
/// size; see `zone::stage_bytes_for`), less when the zone has less room;
/// an existing one is joined whatever its size.
///
/// # Safety
/// `f` must be NULL or live; `stage_name` must point at `stage_name_len`
/// readable bytes; `stage_udata` must be `dict[1]` of the live dict named
/// `stage_name`; `err` may be NULL, else writable.
///
/// # Errors
/// Returns NULL and sets `err.code` to `RC_NULL`, `RC_PANIC` or an attach
/// code, and `err.transient` to 1 when a later attach may succeed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn resty_counter_stage_attach(
    f: *mut FlusherHandle,
    stage_udata: *mut c_void,
    stage_name: *const u8,
    stage_name_len: usize,
    stage_bytes: f64,
    err: *mut AttachResult,
) -> *mut StageHandle {
    let mut code = RC_PANIC;
    let mut transient = false;
    let h = guard(ptr::null_mut(), || {
        // SAFETY: f is NULL or live (contract); the caller guarantees the
        // name's length.
        let (Some(f), Some(name)) = (unsafe { f.as_ref() }, unsafe {
            bytes(stage_name, stage_name_len)
        }) else {
            code = RC_NULL;
            return ptr::null_mut();
        };
        let asked = if stage_bytes.is_finite() && stage_bytes >= 1.0 {
            stage_bytes as usize
        } else {
            0
        };
        // SAFETY: the caller guarantees stage_udata is that dict's dict[1].
        let attached = unsafe { ZoneStage::attach(f.flusher.dict(), stage_udata, name, asked) };
        let zs = match attached {
            Ok(zs) => zs,
            Err(e) => {
                code = attach_code(e);
                transient = e.is_transient();
                return ptr::null_mut();
            }
        };
        code = 0;
        let refs_since = zs.stage.reclaims();
        Box::into_raw(Box::new(StageHandle {
            zs,
            cursor: 0,
            whole_cursor: None,
            folded: 0,
            refs_since,
        }))
    });
    if !err.is_null() {
        // SAFETY: err is non-NULL and writable by contract.
        unsafe {
            *err = AttachResult {
                code,
                transient: i32::from(transient),
            }
        };
    }
    h
}

/// Leaves the stage (unregisters, gives up the lease) and frees the
/// handle; NULL is a no-op.
///
/// # Safety
/// `h` must be NULL or a handle from `resty_counter_stage_attach` not
/// freed before.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn resty_counter_stage_free(h: *mut StageHandle) {
    guard((), || {
        if !h.is_null() {
            // SAFETY: h came from Box::into_raw and is freed only here.
            let h = unsafe { Box::from_raw(h) };
            h.zs.leave();
        }
    })
}

/// Most pairs one `resty_counter_stage_publish_batch` call takes.
pub const BATCH_MAX: u32 = 4096;

/// Adds `n` deltas into the stage in one pass (one announce, one fence,
/// the slots of a group touched ahead): `keys[i]` of `lens[i]` bytes gets
/// `deltas[i]`, and `rcs[i]` says what became of it (`STAGED`,
/// `STAGE_FULL`, `STAGE_TOO_LONG` also for a NULL key: write those two
/// directly). For a staged pair `refs[i]` is the ref of the key's slot, for
/// [`resty_counter_stage_publish_refs`] (0 for the others). Returns how
/// many were staged.
///
/// # Safety
/// `h` must be NULL or live; `keys`, `lens`, `deltas`, `rcs` and `refs`
/// must hold `n` elements; each `keys[i]` must point at `lens[i]` readable
/// bytes.
///
/// # Errors
/// `RC_NULL` (a NULL handle or array, or `n > BATCH_MAX`), `RC_PANIC`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn resty_counter_stage_publish_batch(
    h: *mut StageHandle,
    keys: *const *const u8,
    lens: *const usize,
    deltas: *const f64,
    n: u32,
    rcs: *mut i32,
    refs: *mut f64,
) -> i32 {
    guard(RC_PANIC, || {
        // SAFETY: h is NULL or live, not aliased during the call.
        let Some(h) = (unsafe { h.as_mut() }) else {
            return RC_NULL;
        };
        if keys.is_null()
            || lens.is_null()
            || deltas.is_null()
            || rcs.is_null()
            || refs.is_null()
            || n > BATCH_MAX
        {
            return RC_NULL;
        }
        let n = n as usize;
        // SAFETY: the caller guarantees n elements in each array.
        let (keys, lens, deltas, rcs, refs) = unsafe {
            (
                std::slice::from_raw_parts(keys, n),
                std::slice::from_raw_parts(lens, n),
                std::slice::from_raw_parts(deltas, n),
                std::slice::from_raw_parts_mut(rcs, n),
                std::slice::from_raw_parts_mut(refs, n),
            )
        };
        let items = (0..n).map(|i| {
            // SAFETY: keys[i] points at lens[i] readable bytes (contract);
            // a NULL key with a length becomes the empty key, refused.
            let key = unsafe { bytes(keys[i], lens[i]) }.unwrap_or(&[]);
            (key, deltas[i])
        });
        let mut i = 0usize;
        let mut staged = 0i32;
        h.zs.stage
            .publish_many(h.zs.worker, items, |_, _, r, slot_ref| {
                rcs[i] = match r {
                    Published::Staged => {
                        staged += 1;
                        STAGED
                    }
                    Published::Full => STAGE_FULL,
                    Published::TooLong | Published::Stale => STAGE_TOO_LONG,
                };
                // Exact: a ref is below 2^53.
                refs[i] = slot_ref as f64;
                i += 1;
            });
        staged
    })
}

/// Whether the refs a handle gave since the stage had reclaimed `*since`
/// slots may be unsound now that it has reclaimed `now` (`REF_SPAN` or more
/// since); if so, the refs begin again at `now`.
fn refs_expired(since: &mut u64, now: u64) -> bool {
    if now.wrapping_sub(*since) < REF_SPAN {
        return false;
    }
    *since = now;
    true
}

/// Adds `n` deltas into the stage by slot ref, in one pass: `refs[i]` is
/// what [`resty_counter_stage_publish_batch`] said of an earlier publish of
/// the same key, and `rcs[i]` says what became of `deltas[i]`: `STAGED`,
/// `STAGE_FULL` (the sum would not be finite; not counted in the stage's
/// stats: publish it by key, which refuses and counts it), or
/// `STAGE_STALE`: the slot no longer
/// holds that key, or `refs[i]` is not a ref; nothing was added: publish
/// the pair by key and forget the ref. Returns how many were staged, or
/// `RC_REFS_EXPIRED` when the stage has reclaimed `REF_SPAN` slots since
/// this handle's refs began: nothing was added, every ref the caller holds
/// must be forgotten (they may name a slot reused 2^21 times), and the
/// refs the handle gives from now on are sound again.
///
/// # Safety
/// `h` must be NULL or live; `refs`, `deltas` and `rcs` must hold `n`
/// elements.
///
/// # Errors
/// `RC_NULL` (a NULL handle or array, or `n > BATCH_MAX`), `RC_PANIC`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn resty_counter_stage_publish_refs(
    h: *mut StageHandle,
    refs: *const f64,
    deltas: *const f64,
    n: u32,
    rcs: *mut i32,
) -> i32 {
    guard(RC_PANIC, || {
        // SAFETY: h is NULL or live, not aliased during the call.
        let Some(h) = (unsafe { h.as_mut() }) else {
            return RC_NULL;
        };
        if refs.is_null() || deltas.is_null() || rcs.is_null() || n > BATCH_MAX {
            return RC_NULL;
        }
        let n = n as usize;
        // SAFETY: the caller guarantees n elements in each array.
        let (refs, deltas, rcs) = unsafe {
            (
                std::slice::from_raw_parts(refs, n),
                std::slice::from_raw_parts(deltas, n),
                std::slice::from_raw_parts_mut(rcs, n),
            )
        };
        if refs_expired(&mut h.refs_since, h.zs.stage.reclaims()) {
            return RC_REFS_EXPIRED;
        }
        // A ref is a whole number below 2^53; anything else names no slot
        // (ref_parts refuses 0 and slots out of range).
        let items = (0..n).map(|i| {
            let r = refs[i];
            let slot_ref = if (1.0..9_007_199_254_740_992.0).contains(&r) {
                r as u64
            } else {
                0
            };
            (slot_ref, deltas[i])
        });
        let mut i = 0usize;
        let mut staged = 0i32;
        h.zs.stage.publish_refs(h.zs.worker, items, |r| {
            rcs[i] = match r {
                Published::Staged => {
                    staged += 1;
                    STAGED
                }
                Published::Full => STAGE_FULL,
                Published::TooLong | Published::Stale => STAGE_STALE,
            };
            i += 1;
        });
        staged
    })
}

/// Folds the stage into the dict through the flusher `f`: every folded
/// (key, delta) goes through `Flusher::add`, as a direct write would
/// (transient failures kept pending and retried, permanent ones dropped
/// and counted, caps, evictions, non-finite saturation).
///
/// `whole == 0`: the automatic fold. Takes or renews the lease for
/// `lease_ms` (else `RC_BUSY`), then folds from this worker's cursor until
/// about `budget` seconds have passed or the round ends. `whole == 1`: the
/// manual and exit fold. Tries the lease but folds one whole round from
/// slot 0 either way (a second folder is harmless: each delta is taken by
/// one CAS), without a budget. `whole == 2`: the same round in slices of
/// about `budget` seconds (a `sync()` that may yield): it starts at slot 0
/// unless this worker's sliced round is under way, which it continues
/// (two syncs of one worker at once share the round).
///
/// Writes what this call did into `*out` (NULL: nothing; see
/// [`FoldResult`]).
///
/// # Safety
/// `h` and `f` must be NULL or live; `out` NULL or writable.
///
/// # Errors
/// `RC_NULL`, `RC_PANIC`, `RC_BUSY`; else 1 (the round ended) or 0 (the
/// budget ran out first: call again).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn resty_counter_stage_fold(
    h: *mut StageHandle,
    f: *mut FlusherHandle,
    whole: i32,
    lease_ms: u32,
    budget: f64,
    out: *mut FoldResult,
) -> i32 {
    guard(RC_PANIC, || {
        // SAFETY: h and f are NULL or live, not aliased during the call.
        let (Some(h), Some(f)) = (unsafe { h.as_mut() }, unsafe { f.as_mut() }) else {
            return RC_NULL;
        };
        let st = h.zs.stage;
        let me = h.zs.worker;
        let held = matches!(
            st.lease(me.pid(), now_ms(), u64::from(lease_ms)),
            Lease::Held { .. }
        );
        if !held && whole == 0 {
            return RC_BUSY;
        }
        st.reap_dead(&alive);
        let flusher = &mut f.flusher;
        let mut tally = FoldResult::default();
        let mut sink = |key: &[u8], delta: f64| match flusher.add(key, delta) {
            Ok(Outcome::Stored) => tally.written += 1.0,
            Ok(Outcome::StoredEvicted) => {
                tally.written += 1.0;
                tally.evicted += 1.0;
            }
            Ok(_) | Err(Rejected::BadKey | Rejected::BadDelta) => tally.failed += 1.0,
        };
        let budget = if budget.is_finite() && budget > 0.0 {
            budget
        } else {
            0.0
        };
        let done = match whole {
            0 => fold_for(st, me, &mut h.cursor, budget, &mut sink),
            2 => {
                let cursor = h.whole_cursor.get_or_insert(0);
                let done = fold_for(st, me, cursor, budget, &mut sink);
                if done {
                    h.whole_cursor = None;
                }
                done
            }
            _ => {
                let mut cursor = 0usize;
                while !st.fold(me, &mut cursor, usize::MAX, &alive, &mut sink).done {}
                true
            }
        };
        if done {
            h.zs.tend();
        }
        h.folded += tally.written as u64;
        // SAFETY: out is NULL or writable, by the contract.
        if let Some(out) = unsafe { out.as_mut() } {
            *out = tally;
        }
        i32::from(done)
    })
}

/// Folds from `*cursor` in chunks of `FOLD_CHUNK` slots until the round
/// ends (true) or about `budget` seconds have passed (false).
fn fold_for(
    st: Stage<'static>,
    me: Worker,
    cursor: &mut usize,
    budget: f64,
    sink: &mut impl FnMut(&[u8], f64),
) -> bool {
    let start = std::time::Instant::now();
    loop {
        if st.fold(me, cursor, FOLD_CHUNK, &alive, &mut *sink).done {
            return true;
        }
        if start.elapsed().as_secs_f64() >= budget {
            return false;
        }
    }
}

/// What `resty_counter_stage_info` reports, declared field by field in the
/// shim's cdef as `resty_counter_stage_report` (`tests/abi.rs` checks they
/// agree). Every field is a double so Lua reads a plain number.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageReport {
    /// Offset of this dict's region from the stage zone's start.
    pub offset: f64,
    /// Bytes of the region.
    pub region_bytes: f64,
    /// The dict zone's address the region was made for.
    pub anchor: f64,
    /// Slots in the table.
    pub slots: f64,
    /// The longest key the stage takes, in bytes.
    pub key_bytes: f64,
    /// Pid of the fold lease's holder (0: none), whatever its expiry.
    pub lease_owner: f64,
    /// Deltas published into the stage, by all workers.
    pub published: f64,
    /// Deltas folded out of the stage, by all workers.
    pub folded: f64,
    /// Publishes refused: no slot within the probe limit, or the sum would overflow.
    pub full: f64,
    /// Folders that died between a take and its write.
    pub lost_events: f64,
    /// What they had taken (an upper bound of the loss).
    pub lost_amount: f64,
    /// Slots in use.
    pub fill: f64,
    /// Deltas this worker folded into the dict.
    pub my_folded: f64,
    /// This worker's pid.
    pub pid: f64,
    /// Regions in the stage zone (every dict's).
    pub zone_regions: f64,
    /// Deltas lost with orphaned regions reclaimed to make room (their
    /// workers all killed), all time, zone-wide: count and magnitude.
    pub orphans_lost_events: f64,
    pub orphans_lost_amount: f64,
}

/// Fills `*out` with the stage's figures and this worker's (see
/// [`StageReport`]).
///
/// # Safety
/// `h` must be NULL or live and `out` NULL or writable, neither aliased
/// during the call.
///
/// # Errors
/// `RC_NULL` or `RC_PANIC`; else 0.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn resty_counter_stage_info(
    h: *mut StageHandle,
    out: *mut StageReport,
) -> i32 {
    guard(RC_PANIC, || {
        // SAFETY: h and out are NULL or live and not aliased, by the contract.
        let Some((h, out)) = (unsafe { handle_and_out(h, out) }) else {
            return RC_NULL;
        };
        let st = h.zs.stage;
        let p = st.params();
        let s = st.stats();
        let (zone_regions, lost_n, lost_sum) = h.zs.zone_report();
        *out = StageReport {
            offset: h.zs.region.offset as f64,
            region_bytes: h.zs.region.bytes as f64,
            anchor: p.anchor as f64,
            slots: p.slots as f64,
            key_bytes: st.max_key_len() as f64,
            lease_owner: f64::from(st.lease_owner()),
            published: s.published as f64,
            folded: s.folded as f64,
            full: s.full as f64,
            lost_events: s.lost_events as f64,
            lost_amount: s.lost_amount,
            fill: s.fill as f64,
            my_folded: h.folded as f64,
            pid: f64::from(h.zs.worker.pid()),
            zone_regions: zone_regions as f64,
            orphans_lost_events: lost_n as f64,
            orphans_lost_amount: lost_sum,
        };
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::resty_counter_strerror;

    #[test]
    fn every_export_answers_null() {
        // SAFETY: NULL handles are part of every export's contract.
        unsafe {
            let mut fold = FoldResult {
                written: 9.0,
                ..FoldResult::default()
            };
            assert_eq!(
                resty_counter_stage_fold(ptr::null_mut(), ptr::null_mut(), 1, 100, 0.0, &mut fold),
                RC_NULL
            );
            assert_eq!(fold.written, 9.0, "nothing written");
            let (k, l, d, mut rc) = ([c"k".as_ptr().cast::<u8>()], [1usize], [1.0f64], [9i32]);
            let mut refs = [9.0f64];
            assert_eq!(
                resty_counter_stage_publish_batch(
                    ptr::null_mut(),
                    k.as_ptr(),
                    l.as_ptr(),
                    d.as_ptr(),
                    1,
                    rc.as_mut_ptr(),
                    refs.as_mut_ptr()
                ),
                RC_NULL
            );
            assert_eq!(
                resty_counter_stage_publish_refs(
                    ptr::null_mut(),
                    refs.as_ptr(),
                    d.as_ptr(),
                    1,
                    rc.as_mut_ptr()
                ),
                RC_NULL
            );
            assert_eq!((rc[0], refs[0]), (9, 9.0), "nothing written");
            let mut out = StageReport::default();
            assert_eq!(resty_counter_stage_info(ptr::null_mut(), &mut out), RC_NULL);
            assert_eq!(out, StageReport::default(), "nothing written");
            resty_counter_stage_free(ptr::null_mut());
        }
    }

    /// `transient` as `resty_counter_stage_attach` reports it for `e`.
    fn transient(e: AttachError) -> bool {
        e.is_transient()
    }

    #[test]
    fn refs_expire_after_ref_span_reclaims_and_begin_again() {
        let mut since = 100;
        assert!(!refs_expired(&mut since, 100));
        assert!(!refs_expired(&mut since, 100 + REF_SPAN - 1));
        assert_eq!(since, 100);
        assert!(refs_expired(&mut since, 100 + REF_SPAN));
        assert_eq!(since, 100 + REF_SPAN, "begins again");
        assert!(!refs_expired(&mut since, 100 + REF_SPAN + 1));
        // The counter wraps: still measured as a distance.
        let mut since = u64::MAX - 1;
        assert!(!refs_expired(&mut since, 5));
        assert!(refs_expired(&mut since, REF_SPAN));
    }

    #[test]
    fn transient_attach_codes_are_the_ones_a_later_sync_may_fix() {
        for e in ATTACH_ERRORS {
            assert!(
                attach_code(e) <= RC_ATTACH && attach_code(e) > RC_BAD_STAGE,
                "{e:?}"
            );
        }
        assert!(transient(AttachError::NoMemory));
        assert!(transient(AttachError::RegistryFull));
        assert!(transient(AttachError::Dict));
        assert!(!transient(AttachError::ZoneTooSmall));
        assert!(!transient(AttachError::NameMismatch));
    }

    #[test]
    fn attach_answers_null() {
        let mut err = AttachResult {
            code: 0,
            transient: 7,
        };
        // SAFETY: a NULL flusher is refused before anything is read.
        let h = unsafe {
            resty_counter_stage_attach(
                ptr::null_mut(),
                ptr::null_mut(),
                b"resty_counter_stage".as_ptr(),
                19,
                0.0,
                &mut err,
            )
        };
        assert!(h.is_null());
        assert_eq!(
            err,
            AttachResult {
                code: RC_NULL,
                transient: 0
            }
        );
    }

    #[test]
    fn every_code_has_a_message() {
        // SAFETY: strerror returns a static NUL-terminated string.
        let unknown = unsafe { CStr::from_ptr(resty_counter_strerror(i32::MIN)) };
        let mut seen = std::collections::HashSet::new();
        for code in (RC_BAD_STAGE..=RC_ATTACH).chain([RC_BUSY]) {
            // SAFETY: as above.
            let msg = unsafe { CStr::from_ptr(resty_counter_strerror(code)) };
            assert_ne!(msg, unknown, "code {code} falls to the catch-all");
            assert!(seen.insert(msg.to_bytes()), "code {code} shares a message");
        }
        for (i, e) in ATTACH_ERRORS.iter().enumerate() {
            assert_eq!(attach_code(*e), RC_ATTACH - i as i32);
        }
    }
}
