//! Crash test of the shared stage: several forked processes run the real
//! protocol on one MAP_SHARED mapping (publish from all, fold by the lease
//! holder into a "dict" that lives in the same mapping), the parent
//! SIGKILLs random children at random moments and respawns them, then
//! checks the counting invariants:
//! - never counted twice: dict + stage <= what was handed to publish, at
//!   every check during the run and at the end;
//! - without kills, after quiescence, dict == what was published;
//! - with kills, what is missing <= the reported lost-in-flight amount +
//!   what killed publishers had handed over but not yet seen published.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use resty_counter::stage::{Lease, Params, Published, Stage};

const KEYS: usize = 48;
const CHILDREN: usize = 4;
const INCARNATIONS: usize = 1024;

/// The shared mapping: control words, then the stage region.
struct Shared {
    words: &'static [AtomicU64],
}

// Control words.
const STOP: usize = 0;
const DICT: usize = 8; // KEYS words: the "dict", integer counts
const HANDED: usize = DICT + KEYS; // per incarnation x KEYS: about to publish
const PUBLISHED: usize = HANDED + INCARNATIONS * KEYS; // ... and done
const CONTROL: usize = PUBLISHED + INCARNATIONS * KEYS;

fn params() -> Params {
    Params {
        slots: 32,
        key_words: 2,
        registry: 16,
        seed: 0x5EED,
        anchor: 42,
    }
}

impl Shared {
    fn new() -> Self {
        let words = CONTROL + params().region_words();
        let len = words * 8;
        // SAFETY: an anonymous shared mapping, checked for failure; it is
        // never unmapped, so the 'static slice over it stays valid, and
        // zero-filled memory is a valid AtomicU64 array.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            Shared {
                words: std::slice::from_raw_parts(p as *const AtomicU64, words),
            }
        }
    }

    fn stage(&self) -> Stage<'static> {
        Stage::attach(&self.words[CONTROL..], 42).unwrap()
    }

    fn w(&self, i: usize) -> &AtomicU64 {
        &self.words[i]
    }

    fn sum(&self, base: usize, key: usize, incarnations: usize) -> u64 {
        (0..incarnations)
            .map(|i| self.w(base + i * KEYS + key).load(SeqCst))
            .sum()
    }
}

fn key(k: usize) -> Vec<u8> {
    format!("key-{k:03}").into_bytes()
}

