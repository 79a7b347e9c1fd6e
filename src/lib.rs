//! resty.counter's native side: the flush of per-worker counters into an
//! nginx shared dict, called from LuaJIT FFI by the shim,
//! `lua/resty/counter.lua` and its parts under `lua/resty/counter/`.
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
//! The calls one count goes through, top-down (names as in the code):
//!
//! Direct path (one worker, no stage zone, `stage = false`, or an attach
//! that failed):
//! 1. `_M.incr` (`lua/resty/counter.lua`) adds the step into `self.buf`, a
//!    Lua table; the first increment of a key in an interval, and every bad
//!    input, goes through `incr_slow`.
//! 2. `tick` (`timer.lua`), the dict's `ngx.timer.every` callback, calls
//!    `run_sync(self, sync_sliced)` (`sync.lua`, as are `drain`,
//!    `publish_batch`, `publish_refs` and `fold_sliced` below):
//!    `resty_counter_flusher_begin`, the body, then `end_sync`
//!    (`resty_counter_flusher_end`).
//! 3. `sync_sliced` calls `resty_counter_flusher_retry(h, SLICE_SECONDS)`
//!    until it returns 0 (`pause` between calls), then
//!    `drain(self, SLICE_SECONDS, nil)`, which walks the buffer in place
//!    (each key leaves it once handed over) and calls `pause` inside its
//!    loop after each slice: `resty_counter_slice_end` (`ffi.rs`) lets
//!    other runnable processes of the CPU run (`sched_yield`, at most once
//!    per `YIELD_EVERY_US` of the sync's work), then
//!    `ngx.sleep(SLICE_PAUSE)` follows when it finds work waiting for the
//!    event loop (`event_loop.rs`), else nothing. A manual `c:sync()` runs
//!    `sync_yielding` (the same in slices, never through the stage) or, in
//!    phases that cannot yield and at exit, `sync_now` (no budget).
//! 4. `drain` calls `resty_counter_flusher_write` (`ffi.rs`) once per key,
//!    and `report` for any result but `RC_STORED`.
//! 5. [`flush::Flusher::add`] merges the key's pending delta, if any, and
//!    writes (`write_new`); [`flush::Flusher::retry`] writes pending ones.
//! 6. [`shdict::ShDict`]'s [`flush::Dict::incr`] is `incr_or_add`:
//!    `*_ffi_shdict_incr` without init, then `*_ffi_shdict_store` (ADD) for
//!    a new key.
//!
//! Staged path (two or more workers and a stage zone):
//! 1. `_M.incr` as above.
//! 2. `tick` → `run_sync(self, sync_sliced)` as above.
//! 3. `sync_sliced`: the retries as above, then `stage_of`
//!    (`stage.lua`; at a worker's first sync `resty_counter_stage_attach` in
//!    `ffi_stage.rs`: `zone::ZoneStage::attach`, which finds or makes the
//!    dict's region through the [`directory::Directory`]), then
//!    `drain(self, SLICE_SECONDS, self.stage)`.
//! 4. `drain` fills two sets of batch arrays: keys this worker staged
//!    before, by the ref of their slot (`self.refs`), go to `publish_refs`
//!    (`resty_counter_stage_publish_refs` → [`stage::Stage::publish_refs`]);
//!    the others, and those whose ref is stale, to `publish_batch`
//!    (`resty_counter_stage_publish_batch` → [`stage::Stage::publish_many`],
//!    which gives each staged key's ref), every `BATCH` keys and at a
//!    slice's end. Each pair the stage refuses (full, too long) goes to
//!    `resty_counter_flusher_write` at once, as on the direct path
//!    (`fallback_writes`).
//! 5. `fold_sliced(self)` (mode 0) calls `resty_counter_stage_fold` with
//!    `SLICE_SECONDS` until it returns 1 (round done) or `RC_BUSY` (another
//!    worker holds the lease), with `pause` between calls; then
//!    `count_fold`. In Rust: the lease ([`stage::Stage::lease`]),
//!    `fold_for` in chunks of `FOLD_CHUNK` slots ([`stage::Stage::fold`]),
//!    each taken (key, delta) into [`flush::Flusher::add`], then steps 5-6
//!    of the direct path; at a round's end `zone::ZoneStage::tend`. So a
//!    staged count reaches the dict through the lease holder's flusher,
//!    often another worker's: a delta the dict refuses is pending there.
//! 6. A manual `c:sync()` writes this worker's buffer directly
//!    (`sync_yielding` or `sync_now`) and then folds the whole stage:
//!    `fold_sliced(self, 2)` or `fold_whole` (mode 1).
//!
//! `unsafe` lives in `ffi.rs`, `ffi_stage.rs`, `shdict.rs`, `zone.rs` and
//! `event_loop.rs` only, each block with a `// SAFETY:` line; `stage.rs` and
//! `directory.rs` are safe Rust over slices of atomics.

#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

// Under loom the directory's atomics are loom's too.
pub mod directory;
pub mod event_loop;
pub mod ffi;
// Under loom the stage's atomics are loom's, which nginx memory cannot be.
#[cfg(not(loom))]
pub mod ffi_stage;
pub mod flush;
pub mod shdict;
pub mod stage;
#[cfg(not(loom))]
pub mod zone;
