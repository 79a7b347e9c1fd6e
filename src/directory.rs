//! The stage zone's directory: which region of the stage zone serves which
//! counter dict.
//!
//! One `lua_shared_dict` of its own (`resty_counter_stage` unless `new()`
//! names another) holds the stages of every counter dict of its subsystem,
//! so the counter dicts hold only the counters. Its directory is a small
//! block of that zone (found by `zone.rs`) with one entry per region: where
//! the region is, how large, and which counter dict it serves (the dict
//! zone's address and size, its name's hash and length). Nothing here is
//! `unsafe`: the directory is a slice of `AtomicU64` words, and the
//! allocator and the regions' contents are reached through [`Regions`],
//! which `zone.rs` implements over nginx's slab allocator and `stage.rs`.
//!
//! # Layout (words)
//! ```text
//! header  HEADER_WORDS  magic, version, anchor (the stage zone's address),
//!                       own offset, entries, lock, orphans' lost deltas
//!                       (count, sum of magnitudes as f64 bits)
//! entries E x 8         state, offset, bytes, dict address, dict size,
//!                       name hash, name length
//! ```
//!
//! # The lock, and what a kill leaves
//! Every change of an entry, and every registration of a worker in a region
//! (done by the caller while it holds the lock), happens under one lock
//! word holding the holder's pid: taken by CAS `0 -> pid` (AcqRel), taken
//! over from a dead holder by CAS `dead -> pid`, given back by CAS
//! `pid -> 0` (Release). Entry words are stored with Release and loaded
//! with Acquire, so a holder that takes the lock over from a killed one
//! sees what that one stored. A holder killed inside leaves at worst:
//! - an ALLOCATING entry: the next holder frees its region if its offset
//!   was stored; a kill between the allocator's return and that store
//!   leaks that one region;
//! - a LIVE entry whose region registered nobody: an orphan, reclaimed by
//!   the next sweep.
//!
//! An entry is marked FREE before its region is freed, so a kill between
//! the two leaks the region rather than freeing it twice. These two short
//! windows are the only leaks a kill can cause (`tests/directory_crash.rs`:
//! 0 to 3 blocks in about 2,000 SIGKILLs). A region whose
//! header does not check out is neither used nor freed: its entry keeps
//! track of the space.
//!
//! # Orphans
//! A LIVE region in which no live process is registered is an orphan: its
//! dict went away at a reload (removed, renamed or resized), or all its
//! workers did. Exiting workers fold their region empty, so an orphan is
//! usually empty, and an empty orphan is freed by any sweep. One that
//! still holds deltas (its workers were killed) is freed only when an
//! attach needs the room; its deltas are then counted as lost in the
//! header.

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering};

use Ordering::{AcqRel, Acquire, Relaxed, Release};

/// "rcstdir1" as a little-endian word.
pub const MAGIC: u64 = u64::from_le_bytes(*b"rcstdir1");
/// Bumped when the layout changes.
pub const LAYOUT_VERSION: u64 = 1;
/// Words before the first entry.
pub const HEADER_WORDS: usize = 16;
/// Words per entry.
pub const ENTRY_WORDS: usize = 8;
/// Entries: counter dicts (and, during a reload, their old regions) one
/// stage zone serves.
pub const ENTRIES: usize = 64;
/// Words of a directory.
pub const WORDS: usize = HEADER_WORDS + ENTRIES * ENTRY_WORDS;

const H_MAGIC: usize = 0;
const H_VERSION: usize = 1;
const H_ANCHOR: usize = 2;
const H_SELF: usize = 3;
const H_ENTRIES: usize = 4;
const H_LOCK: usize = 5;
const H_LOST_EVENTS: usize = 6;
const H_LOST_AMOUNT: usize = 7;

const E_STATE: usize = 0;
const E_OFFSET: usize = 1;
const E_BYTES: usize = 2;
const E_ANCHOR: usize = 3;
const E_SIZE: usize = 4;
const E_HASH: usize = 5;
const E_LEN: usize = 6;

