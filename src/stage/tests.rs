//! Single-threaded tests of every path of the stage.

use super::*;
use std::collections::HashMap;

fn region(p: Params) -> Vec<AtomicU64> {
    (0..p.region_words()).map(|_| AtomicU64::new(0)).collect()
}

fn params(slots: usize) -> Params {
    Params {
        slots,
        key_words: 4,
        registry: 4,
        seed: 0x1234_5678,
        anchor: 0xA11C,
    }
}

fn all_alive(_: u32) -> bool {
    true
}

fn none_alive(_: u32) -> bool {
    false
}

/// Folds whole rounds into a map, returning it.
fn fold_all(st: &Stage, w: Worker, rounds: usize) -> HashMap<Vec<u8>, f64> {
    let mut out = HashMap::new();
    for _ in 0..rounds {
        let mut cursor = 0;
        loop {
            let f = st.fold(w, &mut cursor, 1000, &all_alive, |k, d| {
                *out.entry(k.to_vec()).or_insert(0.0) += d;
            });
            if f.done {
                break;
            }
        }
    }
    out
}

#[test]
fn init_then_attach_validates_the_header() {
    let p = params(16);
    let mem = region(p);
    assert_eq!(
        Stage::attach(&mem, p.anchor).unwrap_err(),
        LayoutError::BadMagic
    );
    let st = Stage::init(&mem, p).unwrap();
    assert_eq!(st.params(), p);
    let again = Stage::attach(&mem, p.anchor).unwrap();
    assert_eq!(again.params(), p);
    assert_eq!(
        Stage::attach(&mem, p.anchor + 1).unwrap_err(),
        LayoutError::BadAnchor
    );
    assert_eq!(
        Stage::attach(&mem[..p.region_words() - 1], p.anchor).unwrap_err(),
        LayoutError::TooSmall
    );
    assert_eq!(
        Stage::attach(&mem[..3], p.anchor).unwrap_err(),
        LayoutError::TooSmall
    );
    mem[H_VERSION].store(LAYOUT_VERSION + 1, Relaxed);
    assert_eq!(
        Stage::attach(&mem, p.anchor).unwrap_err(),
        LayoutError::BadVersion
    );
    mem[H_VERSION].store(LAYOUT_VERSION, Relaxed);
    mem[H_KEY_WORDS].store(0, Relaxed);
    assert_eq!(
        Stage::attach(&mem, p.anchor).unwrap_err(),
        LayoutError::BadParams
    );
    mem[H_KEY_WORDS].store(5, Relaxed);
    assert_eq!(
        Stage::attach(&mem, p.anchor).unwrap_err(),
        LayoutError::TooSmall,
        "sizes that disagree with the stored total"
    );
}

#[test]
fn every_word_of_every_slot_is_its_own_and_the_hot_words_are_packed() {
    let p = Params {
        key_words: 5,
        ..params(7)
    };
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let at = |w: &AtomicU64| (w as *const AtomicU64 as usize - mem.as_ptr() as usize) / 8;
    let mut seen = std::collections::HashSet::new();
    for s in 0..p.slots {
        for field in [S_META, S_DELTA, S_IDLE, S_EPOCH] {
            assert!(seen.insert(at(st.slot(s, field))), "slot {s} field {field}");
        }
        for j in 0..p.key_words {
            assert!(seen.insert(st.key_base(s) + j), "slot {s} key word {j}");
        }
        // Meta and delta side by side, slot after slot: four to a line.
        assert_eq!(at(st.slot(s, S_DELTA)), at(st.slot(s, S_META)) + 1);
        assert_eq!(at(st.slot(s, S_META)), at(st.slot(0, S_META)) + 2 * s);
    }
    let first = HEADER_WORDS + p.registry * ENTRY_WORDS;
    assert_eq!(seen.len(), p.region_words() - first, "no word unused");
    assert!(seen.iter().all(|w| *w >= first && *w < p.region_words()));
}

