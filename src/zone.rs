//! Where the shared stages live: the stage zone, a `lua_shared_dict` of the
//! module's own (`lua_shared_dict resty_counter_stage 16m;`), never the
//! counter dicts, which hold exactly what the original module puts there.
//!
//! Part of the FFI layer (nginx imports). It relies on nginx core's public
//! module ABI only:
//! - `ngx_shm_zone_t { void *data; ngx_shm_t shm; ... }` and
//!   `ngx_shm_t { u_char *addr; size_t size; ngx_str_t name; ... }`, where
//!   `shm.addr` is the zone's `ngx_slab_pool_t *` (same in nginx 1.22 and
//!   1.29);
//! - the exported `ngx_slab_calloc` / `ngx_slab_free`, which take the
//!   pool's mutex themselves;
//!
//! and on lua-nginx-module's exported ffi functions (through `shdict.rs`).
//! What it relies on is checked before use (the stage zone's name is the
//! one the shim names, sizes and addresses are plausible, the symbols
//! exist); anything unexpected is an [`AttachError`] and the caller stays on
//! the direct path.
//!
//! The stage zone holds one directory (`directory.rs`) and one region per
//! counter dict, each a stage (`stage.rs`). The directory is found through
//! the key [`DIRECTORY_KEY`] of the stage zone; if that key is missing or
//! does not hold the directory's offset (deleted, `flush_all`, set by
//! someone), the zone's page starts are scanned for it and the key is put
//! back, so neither the directory nor the regions it tracks are ever lost.
//! Lifetime: everything belongs to the stage zone, so it survives
//! `nginx -s reload` while the zone keeps its name and size, and goes away
//! with the zone.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use crate::directory::{self, DirError, Directory, Ident, Region, Regions, Usage};
use crate::flush::DictError;
use crate::shdict::{ShDict, lookup};
use crate::stage::{HEADER_WORDS, LayoutError, Params, Stage, Worker};

/// The stage zone's key that holds the directory's offset.
pub const DIRECTORY_KEY: &[u8] = b"resty.counter.directory";
/// Key size of a stage made here: keys up to 160 bytes are staged, longer
/// ones take the direct path.
pub const KEY_WORDS: usize = 20;
/// Registry entries: workers (old and new ones during a reload) that may
/// use one stage at once.
pub const REGISTRY: usize = 128;
/// Smallest region worth making, in bytes.
pub const MIN_STAGE_BYTES: usize = 64 << 10;
/// Largest region made, in bytes.
pub const MAX_STAGE_BYTES: usize = 64 << 20;
/// The directory's block: two pages, so the slab allocator gives it a page
/// start, which is where a scan looks.
const DIRECTORY_BYTES: usize = 8192;
/// How long an attach waits for another worker's directory lock.
const LOCK_WAIT: Duration = Duration::from_millis(20);

/// `ngx_str_t`.
#[repr(C)]
struct NgxStr {
    len: usize,
    data: *const u8,
}

/// `ngx_shm_t`, the fields this file reads.
#[repr(C)]
struct NgxShm {
    addr: *mut u8,
    size: usize,
    name: NgxStr,
}

/// `ngx_shm_zone_t`, up to the fields this file reads.
#[repr(C)]
struct NgxShmZone {
    data: *mut c_void,
    shm: NgxShm,
}

type SlabAllocFn = unsafe extern "C" fn(pool: *mut c_void, size: usize) -> *mut c_void;
type SlabFreeFn = unsafe extern "C" fn(pool: *mut c_void, p: *mut c_void);

/// Why the stage cannot be used; the caller stays on the direct path and
/// logs one WARN with [`AttachError::message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachError {
    /// No `ngx_slab_calloc`/`ngx_slab_free` exported by this nginx.
    NoSlab,
    /// A `dict[1]` did not lead to a zone.
    BadZone,
    /// The stage zone's name is not the one asked for: the struct layout
    /// is not the one this file expects.
    NameMismatch,
    /// A zone's size or address is implausible.
    Implausible,
    /// The stage zone is the counter dict itself.
    SameZone,
    /// The stage zone cannot hold a directory and one smallest region.
    ZoneTooSmall,
    /// No room in the stage zone for this dict's region, even after
    /// reclaiming orphans.
    NoMemory,
    /// The directory key holds something that is no directory, and the
    /// zone has none.
    BadOffset,
    /// The region of this dict does not check out.
    BadStage(LayoutError),
    /// The stage's registry is full of live workers.
    RegistryFull,
    /// The stage zone refused the directory key.
    Dict,
    /// Another worker held the directory's lock for too long.
    Busy,
    /// Every directory entry serves a live dict.
    DirectoryFull,
}

