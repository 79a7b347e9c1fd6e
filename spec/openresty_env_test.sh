#!/usr/bin/env bash
# tools/openresty-env, which picks the OpenResty of `make test-openresty`:
# NGINX_BIN is taken as it is, nothing built, if it is an OpenResty (lua and
# stream lua built in, resty.core in its lualib); OPENRESTY_TARBALL must be
# OpenResty's release tarball; with neither and no component sources, the
# error names all three ways. The nginx binaries are stand-ins that print
# an `nginx -V` (the shapes of Debian's nginx and of an OpenResty release);
# no case gets as far as building (OPENRESTY_SRC and the cache are empty
# folders of this test's own).
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd -P)
work=$(mktemp -d "${TMPDIR:-/tmp}/resty-counter-openresty-env.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "  ok    $1"; }
fail() { failed=$((failed + 1)); echo "  FAIL  $1${2:+: $2}"; }

# fake_nginx PATH CONFIGURE-ARGUMENTS [VERSION]: an nginx whose -V says so.
fake_nginx() {
  mkdir -p "$(dirname "$1")"
  cat >"$1" <<SH
#!/bin/sh
[ "\$1" = -V ] || exit 1
cat >&2 <<'EOF'
nginx version: ${3:-openresty/1.29.2.3}
built by gcc 12.2.0 (Debian 12.2.0-14)
TLS SNI support enabled
configure arguments: $2
EOF
SH
  chmod +x "$1"
}
openresty_args="--prefix=/usr/local/openresty/nginx --with-cc-opt=-O2 \
--add-module=../ngx_devel_kit-0.3.3 --add-module=../echo-nginx-module-0.63 \
--add-module=../ngx_lua-0.10.30 --add-module=../ngx_lua_upstream-0.07 \
--add-module=../ngx_stream_lua-0.0.18 --with-pcre-jit --with-stream \
--with-stream_ssl_module --with-threads"

# An OpenResty install: <prefix>/nginx/sbin/nginx and <prefix>/lualib.
or=$work/openresty
fake_nginx "$or/nginx/sbin/nginx" "$openresty_args"
mkdir -p "$or/lualib/resty" && : >"$or/lualib/resty/core.lua"
mkdir -p "$work/bin" && ln -s "$or/nginx/sbin/nginx" "$work/bin/openresty"
# Another lualib, for OPENRESTY_LUALIB.
mkdir -p "$work/lualib2/resty" && : >"$work/lualib2/resty/core.lua"
# OpenResty without its lualib.
fake_nginx "$work/bare/nginx/sbin/nginx" "$openresty_args"
# lua-nginx-module built in, no stream lua.
fake_nginx "$work/http-only/nginx/sbin/nginx" \
  "--prefix=/opt/x/nginx --add-module=../ngx_devel_kit-0.3.3 --add-module=../ngx_lua-0.10.30 --with-stream"
mkdir -p "$work/http-only/lualib/resty" && : >"$work/http-only/lualib/resty/core.lua"
# Debian's nginx 1.22.1 (nginx-light): the lua module is a dynamic one.
fake_nginx "$work/debian/nginx" \
  "--with-cc-opt='-g -O2' --prefix=/usr/share/nginx --conf-path=/etc/nginx/nginx.conf --modules-path=/usr/lib/nginx/modules --with-compat --with-pcre-jit --with-threads --with-stream=dynamic" \
  nginx/1.22.1
mkdir -p "$work/src" "$work/cache"

# run NAME [VAR=VALUE...]: tools/openresty-env with only these set; stdout
# to NAME.out, stderr to NAME.err; prints its exit status.
run() {
  local name=$1
  shift
  env -u NGINX_BIN -u OPENRESTY_LUALIB -u OPENRESTY_TARBALL \
    PATH="$work/bin:$PATH" OPENRESTY_SRC="$work/src" \
    OPENRESTY_CACHE="$work/cache" "$@" \
    "$repo/tools/openresty-env" >"$work/$name.out" 2>"$work/$name.err"
  echo $?
}
# nothing_built: the cache folder is still empty.
nothing_built() { [ -z "$(ls -A "$work/cache")" ]; }
# expect_error NAME STATUS TEXT WHAT: non-zero status, TEXT in the error.
expect_error() {
  if [ "$2" -ne 0 ] && grep -qF -- "$3" "$work/$1.err" && [ ! -s "$work/$1.out" ] \
     && nothing_built; then
    pass "$4"
  else
    fail "$4" "status $2; $(cat "$work/$1.err" "$work/$1.out")"
  fi
}

echo "openresty-env: NGINX_BIN"
rc=$(run installed NGINX_BIN="$or/nginx/sbin/nginx")
want="NGINX_BIN=$or/nginx/sbin/nginx
OPENRESTY_LUALIB=$or/lualib"
if [ "$rc" = 0 ] && [ "$(cat "$work/installed.out")" = "$want" ] && nothing_built; then
  pass "an installed OpenResty is used as it is, its lualib next to nginx/, nothing built"
else
  fail "an installed OpenResty is used as it is, its lualib next to nginx/, nothing built" \
    "status $rc; $(cat "$work/installed.out" "$work/installed.err")"
fi

rc=$(run on-path NGINX_BIN=openresty)
if [ "$rc" = 0 ] && grep -qx "OPENRESTY_LUALIB=$or/lualib" "$work/on-path.out"; then
  pass "NGINX_BIN=openresty, a link on PATH: the lualib of the nginx it links to"
else
  fail "NGINX_BIN=openresty, a link on PATH: the lualib of the nginx it links to" \
    "status $rc; $(cat "$work/on-path.out" "$work/on-path.err")"
fi

rc=$(run lualib NGINX_BIN="$or/nginx/sbin/nginx" OPENRESTY_LUALIB="$work/lualib2")
if [ "$rc" = 0 ] && grep -qx "OPENRESTY_LUALIB=$work/lualib2" "$work/lualib.out"; then
  pass "OPENRESTY_LUALIB overrides the lualib"
else
  fail "OPENRESTY_LUALIB overrides the lualib" "status $rc; $(cat "$work/lualib.out" "$work/lualib.err")"
fi

rc=$(run debian NGINX_BIN="$work/debian/nginx")
expect_error debian "$rc" "is not an OpenResty" "Debian's nginx: not an OpenResty"

rc=$(run http-only NGINX_BIN="$work/http-only/nginx/sbin/nginx")
expect_error http-only "$rc" "has no stream-lua-nginx-module" \
  "an OpenResty without stream lua: said so"

rc=$(run bare NGINX_BIN="$work/bare/nginx/sbin/nginx")
expect_error bare "$rc" "no resty/core.lua in $work/bare/lualib" \
  "no resty.core in the lualib: said so, with OPENRESTY_LUALIB"

rc=$(run missing NGINX_BIN="$work/no/such/nginx")
expect_error missing "$rc" "NGINX_BIN=$work/no/such/nginx: cannot run" \
  "an NGINX_BIN that is not there: said so"

echo "openresty-env: OPENRESTY_TARBALL"
mkdir -p "$work/tarballs/other" "$work/tarballs/layout/openresty-1.29.2.3"
: >"$work/tarballs/openresty-1.27.1.2.tar.gz"
rc=$(run wrong-name OPENRESTY_TARBALL="$work/tarballs/openresty-1.27.1.2.tar.gz")
expect_error wrong-name "$rc" "expected OpenResty's release tarball, openresty-1.29.2.3.tar.gz" \
  "another release: refused by name"

rc=$(run absent OPENRESTY_TARBALL="$work/tarballs/openresty-1.29.2.3.tar.gz")
expect_error absent "$rc" "openresty-1.29.2.3.tar.gz: no such file" "no such file: said so"

echo "not a tarball" >"$work/tarballs/other/openresty-1.29.2.3.tar.gz"
rc=$(run not-tar OPENRESTY_TARBALL="$work/tarballs/other/openresty-1.29.2.3.tar.gz")
expect_error not-tar "$rc" "not a gzip'd tar archive" "not a tarball: refused"

# The right name, but not the release's layout (no configure, no bundle/).
echo x >"$work/tarballs/layout/openresty-1.29.2.3/README"
tar czf "$work/tarballs/layout.tgz" -C "$work/tarballs/layout" openresty-1.29.2.3
mkdir -p "$work/tarballs/renamed"
mv "$work/tarballs/layout.tgz" "$work/tarballs/renamed/openresty-1.29.2.3.tar.gz"
rc=$(run layout OPENRESTY_TARBALL="$work/tarballs/renamed/openresty-1.29.2.3.tar.gz")
expect_error layout "$rc" "has no openresty-1.29.2.3/configure and openresty-1.29.2.3/bundle/" \
  "a tarball without the release's configure and bundle/: refused"

echo "openresty-env: nothing given"
rc=$(run nothing OPENRESTY_SRC="$work/no-sources")
if [ "$rc" -ne 0 ] && grep -qF "no such folder: $work/no-sources" "$work/nothing.err" \
   && grep -q "set NGINX_BIN to an installed OpenResty" "$work/nothing.err" \
   && grep -q "set OPENRESTY_TARBALL to OpenResty's release tarball" "$work/nothing.err"; then
  pass "no OpenResty and no sources: the error names NGINX_BIN and OPENRESTY_TARBALL"
else
  fail "no OpenResty and no sources: the error names NGINX_BIN and OPENRESTY_TARBALL" \
    "status $rc; $(cat "$work/nothing.err")"
fi

echo "openresty-env: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
