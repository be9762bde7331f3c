#!/usr/bin/env bash
# Sets up everything interheap needs on a fresh machine, reusing caches:
#   - the interpreters of the test matrix (scripts/interpreters.sh: 3.12, 3.13,
#     3.14 and free-threaded 3.14t; 3.14 and 3.14t are built once from the
#     release source in ../shared/cpython and cached where the machine has none),
#   - one virtual environment per interpreter: .venv for 3.14 (the default),
#     .venvs/<tag> for the others, with the dev tools, interheap and the example
#     extension (examples/pyo3-extension) built in release mode and installed
#     (Cargo target dirs are cached per interpreter under the cache dir, so a
#     fresh clone rebuilds only interheap's crates), plus the interheap-python
#     launcher in each venv's bin/ (built with the package by
#     frontends/python/build.rs), and libinterheap (the C library) built for
#     it into <venv>/interheap-c/lib,
#   - cargo-fuzz, when the nightly toolchain is there (for the allocator's fuzz target),
#   - with the nightly toolchain, for make test's ThreadSanitizer runs: its
#     rust-src, clang-19 with its TSan runtime (apt-get), and CPython 3.14 and
#     3.14t built with TSan (scripts/cpython-tsan.sh; once, cached),
#   - and Miri with its sysroot (for the engine's tests under Miri).
# Usage: scripts/setup.sh [TAG ...]   (default: every interpreter of the matrix)
#        scripts/setup.sh --demo      only what `make demo` runs on: the default
#                                     interpreter, .venv and the interheap package
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${INTERHEAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/interheap}
DEFAULT_TAG=${INTERHEAP_DEFAULT_TAG:-3.14}
mkdir -p "$CACHE"
log() { printf 'setup: %s\n' "$*" >&2; }

command -v cargo >/dev/null || { log "cargo not found: install Rust (rustup) first"; exit 1; }

demo=0
if [ "${1:-}" = "--demo" ]; then
    demo=1
    shift
    set -- "$DEFAULT_TAG"
fi

# cargo-fuzz, for the allocator's fuzz target (make fuzz; a short run in make
# test). It needs the nightly toolchain; without one the fuzz run is skipped.
if [ "$demo" = 0 ] && cargo +nightly --version >/dev/null 2>&1 && ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz (once; about a minute)"
    cargo install --quiet --locked cargo-fuzz >"$CACHE/cargo-fuzz-install.log" 2>&1 \
        || { tail -20 "$CACHE/cargo-fuzz-install.log" >&2; exit 1; }
fi

# The nightly toolchain's rust-src and Miri, for make test: the
# ThreadSanitizer runs build std instrumented from rust-src (-Zbuild-std), and
# Miri builds its sysroot from it for the engine's tests. The sysroot is built
# once and kept in ~/.cache/miri (cargo miri setup does nothing when it is up
# to date).
if [ "$demo" = 0 ] && cargo +nightly --version >/dev/null 2>&1; then
    if ! cargo +nightly miri --version >/dev/null 2>&1 \
        || ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
        log "adding rust-src and Miri to the nightly toolchain (once)"
        rustup component add --toolchain nightly miri rust-src >"$CACHE/miri-install.log" 2>&1 \
            || { tail -20 "$CACHE/miri-install.log" >&2; exit 1; }
    fi
    cargo +nightly miri setup >"$CACHE/miri-setup.log" 2>&1 \
        || { tail -20 "$CACHE/miri-setup.log" >&2; exit 1; }
fi

