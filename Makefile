# resty.counter: `make test` is the one command CI runs; `make demo` shows the
# counter in a real nginx. Both install what they need.
CARGO ?= cargo
LUAJIT ?= luajit
LUA51 ?= lua5.1
LUA52 ?= lua5.2
BUSTED ?= $(shell command -v busted || echo /usr/bin/busted)

.PHONY: all build deps test test-rust test-lua test-nginx test-integration \
        test-long test-rock test-examples test-openresty test-stream \
        test-install-deps test-openresty-env lint demo bench rock clean

all: build

build:
	$(CARGO) build --release --locked

deps:
	tools/install-deps test

# Rust unit tests and the ABI drift check, then busted specs inside a real
# nginx, then multi-worker integration against a real nginx on loopback.
test: deps build test-rust test-lua test-nginx test-integration test-examples \
      test-rock test-stream test-install-deps test-openresty-env

# The loom model checks of the shared stage build into their own target
# directory, so they do not invalidate the normal build.
test-rust:
	$(CARGO) test --locked
	RUSTFLAGS="--cfg loom" $(CARGO) test --locked --release --lib \
	    --target-dir target/loom loom

# Pure-Lua specs (stub dicts, no nginx) under LuaJIT and plain Lua 5.1/5.2,
# as Kong's and nginx-lua-prometheus's unit tests run them.
test-lua:
	$(LUAJIT) $(BUSTED) --run=unit
	$(LUA51) $(BUSTED) --run=unit
	$(LUA52) $(BUSTED) --run=unit

# Specs that run inside an nginx worker.
test-nginx: build
	spec/run-in-nginx spec/in_nginx/*_spec.lua

# Multi-worker integration specs that drive nginx from outside.
test-integration: build
	$(LUAJIT) $(BUSTED) --run=integration

test-long: build
	LONG=1 $(LUAJIT) $(BUSTED) --run=integration

# Each config in examples/ passes nginx -t; plain and the prometheus alias run.
test-examples: build
	spec/examples_test.sh

# The LuaRocks packages as users install them: the rockspec with `luarocks
# make`, then the rocks of `make rock`, the binary one on a host without
# Rust (cargo and rustc off the PATH).
test-rock:
	tools/install-deps rock
	spec/rock_test.sh
	spec/binary_rock_test.sh

# tools/install-deps installs what each target runs and stops only a
# system nginx its own install started (stand-in apt-get; installs nothing).
test-install-deps:
	spec/install_deps_test.sh

# tools/openresty-env takes only an OpenResty with stream lua and resty.core,
# builds nothing when NGINX_BIN is set, and refuses a tarball that is not
# OpenResty's release (stand-in nginx binaries; builds nothing).
test-openresty-env:
	spec/openresty_env_test.sh

# The stream subsystem (a stream {} block): needs an nginx with stream lua,
# which Debian's has not (the specs then say so and skip).
test-stream: build
	$(LUAJIT) $(BUSTED) --run=stream

# The nginx specs, integration specs, examples, rock test and stream specs
# again on OpenResty, the one tools/openresty-env names: an installed one
# (NGINX_BIN=/usr/local/openresty/nginx/sbin/nginx make test-openresty),
# else one tools/build-openresty builds once (cached) from the release
# tarball (OPENRESTY_TARBALL=.../openresty-1.29.2.3.tar.gz), else from
# OpenResty's component sources (OPENRESTY_SRC, the offline build CI uses).
OPENRESTY_ENV = target/openresty.env
test-openresty: build
	tools/install-deps openresty
	tools/openresty-env > $(OPENRESTY_ENV).tmp
	mv $(OPENRESTY_ENV).tmp $(OPENRESTY_ENV)
	set -a && . ./$(OPENRESTY_ENV) && SPEC_REQUIRE_STREAM=1 && \
	  $(MAKE) --no-print-directory test-nginx test-integration test-examples \
	    test-rock test-stream

lint:
	tools/install-deps lint
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --locked --no-deps
	luacheck lua spec bench examples
	stylua --check lua spec bench examples
	shellcheck -S warning spec/run-in-nginx spec/support/nginx-conf spec/*.sh \
	    spec/support/*.sh tools/* bench/run examples/*.sh .ci/run

demo:
	tools/install-deps demo
	$(MAKE) build
	examples/demo.sh

bench:
	tools/install-deps bench
	$(MAKE) build
	bench/run

# dist/: the source rock and this machine's binary rock (installs with no
# Rust toolchain), built from one snapshot of the checkout; prints their
# sizes and sha256.
rock:
	tools/install-deps rock
	tools/make-rock dist

# What builds and tests leave behind.
clean:
	$(CARGO) clean
	rm -rf spec/tmp bench/tmp bench/results/quick dist
