#!/usr/bin/env bash
# Runs every check and test of interheap on every interpreter of the matrix.
# Expects scripts/setup.sh to have run (make test does both).
#   1. Rust: cargo fmt --check, cargo clippy -D warnings, cargo test (the
#      lock-free protocols and their loom models, engine, glue, global
#      allocator), the models' mutation check (scripts/mutants.py), the
#      glue's clippy and tests again against 3.12 (code that only 3.12
#      compiles: the raw-swap guard), the global allocator's refusal of abi3
#      builds, the engine's and the global allocator's tests under
#      AddressSanitizer (nightly), the engine's and the sync crate's tests
#      under Miri (nightly; smaller sizes, see engine/tests/support) and a
#      short fuzzing run of the allocator (cargo fuzz, engine/fuzz)
#   2. Python: ruff
#   3. pytest on each venv listed in .venvs.list (3.12, 3.13, 3.14, 3.14t)
#   4. interheap-python built with AddressSanitizer, running 4 isolated
#      interpreters that exchange objects (examples/interpreters_exchange.py),
#      then the same under `python -m interheap run --sites --timeline` with
#      interheap._native built with AddressSanitizer too
#   5. ThreadSanitizer (nightly): the engine's tests; on 3.14 and 3.14t,
#      against CPython built with TSan (scripts/cpython-tsan.sh), the glue's
#      and the global allocator's tests, interheap-python running
#      examples/parallel_interpreters.py and examples/interpreters_exchange.py,
#      and python -m interheap run --sites --timeline with interheap._native
#      built with TSan too (the hooks under python, the heaps under
#      interheap-python)
#   6. CPython's own regression tests under interheap-python (scripts/regrtest.sh)
# Prints one closing line "N passed, N failed" over all pytest runs. Before
# it, each failed command's output, condensed (scripts/condense_report.py:
# a sanitizer report's headline, frames and summary; else its last lines),
# so that a log that keeps only its tail still says why.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${INTERHEAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/interheap}
cd "$ROOT"
[ -f .venvs.list ] || { echo "test: run scripts/setup.sh first (or: make test)" >&2; exit 2; }