#[test]
fn init_refuses_bad_params_and_small_regions() {
    let p = params(16);
    let mem = region(p);
    for bad in [
        Params { slots: 0, ..p },
        Params { key_words: 0, ..p },
        Params {
            key_words: MAX_KEY_WORDS + 1,
            ..p
        },
        Params { registry: 0, ..p },
    ] {
        assert_eq!(Stage::init(&mem, bad).unwrap_err(), LayoutError::BadParams);
    }
    assert_eq!(
        Stage::init(&mem, Params { slots: 17, ..p }).unwrap_err(),
        LayoutError::TooSmall
    );
    assert_eq!(Params::slots_for(p.region_words(), 4, 4), 16);
}

#[test]
fn publish_accumulates_and_fold_takes_each_sum_once() {
    let p = params(64);
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let w = st.register(100, &all_alive).unwrap();
    assert_eq!(st.publish(w, b"a", 1.0), Published::Staged);
    assert_eq!(st.publish(w, b"a", 2.5), Published::Staged);
    assert_eq!(st.publish(w, b"a\0", 4.0), Published::Staged);
    assert_eq!(
        st.publish(w, b"0123456789abcdef0123456789ab", -1.0),
        Published::Staged
    );
    assert_eq!(st.pending(b"a"), 3.5);
    let got = fold_all(&st, w, 1);
    assert_eq!(got.len(), 3);
    assert_eq!(got[&b"a".to_vec()], 3.5);
    assert_eq!(got[&b"a\0".to_vec()], 4.0, "keys are bytes, NUL included");
    assert_eq!(got[&b"0123456789abcdef0123456789ab".to_vec()], -1.0);
    assert!(
        fold_all(&st, w, 1).is_empty(),
        "a second fold finds nothing"
    );
    let s = st.stats();
    assert_eq!((s.published, s.folded, s.fill, s.fold_rounds), (4, 3, 3, 2));
}

#[test]
fn publish_many_reports_each_pair() {
    let p = params(8);
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let w = st.register(100, &all_alive).unwrap();
    let long = [b'x'; 33];
    let items: Vec<(&[u8], f64)> = vec![(b"k", 1.0), (&long, 1.0), (b"", 1.0), (b"n", f64::NAN)];
    let mut seen = Vec::new();
    st.publish_many(w, items, |k, _, r, _| seen.push((k.len(), r)));
    assert_eq!(
        seen,
        vec![
            (1, Published::Staged),
            (33, Published::TooLong),
            (0, Published::TooLong),
            (1, Published::TooLong)
        ]
    );
    assert_eq!(st.stats().too_long, 3);
    assert_eq!(st.max_key_len(), 32);
    assert_eq!(st.publish(w, &[b'y'; 32], 1.0), Published::Staged);
}

/// The slot ref `publish_many` gives for `key` (publishing `delta`).
fn ref_of(st: &Stage, w: Worker, key: &[u8], delta: f64) -> u64 {
    let mut out = (Published::Full, 0);
    st.publish_many(w, [(key, delta)], |_, _, r, slot_ref| out = (r, slot_ref));
    assert_eq!(out.0, Published::Staged);
    assert_ne!(out.1, 0, "a staged key has a ref");
    out.1
}

/// What `publish_refs` says of each (ref, delta).
fn by_refs(st: &Stage, w: Worker, items: &[(u64, f64)]) -> Vec<Published> {
    let mut seen = Vec::new();
    st.publish_refs(w, items.iter().copied(), |r| seen.push(r));
    seen
}

