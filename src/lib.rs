//! resty.counter's native side: the flush of per-worker counters into an
//! nginx shared dict, called from LuaJIT FFI by `lua/resty/counter.lua`.
//!
//! Where a count goes, by file (the one description; other file headers
//! point here):
//! - buffered: `lua/resty/counter.lua`, a Lua table per dict and worker
//!   (the request path never crosses into Rust);
//! - handed over: at sync time the shim hands each `(key, delta)` to the
//!   library (`ffi.rs` and `ffi_stage.rs`, the only exported functions);
//! - staged (more than one worker and a stage zone): [`stage::Stage`] adds
//!   it into a lock-free table in shared memory, the dict's region of the
//!   stage zone (`lua_shared_dict resty_counter_stage`), found or made by
//!   `zone.rs` through the zone's [`directory::Directory`]; once per
//!   interval the worker holding the lease folds the region, one write per
//!   key, into the flusher (see `docs/DESIGN.md`);
//! - flushed: [`flush::Flusher`] writes each delta into the dict (directly
//!   with one worker, or for what the stage refuses, or from the fold),
//!   keeps transient failures pending under a cap, and decides and reports
//!   each sync's result;
//! - into nginx: `shdict.rs` calls lua-nginx-module's
//!   `*_ffi_shdict_incr` and `*_ffi_shdict_store` directly.
//!
//! `unsafe` lives in `ffi.rs`, `ffi_stage.rs`, `shdict.rs` and `zone.rs`
//! only, each block with a `// SAFETY:` line; `stage.rs` and
//! `directory.rs` are safe Rust over slices of atomics.

#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

// Under loom the directory's atomics are loom's too.
pub mod directory;
pub mod ffi;
// Under loom the stage's atomics are loom's, which nginx memory cannot be.
#[cfg(not(loom))]
pub mod ffi_stage;
pub mod flush;
pub mod shdict;
pub mod stage;
#[cfg(not(loom))]
pub mod zone;
