//! The shared stage: a fixed-size lock-free hash table in shared memory
//! where every worker adds its `(key, delta)` pairs at sync time, and from
//! which one worker (the lease holder) folds each key's sum into the dict
//! once per interval, so the dict sees one write per key, not one per
//! worker and key.
//!
//! The region is a slice of `AtomicU64` words (keys are packed into words
//! too), so nothing here is `unsafe` (the one CPU hint it uses, a prefetch,
//! is in `ffi.rs`); `zone.rs` finds the memory. See
//! `docs/DESIGN.md` for the picture, the failure table and the sizing.
//!
//! # Layout (words)
//! ```text
//! header   HEADER_WORDS   magic, version, sizes, seed, anchor | lease |
//!                         global epoch | stats (each group on its own line)
//! registry R x 8          per worker: pid, announced epoch, in-flight slot,
//!                         in-flight amount (one cache line each)
//! hot      N x 2          per slot: meta, delta (f64 bits); four slots to a
//!                         cache line
//! cold     N x (2 + KW)   per slot: idle folds, retire epoch, KW key words
//!                         (bytes little-endian, zero padded)
//! ```
//! A publish by ref and the fold's walk over free slots read the hot words
//! only: 16 bytes a slot, so the lines and pages they touch are a tenth of
//! the region's; the cold words are read for a key (compare, fold).
//!
//! # Slot states (the meta word)
//! `state` (3 bits) | `gen` (21 bits, bumped at every claim) | payload (40):
//! EMPTY -> CLAIMED(pid) -> READY(len, tag) -> RETIRED -> FREEING(pid) -> EMPTY.
//! A CLAIMED or FREEING slot whose pid is dead is freed by the next folder.
//!
//! # Orderings, field by field
//! - `meta`: claimed by CAS (AcqRel); READY stored with Release after the key
//!   words and the first delta, read with Acquire, so a reader that sees
//!   READY sees the key. RETIRED by CAS (AcqRel) before the retirer's SeqCst
//!   fence (see epochs).
//! - `delta`: f64 bits, or `TOMB`. Publishers add by CAS (AcqRel) and never
//!   add to `TOMB`; the folder takes by CAS `d -> 0` (AcqRel) after recording
//!   `d` in its registry entry; retire is CAS `0 -> TOMB`. Each unit of a
//!   delta is moved by exactly one successful CAS, so nothing is counted
//!   twice.
//! - key words, `idle`: Relaxed; ordered by the meta word's Release/Acquire.
//! - `retire epoch`: 0 = unknown, else G + 1, stored with Release after the
//!   SeqCst fence that follows RETIRED; read with Acquire by the freer.
//! - epochs: a pass (publish batch or fold slice) stores its announce word,
//!   then runs a SeqCst fence, then reads slots. A retirer makes the slot
//!   RETIRED, runs a SeqCst fence, then reads the global epoch G. By the
//!   fence rules, a pass whose announce the freer does not see as `<= G`
//!   (idle, newer, or dead) reads RETIRED or later for that slot, so it
//!   never holds a key it compared in a slot that gets reused.
//! - slot refs: a publish by ref reads `meta` (Acquire) inside a pass and
//!   adds only to a slot READY under the ref's generation. That is the
//!   keyed publish's READY check with the key compare replaced by the
//!   generation (every claim bumps it), and by the epochs the slot is not
//!   freed before the pass ends. A ref is sound while its slot was claimed
//!   fewer than 2^21 times since it was made (`REF_SPAN`).
//! - lease, stats, registry pid: CAS / fetch_add, AcqRel or Relaxed (stats
//!   are counters, nothing is ordered by them).

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering, fence};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering, fence};

use Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};

/// "rcstage1" as a little-endian word.
pub const MAGIC: u64 = u64::from_le_bytes(*b"rcstage1");
/// Bumped whenever the layout or the protocol changes.
pub const LAYOUT_VERSION: u64 = 2;
/// Words before the registry.
pub const HEADER_WORDS: usize = 40;
/// Words per registry entry (one 64-byte line).
pub const ENTRY_WORDS: usize = 8;
/// Words of a slot besides its key words: meta and delta (hot), idle and
/// retire epoch (cold).
pub const SLOT_HEAD_WORDS: usize = 4;
/// Words of a slot in the hot array.
const HOT_WORDS: usize = 2;
/// Slots a publish looks at before it gives up (`Full`): keys are request
/// data, so a hostile or unlucky chain costs at most this much.
pub const PROBE_LIMIT: usize = 64;
/// Keys hashed ahead in a batch publish, so their cache misses overlap.
const GROUP: usize = 8;
/// Refs whose slots are touched ahead in a publish by ref: a ref needs
/// no hash, so the misses of a longer run can overlap.
const REF_GROUP: usize = 64;
/// Slots ahead of the fold's walk whose lines it asks for (`touch`).
const FOLD_AHEAD: usize = 16;
/// Folds a slot must stay at delta 0 before it is retired.
pub const IDLE_FOLDS: u64 = 2;
/// The largest key-word count a layout may have (keys up to 2 KiB).
pub const MAX_KEY_WORDS: usize = 256;
/// The delta word of a retired slot: a NaN no finite sum can produce.
pub const TOMB: u64 = 0x7FF8_DEAD_0000_0001;
/// The largest pid the lease word holds (24 bits; Linux's pid_max is 2^22).
pub const MAX_PID: u32 = (1 << 24) - 1;

