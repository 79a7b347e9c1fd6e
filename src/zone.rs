//! Where the shared stage lives: a block of the dict's own shared zone,
//! allocated with nginx's slab allocator, found again through a reserved
//! key in the dict.
//!
//! Part of the FFI layer (nginx imports). It relies on nginx core's public
//! module ABI only (FACTS.md, "nginx core ABI that modules may rely on"):
//! - `ngx_shm_zone_t { void *data; ngx_shm_t shm; ... }` and
//!   `ngx_shm_t { u_char *addr; size_t size; ngx_str_t name; ... }`, where
//!   `shm.addr` is the zone's `ngx_slab_pool_t *`;
//! - the exported `ngx_slab_calloc` / `ngx_slab_free`, which take the
//!   pool's mutex themselves;
//!
//! and on lua-nginx-module's exported ffi functions only (`udata_to_zone`
//! for the zone, `shdict_incr`/`shdict_store` for the reserved key). What it
//! relies on is checked before use (the zone's name is the dict's name, its
//! size and address are plausible, the symbols exist); anything unexpected
//! is an [`AttachError`] and the caller stays on the direct path.
//!
//! Lifetime: the block belongs to the zone, so it survives `nginx -s
//! reload` with the dict's contents and goes away with the zone. The
//! reserved key holds the block's offset from `shm.addr`; the first worker
//! to ADD it wins, the others free their block and use the winner's.

use std::ffi::{c_char, c_int, c_long, c_void};
use std::ptr::{self, NonNull};
use std::sync::atomic::AtomicU64;

use crate::shdict::{IncrFn, StoreFn, UdataToZoneFn};
use crate::stage::{HEADER_WORDS, LayoutError, Params, Stage, Worker};

/// The dict key under which the stage's offset is kept. It starts with a
/// NUL byte, which `get_keys` users do not produce by accident.
pub const RESERVED_KEY: &[u8] = b"\0resty.counter.stage";
/// Key size of a stage made here: keys up to 160 bytes are staged, longer
/// ones take the direct path.
pub const KEY_WORDS: usize = 20;
/// Registry entries: workers (old and new ones during a reload) that may
/// use one stage at once.
pub const REGISTRY: usize = 128;
/// Smallest stage worth making, in bytes.
pub const MIN_STAGE_BYTES: usize = 64 << 10;
/// Largest stage made, in bytes.
pub const MAX_STAGE_BYTES: usize = 64 << 20;

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

use crate::shdict::{LUA_TNUMBER, NGX_OK, SHDICT_ADD};

/// Why the stage cannot be used; the caller stays on the direct path and
/// logs one WARN with [`AttachError::message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachError {
    /// No lua-nginx-module shdict entry points in this process.
    NoSymbol,
    /// No `ngx_slab_calloc`/`ngx_slab_free` exported by this nginx.
    NoSlab,
    /// `dict[1]` did not lead to a zone.
    BadZone,
    /// The zone's name is not the dict's: the struct layout is not the one
    /// this file expects.
    NameMismatch,
    /// The zone's size or address is implausible.
    Implausible,
    /// The zone is too small for a stage of [`MIN_STAGE_BYTES`].
    ZoneTooSmall,
    /// The slab allocator had no room for the stage.
    NoMemory,
    /// The reserved key holds something that is not a valid offset.
    BadOffset,
    /// The block at the offset is not a stage of this layout and pool.
    BadStage(LayoutError),
    /// The stage's registry is full of live workers.
    RegistryFull,
    /// The dict refused the reserved key (full, or not a number).
    Dict,
}

impl AttachError {
    /// A static message for the log line.
    pub fn message(self) -> &'static std::ffi::CStr {
        match self {
            AttachError::NoSymbol => c"no lua-nginx-module shdict entry points",
            AttachError::NoSlab => c"nginx exports no ngx_slab_calloc/ngx_slab_free",
            AttachError::BadZone => c"no shared zone behind the dict",
            AttachError::NameMismatch => c"the zone's name is not the dict's (unknown nginx ABI)",
            AttachError::Implausible => c"the zone's size or address is implausible",
            AttachError::ZoneTooSmall => c"the dict is too small for a stage",
            AttachError::NoMemory => c"no room in the dict's zone for the stage",
            AttachError::BadOffset => c"the reserved key does not hold a stage offset",
            AttachError::BadStage(_) => c"the stage header does not match",
            AttachError::RegistryFull => c"the stage's worker registry is full",
            AttachError::Dict => c"the dict refused the reserved key",
        }
    }

    /// Whether a later attach may succeed: the zone may get room (keys
    /// expire or are deleted, another worker's block gets published), the
    /// registry frees entries as old workers exit, the dict may take the
    /// reserved key. The others are facts about this nginx or this dict.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            AttachError::NoMemory | AttachError::RegistryFull | AttachError::Dict
        )
    }
}

