# shellcheck shell=bash
# What the rock specs share (spec/rock_test.sh: the rockspec built with
# `luarocks make`; spec/binary_rock_test.sh: the binary rock installed
# without a Rust toolchain): a tally, a temporary LuaRocks tree, and a
# 2-worker nginx whose lua_package_path and lua_package_cpath point only at
# that tree (and where the flavor keeps resty.core).
#
#   pass NAME / fail NAME [WHY] / finish    the tally; finish exits with it
#   rock_need TOOL...        exits 1 naming a missing tool
#   rock_setup NAME          ROCK_TREE, ROCK_PREFIX and ROCK_WORK: fresh
#                            temporary directories, removed at exit (the
#                            nginx stopped first)
#   rock_check_layout        the shim and the library are in the tree
#   rock_serve               starts the nginx (NX_PORT)
#   rock_get PATH            GET from it
#   rock_check_where         the worker that answers loaded the shim and the
#                            library from the tree, in native mode
#   rock_count N             N requests, 8 at a time on fresh connections,
#                            so both workers count; the dict then holds
#                            exactly N (ROCK_SERVED: what the access log has)
#   rock_check_log WHEN      no error, crit, alert or emerg, no worker that
#                            exited on a signal
#   rock_settle              one sync interval and the first tick's spread
#
# Sourcing it sources examples/nginx-helpers.sh (NGINX_BIN, nx_*).

rock_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=examples/nginx-helpers.sh
. "$rock_repo/examples/nginx-helpers.sh"
rock_sync_interval=0.2

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "  ok    $1"; }
fail() { failed=$((failed + 1)); echo "  FAIL  $1${2:+: $2}"; }
finish() {
  echo "$rock_name: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  exit
}

rock_need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || {
      echo "${rock_name:-rock}: $tool not found (tools/install-deps rock installs it)" >&2
      exit 1
    }
  done
}

rock_setup() {
  rock_name=$1
  ROCK_TREE=$(mktemp -d "${TMPDIR:-/tmp}/resty-counter-$rock_name.XXXXXX")
  ROCK_PREFIX=$(mktemp -d "${TMPDIR:-/tmp}/resty-counter-$rock_name-nginx.XXXXXX")
  ROCK_WORK=$(mktemp -d "${TMPDIR:-/tmp}/resty-counter-$rock_name-work.XXXXXX")
  ROCK_LUA_DIR=$ROCK_TREE/share/lua/5.1
  ROCK_LIB_DIR=$ROCK_TREE/lib/lua/5.1
  trap rock_cleanup EXIT
  trap 'exit 130' INT TERM
}

rock_cleanup() {
  nx_stop "$ROCK_PREFIX"
  rm -rf "$ROCK_TREE" "$ROCK_PREFIX" "$ROCK_WORK"
}

rock_check_layout() {
  if [ -f "$ROCK_LUA_DIR/resty/counter.lua" ] && [ -f "$ROCK_LIB_DIR/libresty_counter.so" ]; then
    pass "installed share/lua/5.1/resty/counter.lua and lib/lua/5.1/libresty_counter.so"
  else
    fail "tree layout" "$(cd "$ROCK_TREE" && find . -type f | sort | tr '\n' ' ')"
    finish
  fi
}

rock_serve() {
  mkdir -p "$ROCK_PREFIX/conf" "$ROCK_PREFIX/logs"
  cat >"$ROCK_PREFIX/conf/rock.conf.in" <<CONF
worker_processes 2;
pid \${PREFIX}/logs/nginx.pid;
error_log \${PREFIX}/logs/error.log warn;
events { worker_connections 256; }
http {
    lua_package_path "$ROCK_LUA_DIR/?.lua;$NGINX_RESTY_CORE";
    lua_package_cpath "$ROCK_LIB_DIR/?.so";
    lua_shared_dict counters 1m;
    log_format rock '\$uri \$status \$pid';
    access_log \${PREFIX}/logs/access.log rock;
    init_worker_by_lua_block {
        require("resty.counter").new("counters", $rock_sync_interval)
    }
    server {
        listen 127.0.0.1:\${PORT};
        location = /incr {
            content_by_lua_block {
                require("resty.counter").new("counters", $rock_sync_interval):incr("hits")
                ngx.exit(204)
            }
        }
        location = /count {
            content_by_lua_block {
                ngx.print(ngx.shared.counters:get("hits") or 0)
            }
        }
        location = /where {
            content_by_lua_block {
                -- The worker runs a private copy of the library (its maps
                -- show a memfd): the loader says whose bytes those are.
                local counter = require "resty.counter"
                ngx.say(counter.new("counters"):stats().mode)
                ngx.say((debug.getinfo(counter.new, "S").source:gsub("^@", "")))
                ngx.say(require("resty.counter.loader").path or "?")
            }
        }
    }
}
CONF
  if ! NX_READY_PATH=/count nx_launch "$ROCK_PREFIX/conf/rock.conf.in" "$ROCK_PREFIX" "$rock_repo"; then
    fail "nginx starts against the tree"
    finish
  fi
  pass "nginx (2 workers) starts with lua_package_* pointing only at the tree"
}

rock_get() { curl -s --max-time 5 "http://127.0.0.1:$NX_PORT$1"; }

# /where loads the library in the worker that answers: mode, shim, library.
rock_where_expected() {
  printf 'native\n%s\n%s' "$ROCK_LUA_DIR/resty/counter.lua" "$ROCK_LIB_DIR/libresty_counter.so"
}

rock_check_where() {
  local where
  where=$(rock_get /where)
  if [ "$where" = "$(rock_where_expected)" ]; then
    pass "the shim and the library load from the tree (native mode)"
  else
    fail "loaded from the tree" "got: $(echo "$where" | tr '\n' ' ')"
  fi
}

rock_settle() {
  sleep "$(awk -v i="$rock_sync_interval" 'BEGIN { print 3 * i }')"
}

rock_count() {
  local requests=$1 codes workers count log=$ROCK_PREFIX/logs/access.log
  codes=$(curl -s -Z --parallel-max 8 -H "Connection: close" \
            -o /dev/null -w '%{http_code}\n' \
            "http://127.0.0.1:$NX_PORT/incr?i=[1-$requests]" 2>"$ROCK_PREFIX/curl.err" |
            sort | uniq -c)
  ROCK_SERVED=$(awk '$1 == "/incr" && $2 == 204' "$log" | wc -l)
  workers=$(awk '$1 == "/incr" { print $3 }' "$log" | sort -u | wc -l)
  if [ "$ROCK_SERVED" -ne "$requests" ]; then
    fail "$requests requests served" "access log has $ROCK_SERVED; curl saw $(echo $codes) $(head -c 300 "$ROCK_PREFIX/curl.err")"
  fi
  rock_settle
  count=$(rock_get /count)
  if [ "$count" = "$ROCK_SERVED" ] && [ "$ROCK_SERVED" -eq "$requests" ]; then
    pass "$requests requests, $count counted (served by $workers workers)"
  else
    fail "count equals requests" "served $ROCK_SERVED of $requests, counted $count"
  fi
}

rock_check_log() {
  if grep -E 'exited on signal|\[(error|crit|alert|emerg)\]' "$ROCK_PREFIX/logs/error.log"; then
    fail "error log clean${1:-}"
  else
    pass "error log clean${1:-}"
  fi
}
