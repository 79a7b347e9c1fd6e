//! The shared dict's C entry point, imported from lua-nginx-module.
//!
//! Part of the FFI layer: it finds `*_ffi_shdict_incr` and `*_ffi_shdict_store`
//! in the worker's global symbol namespace (`dlsym(RTLD_DEFAULT)`: nginx
//! loads the lua module with `RTLD_GLOBAL`, OpenResty links it into the
//! binary) and does what `dict:incr(key, delta, 0)` means, minus the Lua.
//!
//! It does not call incr with an init value. lua-nginx-module (0.10.23 at
//! least) links a new node into the dict's tree before copying its key in,
//! so when the new key's CRC32 equals an existing key's, the tree compares
//! against uninitialised bytes and the two keys can corrupt each other
//! (e.g. "buckeroo" and "plumless"). `add` copies the key first. So: incr
//! without init; on "not found", add the delta as a new number; if another
//! worker added it in between ("exists"), incr again.

use std::ffi::{CStr, c_char, c_int, c_long, c_void};
use std::ptr::{self, NonNull};

use crate::flush::{Dict, DictError, Written};

/// `ngx_http_lua_ffi_shdict_incr` and its stream and meta twins; stable
/// since lua-nginx-module 0.10.12.
pub type IncrFn = unsafe extern "C" fn(
    zone: *mut c_void,
    key: *const u8,
    key_len: usize,
    value: *mut f64,
    err: *mut *mut c_char,
    has_init: c_int,
    init: f64,
    init_ttl: c_long,
    forcible: *mut c_int,
) -> c_int;

/// `ngx_http_lua_ffi_shdict_store` and its twins; stable since 0.10.x.
pub type StoreFn = unsafe extern "C" fn(
    zone: *mut c_void,
    op: c_int,
    key: *const u8,
    key_len: usize,
    value_type: c_int,
    str_value_buf: *const u8,
    str_value_len: usize,
    num_value: f64,
    exptime: c_long,
    user_flags: c_int,
    errmsg: *mut *mut c_char,
    forcible: *mut c_int,
) -> c_int;

/// `ngx_http_lua_ffi_shdict_udata_to_zone` (0.10.14 and later).
pub type UdataToZoneFn = unsafe extern "C" fn(zone_udata: *mut c_void) -> *mut c_void;

const NGX_OK: c_int = 0;
/// A plain store: `dict:set`.
const SHDICT_SET: c_int = 0;
/// `NGX_HTTP_LUA_SHDICT_ADD`: store only if the key is missing.
const SHDICT_ADD: c_int = 1;
/// `NGX_HTTP_LUA_SHDICT_REPLACE`: store only if the key exists.
const SHDICT_REPLACE: c_int = 2;
/// `LUA_TNUMBER`: the stored value is `num_value`.
const LUA_TNUMBER: c_int = 3;
/// How often a key may vanish and reappear between incr and add.
const ATTEMPTS: usize = 3;

/// Why a dict handle could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// No `*_ffi_shdict_incr` or `*_ffi_shdict_store` in this process: not
    /// inside nginx with the lua module, or an unknown subsystem.
    NoSymbol,
    /// `dict[1]` did not lead to a zone.
    BadZone,
}

/// Symbol prefixes to try, in order, for a subsystem (`ngx.config.subsystem`).
fn prefixes(subsystem: &[u8]) -> &'static [&'static str] {
    match subsystem {
        b"stream" => &["ngx_stream_lua", "ngx_meta_lua"],
        _ => &["ngx_http_lua", "ngx_meta_lua"],
    }
}

/// A symbol of the worker's global namespace (nginx, the lua module).
pub(crate) fn lookup(name: &str) -> Option<NonNull<c_void>> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only reads
    // the process's symbol tables.
    NonNull::new(unsafe { libc::dlsym(libc::RTLD_DEFAULT, cname.as_ptr()) })
}

