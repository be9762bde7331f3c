#!/usr/bin/env bash
# Fuzzes the engine with cargo fuzz (nightly): every target in engine/fuzz for
# FUZZ_SECONDS (default 60) each, with its corpus kept in the cache
# ($CACHE/fuzz-corpus/<target>) so that each run starts where the last one
# ended. A crash stops the run (exit 1) and leaves its input in
# engine/fuzz/artifacts/<target>/.
#
#   heap_ops     the allocator: malloc/calloc/realloc/free from 3 threads,
#                remote frees, an ended heap, heaps keeping requested sizes
#   tracker_ops  the hooks' bookkeeping: nurseries, the block table and the
#                ledger from 3 threads, fast and general paths, handed-off frees
#
#   scripts/fuzz.sh [TARGET...]      (FUZZ_SECONDS=600 scripts/fuzz.sh for a long run)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${INTERHEAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/interheap}
SECONDS_EACH=${FUZZ_SECONDS:-60}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(heap_ops tracker_ops)
cd "$ROOT/engine"
for target in "${targets[@]}"; do
    corpus="$CACHE/fuzz-corpus/$target"
    mkdir -p "$corpus"
    before=$(find "$corpus" -type f | wc -l)
    echo "fuzz $target: ${SECONDS_EACH} s, corpus $corpus ($before inputs)"
    if ! CARGO_TARGET_DIR="$CACHE/target/fuzz" cargo +nightly fuzz run "$target" "$corpus" \
        -- -max_total_time="$SECONDS_EACH" > "$CACHE/fuzz-$target.log" 2>&1; then
        tail -40 "$CACHE/fuzz-$target.log" >&2
        echo "fuzz $target: FAILED (input in engine/fuzz/artifacts/$target/)" >&2
        exit 1
    fi
    runs=$(grep -o 'Done [0-9]* runs' "$CACHE/fuzz-$target.log" | tail -1)
    echo "fuzz $target: ${runs:-done}, corpus $(find "$corpus" -type f | wc -l) inputs"
done
