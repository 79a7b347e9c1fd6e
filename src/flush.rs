//! The flush: moving a worker's deltas into the shared dict.
//!
//! The Lua shim buffers increments in a Lua table (the hot path never crosses
//! into Rust). At sync time it hands each `(key, delta)` to [`Flusher::add`],
//! which writes it into the shared dict at once. From that hand-over on, Rust
//! owns the delta until it reaches the dict:
//!
//! - a write that succeeds is done;
//! - a transient failure (`no memory`: the dict is full and 30 LRU evictions
//!   did not make room) keeps the delta pending; [`Flusher::retry`] tries it
//!   again at the next sync, and a later delta for the same key is merged
//!   into it, so nothing is counted twice or lost;
//! - a permanent failure (`not a number`: the key holds a string) drops the
//!   delta and reports it: retrying could never succeed;
//! - pending deltas are capped in keys and in bytes, so a dict that stays full
//!   cannot grow worker memory without bound; what the cap refuses is
//!   dropped and counted.
//!
//! A sync is [`Flusher::begin`], any number of [`Flusher::add`] and
//! [`Flusher::retry`] calls, then [`Flusher::end`], which decides whether
//! the sync succeeded and returns what failed, was dropped or is still
//! pending: the Flusher owns the sync's state and its result, the shim only
//! logs and returns it. `add` does not care where a pair comes from, so a
//! second source (deltas other workers published) can feed the same
//! write/retry/report path inside the same sync.
//!
//! Nothing here is `unsafe`: the dict is a trait, implemented over the nginx
//! entry point in `shdict.rs` and by a stand-in in the tests.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Longest key the shared dict accepts (nginx stores the length in a u16).
pub const MAX_KEY_LEN: usize = 65535;

/// Bytes a pending entry costs beyond its key (hash slot, box header, delta).
const ENTRY_OVERHEAD: usize = 48;

/// Why the dict refused a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DictError {
    /// The dict is full: transient, worth retrying.
    NoMemory,
    /// The key holds a value that is not a number: permanent.
    NotANumber,
    /// The sum at the key would not be finite; the key was saturated at the
    /// largest finite number of its sign and the delta is dropped.
    NotFinite,
    /// Any other message from the dict: treated as permanent.
    Other,
}

impl DictError {
    /// Classifies the static message nginx returns in `*err`.
    pub fn from_message(msg: &[u8]) -> Self {
        match msg {
            b"no memory" => DictError::NoMemory,
            b"not a number" => DictError::NotANumber,
            _ => DictError::Other,
        }
    }

    /// Whether a later attempt may succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, DictError::NoMemory)
    }
}

/// A successful write: `evicted` is nginx's `forcible`, other entries were
/// evicted from the dict to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub evicted: bool,
}

/// What the flush needs of a shared dict: `incr(key, delta, init = 0)`.
pub trait Dict {
    /// Adds `delta` to the number at `key`, creating it at 0 if missing.
    fn incr(&mut self, key: &[u8], delta: f64) -> Result<Written, DictError>;

    /// The clock a budgeted retry reads; a stand-in dict may supply its own.
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// What became of one handed-over delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It reached the dict.
    Stored,
    /// It reached the dict, and the dict evicted other entries to make room.
    StoredEvicted,
    /// The dict refused it for now; it is pending and will be retried.
    Retained(DictError),
    /// The dict refused it for good; it is dropped.
    Dropped(DictError),
    /// The dict refused it for now, but the pending cap is full: dropped.
    DroppedCap,
    /// Merged with the delta still pending for its key, the sum would not be
    /// finite: this delta is dropped, the pending one stays.
    DroppedOverflow,
}

/// A caller error: the delta was not accepted and nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Key empty or longer than [`MAX_KEY_LEN`].
    BadKey,
    /// Delta NaN or infinite.
    BadDelta,
}

/// Bounds on what a dict that stays full may make a worker keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_keys: usize,
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_keys: 10_000,
            max_bytes: 8 << 20,
        }
    }
}

/// Counters a worker reports through `stats()`; each field is described in
/// `docs/API.md` ("`c:stats()`").
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub pending_keys: u64,
    pub pending_bytes: u64,
    pub keys_flushed: u64,
    pub retries: u64,
    pub dropped_deltas: u64,
    pub dropped_permanent: u64,
    pub dropped_overflow: u64,
    pub evictions: u64,
    pub failed_writes: u64,
    pub syncs: u64,
    pub failed_syncs: u64,
    pub last_sync_ns: u64,
}