/// A shared dict zone and the entry points that write numbers into it.
#[derive(Debug)]
pub struct ShDict {
    zone: NonNull<c_void>,
    incr: IncrFn,
    store: StoreFn,
    to_zone: Option<UdataToZoneFn>,
}

impl ShDict {
    /// Resolves the entry points for `subsystem` and turns `dict[1]` into a
    /// zone: through `udata_to_zone` where the module has it (`dict[1]` is a
    /// full userdata since 0.10.14), else `dict[1]` is the zone itself.
    ///
    /// # Safety
    /// `zone_udata` must be NULL or `dict[1]` of a live shared dict.
    pub unsafe fn open(subsystem: &[u8], zone_udata: *mut c_void) -> Result<Self, OpenError> {
        if zone_udata.is_null() {
            return Err(OpenError::BadZone);
        }
        for prefix in prefixes(subsystem) {
            let (Some(incr), Some(store)) = (
                lookup(&format!("{prefix}_ffi_shdict_incr")),
                lookup(&format!("{prefix}_ffi_shdict_store")),
            ) else {
                continue;
            };
            // SAFETY: the symbol is lua-nginx-module's shdict incr, whose C
            // signature is IncrFn in every version this crate supports.
            let incr: IncrFn = unsafe { std::mem::transmute(incr.as_ptr()) };
            // SAFETY: likewise, shdict store has the signature StoreFn.
            let store: StoreFn = unsafe { std::mem::transmute(store.as_ptr()) };
            let to_zone = lookup(&format!("{prefix}_ffi_shdict_udata_to_zone")).map(|f| {
                // SAFETY: same module, signature UdataToZoneFn.
                unsafe { std::mem::transmute::<*mut c_void, UdataToZoneFn>(f.as_ptr()) }
            });
            let mut d = ShDict {
                zone: NonNull::dangling(),
                incr,
                store,
                to_zone,
            };
            // SAFETY: forwarded contract (zone_udata is a live dict's dict[1]).
            d.zone = unsafe { d.zone_of(zone_udata) }?;
            return Ok(d);
        }
        Err(OpenError::NoSymbol)
    }

    /// The zone behind another dict's `dict[1]`, as `open` finds it.
    ///
    /// # Safety
    /// `zone_udata` must be NULL or `dict[1]` of a live shared dict of the
    /// same subsystem.
    unsafe fn zone_of(&self, zone_udata: *mut c_void) -> Result<NonNull<c_void>, OpenError> {
        if zone_udata.is_null() {
            return Err(OpenError::BadZone);
        }
        let zone = match self.to_zone {
            // SAFETY: zone_udata is dict[1], the userdata the module created
            // for that dict; the call only reads it.
            Some(f) => unsafe { f(zone_udata) },
            None => zone_udata,
        };
        NonNull::new(zone).ok_or(OpenError::BadZone)
    }

    /// Another dict of the same subsystem, through the same entry points
    /// (the stage zone, next to a counter dict).
    ///
    /// # Safety
    /// `zone_udata` must be NULL or `dict[1]` of a live shared dict of the
    /// same subsystem.
    pub unsafe fn sibling(&self, zone_udata: *mut c_void) -> Result<ShDict, OpenError> {
        Ok(ShDict {
            // SAFETY: forwarded contract.
            zone: unsafe { self.zone_of(zone_udata) }?,
            incr: self.incr,
            store: self.store,
            to_zone: self.to_zone,
        })
    }

    /// The dict's `ngx_shm_zone_t *`.
    pub fn zone(&self) -> NonNull<c_void> {
        self.zone
    }

    /// The number at `key`, or `None` when the key is missing.
    pub fn read_number(&mut self, key: &[u8]) -> Result<Option<f64>, DictError> {
        Ok(self.incr_existing(key, 0.0)?.map(|(v, _)| v))
    }