impl AttachError {
    /// A static message for the log line.
    pub fn message(self) -> &'static std::ffi::CStr {
        match self {
            AttachError::NoSlab => c"nginx exports no ngx_slab_calloc/ngx_slab_free",
            AttachError::BadZone => c"no shared zone behind the dict",
            AttachError::NameMismatch => {
                c"the stage zone's name is not the one asked for (unknown nginx ABI)"
            }
            AttachError::Implausible => c"a zone's size or address is implausible",
            AttachError::SameZone => c"the stage zone is the counter dict itself",
            AttachError::ZoneTooSmall => c"the stage zone is too small (64 KiB at least)",
            AttachError::NoMemory => c"no room left in the stage zone for this dict",
            AttachError::BadOffset => {
                c"the stage zone's key resty.counter.directory holds no directory (delete it)"
            }
            AttachError::BadStage(_) => c"this dict's region of the stage zone does not match",
            AttachError::RegistryFull => c"the stage's worker registry is full",
            AttachError::Dict => c"the stage zone refused the directory key",
            AttachError::Busy => c"another worker held the stage zone's directory",
            AttachError::DirectoryFull => c"the stage zone serves 64 dicts already",
        }
    }

    /// Whether a later attach may succeed: room may come back (orphans are
    /// reclaimed as old workers exit), the registry frees entries, a lock
    /// is given back, a bad key deleted. The others are facts about this
    /// nginx or its configuration.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            AttachError::NoMemory
                | AttachError::RegistryFull
                | AttachError::Dict
                | AttachError::Busy
                | AttachError::BadOffset
                | AttachError::DirectoryFull
        )
    }
}

/// A zone's memory: its start (the slab pool) and size.
#[derive(Debug, Clone, Copy)]
struct Mem {
    addr: usize,
    size: usize,
}

impl Mem {
    /// `words` words at `offset`, if they lie inside the zone, aligned.
    fn words(&self, offset: u64, words: usize) -> Option<&'static [AtomicU64]> {
        let offset = usize::try_from(offset).ok()?;
        let end = offset.checked_add(words.checked_mul(8)?)?;
        if offset % 8 != 0 || offset < 64 || end > self.size {
            return None;
        }
        // SAFETY: the range is 8-aligned and inside a zone that stays
        // mapped for the worker's life (checked above); the module's blocks
        // there are only ever accessed atomically, by every worker.
        Some(unsafe { std::slice::from_raw_parts((self.addr + offset) as *const AtomicU64, words) })
    }
}

/// The slab allocator of the stage zone.
#[derive(Clone, Copy)]
struct Slab {
    pool: Mem,
    calloc: SlabAllocFn,
    free: SlabFreeFn,
}

impl Slab {
    /// nginx's allocator over the zone whose memory is `pool`.
    fn find(pool: Mem) -> Result<Self, AttachError> {
        let (Some(calloc), Some(free)) = (lookup("ngx_slab_calloc"), lookup("ngx_slab_free"))
        else {
            return Err(AttachError::NoSlab);
        };
        // SAFETY: nginx core's exported functions, whose C signatures are
        // these fn types (nginx 1.22 through 1.29).
        let (calloc, free) = unsafe {
            (
                std::mem::transmute::<*mut c_void, SlabAllocFn>(calloc.as_ptr()),
                std::mem::transmute::<*mut c_void, SlabFreeFn>(free.as_ptr()),
            )
        };
        Ok(Slab { pool, calloc, free })
    }

    /// `bytes` zeroed bytes of the pool: their offset, checked to lie
    /// inside the zone.
    fn alloc(&self, bytes: usize) -> Option<u64> {
        // SAFETY: pool.addr is the stage zone's ngx_slab_pool_t (shm.addr,
        // as lua-nginx-module's zone init casts it); calloc locks the pool.
        let p = unsafe { (self.calloc)(self.pool.addr as *mut c_void, bytes) } as usize;
        if p == 0 {
            return None;
        }
        let off = p.wrapping_sub(self.pool.addr);
        if p % 8 != 0 || p <= self.pool.addr || off + bytes > self.pool.size {
            self.free(off as u64);
            return None;
        }
        Some(off as u64)
    }

