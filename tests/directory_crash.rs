//! Crash test of the stage zone's directory: forked processes attach
//! random dicts (lock, find or make the region, register, unlock) and
//! leave them again on one MAP_SHARED mapping, with a block allocator in
//! the same mapping standing in for nginx's slab pool; the parent SIGKILLs
//! random children at random moments and respawns them. At the end it
//! takes the lock over from the dead and sweeps, then checks:
//! - nothing is freed twice (the allocator flags it);
//! - one LIVE region per dict at most;
//! - once every region is an orphan, almost nothing stays allocated: only
//!   a kill inside one of two short windows leaks a block (see below).

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use resty_counter::directory::{self, Directory, Ident, Region, Regions, Usage};

const CHILDREN: usize = 4;
const DICTS: u64 = 6;
const BLOCKS: usize = 64;
const USERS: usize = 8;

// Control words, then the directory.
const STOP: usize = 0;
const DOUBLE_FREE: usize = 1;
const BLOCK: usize = 8; // BLOCKS words: 0 free, 1 allocated
const USER: usize = BLOCK + BLOCKS; // BLOCKS x USERS pids registered
const DIR: usize = USER + BLOCKS * USERS;
const WORDS: usize = DIR + directory::WORDS;

struct Zone {
    words: &'static [AtomicU64],
}

impl Zone {
    fn new() -> Self {
        // SAFETY: an anonymous shared mapping, checked for failure, never
        // unmapped; zero-filled memory is a valid AtomicU64 array.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                WORDS * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            Zone {
                words: std::slice::from_raw_parts(p as *const AtomicU64, WORDS),
            }
        }
    }

    fn w(&self, i: usize) -> &AtomicU64 {
        &self.words[i]
    }

    fn dir(&self) -> Directory<'static> {
        Directory::attach(&self.words[DIR..], 1, 4096).unwrap()
    }

    fn block_of(offset: u64) -> usize {
        (offset >> 20) as usize - 1
    }
}

impl Regions for &Zone {
    fn alloc(&mut self, _bytes: u64) -> Option<u64> {
        (0..BLOCKS)
            .find(|&b| {
                self.w(BLOCK + b)
                    .compare_exchange(0, 1, SeqCst, SeqCst)
                    .is_ok()
            })
            .map(|b| ((b + 1) as u64) << 20)
    }

    fn free(&mut self, offset: u64) {
        let b = Zone::block_of(offset);
        for u in 0..USERS {
            self.w(USER + b * USERS + u).store(0, SeqCst);
        }
        if self
            .w(BLOCK + b)
            .compare_exchange(1, 0, SeqCst, SeqCst)
            .is_err()
        {
            self.w(DOUBLE_FREE).store(offset, SeqCst);
        }
    }

    fn init(&mut self, _: Region, _: &Ident) -> bool {
        // Making a stage takes a while (nginx zeroes and the stage writes
        // its header): kills land in ALLOCATING often.
        std::thread::sleep(Duration::from_micros(100));
        true
    }