/// The nginx entry points an attach uses.
#[derive(Clone, Copy)]
struct Entries {
    incr: IncrFn,
    store: StoreFn,
    calloc: SlabAllocFn,
    free: SlabFreeFn,
}

/// This worker's view of a dict's stage.
pub struct ZoneStage {
    /// The stage, over the zone's memory (mapped for the worker's life).
    pub stage: Stage<'static>,
    /// This worker's registry entry.
    pub worker: Worker,
    /// Offset of the stage from the zone's start (`shm.addr`).
    pub offset: usize,
    /// Whether this worker's block won the ADD.
    pub created: bool,
    zone: NonNull<c_void>,
    entries: Entries,
}

impl std::fmt::Debug for ZoneStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZoneStage")
            .field("stage", &self.stage)
            .field("worker", &self.worker)
            .field("offset", &self.offset)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

fn lookup(name: &str) -> Option<NonNull<c_void>> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only reads
    // the process's symbol tables.
    NonNull::new(unsafe { libc::dlsym(libc::RTLD_DEFAULT, cname.as_ptr()) })
}

/// Bytes of stage for a zone of `zone_size` bytes: an eighth of the zone
/// (the rest stays the users' keys), at most [`MAX_STAGE_BYTES`]; 0 when
/// that is under [`MIN_STAGE_BYTES`]. `asked` (non-zero: the `stage_bytes`
/// option) replaces the eighth, still within the bounds and at most half
/// the zone.
pub fn stage_bytes_for(zone_size: usize, asked: usize) -> usize {
    let want = if asked == 0 {
        zone_size / 8
    } else {
        asked.min(zone_size / 2)
    };
    let b = want.min(MAX_STAGE_BYTES) & !4095;
    if b < MIN_STAGE_BYTES { 0 } else { b }
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

/// CLOCK_MONOTONIC in ms: one clock for every worker of the machine.
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a valid local.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
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

/// The zone's start and size, checked: the zone's name must be the dict's
/// (which proves the struct layout), the size plausible, the address
/// page-aligned (nginx maps zones with mmap).
///
/// # Safety
/// `zone` must be the `ngx_shm_zone_t *` lua-nginx-module returned for a
/// live dict.
unsafe fn zone_memory(
    zone: NonNull<c_void>,
    dict_name: &[u8],
) -> Result<(usize, usize), AttachError> {
    // SAFETY: zone points at an ngx_shm_zone_t, whose leading fields are
    // NgxShmZone's (nginx core ABI, same in 1.22 and 1.29); only read.
    let z = unsafe { &*zone.as_ptr().cast::<NgxShmZone>() };
    let name = &z.shm.name;
    if name.data.is_null() || name.len != dict_name.len() || name.len > 4096 {
        return Err(AttachError::NameMismatch);
    }
    // SAFETY: name.data points at name.len bytes of the configured zone
    // name, which lives as long as the cycle (checked non-NULL above).
    let stored = unsafe { std::slice::from_raw_parts(name.data, name.len) };
    if stored != dict_name {
        return Err(AttachError::NameMismatch);
    }
    let addr = z.shm.addr as usize;
    let size = z.shm.size;
    if addr == 0 || addr % 4096 != 0 || !(8192..=1 << 40).contains(&size) {
        return Err(AttachError::Implausible);
    }
    Ok((addr, size))
}

/// The stage at `offset` in the zone, validated.
///
/// # Safety
/// `addr`/`size` must be a live zone's memory, mapped for the worker's life.
unsafe fn stage_at(addr: usize, size: usize, offset: usize) -> Result<Stage<'static>, AttachError> {
    if offset % 8 != 0 || offset < 64 || offset + HEADER_WORDS * 8 > size {
        return Err(AttachError::BadOffset);
    }
    let base = (addr + offset) as *const AtomicU64;
    // SAFETY: base is 8-aligned inside the zone with HEADER_WORDS words
    // before its end (checked above); zone memory stays mapped and is only
    // accessed atomically by every worker.
    let head = unsafe { std::slice::from_raw_parts(base, HEADER_WORDS) };
    let total = Stage::stored_words(head).ok_or(AttachError::BadOffset)?;
    if total < HEADER_WORDS || total > (size - offset) / 8 {
        return Err(AttachError::BadStage(LayoutError::TooSmall));
    }
    // SAFETY: as above, with total words inside the zone (checked).
    let words = unsafe { std::slice::from_raw_parts(base, total) };
    Stage::attach(words, addr as u64).map_err(AttachError::BadStage)
}