#[test]
fn a_ref_adds_into_its_keys_slot_like_the_key() {
    let p = params(64);
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let w = st.register(100, &all_alive).unwrap();
    let keys: Vec<Vec<u8>> = (0..40u8).map(|i| vec![b'k', i]).collect();
    let refs: Vec<u64> = keys.iter().map(|k| ref_of(&st, w, k, 1.0)).collect();
    // Again by key: the same slot, so the same ref.
    for (k, r) in keys.iter().zip(&refs) {
        assert_eq!(ref_of(&st, w, k, 1.0), *r);
    }
    // A batch longer than a prefetch group.
    let items: Vec<(u64, f64)> = refs.iter().map(|r| (*r, 3.0)).collect();
    assert!(
        by_refs(&st, w, &items)
            .iter()
            .all(|r| *r == Published::Staged)
    );
    for k in &keys {
        assert_eq!(st.pending(k), 5.0);
    }
    assert_eq!(st.stats().published, 120);
    let got = fold_all(&st, w, 1);
    assert_eq!(got.len(), 40);
    assert!(got.values().all(|v| *v == 5.0));
}

#[test]
fn a_ref_is_stale_once_its_slot_is_retired_or_reused() {
    let p = params(1);
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let w = st.register(100, &all_alive).unwrap();
    let old = ref_of(&st, w, b"old", 1.0);
    fold_all(&st, w, 1);
    fold_all(&st, w, IDLE_FOLDS as usize);
    assert_eq!(state(st.slot(0, S_META).load(Relaxed)), RETIRED);
    assert_eq!(by_refs(&st, w, &[(old, 5.0)]), vec![Published::Stale]);
    fold_all(&st, w, 1);
    assert_eq!(state(st.slot(0, S_META).load(Relaxed)), EMPTY);
    // The one slot, now another key's: the old ref must not add into it.
    let new = ref_of(&st, w, b"new", 2.0);
    assert_ne!(new, old, "a new claim, a new generation");
    assert_eq!(by_refs(&st, w, &[(old, 5.0)]), vec![Published::Stale]);
    assert_eq!(by_refs(&st, w, &[(new, 1.0)]), vec![Published::Staged]);
    let got = fold_all(&st, w, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[&b"new".to_vec()], 3.0);
}

#[test]
fn a_ref_that_names_no_slot_or_a_bad_delta_is_stale_and_adds_nothing() {
    let p = params(4);
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let w = st.register(100, &all_alive).unwrap();
    let r = ref_of(&st, w, b"k", 1.0);
    let beyond = Stage::slot_ref(4, gen_of(st.slot(0, S_META).load(Relaxed)));
    let seen = by_refs(
        &st,
        w,
        &[
            (0, 1.0),
            (beyond, 1.0),
            (u64::MAX, 1.0),
            (r ^ 1, 1.0),
            (r, f64::NAN),
        ],
    );
    assert!(seen.iter().all(|x| *x == Published::Stale), "{seen:?}");
    assert_eq!(st.pending(b"k"), 1.0);
    // An empty batch is one empty pass.
    assert!(by_refs(&st, w, &[]).is_empty());
    // A sum that would overflow is refused as by key, and not counted:
    // the caller publishes it by key, which counts it.
    assert_eq!(
        by_refs(&st, w, &[(r, f64::MAX), (r, f64::MAX)]),
        vec![Published::Staged, Published::Full]
    );
    assert_eq!(st.stats().full, 0);
}

#[test]
fn a_full_table_sends_the_rest_down_the_direct_path() {
    let p = params(4);
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let w = st.register(100, &all_alive).unwrap();
    let keys: Vec<Vec<u8>> = (0..6u8).map(|i| vec![b'k', i]).collect();
    let results: Vec<_> = keys.iter().map(|k| st.publish(w, k, 1.0)).collect();
    assert_eq!(
        results.iter().filter(|r| **r == Published::Staged).count(),
        4
    );
    assert_eq!(results.iter().filter(|r| **r == Published::Full).count(), 2);
    assert_eq!(st.stats().full, 2);
    assert_eq!(st.stats().fill, 4);
    // A key already staged still adds in a full table.
    let staged = keys
        .iter()
        .zip(&results)
        .find(|(_, r)| **r == Published::Staged)
        .unwrap()
        .0;
    assert_eq!(st.publish(w, staged, 1.0), Published::Staged);
    assert_eq!(st.pending(staged), 2.0);
}