#[derive(Debug)]
struct Pending {
    delta: f64,
    /// The sync that last tried it, so one sync tries each key once.
    tried_in: u64,
}

/// One worker's flush state for one shared dict.
#[derive(Debug)]
pub struct Flusher<D> {
    dict: D,
    limits: Limits,
    pending: HashMap<Box<[u8]>, Pending>,
    pending_bytes: usize,
    stats: Stats,
    sync_id: u64,
    sync_started: Option<Instant>,
    sync_ok: bool,
    dropped_this_sync: u64,
    dropped_in_retry: u64,
    /// Handed-over deltas that did not arrive (kept or dropped, the cap's
    /// drops apart), writes that evicted other entries (first writes and
    /// retries), and those of them that were retries, since the last `end`.
    failed_this_sync: u64,
    evicted_this_sync: u64,
    evicted_in_retry: u64,
    /// Syncs begun and not ended: a manual sync that starts while a sliced
    /// one is between slices joins it instead of starting over.
    active: u32,
}

/// What [`Flusher::end`] reports about the sync it ends, for the log.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SyncEnd {
    /// Whether every delta of this sync arrived: the sync's return value.
    pub ok: bool,
    /// Handed-over deltas that did not arrive (kept pending or dropped),
    /// the cap's drops apart.
    pub failed: u64,
    /// Writes of this sync that evicted other entries: handed-over deltas
    /// (each got `StoredEvicted`) and pending ones a retry wrote.
    pub evicted: u64,
    /// The part of `evicted` that retries caused (no per-key outcome).
    pub evicted_in_retry: u64,
    /// Keys still pending after this sync, and the sum of their deltas.
    pub pending_keys: u64,
    pub pending_sum: f64,
    /// Deltas the pending cap dropped.
    pub dropped_cap: u64,
    /// Pending deltas a retry found permanently refused, and dropped.
    pub dropped_in_retry: u64,
}

impl<D: Dict> Flusher<D> {
    pub fn new(dict: D, limits: Limits) -> Self {
        Flusher {
            dict,
            limits,
            pending: HashMap::new(),
            pending_bytes: 0,
            stats: Stats::default(),
            sync_id: 0,
            sync_started: None,
            sync_ok: true,
            dropped_this_sync: 0,
            failed_this_sync: 0,
            evicted_this_sync: 0,
            evicted_in_retry: 0,
            dropped_in_retry: 0,
            active: 0,
        }
    }

    /// Marks the start of a sync: times it, and lets [`retry`](Self::retry)
    /// try every pending key once more. A sync begun while another is still
    /// running (a manual sync between two slices of the automatic one) joins
    /// it: nothing of the running sync is reset, and each pending key is
    /// still tried once.
    pub fn begin(&mut self) {
        self.active = self.active.saturating_add(1);
        if self.active > 1 {
            return;
        }
        self.sync_id = self.sync_id.wrapping_add(1);
        self.sync_started = Some(Instant::now());
        self.sync_ok = true;
        self.dropped_this_sync = 0;
        self.dropped_in_retry = 0;
    }

    /// Ends a sync begun with [`begin`](Self::begin) and decides whether it
    /// succeeded: every delta arrived, none is left pending, and (when
    /// `evictions_fail`, the shim's error metric is set) no write evicted
    /// other entries. Returns that and what failed or was dropped since the
    /// last `end`, for the log, so each is reported once. A sync that
    /// joined a running one fails if the running one failed so far.
    pub fn end(&mut self, evictions_fail: bool) -> SyncEnd {
        let ok = self.sync_ok
            && self.pending.is_empty()
            && !(evictions_fail && self.evicted_this_sync > 0);
        self.stats.syncs += 1;
        if !ok {
            self.stats.failed_syncs += 1;
        }
        self.active = self.active.saturating_sub(1);
        if self.active == 0 {
            if let Some(start) = self.sync_started.take() {
                self.stats.last_sync_ns = duration_ns(start.elapsed());
            }
            self.sync_ok = true;
        }
        let end = SyncEnd {
            ok,
            failed: self.failed_this_sync,
            evicted: self.evicted_this_sync,
            evicted_in_retry: self.evicted_in_retry,
            pending_keys: self.pending.len() as u64,
            pending_sum: self.pending_sum(),
            dropped_cap: self.dropped_this_sync,
            dropped_in_retry: self.dropped_in_retry,
        };
        self.dropped_this_sync = 0;
        self.dropped_in_retry = 0;
        self.failed_this_sync = 0;
        self.evicted_this_sync = 0;
        self.evicted_in_retry = 0;
        end
    }