failures=()
# Each step's wall time, printed at the end (where a slow `make test` goes).
step_name=""; step_start=$SECONDS; step_times=()
end_step() {
    [ -n "$step_name" ] && step_times+=("$(printf '%5d s  %s' $((SECONDS - step_start)) "$step_name")")
    step_name=""
}
step() { end_step; step_name="$*"; step_start=$SECONDS; printf '\n=== %s\n' "$*"; }
# Each run's output also goes to a log; a failing run's report is condensed
# at the end of the output, where a CI log that keeps only its tail shows it.
RUN_LOGS=$(mktemp -d)
trap 'rm -rf "$RUN_LOGS"' EXIT
failure_logs=()
run() {
    local log
    log=$RUN_LOGS/$((${#failure_logs[@]} + ${#failures[@]})).$RANDOM.log
    "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        failures+=("$*")
        failure_logs+=("$log")
    else
        rm -f "$log"
    fi
    return "$rc"
}

PY=$ROOT/.venv/bin/python
export PYO3_PYTHON=$PY
LIBDIR=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
export CARGO_TARGET_DIR=$CACHE/target/checks

step "cargo fmt --check"
run cargo fmt --all --check
step "cargo clippy -D warnings"
run cargo clippy --quiet --workspace --all-targets -- -D warnings
step "cargo test (lock-free protocols with their loom models, engine, CPython glue, global allocator)"
run env LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cargo test --quiet -p interheap-sync -p interheap-engine -p interheap-cpython -p interheap-pyalloc
step "the loom models catch their mutations (weakened orderings, dropped steps: scripts/mutants.py)"
run "$PY" scripts/mutants.py
PY312=$(awk '$1 == "3.12" { print $2 "/bin/python" }' .venvs.list)
if [ -n "$PY312" ]; then
    step "cargo clippy and test of the CPython glue against 3.12 (the raw-swap guard)"
    LIBDIR312=$("$PY312" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
    run env PYO3_PYTHON="$PY312" CARGO_TARGET_DIR="$CACHE/target/checks312" \
        cargo clippy --quiet --workspace --all-targets -- -D warnings
    run env PYO3_PYTHON="$PY312" CARGO_TARGET_DIR="$CACHE/target/checks312" \
        LD_LIBRARY_PATH="$LIBDIR312${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        cargo test --quiet -p interheap-cpython
else
    step "NOT RUN: the glue's 3.12 checks (3.12 is not in .venvs.list)"
fi
step "global allocator refuses the stable ABI (abi3) with a clear error"
abi3=$(CARGO_TARGET_DIR="$CACHE/target/abi3-check" \
    cargo check --quiet -p interheap-pyalloc --features pyo3-ffi/abi3-py312 2>&1)
if [ $? -ne 0 ] && grep -q "does not support the stable ABI" <<< "$abi3"; then
    echo "refused, as it should be"
else
    echo "$abi3" | tail -20
    failures+=("interheap-pyalloc did not refuse an abi3 build")
fi
step "free-threaded 3.13 (3.13t) is refused at build time and by the matrix, naming 3.14"
ft313=$(mktemp)
printf '%s\n' implementation=CPython version=3.13 shared=true lib_name=python3.13t lib_dir=/usr/lib \
    executable=/usr/bin/python3.13t pointer_width=64 build_flags=Py_GIL_DISABLED > "$ft313"
refusal=$(PYO3_CONFIG_FILE="$ft313" CARGO_TARGET_DIR="$CACHE/target/ft313-check" \
    cargo check --quiet -p interheap-cpython 2>&1)
if [ $? -ne 0 ] && grep -q "free-threaded build of CPython versions below 3.14" <<< "$refusal"; then
    echo "build refused, as it should be"
else
    echo "$refusal" | tail -20
    failures+=("the glue built against free-threaded 3.13")
fi
rm -f "$ft313"
refusal=$(scripts/interpreters.sh --tag 3.13t 2>&1)
if [ $? -ne 0 ] && grep -q "Use free-threaded 3.14 (tag 3.14t)" <<< "$refusal"; then
    echo "matrix refused 3.13t, as it should: $refusal"
else
    failures+=("interpreters.sh accepted 3.13t: $refusal")
fi
step "engine under AddressSanitizer + LeakSanitizer (nightly)"
if cargo +nightly --version >/dev/null 2>&1; then
    run env RUSTFLAGS="-Zsanitizer=address" CARGO_TARGET_DIR="$CACHE/target/asan" \
        cargo +nightly test --quiet -p interheap-engine --target "$(rustc -vV | sed -n 's/^host: //p')"
    step "global allocator (embedded CPython, stress) under AddressSanitizer + LeakSanitizer (nightly)"
    run env RUSTFLAGS="-Zsanitizer=address" CARGO_TARGET_DIR="$CACHE/target/asan" \
        LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PYALLOC_STRESS_OPS=40000 \
        cargo +nightly test --quiet -p interheap-pyalloc --target "$(rustc -vV | sed -n 's/^host: //p')"
else
    echo "NOT RUN: no nightly toolchain, so no AddressSanitizer run of the engine"
fi
# Miri checks every step of the engine's and the sync crate's unit and
# property tests for undefined behaviour: out-of-bounds and use-after-free
# accesses, aliasing (Stacked Borrows, Miri's default), data races and
# weak-memory effects of the atomics, with memory from Rust's allocator
# behind the OS layer (engine/src/heap/os.rs). The tests run with fewer
# rounds, threads and cases there; those that cannot run under Miri say why
# in their #[cfg_attr(miri, ignore = ...)]. The loom models are not built
# there (loom explores their interleavings itself), nor are the doctests run.
# Miri runs one test at a time, so the heap's tests run in a second process
# beside the unit and model tests (both cores busy: half the wall time).
step "engine and sync under Miri (nightly)"
if cargo +nightly miri --version >/dev/null 2>&1; then
    # miri FLAGS ARGS...: cargo miri test with FLAGS added to MIRIFLAGS.
    miri() {
        local flags=$1
        shift
        env MIRIFLAGS="$flags ${MIRIFLAGS:-}" CARGO_TARGET_DIR="$CACHE/target/miri" \
            cargo +nightly miri test --quiet "$@"
    }
    if run miri "" --no-run -p interheap-sync -p interheap-engine --lib --tests; then
        miri_heap_log=$(mktemp)
        # -Zmiri-ignore-leaks: heaps are never freed (Heap::new hands out a
        # &'static; an ended heap is pooled for reuse), and some of these tests
        # leave a heap with its segments live at exit, which Miri calls a leak.
        miri -Zmiri-ignore-leaks -p interheap-engine --test heap > "$miri_heap_log" 2>&1 &
        miri_heap=$!
        run miri "" -p interheap-sync -p interheap-engine --lib
        run miri "" -p interheap-engine --test model
        wait "$miri_heap" || failures+=("Miri: cargo miri test -p interheap-engine --test heap")
        cat "$miri_heap_log"
        rm -f "$miri_heap_log"
    fi
else
    echo "NOT RUN: no nightly toolchain with Miri (scripts/setup.sh installs it)"
fi
step "fuzz the allocator and the hooks' bookkeeping from 3 threads (cargo fuzz, ${FUZZ_SECONDS:-20} s each)"
if cargo +nightly --version >/dev/null 2>&1 && cargo fuzz --version >/dev/null 2>&1; then
    run env FUZZ_SECONDS="${FUZZ_SECONDS:-20}" "$ROOT/scripts/fuzz.sh"
else
    echo "NOT RUN: no nightly toolchain or cargo-fuzz"
fi
step "ruff"
run "$ROOT/.venv/bin/ruff" check .
run "$ROOT/.venv/bin/ruff" format --check .

# pytest on every interpreter, two at a time: the suites mostly wait on the
# interpreters they start, so two share the 2 cores well (measured: 375 s one
# after another). Each suite's output is printed whole, in matrix order.
passed=0; failed=0
step "pytest on every interpreter of the matrix, two at a time"
logs=(); tags=(); pids=()
while read -r tag venv; do
    log=$(mktemp)
    logs+=("$log"); tags+=("$tag ($venv)")
    # Two at a time: wait for the one started two suites ago.
    if [ ${#pids[@]} -ge 2 ]; then wait "${pids[-2]}" 2>/dev/null || true; fi
    ( start=$SECONDS
      "$venv/bin/python" -m pytest -q -rsx -p no:cacheprovider tests "$@" > "$log" 2>&1
      rc=$?
      echo "pytest exit $rc after $((SECONDS - start)) s" >> "$log"
      exit $rc ) &
    pids+=($!)
done < .venvs.list
for i in "${!pids[@]}"; do
    # (Its exit status is read from its log: it may have been waited for above.)
    wait "${pids[$i]}" 2>/dev/null
    rc=$(sed -n 's/^pytest exit \([0-9]*\) after .*/\1/p' "${logs[$i]}" | tail -1)
    rc=${rc:-1}
    echo "--- pytest on ${tags[$i]}"
    cat "${logs[$i]}"
    summary=$(grep -E '^[0-9=].*(passed|failed|error)' "${logs[$i]}" | tail -1)
    p=$(grep -oE '[0-9]+ passed' <<< "$summary" | grep -oE '[0-9]+' || true)
    f=$(grep -oE '[0-9]+ (failed|error)' <<< "$summary" | grep -oE '[0-9]+' | paste -sd+ | bc 2>/dev/null || true)
    passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0}))
    step_times+=("$(printf '%5s    %s' "" "pytest on ${tags[$i]}: $(tail -1 "${logs[$i]}")")")
    # Exit 5 (no tests collected) is a failure too: a matrix entry that tests nothing.
    [ "$rc" -eq 0 ] || failures+=("pytest on ${tags[$i]} (exit $rc)")
    rm -f "${logs[$i]}"
done

# interheap-python itself built with AddressSanitizer (+ LeakSanitizer at
# exit), running 4 isolated interpreters that churn and exchange objects
# through queues while the allocator checks its own figures.
if cargo +nightly --version >/dev/null 2>&1; then
    while read -r tag venv; do
        if [ -s "$venv/interheap-c/rustflags" ] && [ -n "$(tr -d '[:space:]' < "$venv/interheap-c/rustflags")" ]; then
            # Debian unstable's 3.15 runs on its own glibc and loader; an ASan
            # build against it is not set up. The allocator code is the same
            # one the other interpreters' ASan runs check.
            step "NOT RUN: interheap-python under AddressSanitizer on $tag (runs on another glibc's loader; not set up)"
            continue
        fi
        step "interheap-python under AddressSanitizer on $tag: examples/interpreters_exchange.py"
        asan_target=$CACHE/target/asan-launcher-$tag
        host=$(rustc -vV | sed -n 's/^host: //p')
        # --export-dynamic: the launcher carries the ASan runtime, and the
        # ASan build of interheap._native loaded into it below resolves the
        # runtime's symbols from it (rustc links the runtime into executables
        # only). One RUSTFLAGS for both builds, so they share one target dir.
        asan_flags="-Zsanitizer=address -Clink-arg=-Wl,--export-dynamic"
        if env PYO3_PYTHON="$venv/bin/python" RUSTFLAGS="$asan_flags" CARGO_TARGET_DIR="$asan_target" \
            cargo +nightly build --profile asan --quiet -p interheap-launcher --target "$host"; then
            install -m 755 "$asan_target/$host/asan/interheap-python" "$venv/bin/interheap-python-asan"
            run env ASAN_OPTIONS=halt_on_error=1 timeout 600 "$venv/bin/interheap-python-asan" \
                examples/interpreters_exchange.py --seconds 3
        else
            failures+=("AddressSanitizer build of interheap-python for $tag")
            continue
        fi
        # The hooks, sampled sites (stacks read in every interpreter) and the
        # timeline, all built with ASan, over the ASan allocator: the
        # interpreters exchange objects, so blocks sampled in one are freed
        # in another. A high rate (4 KiB) samples about 20,000 blocks.
        step "python -m interheap run --sites --timeline under AddressSanitizer on $tag"
        asan_package=$venv/interheap-asan
        if env PYO3_PYTHON="$venv/bin/python" RUSTFLAGS="$asan_flags" CARGO_TARGET_DIR="$asan_target" \
            INTERHEAP_WHEEL_LAUNCHER=0 \
            cargo +nightly build --profile asan --quiet -p interheap-python --target "$host"; then
            rm -rf "$asan_package" && mkdir -p "$asan_package"
            cp -r "$ROOT/frontends/python/python/interheap" "$ROOT/frontends/python/python/interheap_interp" \
                "$asan_package/"
            rm -f "$asan_package"/interheap/_native*.so
            suffix=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
            cp "$asan_target/$host/asan/lib_native.so" "$asan_package/interheap/_native$suffix"
            run env ASAN_OPTIONS=halt_on_error=1 PYTHONPATH="$asan_package" timeout 600 \
                "$venv/bin/interheap-python-asan" -c \
                "import interheap._native as n, sys; sys.exit(0 if n.__file__.startswith('$asan_package') else 1)"
            run env ASAN_OPTIONS=halt_on_error=1 PYTHONPATH="$asan_package" timeout 600 \
                "$venv/bin/interheap-python-asan" -m interheap run --no-report --sites 4KiB --timeline 2 \
                examples/interpreters_exchange.py --seconds 3
        else
            failures+=("AddressSanitizer build of interheap._native for $tag")
        fi
    done < .venvs.list
else
    echo "NOT RUN: no nightly toolchain, so no AddressSanitizer run of interheap-python"
fi

# ThreadSanitizer (nightly; -Zbuild-std with rust-src, so that std's own
# synchronisation is instrumented too). The engine's tests, then per
# free-threaded and default 3.14: the glue's and the global allocator's tests
# (embedded CPython, stress) and interheap-python running the parallel-
# interpreter examples, all against CPython built with TSan
# (scripts/cpython-tsan.sh, built once by scripts/setup.sh): an uninstrumented
# libpython hides its PyMutex and GIL atomics from TSan, which then reports
# the cross-interpreter queues' handoffs as races. Reports that are not bugs
# are suppressed in scripts/tsan.supp, each with its argument. A report
# fails the step (TSan's exit code 66).
host=$(rustc -vV | sed -n 's/^host: //p')
tsan_flags="-Zsanitizer=thread -Clink-arg=-Wl,--export-dynamic"
# The symbolizer: the suppressions name functions, and the TSan runtime that
# the TSan python links (clang-19's) does not find it by itself.
tsan_options="suppressions=$ROOT/scripts/tsan.supp halt_on_error=1 second_deadlock_stack=1"
if command -v llvm-symbolizer >/dev/null; then
    tsan_options+=" external_symbolizer_path=$(command -v llvm-symbolizer)"
fi
tsan_env=(TSAN_OPTIONS="$tsan_options")
if ! cargo +nightly --version >/dev/null 2>&1; then
    step "NOT RUN: ThreadSanitizer (no nightly toolchain)"
elif ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    step "NOT RUN: ThreadSanitizer (no rust-src for nightly, which -Zbuild-std needs; scripts/setup.sh adds it)"
else
    step "engine and sync under ThreadSanitizer (nightly, std instrumented)"
    # PROPTEST_CASES: the single-threaded model test, 8 cases of its 64.
    # --lib --tests: not the doctests (rustdoc would build them without TSan
    # against the instrumented std, which rustc refuses; cargo test runs them).
    # (3.14's target dir: the instrumented std built there serves both.)
    # --skip models::: the loom models run their threads as coroutines on
    # stacks of loom's own, which TSan cannot follow (loom checks them).
    # (Below too; the harness-less tests ignore the argument.)
    run env "${tsan_env[@]}" RUSTFLAGS="$tsan_flags" CARGO_TARGET_DIR="$CACHE/target/tsan-3.14" PROPTEST_CASES=8 \
        cargo +nightly test --quiet -Zbuild-std --target "$host" -p interheap-sync -p interheap-engine --lib --tests \
        -- --skip models::
    for tag in 3.14 3.14t; do
        if ! tpy=$(scripts/cpython-tsan.sh --cached --tag "$tag" 2>&1); then
            step "NOT RUN: ThreadSanitizer runs on $tag: $tpy"
            failures+=("ThreadSanitizer runs on $tag: no CPython built with TSan")
            continue
        fi
        tlib=$("$tpy" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
        tsan_target=$CACHE/target/tsan-$tag
        step "CPython glue and global allocator (embedded CPython, stress) under ThreadSanitizer on $tag (CPython with TSan)"
        run env "${tsan_env[@]}" RUSTFLAGS="$tsan_flags" CARGO_TARGET_DIR="$tsan_target" PYO3_PYTHON="$tpy" \
            LD_LIBRARY_PATH="$tlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PYALLOC_STRESS_OPS=5000 \
            cargo +nightly test --quiet -Zbuild-std --target "$host" -p interheap-cpython -p interheap-pyalloc --lib --tests \
            -- --skip models::
        step "interheap-python under ThreadSanitizer on $tag (CPython with TSan): parallel_interpreters.py, interpreters_exchange.py"
        if env RUSTFLAGS="$tsan_flags" CARGO_TARGET_DIR="$tsan_target" PYO3_PYTHON="$tpy" \
            cargo +nightly build --quiet -Zbuild-std --profile tsan --target "$host" -p interheap-launcher; then
            tsan_launcher=$tsan_target/$host/tsan/interheap-python
            run env "${tsan_env[@]}" timeout 900 "$tsan_launcher" examples/parallel_interpreters.py --scale 0.05
            run env "${tsan_env[@]}" timeout 900 "$tsan_launcher" examples/interpreters_exchange.py --seconds 3
        else
            failures+=("ThreadSanitizer build of interheap-python for $tag")
            continue
        fi
        # interheap._native built with TSan: the hooks (sampled sites read in
        # every interpreter, the timeline's thread) over CPython's allocator
        # in the TSan python, and the figures read from the heaps under the
        # TSan interheap-python.
        step "python -m interheap run --sites --timeline under ThreadSanitizer on $tag: the hooks (python), the heaps (interheap-python)"
        if env RUSTFLAGS="$tsan_flags" CARGO_TARGET_DIR="$tsan_target" PYO3_PYTHON="$tpy" INTERHEAP_WHEEL_LAUNCHER=0 \
            cargo +nightly build --quiet -Zbuild-std --profile tsan --target "$host" -p interheap-python; then
            tsan_package=$tsan_target/interheap-package
            rm -rf "$tsan_package" && mkdir -p "$tsan_package"
            cp -r "$ROOT/frontends/python/python/interheap" "$ROOT/frontends/python/python/interheap_interp" \
                "$tsan_package/"
            rm -f "$tsan_package"/interheap/_native*.so
            suffix=$(env "${tsan_env[@]}" "$tpy" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
            cp "$tsan_target/$host/tsan/lib_native.so" "$tsan_package/interheap/_native$suffix"
            run env "${tsan_env[@]}" PYTHONPATH="$tsan_package" "$tpy" -c \
                "import interheap._native as n, sys; sys.exit(0 if n.__file__.startswith('$tsan_package') else 1)"
            run env "${tsan_env[@]}" PYTHONPATH="$tsan_package" timeout 900 "$tpy" -m interheap run --no-report \
                --sites 4KiB --timeline 2 examples/parallel_interpreters.py --scale 0.05
            run env "${tsan_env[@]}" PYTHONPATH="$tsan_package" timeout 900 "$tsan_launcher" -m interheap run \
                --no-report --sites 4KiB --timeline 2 examples/interpreters_exchange.py --seconds 3
        else
            failures+=("ThreadSanitizer build of interheap._native for $tag")
        fi
    done
fi

step "CPython regression tests under interheap-python"
run scripts/regrtest.sh

end_step
echo
echo "time per step (total $SECONDS s):"
printf '%s\n' "${step_times[@]}"
echo
for log in "${failure_logs[@]}"; do
    echo "--- the end of a failed run's output, condensed (sanitizer reports: kind, top frames, summary):"
    "$PY" scripts/condense_report.py "$log"
done
if [ ${#failures[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failures[@]}"
fi
echo "$passed passed, $failed failed"
[ ${#failures[@]} -eq 0 ]
