#!/usr/bin/env bash
# Ensure a runnable CPython 3.15 (Debian unstable's binary packages) exists, and print its path.
#
# Debian sid's python3.15 needs a newer glibc than this machine's, so its packages AND sid's
# libc6 and library dependencies are unpacked side by side into a private root, and the
# python3.15 binary is patched (patchelf) to use that root's dynamic loader and libraries
# (PT_INTERP + DT_RPATH). It then runs natively: sys.executable is right, subprocesses and
# `python3.15 -m venv` work. sysconfig is relocated into the root (LIBDIR, INCLUDEPY, LIBPL,
# WHEEL_PKG_DIR...), LIBDIR is a directory holding only libpython3.15.so* (so LD_LIBRARY_PATH=LIBDIR
# never drags sid's libc into host programs), and pyconfig.h is the real one.
#
# Stdout: the absolute path of python3.15 (or what an option below asks for). Logs: stderr.
#
# Consumers that LINK libpython3.15.so (a C embedding program, a cargo binary using pyo3-ffi with
# an embedded interpreter) must run with the root's glibc, so they need extra link flags:
#     gcc prog.c $(python3.15 -c 'import sysconfig; print("-I"+sysconfig.get_config_var("INCLUDEPY"))') \
#         -L"$LIBDIR" -lpython3.15 $(scripts/cpython315.sh --link-flags)
#     RUSTFLAGS="$(scripts/cpython315.sh --rustflags)" cargo build ...
# --link-flags are: --dynamic-linker=<root ld.so>, an rpath to LIBDIR and the root's lib dir as
# DT_RPATH (--disable-new-dtags, so it also covers libpython's and extension modules' own
# dependencies), and --allow-shlib-undefined (the host's libc.so.6 lacks libpython's GLIBC_2.38
# symbols at link time; the root's glibc has them at run time). Such an embedding program must
# also set PYTHONHOME (see --home) or PyConfig.home: libpython's built-in prefix is /usr.
# Extension modules (maturin/PyO3, C extensions) need nothing special: they are loaded into
# python3.15, which already runs on the root's glibc.
set -euo pipefail

PROG=${0##*/}
PYVER=3.15
CACHE_ROOT=${INTERHEAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/interheap}
CPY_CACHE=$CACHE_ROOT/cpython
DEST=$CPY_CACHE/$PYVER-debian
MIRROR=${INTERHEAP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${INTERHEAP_PY315_SUITE:-sid}
APT_DIR=$CPY_CACHE/apt-$SUITE-binary # private apt list/indexes: /etc/apt is left untouched
ARCH_TRIPLET=x86_64-linux-gnu
MARKER=.interheap-complete
# Packages to unpack; their Depends/Pre-Depends are added recursively, minus DENY.
ROOT_PKGS=("python$PYVER-minimal" "libpython$PYVER-minimal" "libpython$PYVER-stdlib" "libpython$PYVER"
    "libpython$PYVER-dev" "python$PYVER" "python$PYVER-venv" python3-pip-whl python3-setuptools-whl
    "libpython$PYVER-testsuite") # CPython's own tests (Lib/test), which scripts/regrtest.sh runs
# Not needed in the private root: maintainer-script/config machinery and data the host has.
is_denied() {
    case $1 in
    "libpython$PYVER-dev") return 1 ;;
    *-dev | debconf* | cdebconf* | ca-certificates | openssl | tzdata | media-types | mime-support | \
        netbase | readline-common | libc-dev-bin | dpkg | perl* | install-info | net-tools) return 0 ;;
    esac
    return 1
}

