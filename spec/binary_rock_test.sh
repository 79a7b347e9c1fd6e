#!/usr/bin/env bash
# `make test-rock`, second part: the binary rock on a host without Rust.
# tools/make-rock (`make rock`) builds the source rock and this machine's
# binary rock here, where cargo is. Then, with cargo and rustc off the PATH
# and CARGO_HOME and RUSTUP_HOME pointing nowhere, for the rest of the run:
# the source rock does not install (so the mask holds), the binary rock
# does, into a fresh tree; its library is stripped, needs only glibc and
# libgcc_s, and no newer glibc than the README says; and a 2-worker nginx
# that reads only that tree runs it in native mode and counts N exactly.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
requests=${ROCK_REQUESTS:-2000}
# shellcheck source=spec/support/rock.sh
. "$repo/spec/support/rock.sh"

rock_need luarocks cargo "$NGINX_BIN" curl readelf ldd unzip
rock_setup binary-rock

# 1. Build both rocks, as `make rock` does (into a directory of our own).
dist=$ROCK_WORK/dist
if out=$("$repo/tools/make-rock" "$dist" 2>&1); then
  pass "tools/make-rock: $(echo "$out" | grep -c ' bytes ') rocks with size and sha256"
  echo "$out" | sed 's/^/        /'
else
  fail "tools/make-rock" "$out"
  finish
fi
rockspec=$(cd "$repo" && echo resty-counter-*.rockspec)
name_version=${rockspec%.rockspec}
src_rock=$dist/$name_version.src.rock
bin_rock=$dist/$name_version.$(luarocks --lua-version=5.1 config arch).rock
if [ -f "$src_rock" ] && [ -f "$bin_rock" ]; then
  pass "dist has $(basename "$src_rock") and $(basename "$bin_rock")"
else
  fail "rock names" "$(ls "$dist" | tr '\n' ' ')"
  finish
fi

# The binary rock holds the shim, the loader and the library of one build
# (and LuaRocks' own files), and its shim is the source rock's.
files=$(unzip -Z1 "$bin_rock" | grep -v '/$' | sort | paste -sd' ')
shim="lua/resty/counter.lua"
for part in abi loader log pure stage sync timer; do
  shim="$shim lua/resty/counter/$part.lua"
done
# shellcheck disable=SC2086 # $shim is a list of names without spaces
want=$(printf '%s\n' doc/README.md lib/libresty_counter.so $shim "$rockspec" rock_manifest \
  | sort | paste -sd' ')
if [ "$files" = "$want" ]; then
  pass "the binary rock holds: $files"
else
  fail "binary rock contents" "got: $files; want: $want"
fi
same=1
for f in $shim; do
  cmp -s <(unzip -p "$bin_rock" "$f") <(unzip -p "$src_rock" "resty.counter/$f") || same=0
done
if [ "$same" = 1 ]; then
  pass "its shim files (counter.lua and resty/counter/*.lua) are the source rock's"
else
  fail "shim of the binary rock differs from the source rock's"
fi

# 2. From here on, a host without Rust. A PATH directory that holds cargo or
#    rustc is replaced by links to everything else in it.
path='' n=0
IFS=: read -ra dirs <<<"$PATH"
for d in "${dirs[@]}"; do
  [ -d "$d" ] || continue
  if [ -e "$d/cargo" ] || [ -e "$d/rustc" ]; then
    n=$((n + 1))
    mkdir "$ROCK_WORK/path$n"
    for f in "$d"/*; do
      case ${f##*/} in
        cargo | cargo-* | rustc | rustdoc | rustup | rust-*) ;;
        *) ln -s "$f" "$ROCK_WORK/path$n/" ;;
      esac
    done
    d=$ROCK_WORK/path$n
  fi
  path=${path:+$path:}$d
done
export PATH=$path
export CARGO_HOME=$ROCK_WORK/no-cargo-home RUSTUP_HOME=$ROCK_WORK/no-rustup-home
unset RUSTUP_TOOLCHAIN CARGO RUSTC
if found=$(command -v cargo rustc); then
  fail "cargo and rustc off the PATH" "found $found"
  finish
fi
pass "no cargo, no rustc on the PATH; CARGO_HOME and RUSTUP_HOME are missing directories"

# Before the binary rock, this was the only rock: it needs cargo.
if out=$(luarocks --lua-version=5.1 --tree="$ROCK_WORK/src-tree" install "$src_rock" 2>&1); then
  fail "without cargo, the source rock does not install" "it did: $out"
elif echo "$out" | grep -q 'cargo: not found'; then
  pass "without cargo, the source rock does not install ($(echo "$out" | grep -m1 'cargo: not found'))"
else
  fail "the source rock fails for want of cargo" "$out"
fi

if out=$(luarocks --lua-version=5.1 --tree="$ROCK_TREE" install "$bin_rock" 2>&1); then
  pass "luarocks --lua-version=5.1 --tree=<fresh> install $(basename "$bin_rock")"
else
  fail "luarocks install of the binary rock" "$out"
  finish
fi
rock_check_layout

# 3. The installed library: stripped, its dynamic dependencies, its glibc.
lib=$ROCK_LIB_DIR/libresty_counter.so
if readelf -S -W "$lib" | grep -q '\.symtab'; then
  fail "the library is stripped" "it has a .symtab"
else
  pass "the library is stripped (no .symtab; $(stat -c %s "$lib") bytes)"
fi
# libc.so.6 and ld-linux (glibc's dynamic loader, which provides
# __tls_get_addr) are glibc; libgcc_s is the unwinder Rust's panics use.
needed=$(readelf -d "$lib" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort | paste -sd' ')
other=$(echo "$needed" | tr ' ' '\n' | grep -Ev '^(libc\.so\.6|libgcc_s\.so\.1|ld-linux-[a-z0-9_-]+\.so\.[0-9]+|)$')
if [ -z "$other" ] && [[ " $needed " == *" libc.so.6 "* ]]; then
  pass "readelf -d: NEEDED $needed"
else
  fail "NEEDED only glibc and libgcc_s" "NEEDED: $needed"
fi
if ldd_out=$(ldd "$lib" 2>&1) && ! echo "$ldd_out" | grep -q 'not found'; then
  pass "ldd resolves every dependency"
  echo "$ldd_out" | sed 's/^/        /'
else
  fail "ldd" "$ldd_out"
fi
glibc=$(readelf -V "$lib" | sed -n 's/.*Name: GLIBC_\([0-9.]*\).*/\1/p' | sort -uV | tail -1)
readme=$(grep -o 'glibc [0-9][0-9.]* or later' "$repo/README.md" | sort -u)
if [ -n "$glibc" ] && [ "$readme" = "glibc $glibc or later" ]; then
  pass "newest glibc symbol version GLIBC_$glibc, as the README says ($readme)"
else
  fail "README's glibc" "the library needs GLIBC_${glibc:-?}; README says: ${readme:-nothing}"
fi

# 4. An nginx that sees only the tree: native mode, N counted exactly.
rock_serve
rock_check_where
rock_count "$requests"
rock_check_log
finish
