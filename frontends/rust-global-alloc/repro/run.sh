#!/usr/bin/env bash
# Builds repro/torn_allocator.c against each given interpreter (default:
# every interpreter of the matrix in .venvs.list) and runs it for SECONDS
# (default 20). Prints, per interpreter, whether CPython read its raw
# allocator table torn. The race is CPython's; see ../README.md.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
SECONDS_TO_RUN=${SECONDS_TO_RUN:-20}
pythons=("$@")
if [ ${#pythons[@]} -eq 0 ]; then
    while read -r _tag venv; do pythons+=("$venv/bin/python"); done < "$ROOT/.venvs.list"
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for py in "${pythons[@]}"; do
    read -r name inc lib ldlib < <("$py" -c 'import sys, sysconfig as s
t = "t" if s.get_config_var("Py_GIL_DISABLED") else ""
print("%d.%d%s" % (*sys.version_info[:2], t), s.get_paths()["include"], s.get_config_var("LIBDIR"), s.get_config_var("LDLIBRARY"))')
    if [[ "$ldlib" != *.so* ]]; then
        echo "$name: skipped (no shared libpython to link against)"; continue
    fi
    if ! gcc -O2 -g -o "$out/torn-$name" "$HERE/torn_allocator.c" -I"$inc" -L"$lib" -lpython"$name" -lpthread 2> "$out/cc-$name.log"; then
        echo "$name: skipped (could not build: $(head -1 "$out/cc-$name.log"))"; continue
    fi
    result=$(LD_LIBRARY_PATH="$lib" timeout $((SECONDS_TO_RUN + 60)) "$out/torn-$name" "$SECONDS_TO_RUN" 2>&1 | grep -E "torn read|no torn read" | head -1)
    echo "$name: ${result:-no result (crashed before reporting)}"
done