    /// `dict:add(key, value)`: false when the key exists.
    pub fn add_number(&mut self, key: &[u8], value: f64) -> Result<bool, DictError> {
        Ok(self.add_new(key, value)?.is_some())
    }

    /// `dict:set(key, value)`.
    pub fn set_number(&mut self, key: &[u8], value: f64) -> Result<(), DictError> {
        match self.store_number(SHDICT_SET, key, value) {
            Ok(_) => Ok(()),
            Err(err) => refusal(err, b"").and(Err(DictError::Other)),
        }
    }

    /// A dict over explicit entry points: the tests' stand-ins.
    ///
    /// # Safety
    /// `incr` and `store` must behave like lua-nginx-module's for `zone`.
    #[cfg(test)]
    pub unsafe fn with_entries(zone: NonNull<c_void>, incr: IncrFn, store: StoreFn) -> Self {
        ShDict {
            zone,
            incr,
            store,
            to_zone: None,
        }
    }

    /// `dict:incr(key, value, init)` without handing incr an init (see the
    /// module docs): adds `value` to the number at `key`, or creates the
    /// key at `init + value`. Returns the new value and whether other
    /// entries were evicted. A non-finite sum is refused as in
    /// [`Dict::incr`].
    pub fn incr_or_add(
        &mut self,
        key: &[u8],
        value: f64,
        init: f64,
    ) -> Result<(f64, Written), DictError> {
        for _ in 0..ATTEMPTS {
            if let Some(done) = self.incr_existing(key, value)? {
                return Ok(done);
            }
            if let Some(w) = self.add_new(key, init + value)? {
                return Ok((init + value, w));
            }
        }
        Err(DictError::Other)
    }

    /// `dict:incr(key, delta)`, no init: `Ok(None)` when the key is missing,
    /// else the new value.
    fn incr_existing(
        &mut self,
        key: &[u8],
        delta: f64,
    ) -> Result<Option<(f64, Written)>, DictError> {
        let mut value = delta;
        let mut err: *mut c_char = ptr::null_mut();
        let mut forcible: c_int = 0;
        // SAFETY: zone came from the module for a live dict (dicts live as
        // long as the worker); key is a valid slice for key.len() bytes;
        // every out-pointer points at a local that outlives the call.
        let rc = unsafe {
            (self.incr)(
                self.zone.as_ptr(),
                key.as_ptr(),
                key.len(),
                &mut value,
                &mut err,
                0,
                0.0,
                0,
                &mut forcible,
            )
        };
        if rc == NGX_OK {
            if !value.is_finite() {
                // Finite old value plus finite delta overflowed (another
                // worker's write raced ours, or the sum left the range).
                // The dict must not hold it: saturate, and drop this delta.
                self.saturate(key, value);
                return Err(DictError::NotFinite);
            }
            return Ok(Some((value, Written { evicted: false })));
        }
        refusal(err, b"not found").map(|_| None)
    }

    /// Replaces a non-finite number at `key` with the largest finite number
    /// of its sign (NaN: 0). Best effort: if the replace fails the key is
    /// left as it is, and the caller reports the drop either way.
    fn saturate(&mut self, key: &[u8], value: f64) {
        let repaired = if value.is_nan() {
            0.0
        } else {
            f64::MAX.copysign(value)
        };
        let _ = self.store_number(SHDICT_REPLACE, key, repaired);
    }

    /// `dict:add(key, delta)`: `Ok(None)` when the key exists by now.
    fn add_new(&mut self, key: &[u8], delta: f64) -> Result<Option<Written>, DictError> {
        match self.store_number(SHDICT_ADD, key, delta) {
            Ok(evicted) => Ok(Some(Written { evicted })),
            Err(err) => refusal(err, b"exists"),
        }
    }