fn key_index(name: &[u8]) -> usize {
    std::str::from_utf8(&name[4..]).unwrap().parse().unwrap()
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the pid exists.
    let rc = unsafe { libc::kill(pid as i32, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec into a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

fn dict_add(sh: &Shared, name: &[u8], d: f64) {
    assert!(d >= 0.0 && d.fract() == 0.0, "delta {d}");
    sh.w(DICT + key_index(name)).fetch_add(d as u64, SeqCst);
}

/// One child's life: publish and, when it holds the lease, fold.
fn child(sh: &Shared, incarnation: usize, seed: u64) -> ! {
    let st = sh.stage();
    let pid = std::process::id();
    let worker = st.register(pid, &alive).expect("registry has room");
    let mut rng = seed | 1;
    let mut cursor = 0usize;
    let mut iteration = 0u64;
    // The slot refs of keys this child staged, as the shim keeps them: a
    // key with a ref goes by ref, by key again once it is stale.
    let mut refs = std::collections::HashMap::new();
    while sh.w(STOP).load(SeqCst) == 0 {
        iteration += 1;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Keys rotate over time, so old ones go idle and get reclaimed.
        let k = ((now_ms() / 50) as usize * 5 + (rng % 12) as usize) % KEYS;
        let name = key(k);
        let at = incarnation * KEYS + k;
        sh.w(HANDED + at).fetch_add(1, SeqCst);
        let mut r = Published::Stale;
        if let Some(&slot_ref) = refs.get(&k) {
            st.publish_refs(worker, [(slot_ref, 1.0)], |x| r = x);
        }
        if r == Published::Stale {
            refs.remove(&k);
            st.publish_many(worker, [(&name[..], 1.0)], |_, _, x, slot_ref| {
                r = x;
                if x == Published::Staged {
                    refs.insert(k, slot_ref);
                }
            });
        }
        match r {
            Published::Staged => {}
            Published::Full | Published::TooLong | Published::Stale => dict_add(sh, &name, 1.0),
        }
        sh.w(PUBLISHED + at).fetch_add(1, SeqCst);
        if iteration % 16 == 0
            && let Lease::Held { took_over } = st.lease(pid, now_ms(), 20)
        {
            if took_over.is_some() {
                st.reap_dead(&alive);
            }
            // A dict write takes a while: kills land mid-fold too.
            st.fold(worker, &mut cursor, 8, &alive, |name, d| {
                std::thread::sleep(Duration::from_micros(20));
                dict_add(sh, name, d)
            });
        }
        if rng % 64 == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    st.release_lease(pid);
    st.unregister(worker);
    // SAFETY: _exit ends the forked child without running the parent's
    // atexit handlers or test harness code.
    unsafe { libc::_exit(0) }
}

fn spawn(sh: &Shared, incarnation: usize) -> i32 {
    // SAFETY: fork in a test process; the child only runs `child`, which
    // touches the shared mapping and ends in _exit.
    match unsafe { libc::fork() } {
        -1 => panic!("fork failed"),
        0 => child(sh, incarnation, 0x9E37_79B9 ^ (incarnation as u64) << 20),
        pid => pid,
    }
}

fn kill_and_reap(pid: i32, signal: i32) {
    // SAFETY: pid is our own child; waitpid reaps it so its pid is gone.
    unsafe {
        libc::kill(pid, signal);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
}

/// dict + stage <= handed, read in that order (a delta moving from the
/// stage into the dict between the reads is seen at most once).
fn check_never_twice(sh: &Shared, st: &Stage, incarnations: usize) {
    for k in 0..KEYS {
        let dict = sh.w(DICT + k).load(SeqCst) as f64;
        let staged = st.pending(&key(k));
        let handed = sh.sum(HANDED, k, incarnations) as f64;
        assert!(
            dict + staged <= handed,
            "key {k}: dict {dict} + stage {staged} > handed {handed}"
        );
    }
}

struct Outcome {
    handed: u64,
    published_by_killed: u64,
    handed_by_killed: u64,
    dict: u64,
    lost_amount: f64,
    kills: usize,
}

fn run(kill: bool, seconds: f64) -> Outcome {
    let sh = Shared::new();
    let st = Stage::init(&sh.words[CONTROL..], params()).unwrap();
    let mut live: Vec<(i32, usize)> = (0..CHILDREN).map(|i| (spawn(&sh, i), i)).collect();
    let mut next = CHILDREN;
    let mut killed = Vec::new();
    let mut rng = 0xC0FF_EE11_u64;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_micros(500 + rng % 20_000));
        check_never_twice(&sh, &st, next);
        if kill && next < INCARNATIONS {
            // Half the kills aim at the lease holder, to land mid-fold.
            let owner = st.lease_owner() as i32;
            let victim = match live.iter().position(|(pid, _)| *pid == owner) {
                Some(at) if rng & 0x100 != 0 => at,
                _ => (rng >> 9) as usize % live.len(),
            };
            let (pid, inc) = live[victim];
            kill_and_reap(pid, libc::SIGKILL);
            killed.push(inc);
            live[victim] = (spawn(&sh, next), next);
            next += 1;
        }
    }
    sh.w(STOP).store(1, SeqCst);
    for (pid, _) in &live {
        // SAFETY: our own child, reaped once.
        unsafe {
            let mut status = 0;
            libc::waitpid(*pid, &mut status, 0);
            assert!(libc::WIFEXITED(status), "child {pid} did not exit cleanly");
        }
    }
    // Quiescence: the parent folds whatever is left.
    let me = st.register(std::process::id(), &alive).unwrap();
    st.reap_dead(&alive);
    for _ in 0..6 {
        let mut cursor = 0;
        while !st
            .fold(me, &mut cursor, 1000, &alive, |name, d| {
                dict_add(&sh, name, d)
            })
            .done
        {}
    }
    check_never_twice(&sh, &st, next);
    let s = st.stats();
    let sum = |base| (0..KEYS).map(|k| sh.sum(base, k, next)).sum::<u64>();
    let of_killed = |base: usize| {
        killed
            .iter()
            .map(|&i| {
                (0..KEYS)
                    .map(|k| sh.w(base + i * KEYS + k).load(SeqCst))
                    .sum::<u64>()
            })
            .sum::<u64>()
    };
    for k in 0..KEYS {
        assert_eq!(st.pending(&key(k)), 0.0, "stage not empty after quiescence");
    }
    eprintln!("stage after the run: {s:?}");
    Outcome {
        handed: sum(HANDED),
        published_by_killed: of_killed(PUBLISHED),
        handed_by_killed: of_killed(HANDED),
        dict: (0..KEYS).map(|k| sh.w(DICT + k).load(SeqCst)).sum(),
        lost_amount: s.lost_amount,
        kills: killed.len(),
    }
}

#[test]
fn without_kills_the_dict_equals_the_truth() {
    let o = run(false, 1.5);
    assert!(o.handed > 1000, "too little traffic: {}", o.handed);
    assert_eq!(o.dict, o.handed);
}

#[test]
fn with_random_sigkills_nothing_is_counted_twice_and_loss_is_bounded() {
    let o = run(true, 3.0);
    assert!(o.kills > 50, "too few kills: {}", o.kills);
    assert!(
        o.dict <= o.handed,
        "counted twice: {} > {}",
        o.dict,
        o.handed
    );
    let unpublished = o.handed_by_killed - o.published_by_killed;
    let lost = o.handed - o.dict;
    eprintln!(
        "kills {} handed {} dict {} lost {} <= reported in flight {} + unpublished by the killed {}",
        o.kills, o.handed, o.dict, lost, o.lost_amount, unpublished
    );
    assert!(
        lost as f64 <= o.lost_amount + unpublished as f64,
        "lost {lost} > reported {} + unpublished {unpublished}",
        o.lost_amount
    );
}