const FREE: u64 = 0;
const ALLOCATING: u64 = 1;
const LIVE: u64 = 2;

/// Which counter dict a region serves: its zone's address and size, and its
/// name's hash and length. A dict resized or renamed at a reload is a new
/// zone, so it gets a new region, and its old one becomes an orphan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ident {
    pub anchor: u64,
    pub size: u64,
    pub hash: u64,
    pub len: u64,
}

impl Ident {
    /// The identity of the dict zone at `anchor` of `size` bytes named `name`.
    pub fn new(anchor: u64, size: u64, name: &[u8]) -> Self {
        // FNV-1a, 64 bits: names are configuration, not request data.
        let hash = name.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
        Ident {
            anchor,
            size,
            hash,
            len: name.len() as u64,
        }
    }
}

/// A region of the stage zone: its offset from the zone's start and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub bytes: u64,
}

/// What a region holds, as seen by [`Regions::usage`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Usage {
    /// A live process is registered in it.
    InUse,
    /// Nobody live is registered; `pending` deltas summing to `sum` (in
    /// magnitude) are still in it.
    Orphan { pending: u64, sum: f64 },
    /// Its header does not check out: neither used nor freed.
    Untrusted,
}

/// The zone's allocator and the regions' contents, as the directory needs
/// them (`zone.rs` over nginx, a stand-in in the tests).
pub trait Regions {
    /// `bytes` zeroed bytes of the zone: their offset, or `None`.
    fn alloc(&mut self, bytes: u64) -> Option<u64>;
    /// Gives back what `alloc` returned.
    fn free(&mut self, offset: u64);
    /// Makes a new stage for `id` in a fresh region; false: it could not.
    fn init(&mut self, region: Region, id: &Ident) -> bool;
    /// What the LIVE region `region` made for `id` holds.
    fn usage(&mut self, region: Region, id: &Ident) -> Usage;
}

/// Why a directory is not one, or why an insert failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirError {
    /// Not a directory of this layout, zone and place.
    BadHeader,
    /// Every entry is LIVE and in use.
    Full,
    /// The zone had no room for a region of the smallest size, even after
    /// reclaiming orphans.
    NoRoom,
    /// The region could not be made a stage.
    Init,
}

/// What a sweep reclaimed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Swept {
    /// Regions freed.
    pub freed: u32,
    /// Deltas that were in them (only a sweep under pressure frees those).
    pub lost_events: u64,
    pub lost_amount: f64,
}

/// The directory over its words in the stage zone.
#[derive(Debug, Clone, Copy)]
pub struct Directory<'a> {
    words: &'a [AtomicU64],
}

impl<'a> Directory<'a> {
    /// Writes a new directory into `region` (zeroed memory nobody else
    /// knows yet); the magic is stored last, with Release.
    pub fn init(region: &'a [AtomicU64], anchor: u64, offset: u64) -> Result<Self, DirError> {
        if region.len() < WORDS {
            return Err(DirError::BadHeader);
        }
        region[H_VERSION].store(LAYOUT_VERSION, Relaxed);
        region[H_ANCHOR].store(anchor, Relaxed);
        region[H_SELF].store(offset, Relaxed);
        region[H_ENTRIES].store(ENTRIES as u64, Relaxed);
        region[H_MAGIC].store(MAGIC, Release);
        Ok(Directory { words: region })
    }

    /// Checks a directory found in the zone: magic, version, entries, and
    /// that it was made for this zone (`anchor`) at this place (`offset`).
    pub fn attach(region: &'a [AtomicU64], anchor: u64, offset: u64) -> Result<Self, DirError> {
        let ok = region.len() >= WORDS
            && region[H_MAGIC].load(Acquire) == MAGIC
            && region[H_VERSION].load(Relaxed) == LAYOUT_VERSION
            && region[H_ENTRIES].load(Relaxed) == ENTRIES as u64
            && region[H_ANCHOR].load(Relaxed) == anchor
            && region[H_SELF].load(Relaxed) == offset;
        if ok {
            Ok(Directory { words: region })
        } else {
            Err(DirError::BadHeader)
        }
    }

