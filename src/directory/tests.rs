//! Single-threaded tests of the directory: find and insert, sizes that
//! shrink to fit, orphans, the lock and what a killed holder leaves.

use super::*;
use std::collections::BTreeMap;

/// A stand-in zone: `room` bytes, allocations by first fit, and for each
/// region whether a live worker uses it and how many deltas it holds.
#[derive(Default)]
struct Zone {
    room: u64,
    next: u64,
    blocks: BTreeMap<u64, u64>,
    in_use: BTreeMap<u64, bool>,
    pending: BTreeMap<u64, u64>,
    untrusted: Vec<u64>,
    frees: Vec<u64>,
    inits: u32,
    fail_init: bool,
}

impl Zone {
    fn with_room(room: u64) -> Self {
        Zone {
            room,
            next: 4096,
            ..Zone::default()
        }
    }

    fn used(&self) -> u64 {
        self.blocks.values().sum()
    }
}

impl Regions for Zone {
    fn alloc(&mut self, bytes: u64) -> Option<u64> {
        if self.used() + bytes > self.room {
            return None;
        }
        let at = self.next;
        self.next += bytes;
        self.blocks.insert(at, bytes);
        Some(at)
    }

    fn free(&mut self, offset: u64) {
        assert!(
            self.blocks.remove(&offset).is_some(),
            "double or bad free of {offset}"
        );
        self.in_use.remove(&offset);
        self.frees.push(offset);
    }

    fn init(&mut self, r: Region, _id: &Ident) -> bool {
        self.inits += 1;
        assert_eq!(self.blocks.get(&r.offset), Some(&r.bytes));
        if self.fail_init {
            return false;
        }
        self.in_use.insert(r.offset, true);
        true
    }

    fn usage(&mut self, r: Region, _id: &Ident) -> Usage {
        if self.untrusted.contains(&r.offset) {
            return Usage::Untrusted;
        }
        if self.in_use.get(&r.offset) == Some(&true) {
            Usage::InUse
        } else {
            let pending = self.pending.get(&r.offset).copied().unwrap_or(0);
            Usage::Orphan {
                pending,
                sum: pending as f64,
            }
        }
    }
}

fn words() -> Vec<AtomicU64> {
    (0..WORDS).map(|_| AtomicU64::new(0)).collect()
}

fn none_alive(_: u32) -> bool {
    false
}

fn all_alive(_: u32) -> bool {
    true
}

const A: Ident = Ident {
    anchor: 0x1000,
    size: 1 << 20,
    hash: 1,
    len: 8,
};
const B: Ident = Ident {
    anchor: 0x2000,
    size: 1 << 20,
    hash: 2,
    len: 8,
};

#[test]
fn a_directory_is_found_only_with_its_zone_and_place() {
    let w = words();
    let d = Directory::init(&w, 7, 4096).unwrap();
    assert!(Directory::attach(&w, 7, 4096).is_ok());
    assert_eq!(
        Directory::attach(&w, 8, 4096).unwrap_err(),
        DirError::BadHeader
    );
    assert_eq!(
        Directory::attach(&w, 7, 8192).unwrap_err(),
        DirError::BadHeader
    );
    assert_eq!(
        Directory::attach(&w[..WORDS - 1], 7, 4096).unwrap_err(),
        DirError::BadHeader
    );
    d.retract();
    assert_eq!(
        Directory::attach(&w, 7, 4096).unwrap_err(),
        DirError::BadHeader
    );
}

#[test]
fn each_dict_gets_one_region_found_again_by_its_identity() {
    let w = words();
    let d = Directory::init(&w, 7, 4096).unwrap();
    let mut z = Zone::with_room(1 << 30);
    let l = d.lock(1, &all_alive, || false).unwrap();
    assert_eq!(l.find(&A), None);
    let (ra, _) = l.insert(&A, 1 << 20, 64 << 10, &mut z).unwrap();
    assert_eq!(ra.bytes, 1 << 20);
    assert_eq!(l.find(&A), Some(ra));
    assert_eq!(l.find(&B), None);
    let (rb, _) = l.insert(&B, 1 << 20, 64 << 10, &mut z).unwrap();
    assert_ne!(ra.offset, rb.offset);
    // The same name in a zone of another size (resized at a reload) is
    // another dict.
    let resized = Ident { size: 2 << 20, ..A };
    assert_eq!(l.find(&resized), None);
    assert_eq!(d.usage(), (2, 2 << 20));
}