    fn free(&self, offset: u64) {
        let p = self.pool.addr + offset as usize;
        // SAFETY: p came from this pool's calloc (offsets given back are
        // only those `alloc` returned and the directory recorded).
        unsafe { (self.free)(self.pool.addr as *mut c_void, p as *mut c_void) };
    }
}

/// The directory's [`Regions`] over the stage zone.
struct ZoneRegions {
    slab: Slab,
}

impl ZoneRegions {
    fn stage(&self, r: Region, id: &Ident) -> Result<Stage<'static>, AttachError> {
        let words = usize::try_from(r.bytes).unwrap_or(0) / 8;
        let w = self
            .slab
            .pool
            .words(r.offset, words.max(HEADER_WORDS))
            .ok_or(AttachError::BadOffset)?;
        Stage::attach(w, id.anchor).map_err(AttachError::BadStage)
    }
}

impl Regions for ZoneRegions {
    fn alloc(&mut self, bytes: u64) -> Option<u64> {
        self.slab.alloc(usize::try_from(bytes).ok()?)
    }

    fn free(&mut self, offset: u64) {
        self.slab.free(offset);
    }

    fn init(&mut self, r: Region, id: &Ident) -> bool {
        let words = r.bytes as usize / 8;
        let Some(w) = self.slab.pool.words(r.offset, words) else {
            return false;
        };
        let params = Params {
            slots: Params::slots_for(words, KEY_WORDS, REGISTRY),
            key_words: KEY_WORDS,
            registry: REGISTRY,
            seed: random_seed(),
            anchor: id.anchor,
        };
        Stage::init(w, params).is_ok()
    }

    fn usage(&mut self, r: Region, id: &Ident) -> Usage {
        match self.stage(r, id) {
            Err(_) => Usage::Untrusted,
            Ok(st) if st.has_live_worker(&alive) => Usage::InUse,
            Ok(st) => {
                let (pending, sum) = st.pending_total();
                Usage::Orphan { pending, sum }
            }
        }
    }
}

/// This worker's view of one counter dict's stage.
pub struct ZoneStage {
    /// The stage, over the stage zone's memory (mapped for the worker's life).
    pub stage: Stage<'static>,
    /// This worker's registry entry.
    pub worker: Worker,
    /// The region, in the stage zone.
    pub region: Region,
    dir: Directory<'static>,
    dir_offset: u64,
    key: ShDict,
    slab: Slab,
}

impl std::fmt::Debug for ZoneStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZoneStage")
            .field("stage", &self.stage)
            .field("worker", &self.worker)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// Default region for a counter dict of `dict_size` bytes: half its size,
/// within [`MIN_STAGE_BYTES`] and [`MAX_STAGE_BYTES`]. At 192 bytes a slot
/// and a 70% fill that stages about a quarter of the ~45-byte-key counters
/// such a dict can hold, which is more than most deployments touch in one
/// interval; a fold visits every slot of the region each interval, so a
/// region much larger than the live keys costs CPU for nothing. Keys that
/// do not fit are written directly, exactly. `asked` (non-zero: the
/// `stage_bytes` option) replaces it, in the same bounds.
pub fn stage_bytes_for(dict_size: usize, asked: usize) -> usize {
    let want = if asked == 0 { dict_size / 2 } else { asked };
    want.clamp(MIN_STAGE_BYTES, MAX_STAGE_BYTES) & !4095
}

