#!/usr/bin/env bash
# `make demo`: resty.counter counting real traffic in a 2-worker nginx.
#
# Starts nginx on loopback with examples/nginx.conf, drives traffic with wrk
# (examples/traffic.lua) for DEMO_SECONDS, prints /metrics, and checks every
# counter against the access log, the record of what nginx served. Exits
# non-zero when any count differs. DEMO_KEEP=1 keeps the scratch prefix.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
seconds=${DEMO_SECONDS:-5}
sync_interval=1  # the interval examples/nginx.conf passes to new()

# shellcheck source=examples/nginx-helpers.sh
. "$repo/examples/nginx-helpers.sh"

for tool in "$NGINX_BIN" wrk curl; do
  command -v "$tool" >/dev/null || {
    echo "demo: $tool not found (make demo installs it: tools/install-deps demo)" >&2
    exit 1
  }
done
if [ ! -f "$repo/target/release/libresty_counter.so" ]; then
  echo "demo: target/release/libresty_counter.so missing: run cargo build --release" >&2
  exit 1
fi

prefix=$(mktemp -d "${TMPDIR:-/tmp}/resty-counter-demo.XXXXXX")
cleanup() {
  nx_stop "$prefix"
  if [ "${DEMO_KEEP:-0}" = 1 ]; then
    echo "demo: kept $prefix"
  else
    rm -rf "$prefix"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

nx_launch "$repo/examples/nginx.conf" "$prefix" "$repo"
base="http://127.0.0.1:$NX_PORT"
access_log="$prefix/logs/access.log"
echo "demo: nginx (2 workers) on $base, prefix $prefix"

# Drive traffic; the progress line counts what nginx has logged so far.
echo "demo: wrk, 2 threads, 16 connections, ${seconds}s over 6 routes"
wrk -t2 -c16 -d"${seconds}s" -s "$repo/examples/traffic.lua" "$base/" \
  >"$prefix/wrk.out" 2>&1 &
wrk_pid=$!
# On a terminal the line redraws in place; in a log, one line a second.
lead='' trail='\n' pause=1
if [ -t 1 ]; then
  lead='\r' trail='' pause=0.25
fi
start=$SECONDS
while kill -0 "$wrk_pid" 2>/dev/null; do
  served=$(wc -l <"$access_log")
  printf "$lead"'  %3ds  %9d requests served'"$trail" "$((SECONDS - start))" "$served"
  sleep "$pause"
done
wait "$wrk_pid" || {
  printf "${lead:+\\n}"
  cat "$prefix/wrk.out" >&2
  exit 1
}
served=$(wc -l <"$access_log")
printf "$lead"'  %3ds  %9d requests served (done)\n' "$((SECONDS - start))" "$served"

# Every worker flushes on its own timer: wait two intervals, then scrape.
sleep $((2 * sync_interval))
metrics=$(curl -sf "$base/metrics")
echo "demo: GET /metrics"
echo "$metrics" | sed 's/^/  /'

# Compare "route status count" from the access log and from /metrics.
expected=$(awk '$1 != "/metrics" { n[$1 " " $2]++ }
                END { for (k in n) print k, n[k] }' "$access_log" | sort)
counted=$(echo "$metrics" | sed -n \
  's/^nginx_http_requests_total{route="\([^"]*\)",status="\([0-9]*\)"} \([0-9.e+]*\)$/\1 \2 \3/p' |
  sort)
workers=$(awk '$1 != "/metrics" { print $3 }' "$access_log" | sort -u | wc -l)
total=$(echo "$expected" | awk '{ s += $3 } END { print s + 0 }')

echo "demo: access log vs /metrics ($total requests, served by $workers workers)"
printf '  %-14s %-6s %10s %10s\n' route status served counted
fail=0
while read -r route status n; do
  [ -n "$route" ] || continue
  got=$(echo "$counted" | awk -v r="$route" -v s="$status" \
    '$1 == r && $2 == s { print $3 }')
  mark=ok
  if [ "${got:-missing}" != "$n" ]; then
    mark=DIFFERS
    fail=1
  fi
  printf '  %-14s %-6s %10s %10s  %s\n' "$route" "$status" "$n" "${got:-missing}" "$mark"
done <<<"$expected"
# A counter with no line in the access log is wrong too.
while read -r route status n; do
  [ -n "$route" ] || continue
  if ! echo "$expected" | awk -v r="$route" -v s="$status" \
      '$1 == r && $2 == s { found = 1 } END { exit !found }'; then
    printf '  %-14s %-6s %10s %10s  %s\n' "$route" "$status" 0 "$n" DIFFERS
    fail=1
  fi
done <<<"$counted"

# The dict holds the app's metrics only: every line is a comment or a valid
# sample, and the worker that answered the scrape used the shared stage.
invalid=$(echo "$metrics" | grep -Ev '^(#.*|[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? -?[0-9][0-9.e+]*)$' || true)
if [ -n "$invalid" ]; then
  echo "demo: FAILED: /metrics has lines that are not Prometheus samples:" >&2
  echo "$invalid" | cat -A >&2
  exit 1
fi
if ! echo "$metrics" | grep -Eq '^resty_counter_stage\{worker="[0-9]+"\} 1$'; then
  echo "demo: FAILED: the worker that answered /metrics did not use the shared stage" >&2
  exit 1
fi
echo "demo: /metrics holds only samples; the shared stage was on"

if [ "$total" -eq 0 ]; then
  echo "demo: FAILED: no request was served" >&2
  exit 1
fi
if grep -E '\[(error|crit|alert|emerg)\]' "$prefix/logs/error.log" >&2; then
  echo "demo: FAILED: nginx logged errors (above)" >&2
  exit 1
fi
if [ "$fail" -ne 0 ]; then
  echo "demo: FAILED: counters differ from the access log" >&2
  exit 1
fi
echo "demo: OK: every counter equals the requests served"