# Tools the tests drive as a user would: Debian's chromium loads the HTML
# report (tests/test_html_report.py) and tmux shows the live view
# (tests/test_live.py). Installed with apt-get once (root, or sudo).
if [ "$demo" = 0 ]; then
    missing=()
    command -v chromium >/dev/null || missing+=(chromium)
    command -v tmux >/dev/null || missing+=(tmux)
    # clang and its TSan runtime build CPython with ThreadSanitizer (below).
    if cargo +nightly --version >/dev/null 2>&1; then
        command -v clang-19 >/dev/null || missing+=(clang-19)
        [ -n "$(ls /usr/lib/llvm-19/lib/clang/*/lib/linux/libclang_rt.tsan-x86_64.a 2>/dev/null)" ] \
            || missing+=(libclang-rt-19-dev)
        # TSan reports name functions (and the suppressions match them) only with a symbolizer.
        command -v llvm-symbolizer >/dev/null || missing+=(llvm)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        SUDO=()
        if [ "$(id -u)" != 0 ]; then
            command -v sudo >/dev/null || { log "not root and no sudo: install ${missing[*]} and rerun"; exit 1; }
            SUDO=(sudo)
        fi
        log "installing ${missing[*]} with apt-get (once)"
        "${SUDO[@]}" apt-get update -q >"$CACHE/apt-test-tools.log" 2>&1 \
            || log "warning: apt-get update reported errors; trying to continue"
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}" >>"$CACHE/apt-test-tools.log" 2>&1 \
            || { tail -20 "$CACHE/apt-test-tools.log" >&2; log "apt-get install ${missing[*]} failed"; exit 1; }
    fi
fi