    fn usage(&mut self, r: Region, _: &Ident) -> Usage {
        let b = Zone::block_of(r.offset);
        let used = (0..USERS).any(|u| {
            let pid = self.w(USER + b * USERS + u).load(SeqCst);
            pid != 0 && alive(pid as u32)
        });
        if used {
            Usage::InUse
        } else {
            Usage::Orphan {
                pending: 0,
                sum: 0.0,
            }
        }
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the pid exists.
    let rc = unsafe { libc::kill(pid as i32, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

fn ident(d: u64) -> Ident {
    Ident {
        anchor: 0x10_0000 * (d + 1),
        size: 1 << 20,
        hash: d,
        len: 4,
    }
}

/// One child's life: attach a random dict, stay a while, leave, again.
fn child(z: &'static Zone, seed: u64) -> ! {
    let pid = std::process::id();
    let dir = z.dir();
    let mut rng = seed | 1;
    let mut regions = z;
    while z.w(STOP).load(SeqCst) == 0 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let id = ident(rng % DICTS);
        let Some(l) = dir.lock(pid, &alive, || {
            std::thread::yield_now();
            z.w(STOP).load(SeqCst) == 0
        }) else {
            break;
        };
        let region = match l.find(&id) {
            Some(r) => Some(r),
            None => l
                .insert(&id, 1 << 20, 1 << 20, &mut regions)
                .ok()
                .map(|(r, _)| r),
        };
        let slot = region.and_then(|r| {
            let b = Zone::block_of(r.offset);
            (0..USERS)
                .find(|&u| {
                    z.w(USER + b * USERS + u)
                        .compare_exchange(0, u64::from(pid), SeqCst, SeqCst)
                        .is_ok()
                })
                .map(|u| USER + b * USERS + u)
        });
        drop(l);
        std::thread::sleep(Duration::from_micros(rng % 300));
        if let Some(s) = slot {
            let _ = z.w(s).compare_exchange(u64::from(pid), 0, SeqCst, SeqCst);
        }
        if rng % 5 == 0 {
            let _ = dir
                .lock(pid, &alive, || false)
                .map(|l| l.sweep(&mut regions, false));
        }
    }
    // SAFETY: _exit ends the child without running the parent's test
    // harness teardown.
    unsafe { libc::_exit(0) }
}

fn spawn(z: &'static Zone, seed: u64) -> i32 {
    // SAFETY: fork in a test process; the child only touches the shared
    // mapping and exits with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        child(z, seed);
    }
    pid
}

#[test]
fn sigkilled_attachers_leave_no_double_free_and_no_leak_beyond_the_window() {
    let z: &'static Zone = Box::leak(Box::new(Zone::new()));
    Directory::init(&z.words[DIR..], 1, 4096).unwrap();
    let mut kids: Vec<i32> = (0..CHILDREN).map(|i| spawn(z, 0x9E37 + i as u64)).collect();
    let mut rng = 0x2545_F491u64;
    let mut kills = 0u64;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_micros(200 + rng % 2000));
        let i = (rng % CHILDREN as u64) as usize;
        // SAFETY: kids[i] is our child's pid; SIGKILL, then reap it.
        unsafe {
            libc::kill(kids[i], libc::SIGKILL);
            libc::waitpid(kids[i], std::ptr::null_mut(), 0);
        }
        kills += 1;
        kids[i] = spawn(z, rng);
    }
    z.w(STOP).store(1, SeqCst);
    for pid in kids {
        // SAFETY: our children; they exit at STOP (or are killed if stuck
        // waiting for a lock held by nobody alive, which must not happen).
        unsafe {
            let mut status = 0;
            let waited = (0..200).any(|_| {
                std::thread::sleep(Duration::from_millis(10));
                libc::waitpid(pid, &mut status, libc::WNOHANG) == pid
            });
            if !waited {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
                panic!("child {pid} did not stop: stuck on the lock");
            }
        }
    }
    assert_eq!(z.w(DOUBLE_FREE).load(SeqCst), 0, "a region was freed twice");
    let dir = z.dir();
    let me = std::process::id();
    let l = dir
        .lock(me, &alive, || false)
        .expect("taken over from the dead");
    let found = (0..DICTS).filter(|d| l.find(&ident(*d)).is_some()).count() as u64;
    assert_eq!(dir.usage().0, found, "one LIVE region per dict at most");
    let mut regions = z;
    l.sweep(&mut regions, true);
    assert_eq!(dir.usage().0, 0, "every region was an orphan");
    let leaked = (0..BLOCKS)
        .filter(|&b| z.w(BLOCK + b).load(SeqCst) != 0)
        .count() as u64;
    eprintln!("{kills} kills, {leaked} blocks leaked");
    // Only a kill inside one of two short windows leaks a block: between
    // the allocator's return and the store of the offset, and between
    // marking an entry FREE and the allocator's free (a leak, never a
    // double free). Runs here leak 0 to 3 blocks in about 2,000 kills; a
    // recovery that frees nothing leaks every block, 64.
    assert!(
        leaked * 100 <= kills,
        "{leaked} blocks leaked by {kills} kills"
    );
    assert_eq!(z.w(DOUBLE_FREE).load(SeqCst), 0, "a region was freed twice");
}