#[test]
fn a_region_shrinks_to_the_room_left_and_fails_below_the_minimum() {
    let w = words();
    let d = Directory::init(&w, 7, 4096).unwrap();
    let mut z = Zone::with_room(1 << 20);
    let l = d.lock(1, &all_alive, || false).unwrap();
    let (ra, _) = l.insert(&A, 4 << 20, 64 << 10, &mut z).unwrap();
    assert!(ra.bytes <= 1 << 20 && ra.bytes >= 512 << 10, "{}", ra.bytes);
    assert_eq!(ra.bytes % 4096, 0);
    let left = (1 << 20) - ra.bytes;
    match l.insert(&B, 4 << 20, 64 << 10, &mut z) {
        Ok((rb, _)) => assert!(rb.bytes <= left),
        Err(e) => {
            assert!(left < 64 << 10);
            assert_eq!(e, DirError::NoRoom);
        }
    }
    let w2 = words();
    let d2 = Directory::init(&w2, 7, 4096).unwrap();
    let l2 = d2.lock(1, &all_alive, || false).unwrap();
    let mut tiny = Zone::with_room(32 << 10);
    assert_eq!(
        l2.insert(&A, 1 << 20, 64 << 10, &mut tiny).unwrap_err(),
        DirError::NoRoom
    );
    assert_eq!(l2.find(&A), None, "no entry left behind");
    assert_eq!(d2.usage(), (0, 0));
}

#[test]
fn empty_orphans_are_freed_by_any_sweep_others_only_under_pressure() {
    let w = words();
    let d = Directory::init(&w, 7, 4096).unwrap();
    let mut z = Zone::with_room(1 << 30);
    let l = d.lock(1, &all_alive, || false).unwrap();
    let (ra, _) = l.insert(&A, 1 << 20, 64 << 10, &mut z).unwrap();
    let (rb, _) = l.insert(&B, 1 << 20, 64 << 10, &mut z).unwrap();
    assert_eq!(l.sweep(&mut z, false), Swept::default(), "both in use");
    // A's workers exited (they folded it empty); B's were killed with 5
    // deltas in it.
    z.in_use.insert(ra.offset, false);
    z.in_use.insert(rb.offset, false);
    z.pending.insert(rb.offset, 5);
    let s = l.sweep(&mut z, false);
    assert_eq!((s.freed, s.lost_events), (1, 0));
    assert_eq!(z.frees, vec![ra.offset]);
    assert_eq!(l.find(&A), None);
    assert_eq!(l.find(&B), Some(rb), "kept while it holds deltas");
    let s = l.sweep(&mut z, true);
    assert_eq!((s.freed, s.lost_events, s.lost_amount), (1, 5, 5.0));
    assert_eq!(d.orphans_lost(), (5, 5.0));
    assert_eq!(d.usage(), (0, 0));
}

#[test]
fn an_untrusted_region_is_neither_used_nor_freed() {
    let w = words();
    let d = Directory::init(&w, 7, 4096).unwrap();
    let mut z = Zone::with_room(1 << 30);
    let l = d.lock(1, &all_alive, || false).unwrap();
    let (ra, _) = l.insert(&A, 1 << 20, 64 << 10, &mut z).unwrap();
    z.in_use.insert(ra.offset, false);
    z.untrusted.push(ra.offset);
    l.sweep(&mut z, true);
    assert!(z.frees.is_empty());
    assert_eq!(l.find(&A), Some(ra), "the entry keeps track of the space");
}

#[test]
fn a_full_directory_takes_room_from_orphans_only() {
    let w = words();
    let d = Directory::init(&w, 7, 4096).unwrap();
    let mut z = Zone::with_room(1 << 40);
    let l = d.lock(1, &all_alive, || false).unwrap();
    let mut first = None;
    for i in 0..ENTRIES as u64 {
        let id = Ident { hash: 100 + i, ..A };
        let (r, _) = l.insert(&id, 64 << 10, 64 << 10, &mut z).unwrap();
        first.get_or_insert(r);
    }
    let extra = Ident { hash: 999, ..A };
    assert_eq!(
        l.insert(&extra, 64 << 10, 64 << 10, &mut z).unwrap_err(),
        DirError::Full
    );
    z.in_use.insert(first.unwrap().offset, false);
    z.pending.insert(first.unwrap().offset, 1);
    let (_, swept) = l.insert(&extra, 64 << 10, 64 << 10, &mut z).unwrap();
    assert_eq!((swept.freed, swept.lost_events), (1, 1));
}

