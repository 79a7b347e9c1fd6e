//! Model checks of the directory's lock with loom: workers that attach the
//! same dict at once make one region, and a holder killed while allocating
//! leaves nothing that the next holder does not free, exactly once.
//! Run: `RUSTFLAGS="--cfg loom" cargo test --release --lib directory::loom`.

use super::*;
use loom::sync::atomic::AtomicBool;
use loom::sync::{Arc, Mutex};
use loom::thread;
use std::collections::BTreeMap;

/// The zone both threads allocate from: block offset -> bytes.
#[derive(Default)]
struct Blocks {
    next: u64,
    live: BTreeMap<u64, u64>,
    allocs: u32,
    frees: u32,
}

#[derive(Clone)]
struct Shared(Arc<Mutex<Blocks>>);

impl Regions for Shared {
    fn alloc(&mut self, bytes: u64) -> Option<u64> {
        let mut b = self.0.lock().unwrap();
        b.next += 1 << 20;
        let at = b.next;
        b.live.insert(at, bytes);
        b.allocs += 1;
        Some(at)
    }
    fn free(&mut self, offset: u64) {
        let mut b = self.0.lock().unwrap();
        assert!(b.live.remove(&offset).is_some(), "double free of {offset}");
        b.frees += 1;
    }
    fn init(&mut self, _: Region, _: &Ident) -> bool {
        true
    }
    fn usage(&mut self, _: Region, _: &Ident) -> Usage {
        Usage::InUse
    }
}

const A: Ident = Ident {
    anchor: 1,
    size: 2,
    hash: 3,
    len: 4,
};

fn words() -> Arc<Vec<AtomicU64>> {
    Arc::new((0..WORDS).map(|_| AtomicU64::new(0)).collect())
}

fn find_or_insert(d: Directory, pid: u32, z: &mut Shared, alive: &dyn Fn(u32) -> bool) -> Region {
    let l = d
        .lock(pid, alive, || {
            thread::yield_now();
            true
        })
        .unwrap();
    match l.find(&A) {
        Some(r) => r,
        None => l.insert(&A, 4096, 4096, z).unwrap().0,
    }
}

#[test]
fn two_workers_attaching_one_dict_make_one_region() {
    loom::model(|| {
        let w = words();
        Directory::init(&w, 9, 4096).unwrap();
        let z = Shared(Arc::new(Mutex::new(Blocks::default())));
        let (w2, mut z2) = (w.clone(), z.clone());
        let t = thread::spawn(move || {
            let d = Directory::attach(&w2, 9, 4096).unwrap();
            find_or_insert(d, 2, &mut z2, &|_| true)
        });
        let d = Directory::attach(&w, 9, 4096).unwrap();
        let mut z1 = z.clone();
        let r1 = find_or_insert(d, 1, &mut z1, &|_| true);
        let r2 = t.join().unwrap();
        assert_eq!(r1, r2);
        let b = z.0.lock().unwrap();
        assert_eq!((b.allocs, b.frees), (1, 0));
    });
}

#[test]
fn a_holder_killed_while_allocating_is_cleaned_up_once() {
    loom::model(|| {
        let w = words();
        Directory::init(&w, 9, 4096).unwrap();
        let z = Shared(Arc::new(Mutex::new(Blocks::default())));
        let dead = Arc::new(AtomicBool::new(false));
        let (w2, mut z2, dead2) = (w.clone(), z.clone(), dead.clone());
        // Worker 1 takes the lock, allocates and records a region, and is
        // killed before the entry is LIVE.
        let t = thread::spawn(move || {
            let d = Directory::attach(&w2, 9, 4096).unwrap();
            let l = d
                .lock(1, &|_| true, || {
                    thread::yield_now();
                    true
                })
                .unwrap();
            let off = z2.alloc(4096).unwrap();
            l.dir.e(0, E_OFFSET).store(0, Release);
            l.dir.e(0, E_STATE).store(ALLOCATING, Release);
            l.dir.e(0, E_BYTES).store(4096, Release);
            l.dir.e(0, E_OFFSET).store(off, Release);
            std::mem::forget(l);
            dead2.store(true, Release);
        });
        let d = Directory::attach(&w, 9, 4096).unwrap();
        let mut z1 = z.clone();
        let alive = |p: u32| p != 1 || !dead.load(Acquire);
        let r = find_or_insert(d, 2, &mut z1, &alive);
        t.join().unwrap();
        let b = z.0.lock().unwrap();
        // Either worker 2 got the lock first (worker 1 then leaves its
        // block behind, to be freed by the next holder) or after the kill
        // (the block is freed once). Never twice, and worker 2's region
        // is alive.
        assert!(b.live.contains_key(&r.offset));
        assert!(b.frees <= 1);
        drop(b);
        let l = d.lock(3, &alive, || false).unwrap();
        l.sweep(&mut z1, false);
        let b = z.0.lock().unwrap();
        assert_eq!(b.live.len(), 1, "only worker 2's region is left");
        assert_eq!(b.allocs - b.frees, 1);
    });
}
