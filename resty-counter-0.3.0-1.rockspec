-- LuaRocks package of resty.counter: the Lua shim and the Rust library it
-- loads. `luarocks --lua-version=5.1 make` in a checkout builds the library
-- with cargo (offline once the crates are fetched) and installs both into
-- the tree: the shim under share/lua/5.1, the library under lib/lua/5.1,
-- where package.cpath finds it.
rockspec_format = "3.0"
package = "resty-counter"
version = "0.3.0-1"

-- No public repository yet (.invalid is reserved for names that resolve
-- nowhere). `luarocks make` in a checkout does not read `source`; to
-- `luarocks build` this rockspec elsewhere, point `url` at your clone.
source = {
   url = "git+https://example.invalid/resty.counter.git",
   tag = "v0.3.0",
}

description = {
   summary = "Per-worker counters for OpenResty, flushed into a shared dict by a Rust library",
   detailed = [[
A drop-in replacement for Kong's lua-resty-counter: increments are buffered
in a per-worker Lua table and periodically written into an ngx.shared.DICT
by a Rust cdylib that calls lua-nginx-module's shared dict entry point
directly. Failed writes are kept and retried; buffered counts are flushed
when a worker exits.
]],
   license = "Apache-2.0",
}

supported_platforms = { "linux" }

dependencies = {
   "lua >= 5.1",
}

build = {
   type = "command",
   build_command = "cargo build --release --locked",
   install = {
      lua = {
         ["resty.counter"] = "lua/resty/counter.lua",
         ["resty.counter.abi"] = "lua/resty/counter/abi.lua",
         ["resty.counter.loader"] = "lua/resty/counter/loader.lua",
         ["resty.counter.log"] = "lua/resty/counter/log.lua",
         ["resty.counter.pure"] = "lua/resty/counter/pure.lua",
         ["resty.counter.stage"] = "lua/resty/counter/stage.lua",
         ["resty.counter.sync"] = "lua/resty/counter/sync.lua",
         ["resty.counter.timer"] = "lua/resty/counter/timer.lua",
      },
      lib = {
         libresty_counter = "target/release/libresty_counter.so",
      },
   },
}