#[test]
fn a_region_that_cannot_be_made_a_stage_is_given_back() {
    let w = words();
    let d = Directory::init(&w, 7, 4096).unwrap();
    let mut z = Zone::with_room(1 << 30);
    z.fail_init = true;
    let l = d.lock(1, &all_alive, || false).unwrap();
    assert_eq!(
        l.insert(&A, 1 << 20, 64 << 10, &mut z).unwrap_err(),
        DirError::Init
    );
    assert_eq!(z.used(), 0);
    assert_eq!(z.frees.len(), 1);
    assert_eq!(d.usage(), (0, 0));
}

#[test]
fn the_lock_waits_for_a_live_holder_and_takes_over_from_a_dead_one() {
    let w = words();
    let d = Directory::init(&w, 7, 4096).unwrap();
    let held = d.lock(10, &all_alive, || false).unwrap();
    let mut tries = 0;
    assert!(
        d.lock(20, &all_alive, || {
            tries += 1;
            tries < 3
        })
        .is_none()
    );
    assert_eq!(tries, 3, "asked again() between tries");
    drop(held);
    let held = d.lock(20, &all_alive, || false).unwrap();
    // Holder 20 is killed: its lock is taken over.
    std::mem::forget(held);
    assert!(d.lock(30, &none_alive, || false).is_some());
    assert!(
        d.lock(40, &all_alive, || false).is_some(),
        "released on drop"
    );
}

#[test]
fn a_holder_killed_while_allocating_leaves_nothing_behind() {
    let w = words();
    let d = Directory::init(&w, 7, 4096).unwrap();
    let mut z = Zone::with_room(1 << 30);
    // Holder 10 allocated a region, recorded it, and died before LIVE.
    let l = d.lock(10, &all_alive, || false).unwrap();
    let off = z.alloc(1 << 20).unwrap();
    l.dir.e(3, E_STATE).store(ALLOCATING, Release);
    l.dir.e(3, E_OFFSET).store(off, Release);
    l.dir.e(3, E_BYTES).store(1 << 20, Release);
    std::mem::forget(l);
    let l = d.lock(11, &|p| p != 10, || false).unwrap();
    l.sweep(&mut z, false);
    assert_eq!(z.frees, vec![off], "its region freed once");
    assert_eq!(z.used(), 0);
    assert_eq!(d.usage(), (0, 0));
    // Killed before the offset was recorded: nothing to free, entry reused.
    l.dir.e(5, E_STATE).store(ALLOCATING, Release);
    let (r, _) = l.insert(&A, 1 << 20, 64 << 10, &mut z).unwrap();
    assert_eq!(z.frees.len(), 1);
    assert_eq!(l.find(&A), Some(r));
}

#[test]
fn a_freed_entry_is_marked_free_before_its_region_goes() {
    // A zone that checks, at each free, that no LIVE or ALLOCATING entry
    // still names the block: a kill between the two then leaks, never
    // frees twice.
    struct Watch<'a> {
        inner: Zone,
        dir: &'a [AtomicU64],
    }
    impl Regions for Watch<'_> {
        fn alloc(&mut self, b: u64) -> Option<u64> {
            self.inner.alloc(b)
        }
        fn free(&mut self, offset: u64) {
            for i in 0..ENTRIES {
                let e = |f: usize| self.dir[HEADER_WORDS + i * ENTRY_WORDS + f].load(Acquire);
                assert!(e(E_STATE) == FREE || e(E_OFFSET) != offset, "entry {i}");
            }
            self.inner.free(offset)
        }
        fn init(&mut self, r: Region, id: &Ident) -> bool {
            self.inner.init(r, id)
        }
        fn usage(&mut self, r: Region, id: &Ident) -> Usage {
            self.inner.usage(r, id)
        }
    }
    let w = words();
    let d = Directory::init(&w, 7, 4096).unwrap();
    let mut z = Watch {
        inner: Zone::with_room(1 << 30),
        dir: &w,
    };
    let l = d.lock(1, &all_alive, || false).unwrap();
    let (ra, _) = l.insert(&A, 1 << 20, 64 << 10, &mut z).unwrap();
    z.inner.in_use.insert(ra.offset, false);
    assert_eq!(l.sweep(&mut z, false).freed, 1);
}

#[test]
fn identities_differ_by_name() {
    let a = Ident::new(1, 2, b"counters");
    assert_eq!(a, Ident::new(1, 2, b"counters"));
    assert_ne!(a, Ident::new(1, 2, b"counterz"));
    assert_ne!(a, Ident::new(1, 3, b"counters"));
}
