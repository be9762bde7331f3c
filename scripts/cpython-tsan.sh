#!/usr/bin/env bash
# Builds (once) and prints CPython 3.14 or free-threaded 3.14t compiled with
# ThreadSanitizer, for the TSan runs of make test (scripts/test.sh).
#
# Why: a TSan program that embeds an uninstrumented libpython gets false
# reports, because TSan does not see the synchronisation done in libpython
# (PyMutex and the GIL's atomics, the parking lot, the free-threaded build's
# atomics): accesses that CPython orders look unordered to it (see
# scripts/tsan.supp). With libpython instrumented, TSan sees it all.
#
# Built from the same checked release tarball as scripts/interpreters.sh
# (../shared/cpython, SHA256SUMS), with clang (Debian's clang-19; gcc's
# libtsan is another runtime than the LLVM one rustc links into the Rust
# programs, and two runtimes cannot share a process), --enable-shared with an
# rpath, no ensurepip and no test modules, cached under $INTERHEAP_CACHE/cpython-tsan/<tag>.
# libpython's __tsan_* references resolve against the runtime of the program
# that loads it: python's own (clang links it), or a Rust program's, which
# must then export it (-Clink-arg=-Wl,--export-dynamic).
#
# Usage: scripts/cpython-tsan.sh --tag 3.14|3.14t   prints the interpreter's path
#        scripts/cpython-tsan.sh --cached --tag T   the same, but never builds
#                                                   (fails if it is not cached)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${INTERHEAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/interheap}
SOURCE_DIR=${INTERHEAP_CPYTHON_SOURCE_DIR:-$ROOT/../shared/cpython}
CC_TSAN=${INTERHEAP_TSAN_CC:-clang-19}
log() { printf 'cpython-tsan: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

tag="" cached_only=0
while (($#)); do
    case $1 in
    --tag)
        tag=${2:-}
        shift 2
        ;;
    --cached)
        cached_only=1
        shift
        ;;
    *) die "unknown argument '$1' (usage: $0 [--cached] --tag 3.14|3.14t)" ;;
    esac
done
case $tag in
3.14) cfg_extra=() py=python3.14 ;;
3.14t) cfg_extra=(--disable-gil) py=python3.14t ;;
*) die "--tag must be 3.14 or 3.14t" ;;
esac

prefix=$CACHE/cpython-tsan/$tag
if [[ -f $prefix/.interheap-complete && -x $prefix/bin/$py ]]; then
    printf '%s\n' "$prefix/bin/$py"
    exit 0
fi
((cached_only == 0)) || die "CPython $tag with TSan is not built (scripts/setup.sh builds it)"

command -v "$CC_TSAN" >/dev/null ||
    die "$CC_TSAN not found (apt-get install clang-19 libclang-rt-19-dev; scripts/setup.sh does)"
mkdir -p "$CACHE/cpython-tsan/logs"
exec {lock_fd}>"$CACHE/cpython-tsan/.build-$tag.lock"
flock "$lock_fd"
if [[ -f $prefix/.interheap-complete && -x $prefix/bin/$py ]]; then
    printf '%s\n' "$prefix/bin/$py"
    exit 0
fi

tarball=$(find "$SOURCE_DIR" -maxdepth 1 -name 'Python-3.14.*.tar.xz' -print 2>/dev/null | sort -V | tail -n 1)
[[ -n $tarball ]] || die "no Python-3.14.*.tar.xz in $SOURCE_DIR"
(cd "$SOURCE_DIR" && grep -E "[[:space:]]\*?${tarball##*/}\$" SHA256SUMS | sha256sum --check --strict --quiet -) ||
    die "${tarball##*/} does not match its checksum in $SOURCE_DIR/SHA256SUMS"
upver=${tarball##*/Python-}
upver=${upver%.tar.xz}

logf=$CACHE/cpython-tsan/logs/build-$tag.log
work=$(mktemp -d "${TMPDIR:-/tmp}/interheap-cpython-tsan.XXXXXX")
stage=""
trap 'rm -rf "$work" ${stage:+"$stage"}' EXIT
t0=$SECONDS
log "building CPython $upver ($tag) with ThreadSanitizer: about 15 minutes on 2 cores (log: $logf)"
{
    tar -xf "$tarball" -C "$work"
    cd "$work/Python-$upver"
    ./configure CC="$CC_TSAN" --prefix="$prefix" --enable-shared --with-thread-sanitizer \
        --without-ensurepip --disable-test-modules "LDFLAGS=-Wl,-rpath,$prefix/lib" "${cfg_extra[@]}"
    make -j"$(nproc)"
    stage=$(mktemp -d "$CACHE/cpython-tsan/.staging-$tag.XXXXXX")
    # Byte-compiles only the top level of the library (-l) at install: the
    # instrumented interpreter takes many minutes over all of it, three
    # times; the rest is compiled when first imported.
    make install DESTDIR="$stage" COMPILEALL_OPTS="-j0 -l"
} >"$logf" 2>&1 || {
    tail -30 "$logf" >&2
    die "build failed (log: $logf)"
}
staged=$stage$prefix
# The staged interpreter runs with the staged libpython (its rpath names the final prefix).
LD_LIBRARY_PATH=$staged/lib TSAN_OPTIONS="suppressions=$ROOT/scripts/tsan.supp" \
    "$staged/bin/$py" -I -c 'import sys, _interpreters, concurrent.interpreters' >>"$logf" 2>&1 ||
    die "the built interpreter does not run (log: $logf)"
printf '%s TSan built %s in %d s\n' "${tarball##*/}" "$(date -u +%FT%TZ)" $((SECONDS - t0)) >"$staged/.interheap-complete"
rm -rf "$prefix"
mv -T "$staged" "$prefix"
log "built CPython $upver ($tag) with ThreadSanitizer in $((SECONDS - t0)) s -> $prefix"
printf '%s\n' "$prefix/bin/$py"