    /// `shdict_store(op, key, number)`: whether entries were evicted for
    /// it (the forcible flag), or nginx's static message.
    fn store_number(&mut self, op: c_int, key: &[u8], value: f64) -> Result<bool, *mut c_char> {
        let mut err: *mut c_char = ptr::null_mut();
        let mut forcible: c_int = 0;
        // SAFETY: as in incr_existing; a number store reads no string
        // buffer, so NULL with length 0 is what lua-resty-core passes too.
        let rc = unsafe {
            (self.store)(
                self.zone.as_ptr(),
                op,
                key.as_ptr(),
                key.len(),
                LUA_TNUMBER,
                ptr::null(),
                0,
                value,
                0,
                0,
                &mut err,
                &mut forcible,
            )
        };
        if rc == NGX_OK {
            Ok(forcible != 0)
        } else {
            Err(err)
        }
    }
}

/// What a refused call means: `Ok(None)` for `try_other`, the one message
/// that says the other call (add after incr, incr after add) is the right
/// one; otherwise the error in the static message nginx left in `*err`.
fn refusal(err: *mut c_char, try_other: &[u8]) -> Result<Option<Written>, DictError> {
    if err.is_null() {
        return Err(DictError::Other);
    }
    // SAFETY: on error the module sets *err to a static C string.
    let msg = unsafe { CStr::from_ptr(err) }.to_bytes();
    if msg == try_other {
        Ok(None)
    } else {
        Err(DictError::from_message(msg))
    }
}