#[test]
fn a_sum_that_overflows_is_refused_and_keeps_the_old_part() {
    let p = params(4);
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let w = st.register(100, &all_alive).unwrap();
    assert_eq!(st.publish(w, b"k", f64::MAX), Published::Staged);
    assert_eq!(st.publish(w, b"k", f64::MAX), Published::Full);
    assert_eq!(st.pending(b"k"), f64::MAX);
}

#[test]
fn idle_slots_are_retired_freed_and_reused() {
    let p = params(1);
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let w = st.register(100, &all_alive).unwrap();
    assert_eq!(st.publish(w, b"old", 1.0), Published::Staged);
    assert_eq!(st.publish(w, b"new", 1.0), Published::Full, "one slot");
    // Round 1 takes the delta; rounds 2..=IDLE_FOLDS+1 count idle folds
    // and retire; the next round frees.
    let got = fold_all(&st, w, 1);
    assert_eq!(got[&b"old".to_vec()], 1.0);
    fold_all(&st, w, IDLE_FOLDS as usize);
    assert_eq!(state(st.slot(0, S_META).load(Relaxed)), RETIRED);
    assert_eq!(
        st.publish(w, b"old", 5.0),
        Published::Full,
        "never adds to a tomb"
    );
    assert_eq!(st.publish(w, b"new", 1.0), Published::Full);
    fold_all(&st, w, 1);
    assert_eq!(state(st.slot(0, S_META).load(Relaxed)), EMPTY);
    assert_eq!(st.stats().reclaimed, 1);
    assert_eq!(st.stats().fill, 0);
    assert_eq!(st.publish(w, b"new", 2.0), Published::Staged);
    assert_eq!(st.pending(b"old"), 0.0);
    let got = fold_all(&st, w, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[&b"new".to_vec()], 2.0);
}

#[test]
fn a_worker_inside_an_older_pass_holds_back_the_free() {
    let p = params(1);
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let folder = st.register(100, &all_alive).unwrap();
    let stale = st.register(200, &all_alive).unwrap();
    st.publish(folder, b"old", 1.0);
    fold_all(&st, folder, 1);
    // The stale publisher enters its pass before the slot is retired.
    st.begin_pass(stale);
    fold_all(&st, folder, IDLE_FOLDS as usize + 3);
    let meta = st.slot(0, S_META).load(Relaxed);
    assert_eq!(state(meta), RETIRED, "freed under a live older pass");
    // Its add cannot land: the delta word is a tomb.
    assert_eq!(
        st.publish_in_pass(stale, b"old", 1.0, &mut [0; MAX_KEY_WORDS]),
        Published::Full
    );
    st.end_pass(stale);
    fold_all(&st, folder, 1);
    assert_eq!(state(st.slot(0, S_META).load(Relaxed)), EMPTY);
    // A dead worker stuck in a pass does not hold it back.
    st.publish(folder, b"x", 1.0);
    st.begin_pass(stale);
    let mut cursor = 0;
    for _ in 0..IDLE_FOLDS + 3 {
        st.fold(folder, &mut cursor, 100, &|pid| pid != 200, |_, _| {});
    }
    assert_eq!(state(st.slot(0, S_META).load(Relaxed)), EMPTY);
}

#[test]
fn a_claim_or_free_left_by_a_dead_worker_is_recovered() {
    let p = params(2);
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let w = st.register(100, &all_alive).unwrap();
    st.slot(0, S_META)
        .store(make_meta(CLAIMED, 1, 999), Relaxed);
    st.slot(0, S_DELTA).store(7.0f64.to_bits(), Relaxed);
    st.slot(1, S_META)
        .store(make_meta(FREEING, 1, 998), Relaxed);
    st.w(ST_FILL).store(2, Relaxed);
    let mut cursor = 0;
    // While the pids live, nothing is touched.
    st.fold(w, &mut cursor, 10, &all_alive, |_, _| {
        panic!("nothing to fold")
    });
    assert_eq!(st.stats().fill, 2);
    st.fold(w, &mut cursor, 10, &none_alive, |_, _| {
        panic!("nothing to fold")
    });
    assert_eq!(st.stats().fill, 0);
    assert_eq!(st.stats().reclaimed, 2);
    for s in 0..2 {
        assert_eq!(state(st.slot(s, S_META).load(Relaxed)), EMPTY);
        assert_eq!(st.slot(s, S_DELTA).load(Relaxed), 0);
    }
}

