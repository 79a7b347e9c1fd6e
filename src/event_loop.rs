//! Whether nginx's event loop has work waiting: the sliced sync pauses
//! between two slices only then.
//!
//! A pause is `ngx.sleep`. On an nginx without OpenResty's delayed-events
//! patch (Debian's) the shortest sleep that lets I/O run is a 1 ms timer,
//! and when nothing else is to be done the worker then idles for that
//! millisecond: its CPU goes idle and the next slice starts on cold
//! caches. Measured with one worker and 20k keys, pausing after every
//! 0.5 ms slice cost about 1.5 times the CPU of the same work unsliced.
//! A pause only helps when something waits for the loop, so the shim asks
//! [`waiting`] after each slice and goes on at once when nothing does.
//!
//! Work waiting is any of:
//! - an I/O event ready on the worker's epoll instance: `poll(2)` on the
//!   epoll file descriptor, which reports it readable when its ready list
//!   holds an event, without taking the event off (the kernel's nested
//!   epoll support relies on exactly that);
//! - a timer due: the earliest key of `ngx_event_timer_rbtree` is not
//!   after the current time in `ngx_current_msec`'s units (monotonic
//!   milliseconds since nginx 1.19.x; wall-clock ones before);
//! - a posted event: `ngx_posted_events`, `ngx_posted_next_events`,
//!   `ngx_posted_accept_events`, and OpenResty's
//!   `ngx_posted_delayed_events` where the binary has it, not empty.
//!
//! The worker's event loop runs on the thread that calls in (a Lua
//! callback), so none of these change during the look. Anything that
//! cannot be found (no epoll, a symbol missing) makes the answer
//! [`Waiting::Unknown`], and the shim then pauses after every slice as it
//! did before this module.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Mutex;

use crate::shdict::lookup;

/// What [`waiting`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// Nothing waits: the next slice may run at once.
    Idle,
    /// An event, a timer or a posted event waits for the loop.
    Busy,
    /// The loop could not be inspected (not inside an nginx worker with
    /// epoll): the caller pauses as if busy.
    Unknown,
}

/// `ngx_rbtree_node_t`: its layout has not changed since nginx 0.x.
#[repr(C)]
struct RbNode {
    key: usize,
    left: *mut RbNode,
    right: *mut RbNode,
    parent: *mut RbNode,
    color: u8,
    data: u8,
}

/// `ngx_rbtree_t`.
#[repr(C)]
struct RbTree {
    root: *mut RbNode,
    sentinel: *mut RbNode,
    insert: *const c_void,
}

/// `ngx_queue_t`.
#[repr(C)]
struct Queue {
    prev: *mut Queue,
    next: *mut Queue,
}

/// What was found in this worker, once.
struct Loop {
    timers: NonNull<RbTree>,
    /// Whether `ngx_current_msec` counts monotonic milliseconds.
    monotonic: bool,
    posted: Vec<NonNull<Queue>>,
    /// One `pollfd` per epoll instance, made once and reused by each look.
    polls: Vec<libc::pollfd>,
}

/// The look of process `pid` (0: none yet); `found` is None when it found
/// nothing to inspect.
struct Cache {
    pid: u32,
    found: Option<Loop>,
}

// SAFETY: the pointers are nginx globals of this process, only read on
// the thread that runs the worker's event loop; the Mutex only guards the
// cache against a second thread calling in.
unsafe impl Send for Cache {}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    pid: 0,
    found: None,
});

/// Milliseconds on the clock `ngx_current_msec` counts: the library's
/// monotonic clock ([`crate::ffi::monotonic`]), or the wall clock for an
/// nginx before 1.19.x.
fn msec(monotonic: bool) -> usize {
    let d = if monotonic {
        crate::ffi::monotonic()
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
    };
    d.map_or(0, |d| d.as_millis() as usize)
}

/// Which clock a value of `ngx_current_msec` counts: Some(true) the
/// monotonic one, Some(false) the wall clock, None when it is within an
/// hour of neither (then the loop is not inspected).
fn clock_of(current_msec: usize) -> Option<bool> {
    let near = |monotonic| msec(monotonic).abs_diff(current_msec) < 3_600_000;
    if near(true) {
        Some(true)
    } else if near(false) {
        Some(false)
    } else {
        None
    }
}

/// The epoll instances among this process's open files.
fn epoll_fds() -> Vec<libc::c_int> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let target = std::fs::read_link(e.path()).ok()?;
        if target.as_os_str() != "anon_inode:[eventpoll]" {
            return None;
        }
        e.file_name().to_str()?.parse().ok()
    })
    .collect()
}