// Header words.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 1;
const H_SLOTS: usize = 2;
const H_KEY_WORDS: usize = 3;
const H_REGISTRY: usize = 4;
const H_SEED: usize = 5;
const H_ANCHOR: usize = 6;
const H_TOTAL: usize = 7;
const H_LEASE: usize = 8;
const H_EPOCH: usize = 16;
const ST_PUBLISHED: usize = 24;
const ST_FOLDED: usize = 25;
const ST_FULL: usize = 26;
const ST_TOO_LONG: usize = 27;
const ST_RECLAIMED: usize = 28;
const ST_LOST_EVENTS: usize = 29;
const ST_LOST_AMOUNT: usize = 30;
const ST_FILL: usize = 31;
const ST_FOLD_ROUNDS: usize = 32;
const ST_TAKEOVERS: usize = 33;

// Registry entry words.
const E_PID: usize = 0;
const E_ANNOUNCE: usize = 1;
const E_INFLIGHT_SLOT: usize = 2;
const E_INFLIGHT_AMOUNT: usize = 3;

// Slot words.
const S_META: usize = 0;
const S_DELTA: usize = 1;
const S_IDLE: usize = 2;
const S_EPOCH: usize = 3;

// Meta word.
const EMPTY: u64 = 0;
const CLAIMED: u64 = 1;
const READY: u64 = 2;
const RETIRED: u64 = 3;
const FREEING: u64 = 4;
const STATE_MASK: u64 = 0b111;
const GEN_SHIFT: u32 = 3;
const GEN_BITS: u32 = 21;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;
/// Reclaims after which a holder of slot refs drops them all: half of what
/// the generation's 21 bits tell apart.
pub const REF_SPAN: u64 = 1 << (GEN_BITS - 1);
const PAYLOAD_SHIFT: u32 = 24;

const LEASE_EXPIRY_BITS: u32 = 40;
const LEASE_EXPIRY_MASK: u64 = (1 << LEASE_EXPIRY_BITS) - 1;

fn state(meta: u64) -> u64 {
    meta & STATE_MASK
}

fn gen_of(meta: u64) -> u64 {
    (meta >> GEN_SHIFT) & GEN_MASK
}

fn payload(meta: u64) -> u64 {
    meta >> PAYLOAD_SHIFT
}

fn make_meta(state: u64, generation: u64, payload: u64) -> u64 {
    state | ((generation & GEN_MASK) << GEN_SHIFT) | (payload << PAYLOAD_SHIFT)
}

/// READY's payload: key length (16 bits) and 24 bits of the hash.
fn ready_payload(len: usize, hash: u64) -> u64 {
    (len as u64 & 0xFFFF) | ((hash & 0xFF_FFFF) << 16)
}

/// The sizes of a stage; stored in its header and checked on attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Number of slots (keys the stage can hold at once).
    pub slots: usize,
    /// Words per key: keys up to `8 * key_words` bytes are staged.
    pub key_words: usize,
    /// Registry entries: workers that may publish or fold at once.
    pub registry: usize,
    /// Hash seed (random per stage: keys are request data).
    pub seed: u64,
    /// A value the attaching side checks, e.g. the zone's pool address.
    pub anchor: u64,
}

impl Params {
    /// Words of one slot.
    pub fn slot_words(&self) -> usize {
        SLOT_HEAD_WORDS + self.key_words
    }

    /// Words of the whole region for these sizes.
    pub fn region_words(&self) -> usize {
        HEADER_WORDS + self.registry * ENTRY_WORDS + self.slots * self.slot_words()
    }

    /// The most slots `words` words hold with this key size and registry.
    pub fn slots_for(words: usize, key_words: usize, registry: usize) -> usize {
        words.saturating_sub(HEADER_WORDS + registry * ENTRY_WORDS) / (SLOT_HEAD_WORDS + key_words)
    }
}

/// Why a region is not (or cannot become) a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutError {
    /// The region is smaller than the header, or than the sizes need.
    TooSmall,
    /// Sizes out of range (no slots, key words 0 or above the maximum, no
    /// registry).
    BadParams,
    /// No stage magic at the start of the region.
    BadMagic,
    /// A stage of another layout version.
    BadVersion,
    /// The stored anchor differs from the expected one.
    BadAnchor,
}

/// What became of one published delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Added into the stage; the folder will write it.
    Staged,
    /// No room within [`PROBE_LIMIT`] slots, or the sum would not be
    /// finite: the caller writes the delta into the dict itself.
    Full,
    /// The key is longer than the stage's key size, empty, or the delta is
    /// not finite: the caller writes it directly.
    TooLong,
    /// [`publish_refs`](Stage::publish_refs) only: the slot the ref names
    /// no longer holds that key (retired, reused, or the ref is not one):
    /// nothing was added; the caller publishes the pair by key.
    Stale,
}

/// What a lease attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// The caller holds the lease until `now + ttl`. `took_over` is the pid
    /// of a previous holder whose lease had expired, if any.
    Held { took_over: Option<u32> },
    /// Another worker holds it.
    Busy { owner: u32 },
}

/// What one fold slice did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Folded {
    /// Slots looked at.
    pub visited: usize,
    /// Deltas handed to the sink.
    pub folded: usize,
    /// Slots retired, freed or recovered from dead workers.
    pub reclaimed: usize,
    /// The cursor went round the whole table: the fold of this interval is
    /// complete.
    pub done: bool,
}

/// A snapshot of the header's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Deltas added into the stage.
    pub published: u64,
    /// Deltas taken out of the stage and handed to the sink.
    pub folded: u64,
    /// Publishes refused for lack of room (sent down the direct path).
    pub full: u64,
    /// Publishes refused for key size (sent down the direct path).
    pub too_long: u64,
    /// Slots freed for reuse.
    pub reclaimed: u64,
    /// In-flight records of dead folders found (each a possible loss).
    pub lost_events: u64,
    /// Sum of those records' amounts: an upper bound of what was lost.
    pub lost_amount: f64,
    /// Slots in use (claimed, ready or retired, not yet free).
    pub fill: u64,
    /// Complete folds (cursor went round).
    pub fold_rounds: u64,
    /// Leases taken over from an expired holder.
    pub takeovers: u64,
}

