//! The shared dict's C entry point, imported from lua-nginx-module.
//!
//! Part of the FFI layer: it finds `*_ffi_shdict_incr` in the worker's
//! global symbol namespace (`dlsym(RTLD_DEFAULT)`: nginx loads the lua module
//! with `RTLD_GLOBAL`, OpenResty links it into the binary) and calls it with
//! `init = 0`, the way `dict:incr(key, delta, 0)` does, minus the Lua.

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

/// `ngx_http_lua_ffi_shdict_udata_to_zone` (0.10.14 and later).
pub type UdataToZoneFn = unsafe extern "C" fn(zone_udata: *mut c_void) -> *mut c_void;

const NGX_OK: c_int = 0;

/// Why a dict handle could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// No `*_ffi_shdict_incr` in this process: not inside nginx with the
    /// lua module, or an unknown subsystem.
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

fn lookup(name: &str) -> Option<NonNull<c_void>> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only reads
    // the process's symbol tables.
    NonNull::new(unsafe { libc::dlsym(libc::RTLD_DEFAULT, cname.as_ptr()) })
}

/// A shared dict zone and the entry point that increments in it.
#[derive(Debug)]
pub struct ShDict {
    zone: NonNull<c_void>,
    incr: IncrFn,
}

impl ShDict {
    /// Resolves the entry points for `subsystem` and turns `dict[1]` into a
    /// zone: through `udata_to_zone` where the module has it (dict[1] is a
    /// full userdata since 0.10.14), else dict[1] is the zone itself.
    ///
    /// # Safety
    /// `zone_udata` must be NULL or `dict[1]` of a live shared dict.
    pub unsafe fn open(subsystem: &[u8], zone_udata: *mut c_void) -> Result<Self, OpenError> {
        if zone_udata.is_null() {
            return Err(OpenError::BadZone);
        }
        for prefix in prefixes(subsystem) {
            let Some(incr) = lookup(&format!("{prefix}_ffi_shdict_incr")) else {
                continue;
            };
            // SAFETY: the symbol is lua-nginx-module's shdict incr, whose C
            // signature is IncrFn in every version this crate supports.
            let incr: IncrFn = unsafe { std::mem::transmute(incr.as_ptr()) };
            let zone = match lookup(&format!("{prefix}_ffi_shdict_udata_to_zone")) {
                Some(f) => {
                    // SAFETY: same module, signature UdataToZoneFn.
                    let f: UdataToZoneFn = unsafe { std::mem::transmute(f.as_ptr()) };
                    // SAFETY: zone_udata is dict[1], the userdata the module
                    // created for this dict; the call only reads it.
                    unsafe { f(zone_udata) }
                }
                None => zone_udata,
            };
            let zone = NonNull::new(zone).ok_or(OpenError::BadZone)?;
            return Ok(ShDict { zone, incr });
        }
        Err(OpenError::NoSymbol)
    }

    /// A dict over an explicit entry point: the tests' stand-in.
    ///
    /// # Safety
    /// `incr` must behave like lua-nginx-module's shdict incr for `zone`.
    #[cfg(test)]
    pub unsafe fn with_entry(zone: NonNull<c_void>, incr: IncrFn) -> Self {
        ShDict { zone, incr }
    }
}

impl Dict for ShDict {
    fn incr(&mut self, key: &[u8], delta: f64) -> Result<Written, DictError> {
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
                1,
                0.0,
                0,
                &mut forcible,
            )
        };
        if rc == NGX_OK {
            return Ok(Written {
                evicted: forcible != 0,
            });
        }
        if err.is_null() {
            return Err(DictError::Other);
        }
        // SAFETY: on error the module sets *err to a static C string.
        let msg = unsafe { CStr::from_ptr(err) };
        Err(DictError::from_message(msg.to_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The zone the stand-in entry point works on.
    #[derive(Default)]
    struct Zone {
        map: HashMap<Vec<u8>, f64>,
        full: bool,
        string_key: Option<Vec<u8>>,
        last_init: Option<(c_int, f64, c_long)>,
    }

    static NO_MEMORY: &CStr = c"no memory";
    static NOT_A_NUMBER: &CStr = c"not a number";

    /// A stand-in for `ngx_http_lua_ffi_shdict_incr` with its exact C ABI.
    unsafe extern "C" fn fake_incr(
        zone: *mut c_void,
        key: *const u8,
        key_len: usize,
        value: *mut f64,
        err: *mut *mut c_char,
        has_init: c_int,
        init: f64,
        init_ttl: c_long,
        forcible: *mut c_int,
    ) -> c_int {
        // SAFETY (test): ShDict passes back the Zone pointer it was given and
        // valid pointers for the rest.
        unsafe {
            let zone = &mut *(zone as *mut Zone);
            let key = std::slice::from_raw_parts(key, key_len).to_vec();
            zone.last_init = Some((has_init, init, init_ttl));
            *forcible = 0;
            if zone.string_key.as_ref() == Some(&key) {
                *err = NOT_A_NUMBER.as_ptr() as *mut c_char;
                return -1;
            }
            if zone.full && !zone.map.contains_key(&key) {
                *err = NO_MEMORY.as_ptr() as *mut c_char;
                return -1;
            }
            let v = zone.map.entry(key).or_insert(init);
            *v += *value;
            *value = *v;
            *forcible = c_int::from(zone.map.len() > 2);
            NGX_OK
        }
    }

    fn dict(zone: &mut Zone) -> ShDict {
        let zone = NonNull::from(zone).cast();
        // SAFETY (test): fake_incr implements the contract over Zone.
        unsafe { ShDict::with_entry(zone, fake_incr) }
    }

    #[test]
    fn passes_init_zero_and_reads_results() {
        let mut zone = Zone::default();
        let mut d = dict(&mut zone);
        assert_eq!(d.incr(b"a\0b", 2.0), Ok(Written { evicted: false }));
        assert_eq!(d.incr(b"a\0b", 1.5), Ok(Written { evicted: false }));
        assert_eq!(d.incr(b"c", 1.0), Ok(Written { evicted: false }));
        assert_eq!(d.incr(b"d", 1.0), Ok(Written { evicted: true }));
        assert_eq!(zone.map[&b"a\0b".to_vec()], 3.5);
        assert_eq!(zone.last_init, Some((1, 0.0, 0)));
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
    fn open_outside_nginx_finds_no_symbol() {
        let mut byte = 0u8;
        let p = (&mut byte as *mut u8).cast();
        // SAFETY (test): no entry point exists here, so p is never read.
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

    /// A stand-in entry point that accepts every write.
    unsafe extern "C" fn accept_all(
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
        // SAFETY (test): ShDict always passes a valid forcible pointer.
        unsafe { *forcible = 0 };
        NGX_OK
    }

    /// A dict whose every write succeeds, for tests of the ABI adapters.
    pub fn accepting_dict() -> ShDict {
        // SAFETY (test): accept_all never dereferences the zone.
        unsafe { ShDict::with_entry(NonNull::dangling(), accept_all) }
    }
}