impl Loop {
    fn find() -> Option<Loop> {
        let timers = lookup("ngx_event_timer_rbtree")?.cast::<RbTree>();
        let current_msec = lookup("ngx_current_msec")?.cast::<usize>();
        let mut posted = Vec::new();
        for name in [
            "ngx_posted_events",
            "ngx_posted_next_events",
            "ngx_posted_accept_events",
            "ngx_posted_delayed_events",
        ] {
            if let Some(q) = lookup(name) {
                posted.push(q.cast::<Queue>());
            }
        }
        let polls = pollfds(&epoll_fds());
        if posted.is_empty() || polls.is_empty() {
            return None;
        }
        // SAFETY: ngx_current_msec is nginx's ngx_msec_t (a uintptr_t)
        // global, read on the event loop's own thread.
        let monotonic = clock_of(unsafe { current_msec.as_ptr().read_volatile() })?;
        Some(Loop {
            timers,
            monotonic,
            posted,
            polls,
        })
    }

    fn timer_due(&self) -> bool {
        // SAFETY: ngx_event_timer_rbtree is nginx's timer tree, changed
        // only by the event loop, whose thread is running this call.
        unsafe { timer_due(self.timers.as_ptr(), msec(self.monotonic)) }
    }
}

/// Whether the earliest timer of `tree` is due at `now` (as nginx's
/// `ngx_event_find_timer` compares: the signed difference of the keys).
///
/// # Safety
/// `tree` must point at a valid `ngx_rbtree_t` whose nodes stay valid and
/// unchanged during the call.
unsafe fn timer_due(tree: *const RbTree, now: usize) -> bool {
    // SAFETY: the caller guarantees a valid tree; every node reached from
    // its root through left links is one of its nodes or the sentinel.
    unsafe {
        let sentinel = (*tree).sentinel;
        let mut node = (*tree).root;
        if node.is_null() || node == sentinel {
            return false;
        }
        while !(*node).left.is_null() && (*node).left != sentinel {
            node = (*node).left;
        }
        ((*node).key.wrapping_sub(now) as isize) <= 0
    }
}

/// Whether any of the queues holds an event.
fn any_posted(queues: &[NonNull<Queue>]) -> bool {
    queues.iter().any(|q| {
        // SAFETY: each is a valid ngx_queue_t (nginx's globals, changed
        // only on this thread); an empty queue's next points at itself.
        unsafe { (*q.as_ptr()).next != q.as_ptr() }
    })
}

/// Whether one of the epoll instances of `polls` has an event ready, by
/// `poll(2)` on it, which leaves the event for `epoll_wait`; None when one
/// of them is not an open descriptor.
fn io_ready(polls: &mut [libc::pollfd]) -> Option<bool> {
    for p in polls.iter_mut() {
        p.revents = 0;
    }
    // SAFETY: poll reads and writes `polls.len()` pollfd structs of a live
    // slice; timeout 0 never blocks.
    let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, 0) };
    if n < 0 || polls.iter().any(|p| p.revents & libc::POLLNVAL != 0) {
        return None;
    }
    Some(polls.iter().any(|p| p.revents & libc::POLLIN != 0))
}

/// A `pollfd` asking for readability, per descriptor of `fds`.
fn pollfds(fds: &[libc::c_int]) -> Vec<libc::pollfd> {
    fds.iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect()
}

