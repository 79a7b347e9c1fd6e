//! Model checks of the stage's protocol with loom: every interleaving (and
//! every weak-memory outcome loom models) of two small threads.
//! Run: `RUSTFLAGS="--cfg loom" cargo test --release --lib stage::loom`.

use super::*;
use loom::sync::Arc;
use loom::thread;
use std::collections::HashMap;

fn mem(p: Params) -> Arc<Vec<AtomicU64>> {
    Arc::new((0..p.region_words()).map(|_| AtomicU64::new(0)).collect())
}

fn small(slots: usize) -> Params {
    Params {
        slots,
        key_words: 1,
        registry: 2,
        seed: 7,
        anchor: 1,
    }
}

fn alive(_: u32) -> bool {
    true
}

/// Folds one whole round into `out`.
fn round(st: &Stage, w: Worker, out: &mut HashMap<Vec<u8>, f64>) {
    let mut cursor = 0;
    while !st
        .fold(w, &mut cursor, usize::MAX, &alive, |k, d| {
            *out.entry(k.to_vec()).or_insert(0.0) += d;
        })
        .done
    {}
}

#[test]
fn publish_vs_publish_on_the_same_new_key() {
    loom::model(|| {
        let p = small(2);
        let m = mem(p);
        let st = Stage::init(&m, p).unwrap();
        let a = st.register(1, &alive).unwrap();
        let b = st.register(2, &alive).unwrap();
        let m2 = m.clone();
        let t = thread::spawn(move || {
            let st = Stage::attach(&m2, 1).unwrap();
            st.publish(b, b"k", 2.0)
        });
        let ra = st.publish(a, b"k", 1.0);
        let rb = t.join().unwrap();
        let mut out = HashMap::new();
        round(&st, a, &mut out);
        let staged: f64 = [(ra, 1.0), (rb, 2.0)]
            .iter()
            .filter(|(r, _)| *r == Published::Staged)
            .map(|(_, d)| d)
            .sum();
        assert_eq!(staged, 3.0, "two slots: both fit");
        assert_eq!(out.get(&b"k".to_vec()).copied().unwrap_or(0.0), staged);
    });
}

#[test]
fn publish_vs_fold_loses_and_doubles_nothing() {
    loom::model(|| {
        let p = small(1);
        let m = mem(p);
        let st = Stage::init(&m, p).unwrap();
        let folder = st.register(1, &alive).unwrap();
        let publisher = st.register(2, &alive).unwrap();
        assert_eq!(st.publish(publisher, b"k", 1.0), Published::Staged);
        let m2 = m.clone();
        let t = thread::spawn(move || {
            let st = Stage::attach(&m2, 1).unwrap();
            st.publish(publisher, b"k", 2.0)
        });
        let mut dict = HashMap::new();
        round(&st, folder, &mut dict);
        let r = t.join().unwrap();
        assert_eq!(r, Published::Staged);
        let folded_now = dict.get(&b"k".to_vec()).copied().unwrap_or(0.0);
        assert!(folded_now == 1.0 || folded_now == 3.0, "{folded_now}");
        // dict + what remains in the stage == everything published.
        assert_eq!(folded_now + st.pending(b"k"), 3.0);
        round(&st, folder, &mut dict);
        assert_eq!(dict[&b"k".to_vec()], 3.0);
    });
}

/// The race of a late publisher: "old" is staged by the folder and left
/// idle; `late` (given the slot ref of "old") publishes 10 to it from a
/// second worker while the folder retires, frees and reuses the one slot
/// for "new". Whatever `late` says, "old" holds 1 plus what it says it
/// added, and "new" what its publish said.
fn late_publisher_race(late: fn(&Stage, Worker, u64) -> Published) {
    loom::model(move || {
        let p = small(1);
        let m = mem(p);
        let st = Stage::init(&m, p).unwrap();
        let folder = st.register(1, &alive).unwrap();
        let stale = st.register(2, &alive).unwrap();
        // "old" sits idle: its next fold retires it.
        let mut old_ref = 0;
        st.publish_many(folder, [(&b"old"[..], 1.0)], |_, _, _, r| old_ref = r);
        let mut dict = HashMap::new();
        for _ in 0..IDLE_FOLDS {
            round(&st, folder, &mut dict);
        }
        let m2 = m.clone();
        let t = thread::spawn(move || {
            let st = Stage::attach(&m2, 1).unwrap();
            late(&st, stale, old_ref)
        });
        // Retire, try to free, then publish a new key into the one slot.
        round(&st, folder, &mut dict);
        round(&st, folder, &mut dict);
        let rn = st.publish(folder, b"new", 100.0);
        let ro = t.join().unwrap();
        for _ in 0..IDLE_FOLDS + 3 {
            round(&st, folder, &mut dict);
        }
        let get = |k: &[u8]| dict.get(k).copied().unwrap_or(0.0);
        let want_old = 1.0 + if ro == Published::Staged { 10.0 } else { 0.0 };
        let want_new = if rn == Published::Staged { 100.0 } else { 0.0 };
        assert_eq!(get(b"old"), want_old, "old: {ro:?} new: {rn:?}");
        assert_eq!(get(b"new"), want_new, "old: {ro:?} new: {rn:?}");
    });
}

#[test]
fn a_stale_publisher_never_adds_into_a_reused_slot() {
    late_publisher_race(|st, w, _| st.publish(w, b"old", 10.0));
}

/// By ref: a ref made before the slot was retired, freed and claimed by
/// another key must not add into it.
#[test]
fn a_stale_ref_never_adds_into_a_reused_slot() {
    late_publisher_race(|st, w, old_ref| {
        let mut out = Published::Full;
        st.publish_refs(w, [(old_ref, 10.0)], |r| out = r);
        out
    });
}

#[test]
fn two_folders_never_double_count() {
    loom::model(|| {
        let p = small(1);
        let m = mem(p);
        let st = Stage::init(&m, p).unwrap();
        let a = st.register(1, &alive).unwrap();
        let b = st.register(2, &alive).unwrap();
        st.publish(a, b"k", 1.0);
        let m2 = m.clone();
        let t = thread::spawn(move || {
            let st = Stage::attach(&m2, 1).unwrap();
            let mut out = HashMap::new();
            round(&st, b, &mut out);
            out.get(&b"k".to_vec()).copied().unwrap_or(0.0)
        });
        let mut out = HashMap::new();
        round(&st, a, &mut out);
        let mine = out.get(&b"k".to_vec()).copied().unwrap_or(0.0);
        let theirs = t.join().unwrap();
        assert_eq!(mine + theirs, 1.0);
    });
}

#[test]
fn lease_takeover_has_one_winner() {
    loom::model(|| {
        let p = small(1);
        let m = mem(p);
        let st = Stage::init(&m, p).unwrap();
        // pid 9 held it until t = 100 and died.
        assert_eq!(st.lease(9, 0, 100), Lease::Held { took_over: None });
        let m2 = m.clone();
        let t = thread::spawn(move || {
            let st = Stage::attach(&m2, 1).unwrap();
            st.lease(2, 150, 1000)
        });
        let mine = st.lease(1, 150, 1000);
        let theirs = t.join().unwrap();
        let held: Vec<_> = [mine, theirs]
            .into_iter()
            .filter(|l| matches!(l, Lease::Held { .. }))
            .collect();
        assert_eq!(held, vec![Lease::Held { took_over: Some(9) }]);
        assert_eq!(st.stats().takeovers, 1);
    });
}