#[test]
fn a_retirement_cut_short_is_completed_by_the_next_fold() {
    let p = params(1);
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let w = st.register(100, &all_alive).unwrap();
    st.publish(w, b"k", 1.0);
    fold_all(&st, w, 1);
    // A retirer died right after its tomb CAS.
    st.slot(0, S_DELTA).store(TOMB, Relaxed);
    fold_all(&st, w, 1);
    assert_eq!(state(st.slot(0, S_META).load(Relaxed)), RETIRED);
    assert_ne!(st.slot(0, S_EPOCH).load(Relaxed), 0);
    // ...or right after RETIRED, before the epoch word.
    st.slot(0, S_EPOCH).store(0, Relaxed);
    fold_all(&st, w, 1);
    assert_ne!(st.slot(0, S_EPOCH).load(Relaxed), 0);
    fold_all(&st, w, 1);
    assert_eq!(state(st.slot(0, S_META).load(Relaxed)), EMPTY);
}

#[test]
fn a_folder_killed_between_take_and_write_leaves_a_reported_loss() {
    let p = params(8);
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let folder = st.register(100, &all_alive).unwrap();
    let other = st.register(200, &all_alive).unwrap();
    st.publish(other, b"k", 3.0);
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let died = std::panic::catch_unwind(|| {
        let mut cursor = 0;
        st.fold(folder, &mut cursor, 100, &all_alive, |_, _| {
            panic!("killed")
        });
    });
    std::panic::set_hook(prev);
    assert!(died.is_err());
    assert_eq!(st.pending(b"k"), 0.0, "taken before the write");
    assert_eq!(st.reap_dead(&|pid| pid != 100), 1);
    let s = st.stats();
    assert_eq!((s.lost_events, s.lost_amount), (1, 3.0));
    // Reaping again reports nothing more; the entry is free again.
    assert_eq!(st.reap_dead(&|pid| pid != 100), 0);
    assert_eq!(st.stats().lost_events, 1);
    assert!(st.register(300, &all_alive).is_some());
}

#[test]
fn registry_reaps_the_dead_and_takes_over_a_reused_pid() {
    let p = Params {
        registry: 2,
        ..params(4)
    };
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let a = st.register(1, &all_alive).unwrap();
    let b = st.register(2, &all_alive).unwrap();
    assert_ne!(a, b);
    assert_eq!(st.register(3, &all_alive), None, "full of live workers");
    assert_eq!(st.register(0, &all_alive), None);
    assert_eq!(st.register(MAX_PID + 1, &all_alive), None);
    let c = st.register(3, &|pid| pid != 1).unwrap();
    assert_eq!(c.index, a.index);
    // The same pid again (a reused pid): the stale entry is taken over.
    st.entry(b.index, E_INFLIGHT_SLOT).store(1, Relaxed);
    st.entry(b.index, E_INFLIGHT_AMOUNT)
        .store(2.0f64.to_bits(), Relaxed);
    let b2 = st.register(2, &all_alive).unwrap();
    assert_eq!(b2.index, b.index);
    assert_eq!(st.stats().lost_events, 1);
    st.unregister(c);
    assert!(st.register(4, &all_alive).is_some());
}