/// A stage over a region of shared memory.
#[derive(Clone, Copy)]
pub struct Stage<'a> {
    words: &'a [AtomicU64],
    slots: usize,
    key_words: usize,
    registry: usize,
    seed: u64,
}

impl std::fmt::Debug for Stage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("slots", &self.slots)
            .field("key_words", &self.key_words)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// A worker's registry entry in one stage; made by [`Stage::register`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Worker {
    index: usize,
    pid: u32,
}

impl Worker {
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl<'a> Stage<'a> {
    /// The view of an initialised, checked region.
    fn over(words: &'a [AtomicU64], p: Params) -> Self {
        Stage {
            words,
            slots: p.slots,
            key_words: p.key_words,
            registry: p.registry,
            seed: p.seed,
        }
    }

    /// Writes a new stage's header into `region` (which must be all zero:
    /// fresh memory nobody else uses yet). The magic is stored last with
    /// Release; attach reads it with Acquire.
    pub fn init(region: &'a [AtomicU64], p: Params) -> Result<Self, LayoutError> {
        if p.slots == 0 || p.key_words == 0 || p.key_words > MAX_KEY_WORDS || p.registry == 0 {
            return Err(LayoutError::BadParams);
        }
        if region.len() < p.region_words() {
            return Err(LayoutError::TooSmall);
        }
        let h = |i: usize, v: u64| region[i].store(v, Relaxed);
        h(H_VERSION, LAYOUT_VERSION);
        h(H_SLOTS, p.slots as u64);
        h(H_KEY_WORDS, p.key_words as u64);
        h(H_REGISTRY, p.registry as u64);
        h(H_SEED, p.seed);
        h(H_ANCHOR, p.anchor);
        h(H_TOTAL, p.region_words() as u64);
        h(H_EPOCH, 1);
        region[H_MAGIC].store(MAGIC, Release);
        Ok(Stage::over(region, p))
    }

    /// Validates an existing stage: magic, version, sizes against the
    /// region, and the anchor. Any mismatch refuses (the caller falls back
    /// to the direct path).
    pub fn attach(region: &'a [AtomicU64], anchor: u64) -> Result<Self, LayoutError> {
        if region.len() < HEADER_WORDS {
            return Err(LayoutError::TooSmall);
        }
        if region[H_MAGIC].load(Acquire) != MAGIC {
            return Err(LayoutError::BadMagic);
        }
        if region[H_VERSION].load(Relaxed) != LAYOUT_VERSION {
            return Err(LayoutError::BadVersion);
        }
        let get = |i: usize| usize::try_from(region[i].load(Relaxed)).unwrap_or(usize::MAX);
        let p = Params {
            slots: get(H_SLOTS),
            key_words: get(H_KEY_WORDS),
            registry: get(H_REGISTRY),
            seed: region[H_SEED].load(Relaxed),
            anchor: region[H_ANCHOR].load(Relaxed),
        };
        if p.slots == 0
            || p.key_words == 0
            || p.key_words > MAX_KEY_WORDS
            || p.registry == 0
            || p.registry > 1 << 16
            || p.slots > region.len()
        {
            return Err(LayoutError::BadParams);
        }
        if get(H_TOTAL) != p.region_words() || region.len() < p.region_words() {
            return Err(LayoutError::TooSmall);
        }
        if p.anchor != anchor {
            return Err(LayoutError::BadAnchor);
        }
        Ok(Stage::over(region, p))
    }

    /// The region size a header claims, in words, read before attaching
    /// (so the caller can bound the slice it hands to [`attach`](Self::attach)).
    pub fn stored_words(header: &[AtomicU64]) -> Option<usize> {
        let w = header.get(H_TOTAL)?.load(Acquire);
        usize::try_from(w).ok()
    }

    /// The stage's sizes.
    pub fn params(&self) -> Params {
        Params {
            slots: self.slots,
            key_words: self.key_words,
            registry: self.registry,
            seed: self.seed,
            anchor: self.words[H_ANCHOR].load(Relaxed),
        }
    }

    /// The longest key this stage holds, in bytes.
    pub fn max_key_len(&self) -> usize {
        self.key_words * 8
    }

    fn w(&self, i: usize) -> &AtomicU64 {
        &self.words[i]
    }

    fn entry(&self, e: usize, field: usize) -> &AtomicU64 {
        &self.words[HEADER_WORDS + e * ENTRY_WORDS + field]
    }

    /// The first word of slot `s` in the hot array (meta, delta).
    fn hot_base(&self, s: usize) -> usize {
        HEADER_WORDS + self.registry * ENTRY_WORDS + s * HOT_WORDS
    }

    /// The first word of slot `s` in the cold array (idle, epoch, key).
    fn cold_base(&self, s: usize) -> usize {
        HEADER_WORDS
            + self.registry * ENTRY_WORDS
            + self.slots * HOT_WORDS
            + s * (SLOT_HEAD_WORDS - HOT_WORDS + self.key_words)
    }

    /// The first key word of slot `s`.
    fn key_base(&self, s: usize) -> usize {
        self.cold_base(s) + SLOT_HEAD_WORDS - HOT_WORDS
    }

    /// A field of slot `s`: `S_META` and `S_DELTA` in the hot array,
    /// `S_IDLE` and `S_EPOCH` in the cold one.
    fn slot(&self, s: usize, field: usize) -> &AtomicU64 {
        if field < HOT_WORDS {
            &self.words[self.hot_base(s) + field]
        } else {
            &self.words[self.cold_base(s) + field - HOT_WORDS]
        }
    }

    // ---------------------------------------------------------------
    // Registry
    // ---------------------------------------------------------------

    /// Takes a registry entry for `pid`. An entry already under `pid` is
    /// stale (a dead process whose pid was reused, or this process's own
    /// earlier registration) and is taken over after reporting its
    /// in-flight record. Entries of dead pids (`alive` false) are reaped to
    /// make room. `None`: the registry is full of live workers.
    pub fn register(&self, pid: u32, alive: &dyn Fn(u32) -> bool) -> Option<Worker> {
        if pid == 0 || pid > MAX_PID {
            return None;
        }
        for e in 0..self.registry {
            if self.entry(e, E_PID).load(Acquire) == u64::from(pid) {
                self.report_in_flight(e);
                return Some(self.claim_entry(e, pid));
            }
        }
        for round in 0..2 {
            for e in 0..self.registry {
                let cur = self.entry(e, E_PID).load(Acquire);
                if cur == 0 {
                    if self
                        .entry(e, E_PID)
                        .compare_exchange(0, u64::from(pid), AcqRel, Acquire)
                        .is_ok()
                    {
                        return Some(self.claim_entry(e, pid));
                    }
                } else if round == 0 && !alive(cur as u32) {
                    self.reap_entry(e, cur);
                }
            }
        }
        None
    }

    fn claim_entry(&self, e: usize, pid: u32) -> Worker {
        self.entry(e, E_INFLIGHT_SLOT).store(0, Release);
        self.entry(e, E_ANNOUNCE).store(0, Release);
        Worker { index: e, pid }
    }

    /// Gives a worker's entry back (worker exit). Its in-flight record, if
    /// any, is reported as lost first.
    pub fn unregister(&self, w: Worker) {
        self.report_in_flight(w.index);
        self.entry(w.index, E_ANNOUNCE).store(0, Release);
        let _ = self
            .entry(w.index, E_PID)
            .compare_exchange(u64::from(w.pid), 0, AcqRel, Relaxed);
    }

    /// Reports a dead worker's in-flight record and frees its entry.
    fn reap_entry(&self, e: usize, pid: u64) {
        self.report_in_flight(e);
        let _ = self
            .entry(e, E_PID)
            .compare_exchange(pid, 0, AcqRel, Relaxed);
    }

    /// Whether any registry entry belongs to a live process: a stage
    /// nobody is registered in is an orphan its directory may reclaim.
    pub fn has_live_worker(&self, alive: &dyn Fn(u32) -> bool) -> bool {
        (0..self.registry).any(|e| {
            let pid = self.entry(e, E_PID).load(Acquire);
            pid != 0 && alive(pid as u32)
        })
    }

    /// Deltas still in the stage: how many READY slots hold a non-zero
    /// delta, and the sum of their magnitudes. An orphan with none is
    /// reclaimed at once; one with some only when room is needed, and the
    /// sum is then reported as lost.
    pub fn pending_total(&self) -> (u64, f64) {
        let (mut n, mut sum) = (0u64, 0.0f64);
        for s in 0..self.slots {
            if state(self.slot(s, S_META).load(Acquire)) != READY {
                continue;
            }
            let d = self.slot(s, S_DELTA).load(Acquire);
            if d != TOMB && f64::from_bits(d) != 0.0 {
                n += 1;
                sum += f64::from_bits(d).abs();
            }
        }
        (n, sum)
    }

    /// Reaps every registry entry whose pid is dead: their in-flight
    /// records become reported losses. Returns how many were reaped.
    pub fn reap_dead(&self, alive: &dyn Fn(u32) -> bool) -> usize {
        let mut n = 0;
        for e in 0..self.registry {
            let pid = self.entry(e, E_PID).load(Acquire);
            if pid != 0 && !alive(pid as u32) {
                self.reap_entry(e, pid);
                n += 1;
            }
        }
        n
    }

    /// One swap takes the record, so two reapers never report it twice.
    fn report_in_flight(&self, e: usize) {
        if self.entry(e, E_INFLIGHT_SLOT).swap(0, AcqRel) != 0 {
            let amount = f64::from_bits(self.entry(e, E_INFLIGHT_AMOUNT).load(Acquire));
            self.w(ST_LOST_EVENTS).fetch_add(1, Relaxed);
            add_f64(self.w(ST_LOST_AMOUNT), amount.abs());
        }
    }

    // ---------------------------------------------------------------
    // Epochs
    // ---------------------------------------------------------------

    /// Starts a pass: announces the global epoch, then a SeqCst fence
    /// before any slot is read (see the module docs).
    fn begin_pass(&self, w: Worker) {
        let g = self.w(H_EPOCH).load(Relaxed);
        self.entry(w.index, E_ANNOUNCE).store(g, Relaxed);
        fence(SeqCst);
    }

    /// Ends a pass: Release, so every slot access of the pass happens
    /// before a freer that reads the cleared announce.
    fn end_pass(&self, w: Worker) {
        self.entry(w.index, E_ANNOUNCE).store(0, Release);
    }

    /// Whether a slot retired at epoch `g` may be freed: every registered
    /// worker is idle, announced a later epoch, or is dead.
    fn quiescent(&self, g: u64, alive: &dyn Fn(u32) -> bool) -> bool {
        (0..self.registry).all(|e| {
            let a = self.entry(e, E_ANNOUNCE).load(Acquire);
            if a == 0 || a > g {
                return true;
            }
            let pid = self.entry(e, E_PID).load(Acquire);
            pid == 0 || !alive(pid as u32)
        })
    }

    // ---------------------------------------------------------------
    // Publish
    // ---------------------------------------------------------------

    /// Adds `delta` to `key`'s sum in the stage, in one pass. See
    /// [`publish_many`](Self::publish_many) for a batch in one pass.
    pub fn publish(&self, w: Worker, key: &[u8], delta: f64) -> Published {
        let mut out = Published::Staged;
        self.publish_many(w, std::iter::once((key, delta)), |_, _, r, _| out = r);
        out
    }

    /// Publishes a batch in one pass (one announce, one fence); `each` is
    /// told what became of every pair, so the caller can write the refused
    /// ones into the dict directly, and, for a staged one, the ref of the
    /// key's slot (see [`publish_refs`](Self::publish_refs); 0 otherwise).
    pub fn publish_many<'k, I, F>(&self, w: Worker, items: I, mut each: F)
    where
        I: IntoIterator<Item = (&'k [u8], f64)>,
        F: FnMut(&'k [u8], f64, Published, u64),
    {
        self.begin_pass(w);
        let (mut staged, mut full, mut long) = (0u64, 0u64, 0u64);
        let mut kw = [0u64; MAX_KEY_WORDS];
        let mut items = items.into_iter();
        // Groups of GROUP keys: hash them all and touch their slots first,
        // so the cache misses of a group overlap instead of queueing.
        let mut group: [(&'k [u8], f64, u64); GROUP] = [(&[], 0.0, 0); GROUP];
        loop {
            let mut n = 0;
            for (key, delta) in items.by_ref().take(GROUP) {
                let hash = if self.stageable(key, delta) {
                    let nw = pack(key, &mut kw);
                    let h = hash_words(self.seed, &kw[..nw], key.len());
                    self.touch(fast_range(h, self.slots));
                    h
                } else {
                    0
                };
                group[n] = (key, delta, hash);
                n += 1;
            }
            for &(key, delta, hash) in &group[..n] {
                let (r, slot_ref) = if self.stageable(key, delta) {
                    let nw = pack(key, &mut kw);
                    self.probe(w, &kw[..nw], key.len(), hash, delta)
                } else {
                    (Published::TooLong, 0)
                };
                match r {
                    Published::Staged => staged += 1,
                    Published::Full => full += 1,
                    Published::TooLong | Published::Stale => long += 1,
                }
                each(key, delta, r, slot_ref);
            }
            if n < GROUP {
                break;
            }
        }
        self.end_pass(w);
        for (i, n) in [(ST_PUBLISHED, staged), (ST_FULL, full), (ST_TOO_LONG, long)] {
            if n > 0 {
                self.w(i).fetch_add(n, Relaxed);
            }
        }
    }

    /// Publishes a batch by slot ref, in one pass: `ref` is what
    /// [`publish_many`](Self::publish_many) said of an earlier publish of
    /// the same key, the slot and the generation it was claimed with. A
    /// slot still READY under that generation holds that key (each claim
    /// bumps the generation), and a slot seen READY in a pass is not freed
    /// before the pass ends (the epochs), so the delta is added as by key:
    /// no key read, no hash, no compare. Otherwise the pair is `Stale` and
    /// nothing was added. The generation has 21 bits: a ref is sound while
    /// its slot was claimed fewer than 2^21 times since it was made, which
    /// the caller ensures by dropping its refs once [`reclaims`](Self::reclaims)
    /// has grown by `REF_SPAN` (every claim after a slot's first follows a
    /// free, which that counter counts).
    pub fn publish_refs<I, F>(&self, w: Worker, items: I, mut each: F)
    where
        I: IntoIterator<Item = (u64, f64)>,
        F: FnMut(Published),
    {
        self.begin_pass(w);
        let mut staged = 0u64;
        let mut items = items.into_iter().peekable();
        let mut group = [(0usize, 0u64, 0.0f64); REF_GROUP];
        loop {
            let mut n = 0;
            for (slot_ref, delta) in items.by_ref().take(REF_GROUP) {
                let (s, g) = self.ref_parts(slot_ref).unwrap_or((usize::MAX, 0));
                if s != usize::MAX {
                    self.touch_meta(s);
                }
                group[n] = (s, g, delta);
                n += 1;
            }
            for &(s, g, delta) in &group[..n] {
                let r = if s == usize::MAX || !delta.is_finite() {
                    Published::Stale
                } else {
                    let meta = self.slot(s, S_META).load(Acquire);
                    if state(meta) == READY && gen_of(meta) == g {
                        match self.add_to(s, delta) {
                            AddResult::Added => Published::Staged,
                            AddResult::Overflow => Published::Full,
                            AddResult::Tomb => Published::Stale,
                        }
                    } else {
                        Published::Stale
                    }
                };
                if r == Published::Staged {
                    staged += 1;
                }
                each(r);
            }
            if items.peek().is_none() {
                break;
            }
        }
        self.end_pass(w);
        // A refused pair is not counted here: the caller publishes it by
        // key, which counts it if it is refused again.
        if staged > 0 {
            self.w(ST_PUBLISHED).fetch_add(staged, Relaxed);
        }
    }

    /// The ref of slot `s` claimed under generation `g`: never 0, below
    /// 2^53 (a Lua number holds it exactly) for any slot count a region
    /// can have.
    fn slot_ref(s: usize, g: u64) -> u64 {
        ((s as u64 + 1) << GEN_BITS) | (g & GEN_MASK)
    }

    /// The slot and generation of a ref, if it names a slot of this stage.
    fn ref_parts(&self, slot_ref: u64) -> Option<(usize, u64)> {
        let s = usize::try_from(slot_ref >> GEN_BITS).ok()?.checked_sub(1)?;
        (s < self.slots).then_some((s, slot_ref & GEN_MASK))
    }

    /// Slots retired, freed or recovered so far (the stats' `reclaimed`),
    /// what a holder of refs watches (see [`publish_refs`](Self::publish_refs)).
    pub fn reclaims(&self) -> u64 {
        self.w(ST_RECLAIMED).load(Relaxed)
    }

    fn stageable(&self, key: &[u8], delta: f64) -> bool {
        !key.is_empty() && key.len() <= self.max_key_len() && delta.is_finite()
    }

    /// Prefetches a slot's first two cache lines (meta and the key's
    /// start) so the misses are under way before the slot is probed. A
    /// prefetch retires at once where a load would hold its place until the
    /// line arrives, so a group's misses overlap: in nginx with 16 workers
    /// and 20k keys, the stage path's CPU fell by about a quarter when two
    /// loads per key became these (docs/DESIGN.md).
    fn touch(&self, s: usize) {
        // Not under loom: prefetches order nothing.
        #[cfg(not(loom))]
        {
            let key = self.key_base(s);
            crate::ffi::prefetch(self.words[self.hot_base(s)].as_ptr());
            crate::ffi::prefetch(self.words[key].as_ptr());
            crate::ffi::prefetch(self.words[(key + 7).min(self.words.len() - 1)].as_ptr());
        }
        #[cfg(loom)]
        let _ = s;
    }

    /// Prefetches a slot's hot words only (meta and delta): all a publish by
    /// ref reads.
    fn touch_meta(&self, s: usize) {
        #[cfg(not(loom))]
        crate::ffi::prefetch(self.words[self.hot_base(s)].as_ptr());
        #[cfg(loom)]
        let _ = s;
    }

    /// The fold's look ahead of its walk: the hot line `4 * FOLD_AHEAD`
    /// slots on, and the key of the slot `FOLD_AHEAD` on if it is READY
    /// (by then its hot line has arrived), so the misses overlap with the
    /// work and free slots cost no cold line.
    fn fold_ahead(&self, s: usize) {
        #[cfg(not(loom))]
        {
            if s + 4 * FOLD_AHEAD < self.slots {
                crate::ffi::prefetch(self.words[self.hot_base(s + 4 * FOLD_AHEAD)].as_ptr());
            }
            if s + FOLD_AHEAD < self.slots
                && state(self.slot(s + FOLD_AHEAD, S_META).load(Relaxed)) == READY
            {
                crate::ffi::prefetch(self.words[self.key_base(s + FOLD_AHEAD)].as_ptr());
            }
        }
        #[cfg(loom)]
        let _ = s;
    }

    #[cfg(all(test, not(loom)))]
    fn publish_in_pass(
        &self,
        w: Worker,
        key: &[u8],
        delta: f64,
        kw: &mut [u64; MAX_KEY_WORDS],
    ) -> Published {
        if !self.stageable(key, delta) {
            return Published::TooLong;
        }
        let nw = pack(key, kw);
        let hash = hash_words(self.seed, &kw[..nw], key.len());
        self.probe(w, &kw[..nw], key.len(), hash, delta).0
    }

    /// Linear probe from the key's home slot: add into its READY slot, or
    /// claim the first EMPTY one.
    fn probe(&self, w: Worker, kw: &[u64], len: usize, hash: u64, delta: f64) -> (Published, u64) {
        let nw = kw.len();
        let want = ready_payload(len, hash);
        let mut s = fast_range(hash, self.slots);
        for i in 0..PROBE_LIMIT.min(self.slots) {
            if i > 0 {
                s += 1;
                if s == self.slots {
                    s = 0;
                }
            }
            let meta = self.slot(s, S_META).load(Acquire);
            match state(meta) {
                READY if payload(meta) == want && self.key_is(s, kw) => {
                    match self.add_to(s, delta) {
                        AddResult::Added => {
                            return (Published::Staged, Self::slot_ref(s, gen_of(meta)));
                        }
                        AddResult::Overflow => return (Published::Full, 0),
                        AddResult::Tomb => continue,
                    }
                }
                EMPTY => {
                    let claimed = make_meta(CLAIMED, gen_of(meta) + 1, u64::from(w.pid));
                    if self
                        .slot(s, S_META)
                        .compare_exchange(meta, claimed, AcqRel, Acquire)
                        .is_err()
                    {
                        // Someone else claimed it: it may be this key's
                        // slot by now, but a duplicate further on is fine.
                        continue;
                    }
                    self.w(ST_FILL).fetch_add(1, Relaxed);
                    let base = self.key_base(s);
                    for (j, word) in kw.iter().enumerate() {
                        self.words[base + j].store(*word, Relaxed);
                    }
                    for j in nw..self.key_words {
                        self.words[base + j].store(0, Relaxed);
                    }
                    self.slot(s, S_IDLE).store(0, Relaxed);
                    self.slot(s, S_DELTA).store(delta.to_bits(), Relaxed);
                    self.slot(s, S_META)
                        .store(make_meta(READY, gen_of(claimed), want), Release);
                    return (Published::Staged, Self::slot_ref(s, gen_of(claimed)));
                }
                _ => continue,
            }
        }
        (Published::Full, 0)
    }

    fn key_is(&self, s: usize, kw: &[u64]) -> bool {
        let base = self.key_base(s);
        kw.iter()
            .enumerate()
            .all(|(j, word)| self.words[base + j].load(Relaxed) == *word)
    }

    fn add_to(&self, s: usize, delta: f64) -> AddResult {
        let cell = self.slot(s, S_DELTA);
        let mut cur = cell.load(Relaxed);
        loop {
            if cur == TOMB {
                return AddResult::Tomb;
            }
            let sum = f64::from_bits(cur) + delta;
            if !sum.is_finite() {
                return AddResult::Overflow;
            }
            match cell.compare_exchange_weak(cur, sum.to_bits(), AcqRel, Relaxed) {
                Ok(_) => return AddResult::Added,
                Err(now) => cur = now,
            }
        }
    }

    // ---------------------------------------------------------------
    // Lease
    // ---------------------------------------------------------------

    /// Takes or renews the fold lease for `pid` until `now_ms + ttl_ms`
    /// (`now_ms`: a clock every worker shares, CLOCK_MONOTONIC in ms; the
    /// word keeps its low 40 bits). An expired lease is taken over.
    pub fn lease(&self, pid: u32, now_ms: u64, ttl_ms: u64) -> Lease {
        let cell = self.w(H_LEASE);
        let mine = (u64::from(pid) << LEASE_EXPIRY_BITS)
            | ((now_ms.wrapping_add(ttl_ms.max(1))) & LEASE_EXPIRY_MASK);
        let mut cur = cell.load(Acquire);
        loop {
            let owner = (cur >> LEASE_EXPIRY_BITS) as u32;
            let expiry = cur & LEASE_EXPIRY_MASK;
            let expired = (now_ms & LEASE_EXPIRY_MASK) >= expiry;
            if cur != 0 && owner != pid && !expired {
                return Lease::Busy { owner };
            }
            match cell.compare_exchange(cur, mine, AcqRel, Acquire) {
                Ok(_) => {
                    let took_over = (cur != 0 && owner != pid).then_some(owner);
                    if took_over.is_some() {
                        self.w(ST_TAKEOVERS).fetch_add(1, Relaxed);
                    }
                    return Lease::Held { took_over };
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Gives the lease up if `pid` holds it (worker exit).
    pub fn release_lease(&self, pid: u32) {
        let cell = self.w(H_LEASE);
        let cur = cell.load(Acquire);
        if cur != 0 && (cur >> LEASE_EXPIRY_BITS) as u32 == pid {
            let _ = cell.compare_exchange(cur, 0, AcqRel, Relaxed);
        }
    }

    /// The current lease holder's pid (0: none), whatever its expiry.
    pub fn lease_owner(&self) -> u32 {
        (self.w(H_LEASE).load(Acquire) >> LEASE_EXPIRY_BITS) as u32
    }

    // ---------------------------------------------------------------
    // Fold and reclaim
    // ---------------------------------------------------------------

    /// Folds up to `max_slots` slots from `*cursor` on, in one pass: every
    /// READY slot's non-zero delta is taken (CAS to 0) and then handed to
    /// `sink` — take before write, so a crash between the two loses that one
    /// delta and never counts it twice; the in-flight record makes the loss
    /// reported. Idle slots are retired and freed on the way, and slots of
    /// dead workers recovered. At cursor 0 the global epoch advances.
    pub fn fold(
        &self,
        w: Worker,
        cursor: &mut usize,
        max_slots: usize,
        alive: &dyn Fn(u32) -> bool,
        mut sink: impl FnMut(&[u8], f64),
    ) -> Folded {
        if *cursor >= self.slots {
            *cursor = 0;
        }
        if *cursor == 0 {
            self.w(H_EPOCH).fetch_add(1, AcqRel);
        }
        let mut out = Folded::default();
        let mut key = vec![0u8; self.max_key_len()];
        self.begin_pass(w);
        while out.visited < max_slots.max(1) && *cursor < self.slots {
            let s = *cursor;
            *cursor += 1;
            out.visited += 1;
            self.fold_ahead(s);
            self.fold_slot(w, s, alive, &mut key, &mut sink, &mut out);
        }
        self.end_pass(w);
        if *cursor >= self.slots {
            *cursor = 0;
            out.done = true;
            self.w(ST_FOLD_ROUNDS).fetch_add(1, Relaxed);
        }
        if out.folded > 0 {
            self.w(ST_FOLDED).fetch_add(out.folded as u64, Relaxed);
        }
        if out.reclaimed > 0 {
            self.w(ST_RECLAIMED)
                .fetch_add(out.reclaimed as u64, Relaxed);
        }
        out
    }

    fn fold_slot(
        &self,
        w: Worker,
        s: usize,
        alive: &dyn Fn(u32) -> bool,
        key: &mut [u8],
        sink: &mut impl FnMut(&[u8], f64),
        out: &mut Folded,
    ) {
        let meta = self.slot(s, S_META).load(Acquire);
        match state(meta) {
            READY => {
                let cell = self.slot(s, S_DELTA);
                let mut d = cell.load(Acquire);
                if d == TOMB {
                    // A retirer died (or is) between TOMB and RETIRED.
                    self.finish_retire(s, meta);
                    return;
                }
                if d == 0 {
                    let idle = self.slot(s, S_IDLE).fetch_add(1, Relaxed) + 1;
                    if idle >= IDLE_FOLDS && cell.compare_exchange(0, TOMB, AcqRel, Relaxed).is_ok()
                    {
                        self.finish_retire(s, meta);
                    }
                    return;
                }
                let len = (payload(meta) & 0xFFFF) as usize;
                self.read_key(s, &mut key[..len]);
                let rec = self.entry(w.index, E_INFLIGHT_SLOT);
                let amount = self.entry(w.index, E_INFLIGHT_AMOUNT);
                loop {
                    // Record first, then take: a folder killed after the
                    // take leaves a record that its reaper reports.
                    amount.store(d, Relaxed);
                    rec.store(s as u64 + 1, Release);
                    match cell.compare_exchange(d, 0, AcqRel, Acquire) {
                        Ok(_) => break,
                        Err(now) if now == 0 || now == TOMB => {
                            rec.store(0, Release);
                            return;
                        }
                        Err(now) => d = now,
                    }
                }
                self.slot(s, S_IDLE).store(0, Relaxed);
                sink(&key[..len], f64::from_bits(d));
                rec.store(0, Release);
                out.folded += 1;
            }
            RETIRED => {
                let e = self.slot(s, S_EPOCH).load(Acquire);
                if e == 0 {
                    self.finish_retire(s, meta);
                } else if self.quiescent(e - 1, alive) && self.free(s, meta, w.pid) {
                    out.reclaimed += 1;
                }
            }
            CLAIMED | FREEING => {
                let pid = payload(meta) as u32;
                if pid != w.pid && !alive(pid) && self.free(s, meta, w.pid) {
                    out.reclaimed += 1;
                }
            }
            _ => {}
        }
    }

    /// Completes a retirement whoever started it: READY -> RETIRED, then
    /// the SeqCst fence, then the epoch read, then the epoch stored.
    fn finish_retire(&self, s: usize, meta: u64) {
        let m = self.slot(s, S_META);
        if state(meta) == READY {
            let retired = make_meta(RETIRED, gen_of(meta), 0);
            if m.compare_exchange(meta, retired, AcqRel, Acquire).is_err() {
                return;
            }
        }
        fence(SeqCst);
        let g = self.w(H_EPOCH).load(Relaxed);
        let _ = self
            .slot(s, S_EPOCH)
            .compare_exchange(0, g + 1, Release, Relaxed);
    }

    /// Frees a RETIRED slot (or a CLAIMED/FREEING one of a dead pid):
    /// FREEING(me) by CAS on the exact meta seen (its generation makes a
    /// stale freer fail), reset the words, then EMPTY with Release.
    fn free(&self, s: usize, meta: u64, me: u32) -> bool {
        let m = self.slot(s, S_META);
        let freeing = make_meta(FREEING, gen_of(meta), u64::from(me));
        if m.compare_exchange(meta, freeing, AcqRel, Acquire).is_err() {
            return false;
        }
        self.slot(s, S_DELTA).store(0, Relaxed);
        self.slot(s, S_IDLE).store(0, Relaxed);
        self.slot(s, S_EPOCH).store(0, Relaxed);
        m.store(make_meta(EMPTY, gen_of(meta), 0), Release);
        self.w(ST_FILL).fetch_sub(1, Relaxed);
        true
    }

    fn read_key(&self, s: usize, out: &mut [u8]) {
        let base = self.key_base(s);
        for (j, chunk) in out.chunks_mut(8).enumerate() {
            let word = self.words[base + j].load(Relaxed).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    // ---------------------------------------------------------------
    // Inspection
    // ---------------------------------------------------------------

    /// The header's counters.
    pub fn stats(&self) -> Stats {
        let g = |i: usize| self.w(i).load(Relaxed);
        Stats {
            published: g(ST_PUBLISHED),
            folded: g(ST_FOLDED),
            full: g(ST_FULL),
            too_long: g(ST_TOO_LONG),
            reclaimed: g(ST_RECLAIMED),
            lost_events: g(ST_LOST_EVENTS),
            lost_amount: f64::from_bits(g(ST_LOST_AMOUNT)),
            fill: g(ST_FILL),
            fold_rounds: g(ST_FOLD_ROUNDS),
            takeovers: g(ST_TAKEOVERS),
        }
    }

    /// Sum of the deltas still in the stage for `key` (all its slots), for
    /// tests and the crash check. Not part of the protocol.
    pub fn pending(&self, key: &[u8]) -> f64 {
        let mut sum = 0.0;
        let mut buf = vec![0u8; self.max_key_len()];
        for s in 0..self.slots {
            let meta = self.slot(s, S_META).load(Acquire);
            if state(meta) != READY || (payload(meta) & 0xFFFF) as usize != key.len() {
                continue;
            }
            self.read_key(s, &mut buf[..key.len()]);
            let d = self.slot(s, S_DELTA).load(Acquire);
            if buf[..key.len()] == *key && d != TOMB {
                sum += f64::from_bits(d);
            }
        }
        sum
    }
}

enum AddResult {
    Added,
    Tomb,
    Overflow,
}

fn add_f64(cell: &AtomicU64, x: f64) {
    let mut cur = cell.load(Relaxed);
    loop {
        let next = (f64::from_bits(cur) + x).to_bits();
        match cell.compare_exchange_weak(cur, next, Relaxed, Relaxed) {
            Ok(_) => return,
            Err(now) => cur = now,
        }
    }
}

/// Key bytes into little-endian words, the last one zero padded; returns
/// the word count. `key` must fit in `out`.
fn pack(key: &[u8], out: &mut [u64]) -> usize {
    let mut chunks = key.chunks_exact(8);
    let mut n = 0;
    for (word, chunk) in out.iter_mut().zip(&mut chunks) {
        *word = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        n += 1;
    }
    let rest = chunks.remainder().len();
    if rest > 0 {
        out[n] = if key.len() >= 8 {
            // The last 8 bytes, shifted: no byte-wise copy.
            let tail: [u8; 8] = key[key.len() - 8..].try_into().unwrap_or([0; 8]);
            u64::from_le_bytes(tail) >> (8 * (8 - rest))
        } else {
            let mut b = [0u8; 8];
            b[..rest].copy_from_slice(&key[key.len() - rest..]);
            u64::from_le_bytes(b)
        };
        n += 1;
    }
    n
}

/// A seeded hash over the key's words: folded 64x64->128 multiplies (the
/// wyhash mixing step). Not a cryptographic PRF; a chain it makes long
/// costs at most `PROBE_LIMIT` probes and sends the key down the direct
/// path.
fn hash_words(seed: u64, words: &[u64], len: usize) -> u64 {
    const P0: u64 = 0xa076_1d64_78bd_642f;
    const P1: u64 = 0xe703_7ed1_a0b4_28db;
    let mut h = seed ^ P0 ^ (len as u64).wrapping_mul(P1);
    let mut pairs = words.chunks_exact(2);
    for p in &mut pairs {
        h = mum(p[0] ^ P1 ^ h, p[1] ^ seed);
    }
    if let [last] = pairs.remainder() {
        h = mum(*last ^ P1 ^ h, seed ^ P0);
    }
    mum(h ^ P0, (len as u64) ^ P1)
}

fn mum(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

/// `hash mod n` without a division.
fn fast_range(hash: u64, n: usize) -> usize {
    ((u128::from(hash) * n as u128) >> 64) as usize
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;