wanted=("$@")
if [ ${#wanted[@]} -eq 1 ]; then
    # One interpreter: find (or build) only that one.
    matrix="${wanted[0]} $("$ROOT/scripts/interpreters.sh" --tag "${wanted[0]}")"
else
    matrix=$("$ROOT/scripts/interpreters.sh")
fi

# develop TAG VENV DIR LOG: build the maturin project in DIR (release) into VENV.
develop() {
    (
        cd "$ROOT/$3"
        VIRTUAL_ENV="$2" PATH="$2/bin:$PATH" CARGO_TARGET_DIR="$CACHE/target/$1" \
            "$2/bin/maturin" develop --release --quiet >"$4" 2>&1 \
            || { tail -40 "$4" >&2; exit 1; }
    )
}

venv_dir() {
    # .venv is the default interpreter's; the others live in .venvs/<tag>.
    if [ "$1" = "$DEFAULT_TAG" ]; then echo "$ROOT/.venv"; else echo "$ROOT/.venvs/$1"; fi
}

: > "$ROOT/.venvs.list.tmp"
while read -r tag python; do
    [ -n "$tag" ] || continue
    if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " == *" $tag "* ]]; then continue; fi
    venv=$(venv_dir "$tag")
    # Recreate the venv if it is missing or was made by another interpreter.
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.interheap-python" 2>/dev/null)" != "$python" ]; then
        log "$tag: creating $venv from $python"
        rm -rf "$venv"
        mkdir -p "$(dirname "$venv")"
        "$python" -m venv "$venv"
        echo "$python" > "$venv/.interheap-python"
    fi
    if ! cmp -s "$ROOT/requirements-dev.txt" "$venv/.interheap-requirements"; then
        log "$tag: installing dev requirements"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements-dev.txt"
        cp "$ROOT/requirements-dev.txt" "$venv/.interheap-requirements"
    fi
    # Programs that link libpython (the launcher, libinterheap's C programs)
    # need extra linker flags with Debian unstable's 3.15, which runs on its
    # own glibc (scripts/cpython315.sh); none elsewhere.
    link_flags="" rust_link_flags=""
    case $python in
    "$CACHE/cpython/3.15-debian/"*)
        link_flags=$("$ROOT/scripts/cpython315.sh" --link-flags)
        rust_link_flags=$("$ROOT/scripts/cpython315.sh" --rustflags)
        ;;
    esac
    mkdir -p "$venv/interheap-c/lib"
    printf '%s\n' "$link_flags" > "$venv/interheap-c/link-flags"
    printf '%s\n' "$rust_link_flags" > "$venv/interheap-c/rustflags"
    if [ "$demo" = 1 ]; then
        # The demo runs python -m interheap only: skip the launcher that
        # frontends/python/build.rs builds for the wheel (a minute more).
        log "$tag: building interheap (release)"
        # wheel-data/ holds the launcher of whichever interpreter a full
        # setup built last; maturin would install it into this venv. Hide it
        # for this build (this venv then has no launcher until a full setup).
        launcher_bin="$ROOT/frontends/python/wheel-data/scripts/interheap-python-bin"
        if [ -e "$launcher_bin" ]; then
            mv "$launcher_bin" "$launcher_bin.demo-hidden.tmp"
            trap 'mv "$launcher_bin.demo-hidden.tmp" "$launcher_bin"' EXIT
        fi
        INTERHEAP_WHEEL_LAUNCHER=0 develop "$tag" "$venv" frontends/python "$CACHE/build-$tag.log"
        "$venv/bin/python" -c "import interheap; interheap.stats()" \
            || { log "$tag: interheap does not import in $venv"; exit 1; }
        rm -f "$ROOT/.venvs.list.tmp"
        log "ready for the demo: $venv"
        exit 0
    fi
    log "$tag: building interheap and the interheap-python launcher (release)"
    RUSTFLAGS="$rust_link_flags" develop "$tag" "$venv" frontends/python "$CACHE/build-$tag.log"
    # The package carries the launcher as the wheel does (frontends/python/build.rs):
    # bin/interheap-python-bin behind a wrapper that finds libpython wherever
    # the wheel is installed. Here the interpreter is the one it was built
    # for, so the venv runs the binary itself (sys.executable is the binary).
    install -m 755 "$venv/bin/interheap-python-bin" "$venv/bin/interheap-python"
    "$venv/bin/python" -c "import interheap; interheap.stats()" \
        || { log "$tag: interheap does not import in $venv"; exit 1; }
    # The example PyO3 extension over interheap-pyalloc, which the tests import
    # (same cached target dir: PyO3 is built once per interpreter).
    log "$tag: building the example extension (examples/pyo3-extension)"
    develop "$tag" "$venv" examples/pyo3-extension "$CACHE/build-example-$tag.log"
    "$venv/bin/python" -c "import interheap_example_ext" \
        || { log "$tag: interheap_example_ext does not import in $venv"; exit 1; }
    # libinterheap (include/interheap.h) for this interpreter, for C embedders
    # and the C tests: <venv>/interheap-c/lib. Built in the launcher's target
    # dir (frontends/python/build.rs): both link libpython with the same
    # flags, so the engine and the glue compiled for the launcher serve it
    # too (the extension's pyo3-ffi does not link libpython).
    log "$tag: building libinterheap (release)"
    c_target="$CACHE/target/$tag/interheap-launcher"
    RUSTFLAGS="$rust_link_flags" PYO3_PYTHON="$venv/bin/python" CARGO_TARGET_DIR="$c_target" \
        cargo build --release --quiet -p interheap-c --manifest-path "$ROOT/Cargo.toml" \
        >"$CACHE/build-$tag-c.log" 2>&1 || { tail -40 "$CACHE/build-$tag-c.log" >&2; exit 1; }
    cp "$c_target/release/libinterheap.so" "$c_target/release/libinterheap.a" "$venv/interheap-c/lib/"
    echo "$tag $venv" >> "$ROOT/.venvs.list.tmp"
done <<< "$matrix"
mv "$ROOT/.venvs.list.tmp" "$ROOT/.venvs.list"
# CPython 3.14 and 3.14t built with ThreadSanitizer, for make test's TSan runs
# (scripts/cpython-tsan.sh says why; once each, cached, about 15 minutes).
if [ ${#wanted[@]} -eq 0 ] && cargo +nightly --version >/dev/null 2>&1; then
    for tag in 3.14 3.14t; do
        "$ROOT/scripts/cpython-tsan.sh" --tag "$tag" >/dev/null
    done
fi
log "ready: $(tr '\n' ' ' < "$ROOT/.venvs.list")"