    /// Hands one delta over and writes it into the dict.
    ///
    /// The common case, a valid pair, nothing pending and the dict taking
    /// it, is kept to a few instructions around the dict's own write (a
    /// sync makes one call per key: each branch and call here was measured
    /// in the direct path's cost per key); everything else is out of line.
    #[inline]
    pub fn add(&mut self, key: &[u8], delta: f64) -> Result<Outcome, Rejected> {
        check(key, delta)?;
        if !self.pending.is_empty() {
            return Ok(self.add_to_pending(key, delta));
        }
        Ok(self.write_new(key, delta))
    }

    /// [`Flusher::add`] of a key that may have a delta pending: merged
    /// with it, then written.
    #[inline(never)]
    fn add_to_pending(&mut self, key: &[u8], delta: f64) -> Outcome {
        match self.pending.remove(key) {
            None => self.write_new(key, delta),
            Some(old) => {
                self.pending_bytes -= entry_cost(key);
                let total = old.delta + delta;
                if !total.is_finite() {
                    // Both parts were finite; their sum overflowed. Keep the
                    // older part pending, drop the new one and report it:
                    // merging would leave a delta no retry could ever write.
                    self.insert_pending(key.into(), old);
                    self.stats.dropped_overflow += 1;
                    self.stats.failed_writes += 1;
                    self.failed_this_sync += 1;
                    self.sync_ok = false;
                    return Outcome::DroppedOverflow;
                }
                self.write_new(key, total)
            }
        }
    }

    /// Writes one increment straight into the dict, outside any sync: the
    /// shim's write-through, while it keeps no buffer (its timer refused,
    /// after its exit flush, a Lua VM per request). Nothing keeps a delta
    /// the dict refuses here, so every refusal is a drop, counted as one:
    /// `failed_writes`, and `dropped_deltas` (no memory),
    /// `dropped_overflow` (the sum in the dict is not finite) or
    /// `dropped_permanent` (anything else). A stored one counts in
    /// `keys_flushed` (and `evictions`). The sync's state and result are
    /// not touched: the shim adds each drop to the error metric itself.
    pub fn write_through(&mut self, key: &[u8], delta: f64) -> Result<Outcome, Rejected> {
        check(key, delta)?;
        match self.dict.incr(key, delta) {
            Ok(w) => {
                self.stats.keys_flushed += 1;
                if w.evicted {
                    self.stats.evictions += 1;
                    Ok(Outcome::StoredEvicted)
                } else {
                    Ok(Outcome::Stored)
                }
            }
            Err(e) => {
                self.stats.failed_writes += 1;
                match e {
                    DictError::NoMemory => self.stats.dropped_deltas += 1,
                    DictError::NotFinite => self.stats.dropped_overflow += 1,
                    DictError::NotANumber | DictError::Other => {
                        self.stats.dropped_permanent += 1;
                    }
                }
                Ok(Outcome::Dropped(e))
            }
        }
    }