    /// Unmakes a directory that lost the race to be published, before its
    /// block is freed, so no scan of the zone ever takes it for one.
    pub fn retract(&self) {
        self.words[H_MAGIC].store(0, Release);
    }

    fn e(&self, i: usize, field: usize) -> &AtomicU64 {
        &self.words[HEADER_WORDS + i * ENTRY_WORDS + field]
    }

    /// Takes the lock for `pid`. A holder whose pid is dead is replaced.
    /// While another live process holds it, `again()` is called between
    /// tries (it may wait); `None` once it says false.
    pub fn lock(
        &self,
        pid: u32,
        alive: &dyn Fn(u32) -> bool,
        mut again: impl FnMut() -> bool,
    ) -> Option<Locked<'a>> {
        let cell = &self.words[H_LOCK];
        let me = u64::from(pid);
        loop {
            let cur = cell.load(Acquire);
            let free_or_dead = cur == 0 || cur == me || !alive(cur as u32);
            if free_or_dead && cell.compare_exchange(cur, me, AcqRel, Acquire).is_ok() {
                return Some(Locked {
                    dir: *self,
                    pid: me,
                });
            }
            if !free_or_dead && !again() {
                return None;
            }
        }
    }

    /// LIVE entries and the bytes of their regions (read without the lock:
    /// a report, not a decision).
    pub fn usage(&self) -> (u64, u64) {
        (0..ENTRIES)
            .filter(|&i| self.e(i, E_STATE).load(Acquire) == LIVE)
            .fold((0, 0), |(n, b), i| {
                (n + 1, b + self.e(i, E_BYTES).load(Acquire))
            })
    }

    /// Deltas lost with reclaimed orphans, all time: count and magnitude.
    pub fn orphans_lost(&self) -> (u64, f64) {
        (
            self.words[H_LOST_EVENTS].load(Relaxed),
            f64::from_bits(self.words[H_LOST_AMOUNT].load(Relaxed)),
        )
    }
}

/// The directory while this process holds its lock; dropping it unlocks.
#[derive(Debug)]
pub struct Locked<'a> {
    dir: Directory<'a>,
    pid: u64,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = self.dir.words[H_LOCK].compare_exchange(self.pid, 0, Release, Relaxed);
    }
}

