#!/usr/bin/env bash
# tools/install-deps stops a system nginx only when its own package install
# started it: an nginx that ran before the install is the machine's and
# keeps running. apt-get, dpkg-query, id and cargo are stand-ins on PATH
# (nothing is installed); a "system nginx" is a process that exits on QUIT,
# as nginx does, whose pid is in a pid file given by NGINX_SYSTEM_PID_FILE.
# It installs only what a target runs: `test` and `openresty` no linters,
# `openresty` and any target with NGINX_BIN set no Debian nginx.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/resty-counter-install-deps.XXXXXX")
cleanup() {   # the sleep processes this test started
  local p
  cat "$work"/*.pid "$work/started" 2>/dev/null | while read -r p; do
    kill -KILL "$p" 2>/dev/null
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "  ok    $1"; }
fail() { failed=$((failed + 1)); echo "  FAIL  $1${2:+: $2}"; }

mkdir -p "$work/bin"
# fake-nginx PIDFILE: exits on QUIT (a background job of a script ignores
# QUIT; perl takes it back), then writes its pid, as nginx does once ready.
cat >"$work/bin/fake-nginx" <<'SH'
#!/bin/sh
exec perl -e '$SIG{QUIT} = sub { exit 0 };
  open(my $f, ">", "$ARGV[0].tmp") or die; print $f "$$\n"; close $f;
  rename("$ARGV[0].tmp", $ARGV[0]) or die; sleep 300' "$1"
SH
# Every package is missing, StyLua too; the caller runs as root; cargo
# (StyLua's install) only leaves a trace.
printf '#!/bin/sh\nexit 1\n' >"$work/bin/dpkg-query"
printf '#!/bin/sh\nexit 1\n' >"$work/bin/stylua"
printf '#!/bin/sh\necho 0\n' >"$work/bin/id"
printf '#!/bin/sh\necho "cargo $*" >>"${CARGO_TRACE:-/dev/null}"\n' >"$work/bin/cargo"
# apt-get install starts a "system nginx" when FAKE_APT_STARTS=1, as
# Debian's nginx package does, replacing the pid in the pid file.
cat >"$work/bin/apt-get" <<'SH'
#!/bin/sh
case " $* " in
  *" install "*)
    if [ "${FAKE_APT_STARTS:-0}" = 1 ]; then
      old=$(cat "$NGINX_SYSTEM_PID_FILE" 2>/dev/null)
      fake-nginx "$NGINX_SYSTEM_PID_FILE" </dev/null >/dev/null 2>&1 &
      while [ "$(cat "$NGINX_SYSTEM_PID_FILE" 2>/dev/null)" = "$old" ]; do
        sleep 0.01
      done
    fi ;;
esac
exit 0
SH
chmod +x "$work/bin/"*

alive() { kill -0 "$1" 2>/dev/null && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]; }

# run_case NAME RUNNING_BEFORE(0|1) APT_STARTS(0|1): runs install-deps;
# prints the pid that ran before, then the pid file's pid after ("-": none).
run_case() {
  local pidfile="$work/$1.pid" before=""
  rm -f "$pidfile"
  if [ "$2" = 1 ]; then
    "$work/bin/fake-nginx" "$pidfile" >/dev/null 2>&1 &
    before=$!
    echo "$before" >>"$work/started"
    while [ "$(cat "$pidfile" 2>/dev/null)" != "$before" ]; do sleep 0.01; done
  fi
  PATH="$work/bin:$PATH" NGINX_SYSTEM_PID_FILE="$pidfile" FAKE_APT_STARTS=$3 \
    "$repo/tools/install-deps" lint >"$work/$1.out" 2>&1
  after=$(cat "$pidfile" 2>/dev/null || true)
  echo "${before:--} ${after:--}"
}

# wait_gone PID [TRIES]: polls every 0.05 s until PID has exited.
wait_gone() {
  local _
  for _ in $(seq 1 "${2:-100}"); do alive "$1" || return 0; sleep 0.05; done
  return 1
}
# Still running one second on: a QUIT would have ended it by then.
stays() { ! wait_gone "$1" 20; }

echo "install-deps: the system nginx"
read -r _ started <<<"$(run_case started-by-install 0 1)"
if [ -n "$started" ] && wait_gone "$started"; then
  pass "an nginx the install started is stopped"
else
  fail "an nginx the install started is stopped" "pid ${started:-none} still runs"
fi

read -r before _ <<<"$(run_case running-before 1 0)"
if stays "$before"; then
  pass "an nginx that ran before the install keeps running"
else
  fail "an nginx that ran before the install keeps running" "pid $before was stopped"
fi

read -r before after <<<"$(run_case restarted 1 1)"
if stays "$before" && stays "$after"; then
  pass "an nginx that ran before stays, even when the pid file changes"
else
  fail "an nginx that ran before stays, even when the pid file changes" "before $before, after $after"
fi

read -r _ after <<<"$(run_case none 0 0)"
if [ "$after" = - ] && grep -q "^installing: lua-check" "$work/none.out"; then
  pass "no nginx, nothing stopped"
else
  fail "no nginx, nothing stopped" "$(cat "$work/none.out")"
fi

# installs GROUP [VAR=VALUE...]: the packages `tools/install-deps GROUP`
# installs (its "installing:" lines; no system nginx), one a line, and
# the cargo commands it runs.
installs() {
  local group=$1 trace="$work/cargo.trace"
  shift
  : >"$trace"
  env -u NGINX_BIN PATH="$work/bin:$PATH" NGINX_SYSTEM_PID_FILE="$work/no.pid" \
    CARGO_TRACE="$trace" FAKE_APT_STARTS=0 "$@" \
    "$repo/tools/install-deps" "$group" 2>&1 |
    sed -n 's/^installing: //p' | tr ' ' '\n'
  cat "$trace"
}
# has WORD LIST: LIST (one a line) has WORD, or a line that starts with it.
has() { grep -q "^$1\( \|$\)" <<<"$2"; }

echo "install-deps: what each target installs"
test_pkgs=$(installs test)
lint_pkgs=$(installs lint)
if has lua-check "$lint_pkgs" && has shellcheck "$lint_pkgs" \
   && grep -q "^cargo install .*stylua" <<<"$lint_pkgs"; then
  pass "lint installs luacheck, shellcheck and StyLua"
else
  fail "lint installs luacheck, shellcheck and StyLua" "$(echo $lint_pkgs)"
fi
for tool in lua-check shellcheck stylua; do
  if grep -q "$tool" <<<"$test_pkgs"; then
    fail "test installs no $tool" "$(echo $test_pkgs)"
  else
    pass "test installs no $tool"
  fi
done
for p in luajit2 lua-busted lua5.1 lua5.2 nginx-light libnginx-mod-http-lua \
         lua-resty-core; do
  if has "$p" "$test_pkgs"; then
    pass "test installs $p"
  else
    fail "test installs $p" "$(echo $test_pkgs)"
  fi
done
# luarocks is test-rock's, which installs `rock` itself.
if has luarocks "$test_pkgs"; then
  fail "test leaves luarocks to rock" "$(echo $test_pkgs)"
else
  pass "test leaves luarocks to rock"
fi

# no_debian_nginx WHAT LIST: LIST has the drivers (luajit2), no Debian nginx.
no_debian_nginx() {
  if has luajit2 "$2" && ! has nginx-light "$2" \
     && ! has libnginx-mod-http-lua "$2" && ! has lua-resty-core "$2"; then
    pass "$1"
  else
    fail "$1" "$(echo $2)"
  fi
}
no_debian_nginx "openresty installs no Debian nginx" "$(installs openresty)"
no_debian_nginx "test with NGINX_BIN set installs no Debian nginx" \
  "$(installs test NGINX_BIN=/usr/local/openresty/nginx/sbin/nginx)"

echo "install-deps: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
