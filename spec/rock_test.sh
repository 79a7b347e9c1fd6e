#!/usr/bin/env bash
# `make test-rock`: the LuaRocks package, installed and used the way a user
# would. Installs the rockspec with `luarocks make` into a temporary tree
# (cargo offline), starts a 2-worker nginx whose lua_package_path and
# lua_package_cpath point only at that tree (and where the flavor keeps
# resty.core), counts N requests and checks the dict holds exactly N.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
requests=${ROCK_REQUESTS:-2000}
sync_interval=0.2
# shellcheck source=examples/nginx-helpers.sh
. "$repo/examples/nginx-helpers.sh"

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "  ok    $1"; }
fail() { failed=$((failed + 1)); echo "  FAIL  $1${2:+: $2}"; }
finish() {
  echo "rock: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  exit
}

for tool in luarocks cargo "$NGINX_BIN" curl; do
  command -v "$tool" >/dev/null || {
    echo "rock: $tool not found (tools/install-deps rock installs it)" >&2
    exit 1
  }
done

tree=$(mktemp -d "${TMPDIR:-/tmp}/resty-counter-rock.XXXXXX")
prefix=$(mktemp -d "${TMPDIR:-/tmp}/resty-counter-rock-nginx.XXXXXX")
cleanup() {
  nx_stop "$prefix"
  rm -rf "$tree" "$prefix"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. Install. Crates are fetched first (that needs the network once); the
#    rock itself must then build offline.
echo "rock: luarocks make into $tree"
cd "$repo" || exit 1
if ! cargo fetch --locked -q; then
  fail "cargo fetch --locked"
  finish
fi
if out=$(CARGO_NET_OFFLINE=true luarocks --lua-version=5.1 --tree="$tree" \
           make resty-counter-0.3.0-1.rockspec 2>&1); then
  pass "luarocks --lua-version=5.1 --tree=<tmp> make (cargo offline)"
else
  fail "luarocks make" "$out"
  finish
fi

lua_dir="$tree/share/lua/5.1"
lib_dir="$tree/lib/lua/5.1"
if [ -f "$lua_dir/resty/counter.lua" ] && [ -f "$lib_dir/libresty_counter.so" ]; then
  pass "installed share/lua/5.1/resty/counter.lua and lib/lua/5.1/libresty_counter.so"
else
  fail "tree layout" "$(cd "$tree" && find . -type f | sort | tr '\n' ' ')"
  finish
fi

# 2. An nginx that sees only the tree.
mkdir -p "$prefix/conf" "$prefix/logs"
cat >"$prefix/conf/rock.conf.in" <<CONF
worker_processes 2;
pid \${PREFIX}/logs/nginx.pid;
error_log \${PREFIX}/logs/error.log warn;
events { worker_connections 256; }
http {
    lua_package_path "$lua_dir/?.lua;$NGINX_RESTY_CORE";
    lua_package_cpath "$lib_dir/?.so";
    lua_shared_dict counters 1m;
    log_format rock '\$uri \$status \$pid';
    access_log \${PREFIX}/logs/access.log rock;
    init_worker_by_lua_block {
        require("resty.counter").new("counters", $sync_interval)
    }
    server {
        listen 127.0.0.1:\${PORT};
        location = /incr {
            content_by_lua_block {
                require("resty.counter").new("counters", $sync_interval):incr("hits")
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
                local counter = require "resty.counter"
                local lib = "?"
                for line in io.lines("/proc/self/maps") do
                    local path = line:match("(/%S*libresty_counter%.so)")
                    if path then
                        lib = path
                        break
                    end
                end
                ngx.say(counter.new("counters"):stats().mode)
                ngx.say((debug.getinfo(counter.new, "S").source:gsub("^@", "")))
                ngx.say(lib)
            }
        }
    }
}
CONF
if ! NX_READY_PATH=/count nx_launch "$prefix/conf/rock.conf.in" "$prefix" "$repo"; then
  fail "nginx starts against the tree"
  finish
fi
pass "nginx (2 workers) starts with lua_package_* pointing only at the tree"

get() { curl -s --max-time 5 "http://127.0.0.1:$NX_PORT$1"; }

# /where loads the library in the worker that answers: mode, shim, library.
where=$(get /where)
expected="native
$lua_dir/resty/counter.lua
$lib_dir/libresty_counter.so"
if [ "$where" = "$expected" ]; then
  pass "the shim and the library load from the tree (native mode)"
else
  fail "loaded from the tree" "got: $(echo "$where" | tr '\n' ' ')"
fi

# 3. N requests on fresh connections, 8 at a time, so both workers count.
codes=$(curl -s -Z --parallel-max 8 -H "Connection: close" \
          -o /dev/null -w '%{http_code}\n' \
          "http://127.0.0.1:$NX_PORT/incr?i=[1-$requests]" 2>"$prefix/curl.err" |
          sort | uniq -c)
served=$(awk '$1 == "/incr" && $2 == 204' "$prefix/logs/access.log" | wc -l)
workers=$(awk '$1 == "/incr" { print $3 }' "$prefix/logs/access.log" | sort -u | wc -l)
if [ "$served" -ne "$requests" ]; then
  fail "$requests requests served" "access log has $served; curl saw $(echo $codes) $(head -c 300 "$prefix/curl.err")"
fi

# 4. One sync interval (and the first tick's spread) later, the dict has N.
sleep "$(awk -v i="$sync_interval" 'BEGIN { print 3 * i }')"
count=$(get /count)
if [ "$count" = "$served" ] && [ "$served" -eq "$requests" ]; then
  pass "$requests requests, $count counted (served by $workers workers)"
else
  fail "count equals requests" "served $served of $requests, counted $count"
fi

if grep -E '\[(error|crit|alert|emerg)\]' "$prefix/logs/error.log"; then
  fail "error log clean"
else
  pass "error log clean"
fi

# 5. Upgrade under the running nginx: `luarocks make` again, then reload.
#    The workers run private copies of the library (see
#    lua/resty/counter/loader.lua), so however LuaRocks writes the file they
#    keep counting, and the reloaded ones load the file now on disk.
if ! out=$(CARGO_NET_OFFLINE=true luarocks --lua-version=5.1 --tree="$tree" \
             make resty-counter-0.3.0-1.rockspec 2>&1); then
  fail "luarocks make (reinstall)" "$out"
fi
for _ in $(seq 1 50); do get /incr >/dev/null; done
master=$(cat "$prefix/logs/nginx.pid")
kill -HUP "$master"
sleep "$(awk -v i="$sync_interval" 'BEGIN { print 3 * i }')"
count=$(get /count)
where=$(get /where)
if [ "$count" = "$((served + 50))" ] && [ "$where" = "$expected" ]; then
  pass "after reinstall and reload: $count counted, native from the tree"
else
  fail "reinstall and reload" "counted $count of $((served + 50)); where: $(echo "$where" | tr '\n' ' ')"
fi
if grep -E 'exited on signal|\[(error|crit|alert|emerg)\]' "$prefix/logs/error.log"; then
  fail "error log clean after reinstall and reload"
else
  pass "error log clean after reinstall and reload"
fi
finish