impl Locked<'_> {
    fn state(&self, i: usize) -> u64 {
        self.dir.e(i, E_STATE).load(Acquire)
    }

    fn ident(&self, i: usize) -> Ident {
        let get = |f| self.dir.e(i, f).load(Acquire);
        Ident {
            anchor: get(E_ANCHOR),
            size: get(E_SIZE),
            hash: get(E_HASH),
            len: get(E_LEN),
        }
    }

    fn region(&self, i: usize) -> Region {
        Region {
            offset: self.dir.e(i, E_OFFSET).load(Acquire),
            bytes: self.dir.e(i, E_BYTES).load(Acquire),
        }
    }

    /// Marks entry `i` FREE, then frees its region (in this order: a kill
    /// in between leaks, never frees twice).
    fn release(&self, i: usize, regions: &mut dyn Regions) {
        let r = self.region(i);
        self.dir.e(i, E_STATE).store(FREE, Release);
        self.dir.e(i, E_OFFSET).store(0, Release);
        if r.offset != 0 {
            regions.free(r.offset);
        }
    }

    /// Frees what a holder killed while allocating left behind.
    fn recover(&self, regions: &mut dyn Regions) {
        for i in 0..ENTRIES {
            if self.state(i) == ALLOCATING {
                self.release(i, regions);
            }
        }
    }

    /// The LIVE region made for `id`, if any.
    pub fn find(&self, id: &Ident) -> Option<Region> {
        (0..ENTRIES)
            .find(|&i| self.state(i) == LIVE && self.ident(i) == *id)
            .map(|i| self.region(i))
    }

    /// Frees orphans: the empty ones always, the ones holding deltas only
    /// under `pressure` (their deltas are then counted as lost).
    pub fn sweep(&self, regions: &mut dyn Regions, pressure: bool) -> Swept {
        self.recover(regions);
        let mut out = Swept::default();
        for i in 0..ENTRIES {
            if self.state(i) != LIVE {
                continue;
            }
            let Usage::Orphan { pending, sum } = regions.usage(self.region(i), &self.ident(i))
            else {
                continue;
            };
            if pending > 0 && !pressure {
                continue;
            }
            self.release(i, regions);
            out.freed += 1;
            out.lost_events += pending;
            out.lost_amount += sum;
        }
        if out.lost_events > 0 {
            let h = &self.dir.words;
            h[H_LOST_EVENTS].fetch_add(out.lost_events, Relaxed);
            let old = f64::from_bits(h[H_LOST_AMOUNT].load(Relaxed));
            h[H_LOST_AMOUNT].store((old + out.lost_amount).to_bits(), Relaxed);
        }
        out
    }

    /// Makes a region for `id`: `want` bytes, or less down to `min` (each
    /// try three quarters of the one before) when the zone has no room for
    /// more. Orphans are reclaimed first when no entry or no room is free.
    /// What the sweep reclaimed comes back with the region.
    pub fn insert(
        &self,
        id: &Ident,
        want: u64,
        min: u64,
        regions: &mut dyn Regions,
    ) -> Result<(Region, Swept), DirError> {
        let mut swept = self.sweep(regions, false);
        let free_entry = |l: &Self| (0..ENTRIES).find(|&i| l.state(i) == FREE);
        let i = match free_entry(self) {
            Some(i) => i,
            None => {
                swept = add(swept, self.sweep(regions, true));
                free_entry(self).ok_or(DirError::Full)?
            }
        };
        self.dir.e(i, E_OFFSET).store(0, Release);
        self.dir.e(i, E_STATE).store(ALLOCATING, Release);
        let mut got = try_sizes(want, min, regions);
        if got.is_none() {
            swept = add(swept, self.sweep(regions, true));
            got = try_sizes(want, min, regions);
        }
        let Some(region) = got else {
            self.dir.e(i, E_STATE).store(FREE, Release);
            return Err(DirError::NoRoom);
        };
        self.dir.e(i, E_BYTES).store(region.bytes, Release);
        self.dir.e(i, E_OFFSET).store(region.offset, Release);
        if !regions.init(region, id) {
            self.release(i, regions);
            return Err(DirError::Init);
        }
        let set = |f, v| self.dir.e(i, f).store(v, Release);
        set(E_ANCHOR, id.anchor);
        set(E_SIZE, id.size);
        set(E_HASH, id.hash);
        set(E_LEN, id.len);
        set(E_STATE, LIVE);
        Ok((region, swept))
    }
}

fn add(a: Swept, b: Swept) -> Swept {
    Swept {
        freed: a.freed + b.freed,
        lost_events: a.lost_events + b.lost_events,
        lost_amount: a.lost_amount + b.lost_amount,
    }
}

/// `want` bytes, then three quarters of that, and so on, down to `min`,
/// in whole 4 KiB pages.
fn try_sizes(want: u64, min: u64, regions: &mut dyn Regions) -> Option<Region> {
    let mut bytes = want.max(min) & !4095;
    while bytes >= min && bytes > 0 {
        if let Some(offset) = regions.alloc(bytes) {
            return Some(Region { offset, bytes });
        }
        bytes = (bytes / 4 * 3) & !4095;
    }
    None
}

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod tests;
