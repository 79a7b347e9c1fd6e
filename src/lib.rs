//! resty.counter's native side: the flush of per-worker counters into an
//! nginx shared dict, called from LuaJIT FFI by `lua/resty/counter.lua`.
//!
//! Where a count goes, by file:
//! - buffered: `lua/resty/counter.lua`, a Lua table per dict and worker
//!   (the request path never crosses into Rust);
//! - handed over: the shim calls `resty_counter_flusher_add` per key at
//!   sync time (`ffi.rs`, the only exported functions);
//! - flushed: [`flush::Flusher`] writes each delta into the dict, keeps
//!   transient failures pending under a cap, and counts what happened;
//! - into nginx: `shdict.rs` calls lua-nginx-module's
//!   `*_ffi_shdict_incr` directly.
//!
//! `unsafe` lives in `ffi.rs` and `shdict.rs` only, each block with a
//! `// SAFETY:` line.

#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod ffi;
pub mod ffi_stage;
pub mod flush;
pub mod shdict;
pub mod stage;
pub mod zone;