impl ZoneStage {
    /// Finds or makes the stage of the dict whose `dict[1]` is
    /// `zone_udata`, and registers this worker in it.
    ///
    /// # Safety
    /// `zone_udata` must be NULL or `dict[1]` of a live shared dict named
    /// `dict_name`.
    pub unsafe fn attach(
        subsystem: &[u8],
        zone_udata: *mut c_void,
        dict_name: &[u8],
        asked_bytes: usize,
    ) -> Result<Self, AttachError> {
        if zone_udata.is_null() {
            return Err(AttachError::BadZone);
        }
        let prefixes: &[&str] = match subsystem {
            b"stream" => &["ngx_stream_lua", "ngx_meta_lua"],
            _ => &["ngx_http_lua", "ngx_meta_lua"],
        };
        let (Some(calloc), Some(free)) = (lookup("ngx_slab_calloc"), lookup("ngx_slab_free"))
        else {
            return Err(AttachError::NoSlab);
        };
        for prefix in prefixes {
            let (Some(incr), Some(store)) = (
                lookup(&format!("{prefix}_ffi_shdict_incr")),
                lookup(&format!("{prefix}_ffi_shdict_store")),
            ) else {
                continue;
            };
            // SAFETY: these are nginx's and lua-nginx-module's exported
            // functions, whose C signatures are the fn types named here.
            let entries = unsafe {
                Entries {
                    incr: std::mem::transmute::<*mut c_void, IncrFn>(incr.as_ptr()),
                    store: std::mem::transmute::<*mut c_void, StoreFn>(store.as_ptr()),
                    calloc: std::mem::transmute::<*mut c_void, SlabAllocFn>(calloc.as_ptr()),
                    free: std::mem::transmute::<*mut c_void, SlabFreeFn>(free.as_ptr()),
                }
            };
            let zone = match lookup(&format!("{prefix}_ffi_shdict_udata_to_zone")) {
                Some(f) => {
                    // SAFETY: same module, signature UdataToZoneFn.
                    let f: UdataToZoneFn = unsafe { std::mem::transmute(f.as_ptr()) };
                    // SAFETY: zone_udata is dict[1] of a live dict.
                    unsafe { f(zone_udata) }
                }
                None => zone_udata,
            };
            let zone = NonNull::new(zone).ok_or(AttachError::BadZone)?;
            // SAFETY: zone came from the module for a live dict.
            return unsafe { Self::attach_zone(zone, dict_name, entries, asked_bytes) };
        }
        Err(AttachError::NoSymbol)
    }

    /// # Safety
    /// `zone` must be a live dict's `ngx_shm_zone_t *`; `entries` nginx's.
    unsafe fn attach_zone(
        zone: NonNull<c_void>,
        dict_name: &[u8],
        entries: Entries,
        asked_bytes: usize,
    ) -> Result<Self, AttachError> {
        // SAFETY: forwarded contract.
        let (addr, size) = unsafe { zone_memory(zone, dict_name) }?;
        let mut made = None;
        for _ in 0..3 {
            if let Some(offset) = read_offset(zone, entries)? {
                if let Some((p, _)) = made {
                    // Another worker's block won: ours goes back.
                    // SAFETY: p came from ngx_slab_calloc on this pool and
                    // nobody else knows it.
                    unsafe { (entries.free)(addr as *mut c_void, p) };
                }
                // SAFETY: addr/size are the live zone's.
                let stage = unsafe { stage_at(addr, size, offset) }?;
                return Self::finish(stage, offset, false, zone, entries);
            }
            let (p, stage) = match made {
                Some(m) => m,
                None => match make_stage(addr, size, entries, asked_bytes) {
                    Ok(m) => {
                        made = Some(m);
                        m
                    }
                    // Workers start together: the block that took the room
                    // may be another worker's stage, published meanwhile.
                    Err(AttachError::NoMemory) => match read_offset(zone, entries)? {
                        Some(_) => continue,
                        None => return Err(AttachError::NoMemory),
                    },
                    Err(e) => return Err(e),
                },
            };
            let offset = p as usize - addr;
            match add_offset(zone, entries, offset)? {
                true => return Self::finish(stage, offset, true, zone, entries),
                false => continue, // "exists": read the winner's
            }
        }
        if let Some((p, _)) = made {
            // SAFETY: as above: ours, unpublished.
            unsafe { (entries.free)(addr as *mut c_void, p) };
        }
        Err(AttachError::Dict)
    }