/// Whether a pid exists (`kill(pid, 0)`; EPERM counts as alive). A reused
/// pid reads as alive: conservative, it only delays reclaim.
pub fn alive(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    if p <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing; it only checks the pid.
    let rc = unsafe { libc::kill(p, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// CLOCK_MONOTONIC in ms (`ffi::monotonic`): one clock for every
/// worker of the machine.
pub fn now_ms() -> u64 {
    crate::ffi::monotonic().map_or(0, |d| d.as_millis() as u64)
}

/// This process's pid.
pub fn my_pid() -> u32 {
    std::process::id()
}

fn random_seed() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 8 {
        u64::from_le_bytes(buf)
    } else {
        now_ms().wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(my_pid())
    }
}

/// A zone's memory and name, checked for plausibility: an address that is
/// page-aligned (nginx maps zones with mmap), a size between 8 KiB and 1 TiB,
/// a name of at most 4 KiB.
///
/// # Safety
/// `zone` must be the `ngx_shm_zone_t *` lua-nginx-module returned for a
/// live dict.
unsafe fn zone_memory(zone: NonNull<c_void>) -> Result<(Mem, &'static [u8]), AttachError> {
    // SAFETY: zone points at an ngx_shm_zone_t, whose leading fields are
    // NgxShmZone's (nginx core ABI, same in 1.22 and 1.29); only read.
    let z = unsafe { &*zone.as_ptr().cast::<NgxShmZone>() };
    let name = &z.shm.name;
    if name.data.is_null() || name.len == 0 || name.len > 4096 {
        return Err(AttachError::NameMismatch);
    }
    // SAFETY: name.data points at name.len bytes of the configured zone
    // name, which lives as long as the cycle (checked non-NULL above).
    let name = unsafe { std::slice::from_raw_parts(name.data, name.len) };
    let mem = Mem {
        addr: z.shm.addr as usize,
        size: z.shm.size,
    };
    if mem.addr == 0 || mem.addr % 4096 != 0 || !(8192..=1 << 40).contains(&mem.size) {
        return Err(AttachError::Implausible);
    }
    Ok((mem, name))
}

impl ZoneStage {
    /// Finds or makes, in the stage zone whose `dict[1]` is `stage_udata`
    /// and whose name is `stage_name`, the region of the counter dict
    /// `dict` writes into, and registers this worker in it.
    ///
    /// # Safety
    /// `stage_udata` must be NULL or `dict[1]` of a live shared dict of the
    /// same subsystem as `dict`.
    pub unsafe fn attach(
        dict: &ShDict,
        stage_udata: *mut c_void,
        stage_name: &[u8],
        asked_bytes: usize,
    ) -> Result<Self, AttachError> {
        // SAFETY: forwarded contract.
        let mut key = unsafe { dict.sibling(stage_udata) }.map_err(|_| AttachError::BadZone)?;
        // SAFETY: both zones came from the module for live dicts.
        let ((pool, name), (dmem, dname)) =
            unsafe { (zone_memory(key.zone())?, zone_memory(dict.zone())?) };
        // The stage zone's name is the one the shim passed: this proves the
        // struct layout, which the dict's zone shares.
        if name != stage_name {
            return Err(AttachError::NameMismatch);
        }
        if pool.addr == dmem.addr {
            return Err(AttachError::SameZone);
        }
        if pool.size < DIRECTORY_BYTES + MIN_STAGE_BYTES + 8192 {
            return Err(AttachError::ZoneTooSmall);
        }
        let slab = Slab::find(pool)?;
        let (dir, dir_offset) = find_directory(&mut key, slab)?;
        let me = my_pid();
        let deadline = Instant::now() + LOCK_WAIT;
        let locked = dir
            .lock(me, &alive, || {
                std::thread::yield_now();
                Instant::now() < deadline
            })
            .ok_or(AttachError::Busy)?;
        let id = Ident::new(dmem.addr as u64, dmem.size as u64, dname);
        let mut regions = ZoneRegions { slab };
        let region = match locked.find(&id) {
            Some(r) => r,
            None => {
                let want = stage_bytes_for(dmem.size, asked_bytes) as u64;
                let (r, _swept) = locked
                    .insert(&id, want, MIN_STAGE_BYTES as u64, &mut regions)
                    .map_err(|e| match e {
                        DirError::Full => AttachError::DirectoryFull,
                        DirError::NoRoom => AttachError::NoMemory,
                        DirError::Init | DirError::BadHeader => {
                            AttachError::BadStage(LayoutError::BadParams)
                        }
                    })?;
                r
            }
        };
        let stage = regions.stage(region, &id)?;
        // Registered while the lock is held: a sweep never sees this
        // region without its new worker.
        let worker = stage
            .register(me, &alive)
            .ok_or(AttachError::RegistryFull)?;
        drop(locked);
        Ok(ZoneStage {
            stage,
            worker,
            region,
            dir,
            dir_offset,
            key,
            slab,
        })
    }

    /// Housekeeping at the end of a fold round: frees the regions of dicts
    /// nobody uses any more (empty orphans; skipped when another worker
    /// holds the directory), and puts the directory key back if it went
    /// missing or was overwritten. Returns the regions freed.
    pub fn tend(&mut self) -> u32 {
        if self.key.read_number(DIRECTORY_KEY) != Ok(Some(self.dir_offset as f64)) {
            let _ = self.key.set_number(DIRECTORY_KEY, self.dir_offset as f64);
        }
        let Some(locked) = self.dir.lock(self.worker.pid(), &alive, || false) else {
            return 0;
        };
        let mut regions = ZoneRegions { slab: self.slab };
        locked.sweep(&mut regions, false).freed
    }

    /// Live regions in the stage zone, and the deltas lost with orphans
    /// reclaimed under pressure (count, magnitude), all time.
    pub fn zone_report(&self) -> (u64, u64, f64) {
        let (regions, _bytes) = self.dir.usage();
        let (n, sum) = self.dir.orphans_lost();
        (regions, n, sum)
    }

    /// Unregisters this worker and gives the lease up (worker exit).
    pub fn leave(&self) {
        self.stage.release_lease(self.worker.pid());
        self.stage.unregister(self.worker);
    }
}

/// The stage zone's directory: where its key says, else where a scan of
/// the zone finds it (the key is then put back), else a new one, published
/// by ADD so that exactly one of the workers starting together makes it.
fn find_directory(key: &mut ShDict, slab: Slab) -> Result<(Directory<'static>, u64), AttachError> {
    let pool = slab.pool;
    let at = |offset: u64| {
        let w = pool.words(offset, directory::WORDS)?;
        Directory::attach(w, pool.addr as u64, offset).ok()
    };
    for _ in 0..3 {
        // Missing (None), a number, or something else (Some(None)).
        let stored = match key.read_number(DIRECTORY_KEY) {
            Ok(v) => v.map(Some),
            Err(DictError::NotANumber) => Some(None),
            Err(_) => return Err(AttachError::Dict),
        };
        let offset = stored
            .flatten()
            .filter(|v| v.fract() == 0.0 && *v >= 0.0 && *v < 1e15);
        if let Some(d) = offset.and_then(|o| at(o as u64)) {
            return Ok((d, offset.unwrap_or(0.0) as u64));
        }
        if let Some(o) = scan(pool) {
            let d = at(o).ok_or(AttachError::BadOffset)?;
            key.set_number(DIRECTORY_KEY, o as f64)
                .map_err(|_| AttachError::Dict)?;
            return Ok((d, o));
        }
        if stored.is_some() {
            // Something else is under the key, and the zone holds no
            // directory: never overwrite what we did not write.
            return Err(AttachError::BadOffset);
        }
        let o = slab.alloc(DIRECTORY_BYTES).ok_or(AttachError::NoMemory)?;
        let w = pool
            .words(o, directory::WORDS)
            .ok_or(AttachError::Implausible)?;
        let d = Directory::init(w, pool.addr as u64, o).map_err(|_| AttachError::Implausible)?;
        match key.add_number(DIRECTORY_KEY, o as f64) {
            Ok(true) => return Ok((d, o)),
            won_or_failed => {
                // Another worker's directory won (or the key could not be
                // stored): ours must never be found by a scan.
                d.retract();
                slab.free(o);
                won_or_failed.map_err(|_| AttachError::Dict)?;
            }
        }
    }
    Err(AttachError::Dict)
}

/// The one directory in the zone, found by its header at a page start
/// (where the slab allocator puts a two-page block): the magic, and the
/// zone's address and its own offset written in it. A directory that lost
/// the race to be published was retracted before it was freed, so only the
/// published one matches.
fn scan(pool: Mem) -> Option<u64> {
    (4096..pool.size as u64).step_by(4096).find(|&o| {
        pool.words(o, 1)
            .is_some_and(|w| looks_like_directory(pool, w, o))
    })
}

fn looks_like_directory(pool: Mem, first: &[AtomicU64], offset: u64) -> bool {
    first[0].load(std::sync::atomic::Ordering::Acquire) == directory::MAGIC
        && pool
            .words(offset, directory::WORDS)
            .is_some_and(|w| Directory::attach(w, pool.addr as u64, offset).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_size_is_half_the_dict_within_bounds() {
        assert_eq!(stage_bytes_for(12 << 10, 0), MIN_STAGE_BYTES, "at least");
        assert_eq!(stage_bytes_for(1 << 20, 0), 512 << 10);
        assert_eq!(stage_bytes_for(5 << 20, 0), (5 << 20) / 2);
        assert_eq!(stage_bytes_for(1 << 30, 0), MAX_STAGE_BYTES);
        assert_eq!(stage_bytes_for(16 << 20, 1 << 20), 1 << 20, "asked");
        assert_eq!(
            stage_bytes_for(16 << 20, 1000),
            MIN_STAGE_BYTES,
            "asked too little"
        );
        let slots = Params::slots_for((4 << 20) / 8, KEY_WORDS, REGISTRY);
        assert!(slots > 18_000, "{slots} slots in 4 MiB");
    }

    fn zone_struct(aligned: usize, size: usize, name: &[u8]) -> NgxShmZone {
        NgxShmZone {
            data: std::ptr::null_mut(),
            shm: NgxShm {
                addr: aligned as *mut u8,
                size,
                name: NgxStr {
                    len: name.len(),
                    data: name.as_ptr(),
                },
            },
        }
    }

    #[test]
    fn a_zone_is_checked_before_use() {
        let mut page = vec![0u8; 3 * 4096];
        let aligned = (page.as_mut_ptr() as usize + 4095) & !4095;
        let mut z = zone_struct(aligned, 8192, b"counters");
        let zp = NonNull::from(&mut z).cast();
        // SAFETY: (test) zp points at a NgxShmZone with a valid name.
        let (mem, name) = unsafe { zone_memory(zp) }.unwrap();
        assert_eq!(
            (mem.addr, mem.size, name),
            (aligned, 8192, &b"counters"[..])
        );
        let mut z = zone_struct(aligned + 8, 8192, b"counters");
        let zp = NonNull::from(&mut z).cast();
        // SAFETY: (test) as above.
        let r = unsafe { zone_memory(zp) };
        assert_eq!(r.unwrap_err(), AttachError::Implausible);
        let mut z = zone_struct(aligned, 8192, b"");
        let zp = NonNull::from(&mut z).cast();
        // SAFETY: (test) as above; an empty name is refused before it is read.
        let r = unsafe { zone_memory(zp) };
        assert_eq!(r.unwrap_err(), AttachError::NameMismatch);
    }

    #[test]
    fn words_are_handed_out_only_inside_the_zone_and_aligned() {
        let words: Vec<AtomicU64> = (0..1024).map(|_| AtomicU64::new(0)).collect();
        let m = Mem {
            addr: words.as_ptr() as usize,
            size: words.len() * 8,
        };
        assert!(m.words(64, 8).is_some());
        assert!(m.words(65, 8).is_none(), "unaligned");
        assert!(m.words(0, 8).is_none(), "the pool header");
        assert!(m.words(8192 - 64, 8).is_some());
        assert!(m.words(8192 - 56, 8).is_none(), "past the end");
        assert!(m.words(u64::MAX - 7, 8).is_none(), "overflow");
    }

    #[test]
    fn a_scan_finds_only_a_published_directory() {
        let words: Vec<AtomicU64> = (0..(16 << 10)).map(|_| AtomicU64::new(0)).collect();
        // The stand-in zone must be page-aligned like nginx's.
        let base = (words.as_ptr() as usize + 4095) & !4095;
        let skip = (base - words.as_ptr() as usize) / 8;
        let m = Mem {
            addr: base,
            size: (words.len() - skip - 512) * 8,
        };
        assert_eq!(scan(m), None);
        let w = m.words(3 * 4096, directory::WORDS).unwrap();
        let d = Directory::init(w, base as u64, 3 * 4096).unwrap();
        assert_eq!(scan(m), Some(3 * 4096));
        // A copy at another page (its own offset does not match) is not one.
        let w2 = m.words(5 * 4096, directory::WORDS).unwrap();
        for (a, b) in w.iter().zip(w2) {
            b.store(
                a.load(std::sync::atomic::Ordering::Relaxed),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        d.retract();
        assert_eq!(
            scan(m),
            None,
            "retracted, and the copy names another offset"
        );
    }

    #[test]
    fn transient_errors_are_the_ones_a_later_sync_may_fix() {
        assert!(AttachError::NoMemory.is_transient());
        assert!(AttachError::Busy.is_transient());
        assert!(AttachError::BadOffset.is_transient());
        assert!(!AttachError::SameZone.is_transient());
        assert!(!AttachError::ZoneTooSmall.is_transient());
        assert!(!AttachError::NameMismatch.is_transient());
    }

    #[test]
    fn liveness_and_clock() {
        assert!(alive(my_pid()));
        assert!(!alive(0));
        assert!(!alive(u32::MAX));
        let a = now_ms();
        assert!(a > 0 && now_ms() >= a);
    }
}