/// Whether the event loop of this worker has work waiting (see the module
/// docs).
pub fn waiting() -> Waiting {
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    if cache.pid != pid {
        cache.pid = pid;
        cache.found = Loop::find();
    }
    let Some(l) = cache.found.as_mut() else {
        return Waiting::Unknown;
    };
    if any_posted(&l.posted) || l.timer_due() {
        return Waiting::Busy;
    }
    match io_ready(&mut l.polls) {
        Some(true) => Waiting::Busy,
        Some(false) => Waiting::Idle,
        None => {
            cache.pid = 0; // an epoll descriptor went away: look again
            Waiting::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr;

    fn node(key: usize) -> RbNode {
        RbNode {
            key,
            left: ptr::null_mut(),
            right: ptr::null_mut(),
            parent: ptr::null_mut(),
            color: 0,
            data: 0,
        }
    }

    /// A node on the heap, reached only through its raw pointer.
    fn raw<T>(v: T) -> *mut T {
        Box::into_raw(Box::new(v))
    }

    #[test]
    fn a_timer_is_due_when_the_earliest_key_is_not_after_now() {
        let s = raw(node(0));
        let earliest = raw(node(1_000));
        let root = raw(node(5_000));
        // SAFETY: (test) a two-node tree of live heap nodes, freed at the
        // end, written and read through the raw pointers only.
        unsafe {
            (*earliest).left = s;
            (*earliest).right = s;
            (*root).left = earliest;
            (*root).right = s;
            let tree = raw(RbTree {
                root,
                sentinel: s,
                insert: ptr::null(),
            });
            assert!(!timer_due(tree, 999));
            assert!(timer_due(tree, 1_000));
            assert!(timer_due(tree, 1_001));
            // Keys wrap as nginx's do: a key just past the wrap is later.
            (*earliest).key = 3;
            assert!(!timer_due(tree, usize::MAX - 2));
            (*tree).root = s;
            assert!(!timer_due(tree, usize::MAX), "no timer at all");
            for p in [s, earliest, root] {
                drop(Box::from_raw(p));
            }
            drop(Box::from_raw(tree));
        }
    }

    #[test]
    fn a_posted_queue_counts_when_it_holds_an_event() {
        let q = || {
            raw(Queue {
                prev: ptr::null_mut(),
                next: ptr::null_mut(),
            })
        };
        let (empty, head, item) = (q(), q(), q());
        // SAFETY: (test) live heap queues, freed at the end, linked as
        // ngx_queue_t links them: an empty head points at itself.
        unsafe {
            (*empty).prev = empty;
            (*empty).next = empty;
            (*head).next = item;
            (*head).prev = item;
            (*item).next = head;
            (*item).prev = head;
            let ptrs = |ps: &[*mut Queue]| -> Vec<NonNull<Queue>> {
                ps.iter().map(|&p| NonNull::new(p).unwrap()).collect()
            };
            assert!(!any_posted(&ptrs(&[empty])));
            assert!(any_posted(&ptrs(&[empty, head])));
            for p in [empty, head, item] {
                drop(Box::from_raw(p));
            }
        }
    }

    /// An edge-triggered epoll instance watching a pipe, as nginx watches
    /// its connections.
    fn epoll_on_pipe() -> (libc::c_int, [libc::c_int; 2]) {
        let mut pipe = [0; 2];
        // SAFETY: (test) plain syscalls on descriptors made here.
        unsafe {
            assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
            let ep = libc::epoll_create1(0);
            assert!(ep >= 0);
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLET) as u32,
                u64: 7,
            };
            assert_eq!(
                libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, pipe[0], &mut ev),
                0
            );
            (ep, pipe)
        }
    }

    #[test]
    fn a_ready_event_is_seen_and_left_for_epoll_wait() {
        let (ep, pipe) = epoll_on_pipe();
        assert_eq!(io_ready(&mut pollfds(&[ep])), Some(false));
        // SAFETY: (test) one byte into the pipe made above.
        assert_eq!(unsafe { libc::write(pipe[1], b"x".as_ptr().cast(), 1) }, 1);
        assert_eq!(io_ready(&mut pollfds(&[ep])), Some(true));
        assert_eq!(io_ready(&mut pollfds(&[ep])), Some(true), "looking twice");
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: (test) epoll_wait writes at most 4 events into `evs`.
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 4, 0) };
        assert_eq!(n, 1, "the looks took the event away from epoll_wait");
        assert_eq!({ evs[0].u64 }, 7);
        // Edge-triggered: once epoll_wait reported it, nothing is ready.
        assert_eq!(io_ready(&mut pollfds(&[ep])), Some(false));
        // SAFETY: (test) closing the descriptors made above.
        unsafe {
            libc::close(pipe[0]);
            libc::close(pipe[1]);
            libc::close(ep);
        }
        assert_eq!(io_ready(&mut pollfds(&[ep])), None, "a closed descriptor");
    }

    #[test]
    fn the_clock_of_ngx_current_msec_is_told_from_its_value() {
        // nginx 1.19.x and later: monotonic milliseconds, a little stale.
        assert_eq!(clock_of(msec(true) - 5), Some(true));
        // Older nginx: wall-clock milliseconds.
        assert_eq!(clock_of(msec(false) - 5), Some(false));
        // Neither: the loop is not inspected (every slice then pauses).
        assert_eq!(clock_of(msec(false) / 2), None);
        assert_eq!(clock_of(msec(true) + 7_200_000), None);
    }

    #[test]
    fn outside_nginx_the_answer_is_unknown() {
        // The test binary has no ngx_event_timer_rbtree.
        assert_eq!(waiting(), Waiting::Unknown);
    }
}