usage() {
    cat <<EOF
Usage: $PROG [--link-flags | --rustflags | --home | --root | --libdir] [--refresh] [--help]

Ensure CPython $PYVER from Debian $SUITE's binary packages is unpacked, patched to run natively
on this machine and verified, cached under
    $DEST/
and print the absolute path of its python$PYVER on stdout (logs go to stderr).

  --link-flags  print the gcc/ld flags a program LINKING libpython$PYVER.so needs
                (dynamic linker, rpath, --allow-shlib-undefined; add -L\$LIBDIR -lpython$PYVER)
  --rustflags   the same as rustc flags (-C link-arg=...), for RUSTFLAGS
  --home        print the value for PYTHONHOME / PyConfig.home of embedding programs
  --root        print the private root directory
  --libdir      print LIBDIR (holds libpython$PYVER.so* only)
  --refresh     rebuild the cache even if it is complete
  -h, --help    show this help

Environment:
  INTERHEAP_CACHE          cache root (default \${XDG_CACHE_HOME:-\$HOME/.cache}/interheap)
  INTERHEAP_DEBIAN_MIRROR  Debian mirror (default $MIRROR)
  INTERHEAP_PY315_SUITE    Debian suite providing python$PYVER (default $SUITE)

Needs: apt-get, dpkg-deb, patchelf (installed with apt-get if missing; root or sudo then), flock.
EOF
}

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

MODE="python"
REFRESH=0
while (($#)); do
    case $1 in
    --link-flags) MODE="link" ;;
    --rustflags) MODE="rust" ;;
    --home) MODE="home" ;;
    --root) MODE="root" ;;
    --libdir) MODE="libdir" ;;
    --refresh) REFRESH=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

# Paths inside a root R.
py_of() { printf '%s/usr/bin/python%s\n' "$1" "$PYVER"; }
libdir_of() { printf '%s/libpython\n' "$1"; }
syslib_of() { printf '%s/usr/lib/%s\n' "$1" "$ARCH_TRIPLET"; }
ldso_of() { printf '%s/usr/lib/%s/ld-linux-x86-64.so.2\n' "$1" "$ARCH_TRIPLET"; }

link_flags() {
    printf '%s\n' "-Wl,--dynamic-linker=$(ldso_of "$1") -Wl,--disable-new-dtags -Wl,-rpath,$(libdir_of "$1"):$(syslib_of "$1") -Wl,--allow-shlib-undefined"
}

print_result() {
    case $MODE in
    python) py_of "$DEST" ;;
    link) link_flags "$DEST" ;;
    rust)
        local f out=()
        for f in $(link_flags "$DEST"); do out+=("-C link-arg=$f"); done
        printf '%s\n' "${out[*]}"
        ;;
    home) printf '%s/usr\n' "$DEST" ;;
    root) printf '%s\n' "$DEST" ;;
    libdir) libdir_of "$DEST" ;;
    esac
}

SUDO=()
need_root() {
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "not root and no sudo: cannot apt-get install $*; install it and rerun"
        SUDO=(sudo)
    fi
}

ensure_tools() {
    local t
    for t in apt-get apt-cache dpkg-deb flock; do
        command -v "$t" >/dev/null || die "'$t' not found: this script needs a Debian-based system"
    done
    if ! command -v patchelf >/dev/null; then
        need_root patchelf
        log "installing patchelf with apt-get"
        "${SUDO[@]}" apt-get update >&2 || log "warning: apt-get update reported errors; trying to continue"
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends patchelf >&2 ||
            die "apt-get install patchelf failed"
        command -v patchelf >/dev/null || die "patchelf still not found after installing it"
    fi
}

APT_OPTS=()
setup_private_apt() {
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
    local keyring=
    [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] &&
        keyring=" [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
    {
        echo "# Written by interheap scripts/$PROG: Debian binary packages for CPython $PYVER."
        echo "deb$keyring $MIRROR $SUITE main"
    } >"$APT_DIR/sources.list"
    # Dir::State::status=/dev/null: resolve dependencies as if nothing were installed (the
    # host's packages are not in the private root).
    APT_OPTS=(-o "Dir::Etc::SourceList=$APT_DIR/sources.list" -o Dir::Etc::SourceParts=/nonexistent
        -o "Dir::State::Lists=$APT_DIR/lists" -o "Dir::Cache=$APT_DIR/cache" -o Dir::State::status=/dev/null
        -o APT::Architecture=amd64 -o APT::Architectures::=amd64)
    # root: skip the _apt sandbox, which cannot read a private dir under root's home
    ((EUID != 0)) || APT_OPTS+=(-o APT::Sandbox::User=root)
    log "apt-get update ($MIRROR $SUITE main, private list $APT_DIR/sources.list)"
    apt-get "${APT_OPTS[@]}" -q update >"$APT_DIR/update.log" 2>&1 || {
        tail -n 20 "$APT_DIR/update.log" >&2
        die "apt-get update of the private $SUITE list failed (log: $APT_DIR/update.log)"
    }
}

