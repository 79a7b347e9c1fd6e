#!/usr/bin/env bash
# `make test-rock`: the LuaRocks package, installed and used the way a user
# would. Installs the rockspec with `luarocks make` into a temporary tree
# (cargo offline), starts a 2-worker nginx whose lua_package_path and
# lua_package_cpath point only at that tree (and where the flavor keeps
# resty.core), counts N requests and checks the dict holds exactly N.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
requests=${ROCK_REQUESTS:-2000}
# shellcheck source=spec/support/rock.sh
. "$repo/spec/support/rock.sh"

rock_need luarocks cargo "$NGINX_BIN" curl
rock_setup rock

# 1. Install. Crates are fetched first (that needs the network once); the
#    rock itself must then build offline.
echo "rock: luarocks make into $ROCK_TREE"
cd "$repo" || exit 1
if ! cargo fetch --locked -q; then
  fail "cargo fetch --locked"
  finish
fi
if out=$(CARGO_NET_OFFLINE=true luarocks --lua-version=5.1 --tree="$ROCK_TREE" \
           make resty-counter-0.3.0-1.rockspec 2>&1); then
  pass "luarocks --lua-version=5.1 --tree=<tmp> make (cargo offline)"
else
  fail "luarocks make" "$out"
  finish
fi
rock_check_layout

# 2. An nginx that sees only the tree: native mode, N counted exactly.
rock_serve
rock_check_where
rock_count "$requests"
rock_check_log

# 3. Upgrade under the running nginx: `luarocks make` again, then reload.
#    The workers run private copies of the library (see
#    lua/resty/counter/loader.lua), so however LuaRocks writes the file they
#    keep counting, and the reloaded ones load the file now on disk.
if ! out=$(CARGO_NET_OFFLINE=true luarocks --lua-version=5.1 --tree="$ROCK_TREE" \
             make resty-counter-0.3.0-1.rockspec 2>&1); then
  fail "luarocks make (reinstall)" "$out"
fi
for _ in $(seq 1 50); do rock_get /incr >/dev/null; done
kill -HUP "$(cat "$ROCK_PREFIX/logs/nginx.pid")"
rock_settle
count=$(rock_get /count)
where=$(rock_get /where)
if [ "$count" = "$((ROCK_SERVED + 50))" ] && [ "$where" = "$(rock_where_expected)" ]; then
  pass "after reinstall and reload: $count counted, native from the tree"
else
  fail "reinstall and reload" "counted $count of $((ROCK_SERVED + 50)); where: $(echo "$where" | tr '\n' ' ')"
fi
rock_check_log " after reinstall and reload"
finish
