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
//! - shared across workers (not wired into `sync()` yet): `stage.rs`, a
//!   lock-free table in shared memory that every worker publishes into and
//!   one lease holder folds into the dict; `zone.rs` allocates it in the
//!   dict's own zone; `ffi_stage.rs` exports it. See `docs/DESIGN.md`.
//!
//! `unsafe` lives in `ffi.rs`, `ffi_stage.rs`, `shdict.rs` and `zone.rs`
//! only, each block with a `// SAFETY:` line.

#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod ffi;
// Under loom the stage's atomics are loom's, which nginx memory cannot be.
#[cfg(not(loom))]
pub mod ffi_stage;
pub mod flush;
pub mod shdict;
pub mod stage;
#[cfg(not(loom))]
pub mod zone;