    fn finish(
        stage: Stage<'static>,
        offset: usize,
        created: bool,
        zone: NonNull<c_void>,
        entries: Entries,
    ) -> Result<Self, AttachError> {
        let worker = stage
            .register(my_pid(), &alive)
            .ok_or(AttachError::RegistryFull)?;
        Ok(ZoneStage {
            stage,
            worker,
            offset,
            created,
            zone,
            entries,
        })
    }

    /// Makes sure the reserved key still names this stage: after an LRU
    /// eviction or `flush_all` it is added again (this worker keeps its
    /// cached pointer either way). Returns `Ok(true)` if it had to re-add.
    /// If another stage's offset is there by now (a worker that came up
    /// while the key was missing made one), both stages stay in use: each
    /// is folded by its own lease holder; see docs/DESIGN.md.
    pub fn ensure_key(&self) -> Result<bool, AttachError> {
        if read_offset(self.zone, self.entries)?.is_some() {
            return Ok(false);
        }
        add_offset(self.zone, self.entries, self.offset)?;
        Ok(true)
    }

    /// Unregisters this worker and gives the lease up (worker exit).
    pub fn leave(&self) {
        self.stage.release_lease(self.worker.pid());
        self.stage.unregister(self.worker);
    }
}

/// Allocates and initialises a stage block from the zone's slab pool.
fn make_stage(
    addr: usize,
    size: usize,
    entries: Entries,
    asked_bytes: usize,
) -> Result<(*mut c_void, Stage<'static>), AttachError> {
    let bytes = stage_bytes_for(size, asked_bytes);
    if bytes == 0 {
        return Err(AttachError::ZoneTooSmall);
    }
    // SAFETY: addr is the zone's ngx_slab_pool_t (shm.addr, as
    // lua-nginx-module's zone init casts it); calloc locks the pool.
    let p = unsafe { (entries.calloc)(addr as *mut c_void, bytes) };
    if p.is_null() {
        return Err(AttachError::NoMemory);
    }
    let off = p as usize - addr;
    if p as usize % 8 != 0 || p as usize <= addr || off + bytes > size {
        // SAFETY: p came from this pool's calloc.
        unsafe { (entries.free)(addr as *mut c_void, p) };
        return Err(AttachError::Implausible);
    }
    let words = bytes / 8;
    // SAFETY: p is 8-aligned, zeroed, `bytes` long inside the zone, and
    // only this worker knows it until its offset is published.
    let region = unsafe { std::slice::from_raw_parts(p as *const AtomicU64, words) };
    let params = Params {
        slots: Params::slots_for(words, KEY_WORDS, REGISTRY),
        key_words: KEY_WORDS,
        registry: REGISTRY,
        seed: random_seed(),
        anchor: addr as u64,
    };
    match Stage::init(region, params) {
        Ok(st) => Ok((p, st)),
        Err(e) => {
            // SAFETY: as above.
            unsafe { (entries.free)(addr as *mut c_void, p) };
            Err(AttachError::BadStage(e))
        }
    }
}

/// Reads the reserved key with `incr(key, 0)` (no init): the offset, or
/// `None` when the key is missing.
fn read_offset(zone: NonNull<c_void>, e: Entries) -> Result<Option<usize>, AttachError> {
    let mut value = 0.0f64;
    let mut err: *mut c_char = ptr::null_mut();
    let mut forcible: c_int = 0;
    // SAFETY: zone is a live dict's; the key is a static slice; every
    // out-pointer points at a local.
    let rc = unsafe {
        (e.incr)(
            zone.as_ptr(),
            RESERVED_KEY.as_ptr(),
            RESERVED_KEY.len(),
            &mut value,
            &mut err,
            0,
            0.0,
            0 as c_long,
            &mut forcible,
        )
    };
    if rc == NGX_OK {
        if !(value.is_finite() && value >= 0.0 && value.fract() == 0.0 && value < 1e15) {
            return Err(AttachError::BadOffset);
        }
        return Ok(Some(value as usize));
    }
    if message(err) == b"not found" {
        return Ok(None);
    }
    Err(AttachError::Dict)
}

/// ADDs the reserved key: `Ok(false)` when it exists already.
fn add_offset(zone: NonNull<c_void>, e: Entries, offset: usize) -> Result<bool, AttachError> {
    let mut err: *mut c_char = ptr::null_mut();
    let mut forcible: c_int = 0;
    // SAFETY: as in read_offset; a number store reads no string buffer.
    let rc = unsafe {
        (e.store)(
            zone.as_ptr(),
            SHDICT_ADD,
            RESERVED_KEY.as_ptr(),
            RESERVED_KEY.len(),
            LUA_TNUMBER,
            ptr::null(),
            0,
            offset as f64,
            0,
            0,
            &mut err,
            &mut forcible,
        )
    };
    if rc == NGX_OK {
        return Ok(true);
    }
    if message(err) == b"exists" {
        return Ok(false);
    }
    Err(AttachError::Dict)
}

