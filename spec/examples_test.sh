#!/usr/bin/env bash
# Checks the configs in examples/ as a user would take them: each one,
# with its ${PREFIX}, ${PORT} and ${REPO} filled in, passes `nginx -t`; the
# plain counter and the nginx-lua-prometheus alias also run and answer.
# (examples/nginx.conf runs end to end in `make demo`.)
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=examples/nginx-helpers.sh
. "$repo/examples/nginx-helpers.sh"

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "  ok    $1"; }
fail() { failed=$((failed + 1)); echo "  FAIL  $1${2:+: $2}"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/resty-counter-examples.XXXXXX")
prefix=''
holder=''
cleanup() {
  [ -n "$prefix" ] && nx_stop "$prefix"
  [ -n "$holder" ] && nx_stop "$holder"
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ ! -f "$repo/target/release/libresty_counter.so" ]; then
  echo "examples: target/release/libresty_counter.so missing: run cargo build --release" >&2
  exit 1
fi

echo "examples: nginx -t on each config"
for conf in "$repo"/examples/*.conf; do
  name=$(basename "$conf")
  p="$work/t-${name%.conf}"
  mkdir -p "$p/conf" "$p/logs"
  nx_render "$conf" "$p/conf/nginx.conf" "$p" "$(nx_free_port)" "$repo"
  if out=$("$NGINX_BIN" -t -q -p "$p" -c "$p/conf/nginx.conf" -e "$p/logs/error.log" 2>&1); then
    pass "$name: nginx -t"
  else
    fail "$name: nginx -t" "$out"
  fi
done

log_clean() {
  if grep -E '\[(error|crit|alert|emerg)\]' "$prefix/logs/error.log"; then
    fail "$1: error log clean"
  else
    pass "$1: error log clean"
  fi
}

get() { curl -s --max-time 5 -H "Connection: close" "http://127.0.0.1:$NX_PORT$1"; }

echo "examples: plain.conf, 2 workers"
prefix="$work/plain"
if NX_READY_PATH=/count nx_launch "$repo/examples/plain.conf" "$prefix" "$repo"; then
  for i in $(seq 1 20); do get "/hit?bytes=$i" >/dev/null; done
  sleep 1.2  # two sync intervals of 0.5 s
  body=$(get /count)
  expected=$'hits 20\nbytes 210'
  if [ "$body" = "$expected" ]; then
    pass "plain.conf: 20 hits on 20 connections counted"
  else
    fail "plain.conf: 20 hits on 20 connections counted" "got '$body'"
  fi
  get /report >/dev/null
  body=$(get /count)
  if [ "$(echo "$body" | head -1)" = "hits 0" ]; then
    pass "plain.conf: /report resets what it read"
  else
    fail "plain.conf: /report resets what it read" "got '$body'"
  fi
  log_clean plain.conf
  nx_stop "$prefix"
else
  fail "plain.conf: starts"
fi

echo "examples: a port taken between the probe and nginx's bind"
# nx_launch tries another port, and the error log it leaves is the running
# nginx's alone. The first port offered here is one a running nginx holds.
holder="$work/holder"
if NX_READY_PATH=/count nx_launch "$repo/examples/plain.conf" "$holder" "$repo"; then
  taken=$NX_PORT
  eval "nx_free_port_probe() $(declare -f nx_free_port | tail -n +2)"
  nx_free_port() {
    if [ -e "$work/offered" ]; then nx_free_port_probe; else
      : >"$work/offered"
      echo "$taken"
    fi
  }
  prefix="$work/retry"
  if NX_READY_PATH=/count nx_launch "$repo/examples/plain.conf" "$prefix" "$repo"; then
    if [ "$NX_PORT" != "$taken" ] && [ "$(get /count | head -1)" = "hits 0" ]; then
      pass "retry: answers on another port than the taken $taken"
    else
      fail "retry: answers on another port than the taken $taken" "port $NX_PORT"
    fi
    log_clean retry
    nx_stop "$prefix"
  else
    fail "retry: starts"
  fi
  eval "nx_free_port() $(declare -f nx_free_port_probe | tail -n +2)"
  nx_stop "$holder"
  holder=
else
  fail "retry: the nginx that holds a port starts"
fi

echo "examples: prometheus_alias.conf"
prefix="$work/alias"
if NX_READY_PATH=/metrics nx_launch "$repo/examples/prometheus_alias.conf" "$prefix" "$repo"; then
  body=$(get /metrics)
  if [[ "$body" == "prometheus_resty_counter is resty.counter "*": true" ]]; then
    pass "prometheus_alias.conf: the alias is resty.counter"
  else
    fail "prometheus_alias.conf: the alias is resty.counter" "got '$body'"
  fi
  log_clean prometheus_alias.conf
  nx_stop "$prefix"
else
  fail "prometheus_alias.conf: starts"
fi
prefix=

echo "examples: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