    /// Retries pending deltas not yet tried in this sync. `budget` bounds the
    /// time spent (None: all of them); the clock is read after every write,
    /// so a slow dict overruns the budget by one write at most. At least one
    /// key is tried per call, so a sliced caller always progresses. Returns
    /// how many are still untried in this sync, so the caller knows whether
    /// to come back. No key is copied except those that leave the pending
    /// set.
    pub fn retry(&mut self, budget: Option<Duration>) -> usize {
        let start = self.dict.now();
        let sync_id = self.sync_id;
        let mut out_of_time = false;
        let mut untried = 0usize;
        let mut done: Vec<Box<[u8]>> = Vec::new();
        let dict = &mut self.dict;
        let stats = &mut self.stats;
        let evicted_this_sync = &mut self.evicted_this_sync;
        let evicted_in_retry = &mut self.evicted_in_retry;
        for (key, p) in self.pending.iter_mut() {
            if p.tried_in == sync_id {
                continue;
            }
            if out_of_time {
                untried += 1;
                continue;
            }
            p.tried_in = sync_id;
            stats.retries += 1;
            match dict.incr(key, p.delta) {
                Ok(w) => {
                    stats.keys_flushed += 1;
                    if w.evicted {
                        // Reported like the eviction of a first write: the
                        // sync's own count, hence the log and the error
                        // metric (see `end`).
                        stats.evictions += 1;
                        *evicted_this_sync += 1;
                        *evicted_in_retry += 1;
                    }
                    done.push(key.clone());
                }
                Err(e) => {
                    stats.failed_writes += 1;
                    self.sync_ok = false;
                    if e == DictError::NotFinite {
                        stats.dropped_overflow += 1;
                        self.dropped_in_retry += 1;
                        done.push(key.clone());
                    } else if !e.is_transient() {
                        stats.dropped_permanent += 1;
                        self.dropped_in_retry += 1;
                        done.push(key.clone());
                    }
                }
            }
            if let Some(b) = budget
                && dict.now().saturating_duration_since(start) >= b
            {
                out_of_time = true;
            }
        }
        for key in done {
            if self.pending.remove(&key).is_some() {
                self.pending_bytes -= entry_cost(&key);
            }
        }
        self.refresh_gauges();
        untried
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The sum of every pending delta, for the line a worker logs when it
    /// exits with deltas it could not write.
    pub fn pending_sum(&self) -> f64 {
        self.pending.values().map(|p| p.delta).sum()
    }

    /// Pending delta for a key.
    #[cfg(test)]
    pub fn pending_delta(&self, key: &[u8]) -> Option<f64> {
        self.pending.get(key).map(|p| p.delta)
    }

    pub fn dict(&self) -> &D {
        &self.dict
    }

    pub fn dict_mut(&mut self) -> &mut D {
        &mut self.dict
    }

    #[inline]
    fn write_new(&mut self, key: &[u8], delta: f64) -> Outcome {
        match self.dict.incr(key, delta) {
            Ok(w) => self.stored(w),
            Err(e) => self.refused(e, || key.into(), delta),
        }
    }

    #[inline]
    fn stored(&mut self, w: Written) -> Outcome {
        self.stats.keys_flushed += 1;
        if w.evicted {
            self.stats.evictions += 1;
            self.evicted_this_sync += 1;
            Outcome::StoredEvicted
        } else {
            Outcome::Stored
        }
    }

    #[cold]
    #[inline(never)]
    fn refused(&mut self, e: DictError, key: impl FnOnce() -> Box<[u8]>, delta: f64) -> Outcome {
        self.stats.failed_writes += 1;
        self.sync_ok = false;
        let outcome = if e == DictError::NotFinite {
            self.stats.dropped_overflow += 1;
            Outcome::Dropped(e)
        } else if !e.is_transient() {
            self.stats.dropped_permanent += 1;
            Outcome::Dropped(e)
        } else {
            let key = key();
            if self.fits(&key) {
                let tried_in = self.sync_id;
                self.insert_pending(key, Pending { delta, tried_in });
                Outcome::Retained(e)
            } else {
                self.stats.dropped_deltas += 1;
                self.dropped_this_sync += 1;
                Outcome::DroppedCap
            }
        };
        if outcome != Outcome::DroppedCap {
            self.failed_this_sync += 1;
        }
        self.refresh_gauges();
        outcome
    }

    fn fits(&self, key: &[u8]) -> bool {
        self.pending.len() < self.limits.max_keys
            && self.pending_bytes + entry_cost(key) <= self.limits.max_bytes
    }

    fn insert_pending(&mut self, key: Box<[u8]>, p: Pending) {
        self.pending_bytes += entry_cost(&key);
        self.pending.insert(key, p);
        self.refresh_gauges();
    }

    fn refresh_gauges(&mut self) {
        self.stats.pending_keys = self.pending.len() as u64;
        self.stats.pending_bytes = self.pending_bytes as u64;
        if self.pending.is_empty() && self.pending.capacity() > 64 {
            // Key churn must not keep the high-water mark allocated.
            self.pending.shrink_to(64);
        }
    }
}

/// What `add` and `write_through` refuse before touching anything: a key
/// of 0 or more than `MAX_KEY_LEN` bytes, a delta that is not finite.
fn check(key: &[u8], delta: f64) -> Result<(), Rejected> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(Rejected::BadKey);
    }
    if !delta.is_finite() {
        return Err(Rejected::BadDelta);
    }
    Ok(())
}

