//! Publish cost of the shared stage, in ns per key (no FFI crossing: the
//! shim's call into Rust is not included). Ignored by `cargo test`; run:
//! `cargo test --release --test stage_bench -- --ignored --nocapture`.
//!
//! K = 20k Prometheus-like keys (about 70 bytes), each published once per
//! round, as a sync does; first from one process, then from several forked
//! processes publishing the same (hot) keys into one MAP_SHARED mapping.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use resty_counter::stage::{Params, Stage};

const K: usize = 20_000;

fn k() -> usize {
    std::env::var("STAGE_BENCH_K")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(K)
}
const ROUNDS: usize = 50;

fn keys() -> Vec<Vec<u8>> {
    (0..k())
        .map(|i| {
            format!(
                "kong_http_requests_total{{service=\"svc-{}\",route=\"r-{i}\",code=\"{}\"}}",
                i % 97,
                200 + i % 5
            )
            .into_bytes()
        })
        .collect()
}

fn params() -> Params {
    Params {
        slots: 32_768,
        key_words: 20,
        registry: 16,
        seed: 0xBE4C,
        anchor: 1,
    }
}

fn shared_region() -> &'static [AtomicU64] {
    let words = params().region_words();
    // SAFETY: an anonymous shared mapping, checked, never unmapped; zeroed
    // memory is a valid AtomicU64 array.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            words * 8,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        std::slice::from_raw_parts(p as *const AtomicU64, words)
    }
}

/// ns per key over ROUNDS rounds of K keys; `batch`: one pass per round
/// (publish_many) instead of one pass per key (publish).
fn measure(st: &Stage, pid: u32, keys: &[Vec<u8>], batch: bool) -> f64 {
    let w = st.register(pid, &|_| true).unwrap();
    let t = Instant::now();
    for _ in 0..ROUNDS {
        if batch {
            st.publish_many(w, keys.iter().map(|k| (&k[..], 1.0)), |_, _, _, _| {});
        } else {
            for k in keys {
                std::hint::black_box(st.publish(w, k, 1.0));
            }
        }
    }
    t.elapsed().as_nanos() as f64 / (ROUNDS * keys.len()) as f64
}

#[test]
#[ignore]
fn publish_ns_per_key() {
    let keys = keys();
    let region = shared_region();
    let st = Stage::init(region, params()).unwrap();
    // Warm: every key claimed once.
    measure(&st, 1, &keys, true);
    eprintln!(
        "1 process, K={}: batch {:.1} ns/key, one pass per key {:.1} ns/key",
        keys.len(),
        measure(&st, 1, &keys, true),
        measure(&st, 1, &keys, false)
    );
    // The same work on a process-private std HashMap, for scale.
    let mut map: std::collections::HashMap<Vec<u8>, f64> =
        keys.iter().map(|k| (k.clone(), 0.0)).collect();
    let t = Instant::now();
    for _ in 0..ROUNDS {
        for k in &keys {
            if let Some(v) = map.get_mut(&k[..]) {
                *v += 1.0;
            }
        }
    }
    let ns = t.elapsed().as_nanos() as f64 / (ROUNDS * keys.len()) as f64;
    eprintln!("baseline: std HashMap<Vec<u8>, f64> add, same keys: {ns:.1} ns/key");
    for procs in [2usize, 4] {
        let out = shared_region();
        let mut pids = Vec::new();
        for (p, slot) in out.iter().enumerate().take(procs) {
            // SAFETY: the child only publishes and writes its figure into
            // the shared mapping, then _exits.
            match unsafe { libc::fork() } {
                0 => {
                    let ns = measure(&st, 100 + p as u32, &keys, true);
                    slot.store(ns.to_bits(), std::sync::atomic::Ordering::SeqCst);
                    // SAFETY: ends the forked child without the harness.
                    unsafe { libc::_exit(0) }
                }
                -1 => panic!("fork"),
                pid => pids.push(pid),
            }
        }
        for pid in pids {
            let mut status = 0;
            // SAFETY: our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
        }
        let figures: Vec<String> = (0..procs)
            .map(|p| {
                let ns = f64::from_bits(out[p].load(std::sync::atomic::Ordering::SeqCst));
                format!("{ns:.1}")
            })
            .collect();
        eprintln!(
            "{procs} processes at once, same K={} hot keys, batch: {} ns/key each",
            keys.len(),
            figures.join(" / ")
        );
    }
    let s = st.stats();
    eprintln!("{s:?}");
    assert_eq!(s.full + s.too_long, 0, "{s:?}");
}

/// Fold cost: one round over a region of 4 slots per key (as `make
/// bench`'s scaling figure sizes it), every key with a delta, in ns per
/// slot walked and per key folded (the sink only sums: no dict write).
#[test]
#[ignore]
fn fold_ns_per_slot() {
    let keys = keys();
    let p = Params {
        slots: keys.len() * 4,
        ..params()
    };
    let words = p.region_words();
    let region: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(0)).collect();
    let st = Stage::init(&region, p).unwrap();
    let w = st.register(1, &|_| true).unwrap();
    let mut best = f64::MAX;
    let mut sum = 0.0;
    for _ in 0..ROUNDS {
        st.publish_many(w, keys.iter().map(|k| (&k[..], 1.0)), |_, _, _, _| {});
        let mut cursor = 0;
        let t = Instant::now();
        let out = st.fold(w, &mut cursor, usize::MAX, &|_| true, |_, d| sum += d);
        let ns = t.elapsed().as_nanos() as f64;
        assert!(out.done);
        best = best.min(ns);
    }
    std::hint::black_box(sum);
    eprintln!(
        "fold, K={} keys in {} slots: best round {:.2} ms, {:.1} ns/slot, {:.1} ns/key",
        keys.len(),
        p.slots,
        best / 1e6,
        best / p.slots as f64,
        best / keys.len() as f64
    );
}