# resolve_packages -> prints the package names to unpack (ROOT_PKGS + recursive dependencies).
resolve_packages() {
    local -A seen=()
    local -a todo=("${ROOT_PKGS[@]}") next
    local p line dep
    for p in "${ROOT_PKGS[@]}"; do seen[$p]=1; done
    while ((${#todo[@]})); do
        next=()
        while IFS= read -r line; do
            [[ $line =~ ^[[:space:]]+\|?(Pre)?Depends:\ (.*)$ ]] || continue
            dep=${BASH_REMATCH[2]}
            [[ $dep == \<* ]] && continue # virtual package: a real alternative is listed too
            dep=${dep%%:*}                # strip :any / :amd64
            [[ -n ${seen[$dep]:-} ]] && continue
            seen[$dep]=1
            is_denied "$dep" && continue
            next+=("$dep")
        done < <(apt-cache "${APT_OPTS[@]}" depends --no-recommends --no-suggests --no-conflicts \
            --no-breaks --no-replaces --no-enhances "${todo[@]}" 2>"$APT_DIR/depends.err" ||
            die "apt-cache depends ${todo[*]} failed: $(tail -n 3 "$APT_DIR/depends.err")")
        todo=("${next[@]}")
    done
    for p in "${!seen[@]}"; do is_denied "$p" || printf '%s\n' "$p"; done | sort
}

# Append a relocation to the real _sysconfigdata file: absolute /usr paths that exist in the root
# point into the root; LIBDIR is the libpython-only directory.
relocate_sysconfig() {
    local stage=$1 dest=$2 f
    for f in "$stage/usr/lib/python$PYVER"/_sysconfigdata_*.py; do
        [[ -f $f && ! -L $f ]] || continue
        cat >>"$f" <<EOF

# --- Added by interheap scripts/$PROG: this Debian build is unpacked into a private root,
# not /usr. Paths that exist there are relocated; LIBDIR holds only libpython$PYVER.so*.
def _interheap_relocate(v, root=${dest@Q}):
    import os
    for k, x in list(v.items()):
        if (isinstance(x, str) and (x == '/usr' or x.startswith('/usr/'))
                and not any(c.isspace() or c == ':' for c in x)
                and os.path.exists(root + x)):
            v[k] = root + x
    v['LIBDIR'] = ${dest@Q} + '/libpython'
_interheap_relocate(build_time_vars)
del _interheap_relocate
EOF
        log "relocated sysconfig data in ${f#"$stage"/}"
    done
}

build_root() {
    local stage=$1 dest=$2 debs=$1.debs p f n
    mkdir -p "$stage" "$debs"
    setup_private_apt
    local -a pkgs missing
    # Every wanted package must exist in the suite (apt-cache depends silently skips unknown names).
    missing=()
    for p in "${ROOT_PKGS[@]}"; do
        [[ $(apt-cache "${APT_OPTS[@]}" policy "$p" 2>/dev/null) == *$'\n  Candidate: '[0-9]* ]] || missing+=("$p")
    done
    if ((${#missing[@]})); then
        die "not available in Debian $SUITE ($MIRROR): ${missing[*]}"
    fi
    mapfile -t pkgs < <(resolve_packages)
    ((${#pkgs[@]})) || die "no packages resolved"
    log "downloading ${#pkgs[@]} packages from $SUITE: ${pkgs[*]}"
    (cd "$debs" && apt-get "${APT_OPTS[@]}" -q download "${pkgs[@]}") >"$APT_DIR/download.log" 2>&1 || {
        tail -n 20 "$APT_DIR/download.log" >&2
        die "apt-get download from Debian $SUITE failed (log: $APT_DIR/download.log)"
    }
    : >"$stage/$MARKER.pkgs"
    for f in "$debs"/*.deb; do
        dpkg-deb -x "$f" "$stage" || die "dpkg-deb -x $f failed"
        # shellcheck disable=SC2016 # dpkg-deb's own ${field} syntax
        dpkg-deb --show --showformat='${Package}=${Version}\n' "$f" >>"$stage/$MARKER.pkgs"
    done
    rm -rf "$debs"
    local py lib
    py=$(py_of "$stage")
    lib=$(syslib_of "$stage")
    [[ -x $py ]] || die "python$PYVER binary missing after unpacking ($py)"
    [[ -e $(ldso_of "$stage") && -e $lib/libc.so.6 ]] || die "$SUITE's libc6 was not unpacked into $stage"
    [[ -e $lib/libpython$PYVER.so.1.0 ]] || die "libpython$PYVER.so.1.0 missing after unpacking"
    # Run natively: the root's loader, and DT_RPATH (not RUNPATH) so that it also applies to the
    # dependencies of libraries and dlopen()ed extension modules.
    log "patchelf: interpreter $(ldso_of "$dest"), rpath $(syslib_of "$dest")"
    patchelf --set-interpreter "$(ldso_of "$dest")" --force-rpath --set-rpath "$(syslib_of "$dest")" "$py" ||
        die "patchelf failed on $py"
    # LIBDIR: libpython only (safe for LD_LIBRARY_PATH of host programs).
    mkdir -p "$(libdir_of "$stage")"
    for n in libpython$PYVER.so libpython$PYVER.so.1 libpython$PYVER.so.1.0; do
        [[ -e $lib/$n ]] && ln -sfn "../usr/lib/$ARCH_TRIPLET/$n" "$(libdir_of "$stage")/$n"
    done
    # Debian's include/python3.15/pyconfig.h only #includes <x86_64-linux-gnu/python3.15/pyconfig.h>
    # from the system include path; put the real one in INCLUDEPY.
    f=$stage/usr/include/$ARCH_TRIPLET/python$PYVER/pyconfig.h
    [[ -f $f ]] && cp "$f" "$stage/usr/include/python$PYVER/pyconfig.h"
    relocate_sysconfig "$stage" "$dest"
    for f in "$lib/pkgconfig/python-$PYVER"*.pc; do
        [[ -f $f ]] || continue
        sed -i -e "s|^prefix=/usr\$|prefix=$dest/usr|" -e "s|^libdir=.*|libdir=$(libdir_of "$dest")|" "$f"
    done
    # Debian's sitecustomize.py is an absolute symlink to /etc/python3.15/: use the root's copy.
    f=$stage/usr/lib/python$PYVER/sitecustomize.py
    [[ -L $f && -e $stage/etc/python$PYVER/sitecustomize.py ]] &&
        ln -sfn "../../../etc/python$PYVER/sitecustomize.py" "$f"
    # Convenience names next to the binary (python3.15 stays the real, patched file).
    ln -sfn "python$PYVER" "$stage/usr/bin/python3"
}

# verify ROOT -> fails with a message if the interpreter at ROOT is not usable.
verify() {
    local root=$1 py tmp out
    py=$(py_of "$root")
    out=$("$py" -I -c '
import sys, sysconfig, subprocess, os
import ssl, ctypes, sqlite3, zlib, lzma, bz2, hashlib, readline, decimal, uuid, json, _interpreters
import concurrent.interpreters as ci
assert sys.version_info[:2] == (3, 15), sys.version
assert sys.executable == sys.argv[1], (sys.executable, sys.argv[1])
assert sys.prefix == sys.argv[2], (sys.prefix, sys.argv[2])
r = subprocess.run([sys.executable, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True, check=True)
assert r.stdout.strip() == sys.executable, r
i = ci.create(); i.exec("x = 1"); i.close()
ctypes.CDLL(None).getpid()
sqlite3.connect(":memory:").execute("select 1")
assert os.path.exists(os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")))
assert os.path.exists(os.path.join(sysconfig.get_config_var("INCLUDEPY"), "Python.h"))
print(sys.version.split()[0], "ssl", ssl.OPENSSL_VERSION, "sqlite", sqlite3.sqlite_version)
' "$py" "$root/usr" 2>&1) || die "verification of $py failed:
$out"
    log "runs: Python $out"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    "$py" -m venv "$tmp/venv" >"$tmp/venv.log" 2>&1 || die "python$PYVER -m venv failed: $(tail -n 20 "$tmp/venv.log")"
    "$tmp/venv/bin/python" -m pip --version >"$tmp/pip.log" 2>&1 || die "pip in a fresh venv failed: $(cat "$tmp/pip.log")"
    out=$("$tmp/venv/bin/python" -c 'import sys, subprocess; print(sys.prefix != sys.base_prefix, subprocess.run([sys.executable, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, check=True).stdout.strip() == sys.prefix)')
    [[ $out == "True True" ]] || die "venv interpreter is not isolated or its subprocesses are wrong ($out)"
    log "venv + $(cut -d' ' -f1-2 "$tmp/pip.log") ok"
    if command -v gcc >/dev/null; then
        cat >"$tmp/embed.c" <<'EOF'
#include <Python.h>
int main(void) {
    Py_Initialize();
    int rc = PyRun_SimpleString("import sys, ssl; assert sys.version_info[:2] == (3, 15); print('embedded', sys.version.split()[0])");
    return Py_FinalizeEx() < 0 || rc != 0;
}
EOF
        # shellcheck disable=SC2046 # word-split flags on purpose
        gcc -I"$root/usr/include/python$PYVER" "$tmp/embed.c" -o "$tmp/embed" -L"$(libdir_of "$root")" \
            -lpython$PYVER $(link_flags "$root") >"$tmp/gcc.log" 2>&1 ||
            die "linking a C embedding program against libpython$PYVER failed: $(tail -n 20 "$tmp/gcc.log")"
        out=$(PYTHONHOME=$root/usr "$tmp/embed" 2>&1) || die "C embedding program failed: $out"
        log "C program linking libpython$PYVER.so: $out"
    else
        log "gcc not found: skipping the C embedding check"
    fi
}

# Complete: marked, runs, and holds every package of ROOT_PKGS (a cache made
# before a package was added to the list is rebuilt).
is_complete() {
    [[ -f $DEST/$MARKER && -x $(py_of "$DEST") ]] || return 1
    local p
    for p in "${ROOT_PKGS[@]}"; do
        grep -q "^$p=" "$DEST/$MARKER" || return 1
    done
    "$(py_of "$DEST")" -I -c 'import sys' 2>/dev/null
}

main() {
    mkdir -p "$CPY_CACHE"
    if ((!REFRESH)) && is_complete; then
        print_result
        return
    fi
    exec 9>"$CPY_CACHE/.$PYVER-debian.lock"
    flock 9 || die "cannot lock $CPY_CACHE/.$PYVER-debian.lock"
    if ((!REFRESH)) && is_complete; then # another process finished meanwhile
        print_result
        return
    fi
    ensure_tools
    local stage=$DEST.staging.$$ start=$SECONDS
    rm -rf "$stage" "$stage.debs"
    trap 'rm -rf "'"$stage"'" "'"$stage"'.debs"' EXIT
    log "building $DEST (staging $stage)"
    build_root "$stage" "$DEST"
    # Paths are baked in (PT_INTERP, rpath, sysconfig): move into place, then verify there.
    if [[ -e $DEST ]]; then
        rm -rf "$DEST.old"
        mv "$DEST" "$DEST.old"
    fi
    mv "$stage" "$DEST"
    rm -rf "$DEST.old"
    if ! (verify "$DEST"); then
        rm -rf "$DEST.failed"
        mv "$DEST" "$DEST.failed"
        die "the unpacked interpreter did not verify; kept for inspection in $DEST.failed"
    fi
    log "precompiling the standard library"
    "$(py_of "$DEST")" -I -m compileall -q -j 0 "$DEST/usr/lib/python$PYVER" >/dev/null 2>&1 || true
    {
        echo "# interheap scripts/$PROG: CPython $PYVER from Debian $SUITE ($MIRROR), built $(date -u +%FT%TZ)"
        cat "$DEST/$MARKER.pkgs"
    } >"$DEST/$MARKER.tmp"
    rm -f "$DEST/$MARKER.pkgs"
    mv "$DEST/$MARKER.tmp" "$DEST/$MARKER"
    log "ready in $((SECONDS - start)) s: $(py_of "$DEST") ($(grep '^python'"$PYVER"'-minimal=' "$DEST/$MARKER"))"
    print_result
}

main