fn message(err: *mut c_char) -> &'static [u8] {
    if err.is_null() {
        return b"";
    }
    // SAFETY: on error the module sets *err to a static C string.
    unsafe { std::ffi::CStr::from_ptr(err) }.to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_size_is_a_bounded_quarter_of_the_zone() {
        assert_eq!(stage_bytes_for(256 << 10, 0), 0, "too small");
        assert_eq!(stage_bytes_for(512 << 10, 0), 64 << 10);
        assert_eq!(stage_bytes_for(16 << 20, 0), 2 << 20);
        assert_eq!(stage_bytes_for(1 << 30, 0), MAX_STAGE_BYTES);
        assert_eq!(stage_bytes_for(16 << 20, 1 << 20), 1 << 20, "asked");
        assert_eq!(stage_bytes_for(1 << 20, 1 << 30), 512 << 10, "half at most");
        assert_eq!(stage_bytes_for(16 << 20, 1000), 0, "asked too little");
        let slots = Params::slots_for((4 << 20) / 8, KEY_WORDS, REGISTRY);
        assert!(slots > 18_000, "{slots} slots in 4 MiB");
    }

    #[test]
    fn the_zone_is_checked_before_use() {
        let name = b"counters";
        let mut page = vec![0u8; 3 * 4096];
        let aligned = (page.as_mut_ptr() as usize + 4095) & !4095;
        let mut z = NgxShmZone {
            data: ptr::null_mut(),
            shm: NgxShm {
                addr: aligned as *mut u8,
                size: 8192,
                name: NgxStr {
                    len: name.len(),
                    data: name.as_ptr(),
                },
            },
        };
        let zp = NonNull::from(&mut z).cast();
        // SAFETY: (test) zp points at a NgxShmZone with a valid name.
        unsafe {
            assert_eq!(zone_memory(zp, b"counters"), Ok((aligned, 8192)));
            assert_eq!(zone_memory(zp, b"counter"), Err(AttachError::NameMismatch));
            assert_eq!(zone_memory(zp, b"Counters"), Err(AttachError::NameMismatch));
        }
        z.shm.addr = (aligned + 8) as *mut u8;
        let zp = NonNull::from(&mut z).cast();
        // SAFETY: (test) as above.
        let r = unsafe { zone_memory(zp, b"counters") };
        assert_eq!(r, Err(AttachError::Implausible));
    }

    #[test]
    fn a_stage_is_found_only_at_a_valid_offset_with_its_anchor() {
        let words: Vec<AtomicU64> = (0..4096).map(|_| AtomicU64::new(0)).collect();
        let addr = words.as_ptr() as usize;
        let size = words.len() * 8;
        let p = Params {
            slots: 16,
            key_words: 2,
            registry: 2,
            seed: 1,
            anchor: addr as u64,
        };
        Stage::init(&words[16..], p).unwrap();
        // SAFETY: (test) addr/size describe `words`, alive for the test.
        unsafe {
            assert!(stage_at(addr, size, 128).is_ok());
            assert_eq!(
                stage_at(addr, size, 129).unwrap_err(),
                AttachError::BadOffset
            );
            assert_eq!(
                stage_at(addr, size, size).unwrap_err(),
                AttachError::BadOffset
            );
            assert_eq!(
                stage_at(addr, size, 256).unwrap_err(),
                AttachError::BadStage(LayoutError::TooSmall)
            );
        }
        words[16 + 6].store(addr as u64 + 1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: (test) as above.
        let r = unsafe { stage_at(addr, size, 128) };
        assert_eq!(
            r.unwrap_err(),
            AttachError::BadStage(LayoutError::BadAnchor)
        );
    }

    #[test]
    fn attach_outside_nginx_refuses() {
        let mut byte = 0u8;
        // SAFETY: (test) no entry point exists, so the pointer is not read.
        let r = unsafe { ZoneStage::attach(b"http", (&mut byte as *mut u8).cast(), b"x", 0) };
        assert!(matches!(
            r,
            Err(AttachError::NoSlab | AttachError::NoSymbol)
        ));
        // SAFETY: (test) NULL is refused first.
        let r = unsafe { ZoneStage::attach(b"http", ptr::null_mut(), b"x", 0) };
        assert_eq!(r.unwrap_err(), AttachError::BadZone);
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
