# shellcheck shell=bash
# Runs a throwaway nginx on loopback from a config template: sourced by
# examples/demo.sh, spec/support/rock.sh (the rock specs),
# spec/examples_test.sh and bench/run.
#
#   nx_launch TEMPLATE PREFIX REPO   render TEMPLATE into PREFIX/conf/nginx.conf
#                                    on a free port (NX_PORT), start it, wait
#                                    until it answers
#   nx_render TEMPLATE OUT PREFIX PORT REPO
#                                    the rendering alone
#   nx_stop PREFIX                   graceful quit (workers flush), then wait
#
# NX_READY_PATH (default /) is the path polled until nginx answers.
# Templates use ${PREFIX}, ${PORT} and ${REPO}. The nginx is NGINX_BIN
# (default: nginx from PATH); the main-context lines its flavor needs
# (Debian's load_module lines, none for OpenResty) are prepended, as told by
# spec/support/nginx-conf, which also sets NGINX_FLAVOR, NGINX_RESTY_CORE
# and NGINX_STREAM_LUA. Running as root, a `user root;` line is prepended
# so that workers can read a checkout under a private home directory (they
# would otherwise run as nobody).

nx_conf=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/spec/support/nginx-conf
nx_facts=$("$nx_conf") || { echo "cannot read the nginx flavor ($nx_conf)" >&2; exit 1; }
eval "$nx_facts"
unset nx_conf nx_facts
NX_PORT=

# A port nothing on this host uses: below the kernel's ephemeral range (a
# client connection, curl's or a package download's, may hold any port in
# it, and nginx could not bind that port), and no socket of /proc/net/tcp
# or tcp6 on it, listening or not. nginx may still lose the port to another
# process before it binds: nx_launch then tries another one.
nx_free_port() {
  local low p hex _
  read -r low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || low=32768
  [ "$low" -gt 11000 ] || low=32768
  for _ in $(seq 1 50); do
    p=$((10000 + RANDOM % (low - 10000)))
    printf -v hex ':%04X ' "$p"
    if ! grep -q -- "^ *[0-9]*: [0-9A-F]*$hex" /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  echo "no free port found on 127.0.0.1" >&2
  return 1
}

nx_render() {
  local tpl=$1 out=$2 prefix=$3 port=$4 repo=$5
  {
    [ -z "$NGINX_MAIN_CONF" ] || echo "$NGINX_MAIN_CONF"
    if [ "$(id -u)" -eq 0 ]; then
      echo "user root;  # prepended: run as root, workers read the checkout"
    fi
    sed -e "s|\${PREFIX}|$prefix|g" -e "s|\${PORT}|$port|g" \
        -e "s|\${REPO}|$repo|g" "$tpl"
  } >"$out"
}

# Starts nginx on PREFIX/conf/nginx.conf and waits for an answer on NX_PORT.
nx_start() {
  local prefix=$1 _
  mkdir -p "$prefix/logs"
  "$NGINX_BIN" -p "$prefix" -c "$prefix/conf/nginx.conf" \
           -e "$prefix/logs/error.log" 2>>"$prefix/logs/start.log" || return 1
  for _ in $(seq 1 200); do
    # Any HTTP answer, even a 404, means a worker is serving.
    if curl -s -o /dev/null --max-time 1 \
         "http://127.0.0.1:$NX_PORT${NX_READY_PATH:-/}"; then
      return 0
    fi
    sleep 0.05
  done
  echo "nginx did not answer on 127.0.0.1:$NX_PORT" >&2
  return 1
}

nx_launch() {
  local tpl=$1 prefix=$2 repo=$3 _
  mkdir -p "$prefix/conf" "$prefix/logs"
  for _ in 1 2 3; do
    NX_PORT=$(nx_free_port) || return 1
    nx_render "$tpl" "$prefix/conf/nginx.conf" "$prefix" "$NX_PORT" "$repo"
    : >"$prefix/logs/start.log"
    if nx_start "$prefix"; then
      return 0
    fi
    # Another process took the port between the probe and the bind: retry.
    grep -q "Address already in use" "$prefix/logs/start.log" \
      "$prefix/logs/error.log" 2>/dev/null || break
    nx_stop "$prefix"
    # The failed attempt's log goes aside: error.log is the running nginx's.
    mv "$prefix/logs/error.log" "$prefix/logs/error.log.port-$NX_PORT" 2>/dev/null
  done
  echo "nginx failed to start; its output:" >&2
  cat "$prefix/logs/start.log" "$prefix/logs/error.log" >&2 2>/dev/null
  return 1
}

nx_stop() {
  local prefix=$1 pid _
  pid=$(cat "$prefix/logs/nginx.pid" 2>/dev/null) || return 0
  [ -n "$pid" ] || return 0
  kill -QUIT "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 200); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.05
  done
  echo "nginx $pid did not quit in 10 s: killing it" >&2
  pkill -KILL -P "$pid" 2>/dev/null || true
  kill -KILL "$pid" 2>/dev/null || true
  return 0
}