fn entry_cost(key: &[u8]) -> usize {
    key.len() + ENTRY_OVERHEAD
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A stand-in shared dict: numbers and strings, a capacity in keys, and
    /// an optional key whose write always evicts.
    #[derive(Default)]
    pub struct FakeDict {
        pub nums: HashMap<Vec<u8>, f64>,
        pub strings: Vec<Vec<u8>>,
        pub capacity: Option<usize>,
        pub evict_on: Option<Vec<u8>>,
        pub calls: usize,
        /// With `epoch` set, a stand-in clock: each write costs `write_cost`.
        pub epoch: Option<Instant>,
        pub write_cost: Duration,
    }

    impl Dict for FakeDict {
        fn incr(&mut self, key: &[u8], delta: f64) -> Result<Written, DictError> {
            self.calls += 1;
            if self.strings.iter().any(|s| s == key) {
                return Err(DictError::NotANumber);
            }
            if !self.nums.contains_key(key) && self.capacity.is_some_and(|c| self.nums.len() >= c) {
                return Err(DictError::NoMemory);
            }
            *self.nums.entry(key.to_vec()).or_insert(0.0) += delta;
            Ok(Written {
                evicted: self.evict_on.as_deref() == Some(key),
            })
        }

        fn now(&self) -> Instant {
            match self.epoch {
                Some(t) => t + self.write_cost * u32::try_from(self.calls).unwrap_or(u32::MAX),
                None => Instant::now(),
            }
        }
    }

    fn flusher(dict: FakeDict) -> Flusher<FakeDict> {
        Flusher::new(dict, Limits::default())
    }

    #[test]
    fn stores_and_accumulates() {
        let mut f = flusher(FakeDict::default());
        f.begin();
        assert_eq!(f.add(b"a", 1.0), Ok(Outcome::Stored));
        assert_eq!(f.add(b"a", 2.5), Ok(Outcome::Stored));
        assert_eq!(f.add(b"b", -1.0), Ok(Outcome::Stored));
        assert_eq!(f.end(false).dropped_cap, 0);
        assert_eq!(f.dict().nums[&b"a".to_vec()], 3.5);
        assert_eq!(f.dict().nums[&b"b".to_vec()], -1.0);
        let s = f.stats();
        assert_eq!((s.keys_flushed, s.syncs, s.failed_syncs), (3, 1, 0));
    }

    #[test]
    fn rejects_bad_input_without_touching_the_dict() {
        let mut f = flusher(FakeDict::default());
        assert_eq!(f.add(b"", 1.0), Err(Rejected::BadKey));
        let long = vec![b'k'; MAX_KEY_LEN + 1];
        assert_eq!(f.add(&long, 1.0), Err(Rejected::BadKey));
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(f.add(b"k", bad), Err(Rejected::BadDelta));
        }
        assert_eq!(f.dict().calls, 0);
        let max = vec![b'k'; MAX_KEY_LEN];
        assert_eq!(f.add(&max, 1.0), Ok(Outcome::Stored));
    }

    #[test]
    fn a_write_through_the_dict_refuses_is_a_counted_drop_outside_the_sync() {
        let mut f = flusher(FakeDict {
            capacity: Some(1),
            strings: vec![b"s".to_vec()],
            evict_on: Some(b"a".to_vec()),
            ..FakeDict::default()
        });
        f.begin();
        assert_eq!(f.write_through(b"a", 1.0), Ok(Outcome::StoredEvicted));
        assert_eq!(f.write_through(b"a", 2.0), Ok(Outcome::StoredEvicted));
        assert_eq!(
            f.write_through(b"b", 1.0),
            Ok(Outcome::Dropped(DictError::NoMemory))
        );
        assert_eq!(
            f.write_through(b"s", 1.0),
            Ok(Outcome::Dropped(DictError::NotANumber))
        );
        assert_eq!(f.write_through(b"", 1.0), Err(Rejected::BadKey));
        assert_eq!(f.write_through(b"b", f64::NAN), Err(Rejected::BadDelta));
        assert_eq!(f.dict().nums[&b"a".to_vec()], 3.0);
        assert_eq!(f.pending_delta(b"b"), None, "nothing is kept");
        let s = f.stats();
        assert_eq!(
            (s.failed_writes, s.dropped_deltas, s.dropped_permanent),
            (2, 1, 1)
        );
        assert_eq!((s.keys_flushed, s.evictions, s.pending_keys), (2, 2, 0));
        // The sync it ran beside: not failed, nothing of its own to report.
        let end = f.end(true);
        assert!(end.ok);
        assert_eq!((end.failed, end.evicted, end.dropped_cap), (0, 0, 0));
    }

    #[test]
    fn keys_are_bytes_nul_included() {
        let mut f = flusher(FakeDict::default());
        f.add(b"a\0b", 1.0).unwrap();
        f.add(b"a\0c", 2.0).unwrap();
        f.add(b"a", 4.0).unwrap();
        assert_eq!(f.dict().nums.len(), 3);
        assert_eq!(f.dict().nums[&b"a\0b".to_vec()], 1.0);
    }

    #[test]
    fn transient_failure_is_kept_and_arrives_when_room_returns() {
        let dict = FakeDict {
            capacity: Some(1),
            ..FakeDict::default()
        };
        let mut f = flusher(dict);
        f.begin();
        assert_eq!(f.add(b"a", 1.0), Ok(Outcome::Stored));
        assert_eq!(f.add(b"b", 2.0), Ok(Outcome::Retained(DictError::NoMemory)));
        // A later delta for a pending key merges into it.
        assert_eq!(f.add(b"b", 3.0), Ok(Outcome::Retained(DictError::NoMemory)));
        assert_eq!(f.end(false).dropped_cap, 0);
        assert_eq!(f.pending_delta(b"b"), Some(5.0));
        assert_eq!(f.pending_sum(), 5.0);
        assert_eq!(f.stats().failed_syncs, 1);

        f.dict_mut().capacity = None;
        f.begin();
        assert_eq!(f.retry(None), 0);
        f.end(false);
        assert_eq!(f.dict().nums[&b"b".to_vec()], 5.0);
        assert_eq!(f.pending_delta(b"b"), None);
        let s = f.stats();
        assert_eq!((s.pending_keys, s.pending_bytes, s.retries), (0, 0, 1));
    }

    #[test]
    fn permanent_failure_drops_only_that_key() {
        let dict = FakeDict {
            strings: vec![b"s".to_vec()],
            ..FakeDict::default()
        };
        let mut f = flusher(dict);
        f.begin();
        assert_eq!(
            f.add(b"s", 1.0),
            Ok(Outcome::Dropped(DictError::NotANumber))
        );
        assert_eq!(f.add(b"t", 1.0), Ok(Outcome::Stored));
        f.end(false);
        assert_eq!(f.pending_delta(b"s"), None);
        let s = f.stats();
        assert_eq!((s.dropped_permanent, s.failed_syncs), (1, 1));
        assert_eq!(f.dict().nums[&b"t".to_vec()], 1.0);
    }

    #[test]
    fn cap_bounds_pending_and_counts_drops() {
        let dict = FakeDict {
            capacity: Some(0),
            ..FakeDict::default()
        };
        let limits = Limits {
            max_keys: 3,
            max_bytes: usize::MAX,
        };
        let mut f = Flusher::new(dict, limits);
        f.begin();
        for i in 0..10u8 {
            f.add(&[b'k', i], 1.0).unwrap();
        }
        assert_eq!(f.end(false).dropped_cap, 7);
        let s = f.stats();
        assert_eq!((s.pending_keys, s.dropped_deltas), (3, 7));

        let limits = Limits {
            max_keys: usize::MAX,
            max_bytes: 2 * (ENTRY_OVERHEAD + 1000),
        };
        let mut f = Flusher::new(
            FakeDict {
                capacity: Some(0),
                ..FakeDict::default()
            },
            limits,
        );
        for i in 0..5u8 {
            f.add(&[i; 1000], 1.0).unwrap();
        }
        assert_eq!(f.stats().pending_keys, 2);
        assert!(f.stats().pending_bytes <= limits.max_bytes as u64);
    }

    #[test]
    fn the_flusher_decides_the_result_of_a_sync() {
        let dict = FakeDict {
            capacity: Some(2),
            evict_on: Some(b"e".to_vec()),
            ..FakeDict::default()
        };
        let mut f = flusher(dict);
        // An eviction fails the sync only for a counter with an error metric.
        for (evictions_fail, ok) in [(false, true), (true, false)] {
            f.begin();
            assert_eq!(f.add(b"e", 1.0), Ok(Outcome::StoredEvicted));
            let end = f.end(evictions_fail);
            assert_eq!((end.ok, end.evicted, end.failed), (ok, 1, 0));
        }
        assert_eq!(f.stats().failed_syncs, 1);
        // A delta the full dict refuses is counted, left pending, reported.
        f.begin();
        assert_eq!(f.add(b"a", 1.0), Ok(Outcome::Stored));
        assert_eq!(f.add(b"b", 4.0), Ok(Outcome::Retained(DictError::NoMemory)));
        let end = f.end(false);
        assert!(!end.ok);
        assert_eq!((end.failed, end.pending_keys, end.pending_sum), (1, 1, 4.0));
        // Once it arrives the next sync succeeds, and the counts start over.
        f.dict_mut().capacity = None;
        f.begin();
        f.retry(None);
        let end = f.end(true);
        assert!(end.ok);
        assert_eq!((end.failed, end.evicted, end.pending_keys), (0, 0, 0));
    }

    #[test]
    fn evictions_are_counted() {
        let dict = FakeDict {
            evict_on: Some(b"e".to_vec()),
            ..FakeDict::default()
        };
        let mut f = flusher(dict);
        assert_eq!(f.add(b"e", 1.0), Ok(Outcome::StoredEvicted));
        assert_eq!(f.stats().evictions, 1);
    }

    #[test]
    fn an_eviction_a_retry_causes_is_reported_like_a_first_writes() {
        let mut f = flusher(FakeDict {
            capacity: Some(0),
            ..FakeDict::default()
        });
        f.begin();
        assert_eq!(f.add(b"e", 5.0), Ok(Outcome::Retained(DictError::NoMemory)));
        f.end(true);
        // Room again, but only by evicting: the retry stores with forcible.
        f.dict_mut().capacity = None;
        f.dict_mut().evict_on = Some(b"e".to_vec());
        f.begin();
        assert_eq!(f.retry(None), 0);
        let end = f.end(true);
        assert_eq!(f.dict().nums[&b"e".to_vec()], 5.0);
        assert_eq!((end.evicted, end.evicted_in_retry), (1, 1));
        assert_eq!((end.failed, end.pending_keys), (0, 0));
        assert!(
            !end.ok,
            "an eviction fails the sync of a counter with an error metric"
        );
        assert_eq!(f.stats().evictions, 1);
        assert_eq!(f.stats().failed_syncs, 2);
    }

    #[test]
    fn retry_tries_each_key_once_per_sync_and_respects_budget() {
        // A slow dict on a stand-in clock: 20 µs a write, 2,000 pending keys,
        // a 500 µs budget: each call may write about 25 keys, not all.
        let dict = FakeDict {
            capacity: Some(0),
            epoch: Some(Instant::now()),
            write_cost: Duration::from_micros(20),
            ..FakeDict::default()
        };
        let mut f = flusher(dict);
        f.begin();
        for i in 0..2000u16 {
            f.add(&i.to_le_bytes(), 1.0).unwrap();
        }
        f.end(false);
        f.begin();
        let budget = Some(Duration::from_micros(500));
        let mut calls_made = 0;
        let start = f.dict().calls;
        loop {
            let before = f.dict().calls;
            let left = f.retry(budget);
            let writes = f.dict().calls - before;
            assert!((1..=26).contains(&writes), "{writes} writes in one slice");
            calls_made += 1;
            if left == 0 {
                break;
            }
        }
        assert!(calls_made >= 2000 / 26, "{calls_made} slices");
        assert_eq!(f.retry(None), 0);
        assert_eq!(f.dict().calls - start, 2000, "each key tried exactly once");
        f.end(false);
        assert_eq!(f.stats().pending_keys, 2000);
        // A zero budget still makes progress: one write per call.
        f.begin();
        let before = f.dict().calls;
        assert_eq!(f.retry(Some(Duration::ZERO)), 1999);
        assert_eq!(f.dict().calls - before, 1);
    }

    #[test]
    fn a_sync_begun_during_another_joins_it() {
        let mut f = flusher(FakeDict {
            capacity: Some(0),
            ..FakeDict::default()
        });
        f.begin();
        for i in 0..50u8 {
            f.add(&[i], 1.0).unwrap();
        }
        f.end(false);
        // The dict stays full: the sliced sync retries one key, then a
        // manual sync runs; starting over would retry that key twice.
        f.begin();
        let calls = f.dict().calls;
        assert_eq!(f.retry(Some(Duration::ZERO)), 49);
        f.begin();
        assert_eq!(f.retry(None), 0);
        f.end(false);
        assert_eq!(f.retry(None), 0);
        f.end(false);
        assert_eq!(f.dict().calls - calls, 50, "each key tried once");
        // Now every key holds a string: each retry drops one for good. The
        // drop the sliced part saw before the manual sync joined must still
        // be reported.
        f.dict_mut().capacity = None;
        f.dict_mut().strings = (0..50u8).map(|i| vec![i]).collect();
        f.begin();
        assert_eq!(f.retry(Some(Duration::ZERO)), 49);
        f.begin();
        assert_eq!(f.retry(None), 0);
        let manual = f.end(false);
        assert_eq!(f.retry(None), 0);
        let sliced = f.end(false);
        assert_eq!(manual.dropped_in_retry + sliced.dropped_in_retry, 50);
        assert!(
            !manual.ok && !sliced.ok,
            "a sync with drops claimed success"
        );
        let s = f.stats();
        assert_eq!((s.syncs, s.failed_syncs), (5, 5));
        // The next sync starts clean.
        f.begin();
        f.add(b"x", 1.0).unwrap();
        assert!(f.end(false).ok);
        assert_eq!(f.stats().failed_syncs, 5);
    }

    #[test]
    fn permanent_failure_during_retry_is_reported() {
        let mut f = flusher(FakeDict {
            capacity: Some(0),
            ..FakeDict::default()
        });
        f.begin();
        f.add(b"s", 1.0).unwrap();
        f.end(false);
        f.dict_mut().capacity = None;
        f.dict_mut().strings.push(b"s".to_vec());
        f.begin();
        assert_eq!(f.retry(None), 0);
        assert_eq!(f.end(false).dropped_in_retry, 1);
        let s = f.stats();
        assert_eq!((s.dropped_permanent, s.pending_keys), (1, 0));
        assert_eq!(s.failed_syncs, 2, "the sync that dropped it failed");
    }

    #[test]
    fn overflowing_merge_is_refused_and_keeps_the_old_part() {
        let mut f = flusher(FakeDict {
            capacity: Some(0),
            ..FakeDict::default()
        });
        f.begin();
        f.add(b"k", f64::MAX).unwrap();
        f.end(false);
        f.begin();
        assert_eq!(f.add(b"k", f64::MAX), Ok(Outcome::DroppedOverflow));
        assert_eq!(f.pending_delta(b"k"), Some(f64::MAX));
        f.end(false);
        let s = f.stats();
        assert_eq!((s.dropped_overflow, s.failed_syncs), (1, 2));
    }

    /// Random incr/flush sequences against a plain model: whatever the dict
    /// refuses transiently arrives later, exactly once.
    #[test]
    fn property_random_sequences_match_model() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for round in 0..200 {
            let cap = (rng.next() % 6) as usize;
            let mut f = flusher(FakeDict {
                capacity: Some(cap),
                ..FakeDict::default()
            });
            let mut model: HashMap<Vec<u8>, f64> = HashMap::new();
            for _ in 0..300 {
                let key = vec![b'k', (rng.next() % 10) as u8];
                let step = (rng.next() % 7) as f64 - 3.0;
                match rng.next() % 10 {
                    0 => {
                        f.begin();
                        f.retry(None);
                        f.end(false);
                    }
                    1 => f.dict_mut().capacity = Some((rng.next() % 12) as usize),
                    _ => {
                        f.add(&key, step).unwrap();
                        *model.entry(key).or_insert(0.0) += step;
                    }
                }
            }
            f.dict_mut().capacity = None;
            f.begin();
            f.retry(None);
            f.end(false);
            assert_eq!(f.stats().pending_keys, 0, "round {round}");
            for (k, v) in &model {
                assert_eq!(
                    f.dict().nums.get(k).copied().unwrap_or(0.0),
                    *v,
                    "round {round}"
                );
            }
        }
    }

    pub struct XorShift(pub u64);
    impl XorShift {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }
}
