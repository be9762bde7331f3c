#!/usr/bin/env bash
# Runs CPython's own regression tests under interheap-python, on every
# interpreter of the matrix (or the tags given), as `interheap-python -m test`.
#
# Two tests check pymalloc itself, not Python's behaviour; they are ignored on
# default builds, and listed here and in the output (never silently):
#   test_sys.test_debugmallocstats  expects pymalloc's arena statistics in the
#       output of sys._debugmallocstats(); with another allocator CPython prints
#       only its free lists.
#   test_sys.test_getallocatedblocks  expects sys.getallocatedblocks() > 0 when
#       the allocator has no name CPython knows; that count is pymalloc's own
#       (it reads pymalloc's per-interpreter state), so it is 0 with any other
#       allocator.
# The test files run in parallel worker processes (-j, one per CPU), each
# started as sys.executable, which is interheap-python itself.
#
# SIGINT is given back its default action first: a shell that starts a job in
# the background without job control (`make test &` from a script) makes it
# ignore SIGINT, CPython then installs no KeyboardInterrupt handler, and
# tests that interrupt themselves fail (test_generators'
# test_raise_and_yield_from) or hang for good (test_threading's
# test_print_exception_gh_102056 recurses until a KeyboardInterrupt comes).
# A hang still ends after --timeout, as a failure with its traceback.
# Usage: scripts/regrtest.sh [TAG ...]
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
mkdir -p "$ROOT/out"
[ -f .venvs.list ] || { echo "regrtest: run scripts/setup.sh first" >&2; exit 2; }

PYMALLOC_SPECIFIC=(test_debugmallocstats test_getallocatedblocks)
status=0
while read -r tag venv; do
    if [ $# -gt 0 ] && [[ ! " $* " == *" $tag "* ]]; then continue; fi
    launcher=$venv/bin/interheap-python
    # test_unicode became test_str in 3.13.
    str_test=$("$launcher" -c 'import sys; print("test_str" if sys.version_info >= (3, 13) else "test_unicode")')
    tests=(test_dict test_list test_set test_tuple "$str_test" test_bytes test_long test_float test_gc
           test_weakref test_threading test_thread test_capi test_sys test_interpreters test_exceptions
           test_generators test_compile test_importlib)
    ignore=()
    if [ "$("$launcher" -c 'import sysconfig; print(bool(sysconfig.get_config_var("Py_GIL_DISABLED")))')" = False ]; then
        for t in "${PYMALLOC_SPECIFIC[@]}"; do ignore+=(--ignore "$t"); done
        echo "regrtest $tag: ignoring pymalloc-specific tests: ${PYMALLOC_SPECIFIC[*]} (see scripts/regrtest.sh)"
    fi
    echo "regrtest $tag: $launcher -m test ${tests[*]}"
    "$launcher" -c 'import interheap, sys; d = interheap.allocator_domains(); print("  allocator serves:", d); sys.exit(not d)' \
        || { echo "regrtest $tag: the interheap allocator is not installed"; status=1; continue; }
    # The -j workers are sys.executable: check that they get the allocator too.
    "$launcher" -c 'import subprocess, sys; sys.exit(subprocess.call([sys.executable, "-c",
        "import interheap, sys; sys.exit(not interheap.allocator_domains())"]))' \
        || { echo "regrtest $tag: sys.executable does not run the interheap allocator"; status=1; continue; }
    if ! "$launcher" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])' \
        -m test -j "$(nproc)" --timeout 600 "${ignore[@]}" "${tests[@]}" > "$ROOT/out/regrtest-$tag.log" 2>&1; then
        echo "regrtest $tag: FAILED (log: out/regrtest-$tag.log)"
        tail -25 "$ROOT/out/regrtest-$tag.log"
        status=1
    else
        grep -E "^Total tests:|^Result:" "$ROOT/out/regrtest-$tag.log" | sed "s/^/  $tag: /"
    fi
done < .venvs.list
exit $status