impl Dict for ShDict {
    fn incr(&mut self, key: &[u8], delta: f64) -> Result<Written, DictError> {
        self.incr_or_add(key, delta, 0.0).map(|(_, w)| w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The zone the stand-in entry points work on.
    #[derive(Default)]
    struct Zone {
        map: HashMap<Vec<u8>, f64>,
        full: bool,
        string_key: Option<Vec<u8>>,
        /// Keys another worker adds between our incr and our add.
        raced: Vec<Vec<u8>>,
        incr_inits: Vec<c_int>,
        adds: usize,
    }

    static NO_MEMORY: &CStr = c"no memory";
    static NOT_A_NUMBER: &CStr = c"not a number";
    static NOT_FOUND: &CStr = c"not found";
    static EXISTS: &CStr = c"exists";

    fn fail(err: *mut *mut c_char, msg: &'static CStr) -> c_int {
        // SAFETY: (test) ShDict passes a valid err pointer.
        unsafe { *err = msg.as_ptr() as *mut c_char };
        -1
    }

    /// A stand-in for `ngx_http_lua_ffi_shdict_incr` with its exact C ABI.
    unsafe extern "C" fn fake_incr(
        zone: *mut c_void,
        key: *const u8,
        key_len: usize,
        value: *mut f64,
        err: *mut *mut c_char,
        has_init: c_int,
        _init: f64,
        _init_ttl: c_long,
        forcible: *mut c_int,
    ) -> c_int {
        // SAFETY: (test) ShDict passes back the Zone pointer it was given and
        // valid pointers for the rest.
        let (zone, key) = unsafe {
            *forcible = 0;
            (
                &mut *(zone as *mut Zone),
                std::slice::from_raw_parts(key, key_len).to_vec(),
            )
        };
        zone.incr_inits.push(has_init);
        if zone.string_key.as_ref() == Some(&key) {
            return fail(err, NOT_A_NUMBER);
        }
        let Some(v) = zone.map.get_mut(&key) else {
            return fail(err, NOT_FOUND);
        };
        // SAFETY: (test) value points at the caller's delta.
        unsafe {
            *v += *value;
            *value = *v;
        }
        NGX_OK
    }

    /// A stand-in for `ngx_http_lua_ffi_shdict_store`, ADD of numbers only.
    unsafe extern "C" fn fake_store(
        zone: *mut c_void,
        op: c_int,
        key: *const u8,
        key_len: usize,
        value_type: c_int,
        _str: *const u8,
        _str_len: usize,
        num: f64,
        _exptime: c_long,
        _flags: c_int,
        err: *mut *mut c_char,
        forcible: *mut c_int,
    ) -> c_int {
        // SAFETY: (test) as in fake_incr.
        let (zone, key) = unsafe {
            *forcible = 0;
            (
                &mut *(zone as *mut Zone),
                std::slice::from_raw_parts(key, key_len).to_vec(),
            )
        };
        assert_eq!(value_type, LUA_TNUMBER);
        if op == SHDICT_REPLACE {
            zone.map.insert(key, num);
            return NGX_OK;
        }
        if op == SHDICT_SET {
            if zone.full {
                return fail(err, NO_MEMORY);
            }
            zone.string_key = zone.string_key.take().filter(|k| *k != key);
            zone.map.insert(key, num);
            return NGX_OK;
        }
        assert_eq!(op, SHDICT_ADD);
        zone.adds += 1;
        if let Some(at) = zone.raced.iter().position(|k| *k == key) {
            zone.raced.remove(at);
            zone.map.insert(key, 100.0);
            return fail(err, EXISTS);
        }
        if zone.map.contains_key(&key) {
            return fail(err, EXISTS);
        }
        if zone.full {
            return fail(err, NO_MEMORY);
        }
        zone.map.insert(key, num);
        // SAFETY: (test) valid forcible pointer.
        unsafe { *forcible = c_int::from(zone.map.len() > 2) };
        NGX_OK
    }

    fn dict(zone: &mut Zone) -> ShDict {
        let zone = NonNull::from(zone).cast();
        // SAFETY: (test) the fakes implement the contract over Zone.
        unsafe { ShDict::with_entries(zone, fake_incr, fake_store) }
    }

    #[test]
    fn a_number_is_read_added_only_when_missing_and_set_over_anything() {
        let mut z = Zone::default();
        let mut d = dict(&mut z);
        assert_eq!(d.read_number(b"dir"), Ok(None));
        assert_eq!(d.add_number(b"dir", 4096.0), Ok(true));
        assert_eq!(d.add_number(b"dir", 8192.0), Ok(false), "exists");
        assert_eq!(d.read_number(b"dir"), Ok(Some(4096.0)));
        assert_eq!(d.set_number(b"dir", 12288.0), Ok(()));
        assert_eq!(d.read_number(b"dir"), Ok(Some(12288.0)));
        z.string_key = Some(b"dir".to_vec());
        let mut d = dict(&mut z);
        assert_eq!(d.read_number(b"dir"), Err(DictError::NotANumber));
        assert_eq!(d.set_number(b"dir", 4096.0), Ok(()), "set over a string");
        assert_eq!(d.read_number(b"dir"), Ok(Some(4096.0)));
        z.full = true;
        let mut d = dict(&mut z);
        assert_eq!(d.set_number(b"other", 1.0), Err(DictError::NoMemory));
    }

    #[test]
    fn new_keys_are_added_existing_ones_incremented_never_with_init() {
        let mut zone = Zone::default();
        let mut d = dict(&mut zone);
        assert_eq!(d.incr(b"a\0b", 2.0), Ok(Written { evicted: false }));
        assert_eq!(d.incr(b"a\0b", 1.5), Ok(Written { evicted: false }));
        assert_eq!(d.incr(b"c", 1.0), Ok(Written { evicted: false }));
        assert_eq!(d.incr(b"d", 1.0), Ok(Written { evicted: true }));
        assert_eq!(zone.map[&b"a\0b".to_vec()], 3.5);
        assert_eq!(zone.adds, 3);
        assert!(zone.incr_inits.iter().all(|&i| i == 0), "incr with init");
    }

    #[test]
    fn a_key_another_worker_adds_first_is_incremented() {
        let mut zone = Zone {
            raced: vec![b"r".to_vec()],
            ..Zone::default()
        };
        let mut d = dict(&mut zone);
        assert_eq!(d.incr(b"r", 1.0), Ok(Written { evicted: false }));
        assert_eq!(zone.map[&b"r".to_vec()], 101.0);
    }

    #[test]
    fn maps_error_messages() {
        let mut zone = Zone {
            full: true,
            string_key: Some(b"s".to_vec()),
            ..Zone::default()
        };
        let mut d = dict(&mut zone);
        assert_eq!(d.incr(b"s", 1.0), Err(DictError::NotANumber));
        assert_eq!(d.incr(b"x", 1.0), Err(DictError::NoMemory));
    }

    #[test]
    fn an_overflowing_incr_saturates_the_key_and_is_refused() {
        let mut zone = Zone::default();
        let mut d = dict(&mut zone);
        assert!(d.incr(b"k", 1e308).is_ok());
        assert_eq!(d.incr(b"k", 1e308), Err(DictError::NotFinite));
        assert_eq!(d.incr(b"n", -1e308), Ok(Written { evicted: false }));
        assert_eq!(d.incr(b"n", -1e308), Err(DictError::NotFinite));
        assert_eq!(zone.map[&b"k".to_vec()], f64::MAX);
        assert_eq!(zone.map[&b"n".to_vec()], -f64::MAX);
    }

    #[test]
    fn incr_or_add_creates_at_init_plus_value_and_returns_the_new_value() {
        let mut zone = Zone::default();
        let mut d = dict(&mut zone);
        assert_eq!(
            d.incr_or_add(b"r", -1.0, 1.0),
            Ok((0.0, Written { evicted: false }))
        );
        assert_eq!(d.incr_or_add(b"r", 5.0, 1.0).map(|(v, _)| v), Ok(5.0));
        assert_eq!(d.incr_or_add(b"r", -5.0, 5.0).map(|(v, _)| v), Ok(0.0));
        assert_eq!(zone.map[&b"r".to_vec()], 0.0);
        assert!(zone.incr_inits.iter().all(|&i| i == 0), "incr with init");
    }

    #[test]
    fn open_outside_nginx_finds_no_symbol() {
        let mut byte = 0u8;
        let p = (&mut byte as *mut u8).cast();
        // SAFETY: (test) no entry point exists here, so p is never read.
        unsafe {
            assert_eq!(ShDict::open(b"http", p).unwrap_err(), OpenError::NoSymbol);
            assert_eq!(ShDict::open(b"stream", p).unwrap_err(), OpenError::NoSymbol);
            assert_eq!(
                ShDict::open(b"http", ptr::null_mut()).unwrap_err(),
                OpenError::BadZone
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A stand-in incr that accepts every write.
    unsafe extern "C" fn accept_incr(
        _zone: *mut c_void,
        _key: *const u8,
        _key_len: usize,
        _value: *mut f64,
        _err: *mut *mut c_char,
        _has_init: c_int,
        _init: f64,
        _init_ttl: c_long,
        forcible: *mut c_int,
    ) -> c_int {
        // SAFETY: (test) ShDict always passes a valid forcible pointer.
        unsafe { *forcible = 0 };
        NGX_OK
    }

    /// A stand-in store that is never reached (every incr succeeds).
    unsafe extern "C" fn unreachable_store(
        _zone: *mut c_void,
        _op: c_int,
        _key: *const u8,
        _key_len: usize,
        _value_type: c_int,
        _str: *const u8,
        _str_len: usize,
        _num: f64,
        _exptime: c_long,
        _flags: c_int,
        _err: *mut *mut c_char,
        _forcible: *mut c_int,
    ) -> c_int {
        -1
    }

    /// A dict whose every write succeeds, for tests of the ABI adapters.
    pub fn accepting_dict() -> ShDict {
        // SAFETY: (test) the stand-ins never dereference the zone.
        unsafe { ShDict::with_entries(NonNull::dangling(), accept_incr, unreachable_store) }
    }
}