#[test]
fn lease_is_held_renewed_expires_and_is_taken_over() {
    let p = params(4);
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    assert_eq!(st.lease(10, 1000, 500), Lease::Held { took_over: None });
    assert_eq!(st.lease_owner(), 10);
    assert_eq!(st.lease(11, 1200, 500), Lease::Busy { owner: 10 });
    assert_eq!(st.lease(10, 1400, 500), Lease::Held { took_over: None });
    assert_eq!(st.lease(11, 1899, 500), Lease::Busy { owner: 10 });
    assert_eq!(
        st.lease(11, 1900, 500),
        Lease::Held {
            took_over: Some(10)
        }
    );
    assert_eq!(st.stats().takeovers, 1);
    st.release_lease(10);
    assert_eq!(st.lease_owner(), 11, "only the holder releases");
    st.release_lease(11);
    assert_eq!(st.lease_owner(), 0);
    assert_eq!(st.lease(12, 1901, 500), Lease::Held { took_over: None });
}

#[test]
fn fold_is_resumable_in_slices() {
    let p = params(32);
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let w = st.register(100, &all_alive).unwrap();
    for i in 0..20u8 {
        st.publish(w, &[b'k', i], f64::from(i));
    }
    let mut cursor = 0;
    let mut calls = 0;
    let mut sum = 0.0;
    loop {
        calls += 1;
        let f = st.fold(w, &mut cursor, 5, &all_alive, |_, d| sum += d);
        assert!(f.visited <= 5);
        if f.done {
            break;
        }
    }
    assert_eq!(calls, 32 / 5 + 1);
    assert_eq!(sum, (0..20).sum::<i32>() as f64);
}

#[test]
fn churn_of_many_keys_reuses_slots() {
    let p = params(64);
    let mem = region(p);
    let st = Stage::init(&mem, p).unwrap();
    let w = st.register(100, &all_alive).unwrap();
    let mut truth: HashMap<Vec<u8>, f64> = HashMap::new();
    let mut got: HashMap<Vec<u8>, f64> = HashMap::new();
    // A key lives 1 + IDLE_FOLDS + 1 folds: 4 rounds x 12 keys < 64 slots.
    let mut direct = 0;
    for round in 0..200u32 {
        for i in 0..12u32 {
            let key = format!("key-{}", round * 12 + i).into_bytes();
            *truth.entry(key.clone()).or_insert(0.0) += 1.0;
            if st.publish(w, &key, 1.0) != Published::Staged {
                direct += 1;
                *got.entry(key).or_insert(0.0) += 1.0;
            }
        }
        for (k, d) in fold_all(&st, w, 1) {
            *got.entry(k).or_insert(0.0) += d;
        }
    }
    for (k, d) in fold_all(&st, w, IDLE_FOLDS as usize + 2) {
        *got.entry(k).or_insert(0.0) += d;
    }
    assert_eq!(got, truth);
    assert!(direct < 200, "stage mostly full: {direct} direct writes");
    assert!(st.stats().reclaimed > 2000, "{:?}", st.stats());
    assert_eq!(st.stats().fill, 0);
}

#[test]
fn hash_spreads_keys_and_depends_on_the_seed() {
    let mut a = [0u64; 2];
    pack(b"route-1:200", &mut a);
    let h1 = hash_words(1, &a, 11);
    let h2 = hash_words(2, &a, 11);
    assert_ne!(h1, h2);
    let mut buckets = [0usize; 16];
    for i in 0..16_000u32 {
        let key = format!("k{i}");
        let mut w = [0u64; 1];
        pack(key.as_bytes(), &mut w);
        buckets[fast_range(hash_words(7, &w, key.len()), 16)] += 1;
    }
    assert!(
        buckets.iter().all(|&n| (800..1200).contains(&n)),
        "{buckets:?}"
    );
}

#[test]
fn pack_matches_a_bytewise_packing_for_every_length() {
    let key: Vec<u8> = (1..=40u8).collect();
    for len in 1..=key.len() {
        let mut fast = [0u64; 5];
        let n = pack(&key[..len], &mut fast);
        assert_eq!(n, len.div_ceil(8));
        let mut slow = [0u64; 5];
        for (i, b) in key[..len].iter().enumerate() {
            slow[i / 8] |= u64::from(*b) << (8 * (i % 8));
        }
        assert_eq!(fast[..n], slow[..n], "len {len}");
    }
}
