#!/usr/bin/env bash
# Ensure the CPython interpreters interheap is tested against exist, and print them.
#
# Output (stdout), one line per interpreter, in this order:
#     3.12  /abs/path/to/python3.12
#     3.13  /abs/path/to/python3.13
#     3.14  /abs/path/to/python3.14
#     3.14t /abs/path/to/python3.14t
# All logging goes to stderr. See --help.
set -euo pipefail

PROG=${0##*/}
DEFAULT_TAGS=(3.12 3.13 3.14 3.14t 3.15)
# Tags left out of the default matrix, with a warning, when they cannot be had here.
OPTIONAL_TAGS=" 3.15 "
# CPython 3.14 release source shipped beside the project (../shared/cpython) and its checksum file.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SOURCE_DIR=${INTERHEAP_CPYTHON_SOURCE_DIR:-$ROOT/../shared/cpython}
# Debian source versions of python3.13 to try, in order (only when no 3.13 is installed).
# An entry that does not start with a digit names a suite: "python3.13/<suite>", whatever version it has.
read -r -a DEB_VERSIONS <<<"${INTERHEAP_CPYTHON_DEB_VERSIONS:-3.13.15-1 3.13.5-1 trixie}"
# deb-src suites to index. trixie (stable) keeps 3.13.5-x; 3.13.15-1 is only in forky/sid.
read -r -a DEB_SUITES <<<"${INTERHEAP_DEBIAN_SUITES:-trixie forky sid}"
CACHE_ROOT=${INTERHEAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/interheap}
CPY_CACHE=$CACHE_ROOT/cpython
APT_DIR=$CPY_CACHE/apt # private deb-src list + indexes: /etc/apt is left untouched
BUILD_DEPS=(build-essential pkg-config xz-utils libssl-dev zlib1g-dev libffi-dev libbz2-dev
    liblzma-dev libsqlite3-dev libreadline-dev libncurses-dev uuid-dev libgdbm-dev
    libzstd-dev libgdbm-compat-dev)

usage() {
    cat <<EOF
Usage: $PROG [--tag TAG] [--help]

Ensure the CPython interpreters used by interheap's tests exist and print
"TAG /absolute/path/to/python" per interpreter on stdout, in the order
${DEFAULT_TAGS[*]}. Logging goes to stderr. Exits non-zero if any
interpreter cannot be had (nothing is printed on stdout then).

  --tag TAG   only ensure/print the interpreter TAG, and print just its path
  -h, --help  show this help

Where interpreters come from (a machine that has its own builds nothing):
  3.12   pyenv (\$(pyenv root)/versions/3.12.*, highest patch first), else
         python3.12 on PATH. Must be a default (GIL) shared-library build.
  3.13   likewise for 3.13.*; if none is found, it is built from Debian's
         python3.13 source package (--enable-shared) and cached.
  3.14   likewise for 3.14.*; if none is found, it is built from the release
         tarball in \$INTERHEAP_CPYTHON_SOURCE_DIR (default ../shared/cpython,
         now $SOURCE_DIR), after checking it against SHA256SUMS there,
         as a shared library with an rpath, cached under
         \$INTERHEAP_CACHE/cpython/<version>/.
  3.14t  free-threaded 3.14: pyenv (3.14.*t) or python3.14t on PATH, else
         built like 3.14 with --disable-gil, cached under
         \$INTERHEAP_CACHE/cpython/<version>-ft/.
  3.15   pyenv or python3.15 on PATH, else Debian unstable's binary packages
         unpacked and patched to run on this machine (scripts/cpython315.sh);
         optional: left out of the matrix with a warning if it cannot be had.
  3.13t  no longer supported (experimental in 3.13; PyO3 0.29+ refuses it).

Environment:
  INTERHEAP_CPYTHON_SOURCE_DIR
                      folder holding Python-3.14.*.tar.xz and SHA256SUMS.
  INTERHEAP_PYTHONS   space-separated "tag=/path/to/python" entries; when set,
                      exactly these are used (validated, printed in order) and
                      nothing is searched for or built.
  INTERHEAP_CACHE     cache root (default: \${XDG_CACHE_HOME:-\$HOME/.cache}/interheap);
                      currently: $CACHE_ROOT
  INTERHEAP_DEBIAN_MIRROR
                      Debian mirror URL for the deb-src entry (default: the
                      mirror already configured in /etc/apt).
  INTERHEAP_DEBIAN_SUITES
                      deb-src suites to index (default: ${DEB_SUITES[*]}).
  INTERHEAP_CPYTHON_DEB_VERSIONS
                      Debian python3.13 versions to try, in order; a word not
                      starting with a digit is a suite, meaning whatever version
                      that suite has (default: ${DEB_VERSIONS[*]}).

The Debian source (3.13 only) is fetched with apt-get using a private deb-src list and
index under \$INTERHEAP_CACHE/cpython/apt/ (mirror taken from /etc/apt), so the
system's apt configuration is not changed. Missing build dependencies are
installed with apt-get (root or sudo needed only then).
EOF
}

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------
# Probing interpreters
# ---------------------------------------------------------------------------

# probe PY -> prints "EXECUTABLE MAJOR.MINOR GIL_DISABLED ENABLE_SHARED" (ints), or fails.
probe() {
    local out
    out=$(timeout 60 "$1" -I -c '
import sys, sysconfig
def flag(name):
    v = sysconfig.get_config_var(name)
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 1 if v else 0
print(sys.executable, "%d.%d" % sys.version_info[:2], flag("Py_GIL_DISABLED"), flag("Py_ENABLE_SHARED"))
' 2>/dev/null) || return 1
    [[ $out == /* ]] || return 1
    printf '%s\n' "$out"
}

# check_build PY MAJOR.MINOR KIND -> prints the absolute executable if PY is a usable
# shared-library build of that version, KIND "gil" (default build) or "ft" (free-threaded);
# otherwise logs why and fails.
check_build() {
    local py=$1 want=$2 kind=$3 info exe ver gil shared
    info=$(probe "$py") || {
        log "skipping $py: does not run"
        return 1
    }
    read -r exe ver gil shared <<<"$info"
    if [[ $ver != "$want" ]]; then
        log "skipping $py: it is Python $ver, not $want"
        return 1
    fi
    if [[ $kind == gil && $gil != 0 ]]; then
        log "skipping $py: free-threaded build (Py_GIL_DISABLED=$gil), need a default GIL build"
        return 1
    fi
    if [[ $kind == ft && $gil != 1 ]]; then
        log "skipping $py: default GIL build, need a free-threaded one"
        return 1
    fi
    if [[ $shared != 1 ]]; then
        log "skipping $py: not a shared-library build (Py_ENABLE_SHARED=$shared); libpython must be embeddable"
        return 1
    fi
    printf '%s\n' "$exe"
}

pyenv_roots() {
    local r seen=" "
    for r in "${PYENV_ROOT:-}" "$(pyenv root 2>/dev/null || true)" "$HOME/.pyenv" /root/.pyenv; do
        [[ -n $r && -d $r/versions && $seen != *" $r "* ]] || continue
        seen+="$r "
        printf '%s\n' "$r"
    done
}

# find_python MAJOR.MINOR KIND -> prints the executable of an installed interpreter
# (pyenv first, highest patch first, then PATH), or fails. KIND is "gil" or "ft".
find_python() {
    local want=$1 kind=$2 root d exe t= re
    [[ $kind == ft ]] && t=t
    re="^${want//./\\.}\.[0-9]+$t\$"
    local -a dirs=()
    while IFS= read -r root; do
        for d in "$root"/versions/"$want".*; do
            [[ -d $d && ${d##*/} =~ $re ]] && dirs+=("$d")
        done
    done < <(pyenv_roots)
    if ((${#dirs[@]})); then
        while IFS= read -r d; do
            [[ -x $d/bin/python$want$t ]] || continue
            if exe=$(check_build "$d/bin/python$want$t" "$want" "$kind"); then
                printf '%s\n' "$exe"
                return 0
            fi
        done < <(printf '%s\n' "${dirs[@]}" | sort -rV)
    fi
    # Anything named pythonX.Y[t] on PATH (pyenv shims that fail to run are skipped).
    while IFS= read -r d; do
        if exe=$(check_build "$d" "$want" "$kind"); then
            printf '%s\n' "$exe"
            return 0
        fi
    done < <(type -ap "python$want$t" || true)
    return 1
}

# ---------------------------------------------------------------------------
# Building CPython from Debian's python3.13 source package, cached
# ---------------------------------------------------------------------------

SUDO=()
need_root() {
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "need root (or sudo) to run apt-get for the CPython build"
        SUDO=(sudo)
    fi
}

# Mirror URL the machine already uses for Debian (not the security archive).
detect_mirror() {
    if [[ -n ${INTERHEAP_DEBIAN_MIRROR:-} ]]; then
        printf '%s\n' "${INTERHEAP_DEBIAN_MIRROR%/}"
        return
    fi
    local f line u i
    local -a uris=() w
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        while IFS= read -r line; do
            line=${line%%#*}
            read -r -a w <<<"$line" || true
            [[ ${w[0]:-} == deb || ${w[0]:-} == deb-src ]] || continue
            i=1
            if [[ ${w[1]:-} == "["* ]]; then # skip [options]
                while ((i < ${#w[@]})) && [[ ${w[i]} != *"]" ]]; do i=$((i + 1)); done
                i=$((i + 1))
            fi
            [[ -n ${w[i]:-} ]] && uris+=("${w[i]}")
        done <"$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        while IFS= read -r line; do
            line=${line%%#*}
            [[ $line =~ ^[[:space:]]*URIs:(.*)$ ]] || continue
            read -r -a w <<<"${BASH_REMATCH[1]}" || true
            uris+=("${w[@]}")
        done <"$f"
    done
    # Prefer a ".../debian" archive URL, then anything Debian-looking; never security.
    for u in "${uris[@]}"; do
        u=${u%/}
        [[ $u =~ ^https?:// && $u != *security* && $u == */debian ]] && { printf '%s\n' "$u"; return; }
    done
    for u in "${uris[@]}"; do
        u=${u%/}
        [[ $u =~ ^https?:// && $u != *security* && $u == *debian* ]] && { printf '%s\n' "$u"; return; }
    done
    return 1
}

# Private apt configuration for fetching Debian sources; sets APT_OPTS.
APT_OPTS=()
setup_private_apt() {
    local mirror suite keyring=
    mirror=$(detect_mirror) ||
        die "cannot find the Debian mirror this machine uses in /etc/apt/sources.list{,.d/}; set INTERHEAP_DEBIAN_MIRROR=http://<mirror>/debian"
    [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] && keyring=" [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
    {
        echo "# Written by interheap scripts/interpreters.sh: Debian sources for building CPython."
        for suite in "${DEB_SUITES[@]}"; do
            echo "deb-src$keyring $mirror $suite main"
        done
    } >"$APT_DIR/sources.list"
    log "deb-src $mirror ${DEB_SUITES[*]} main (private list $APT_DIR/sources.list)"
    APT_OPTS=(-o "Dir::Etc::SourceList=$APT_DIR/sources.list" -o Dir::Etc::SourceParts=/nonexistent
        -o "Dir::State::Lists=$APT_DIR/lists" -o "Dir::Cache=$APT_DIR/cache")
    # root: skip the _apt sandbox, which cannot read a private dir under root's home
    ((EUID != 0)) || APT_OPTS+=(-o APT::Sandbox::User=root)
}

# run_logged LOG DESCRIPTION CMD... : run CMD with output to LOG; on failure show the tail and die.
run_logged() {
    local logf=$1 desc=$2
    shift 2
    log "$desc"
    printf '\n===== %s: %s\n' "$desc" "$*" >>"$logf"
    if ! "$@" >>"$logf" 2>&1; then
        printf '%s: error: %s failed; last lines of %s:\n' "$PROG" "$desc" "$logf" >&2
        tail -n 60 "$logf" >&2
        die "$desc failed (full log: $logf)"
    fi
}

install_build_deps() {
    local logf=$1 p
    local -a missing=()
    for p in "${BUILD_DEPS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        need_root
        printf '\n===== apt-get update\n' >>"$logf"
        "${SUDO[@]}" apt-get update >>"$logf" 2>&1 ||
            log "warning: apt-get update reported errors (see $logf); trying to continue"
        run_logged "$logf" "installing build dependencies: ${missing[*]}" \
            "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}

# find_cached MAJOR.MINOR KIND -> prints the executable of the newest complete cached build, or fails.
# KIND is "ft" (free-threaded, bin/pythonX.Yt) or "gil" (bin/pythonX.Y).
find_cached() {
    local want=$1 kind=$2 d py info exe ver gil shared suffix=
    [[ $kind == ft ]] && suffix=-ft
    local -a dirs=()
    for d in "$CPY_CACHE"/"$want".*; do
        [[ -d $d && ${d##*/} =~ ^${want//./\\.}\.[0-9]+$suffix$ ]] && dirs+=("$d")
    done
    ((${#dirs[@]})) || return 1
    while IFS= read -r d; do
        [[ -f $d/.interheap-complete ]] || continue
        if [[ $kind == ft ]]; then py=$d/bin/python${want}t; else py=$d/bin/python$want; fi
        [[ -x $py ]] || continue
        info=$(probe "$py") || {
            log "cached $py does not run; ignoring it"
            continue
        }
        read -r exe ver gil shared <<<"$info"
        if [[ $ver == "$want" && $shared == 1 ]] && { [[ $kind == ft && $gil == 1 ]] || [[ $kind == gil && $gil == 0 ]]; }; then
            printf '%s\n' "$py"
            return 0
        fi
        log "cached $py is not the expected build ($ver GIL_DISABLED=$gil SHARED=$shared); ignoring it"
    done < <(printf '%s\n' "${dirs[@]}" | sort -rV)
    return 1
}

WORK_DIR=
STAGE_DIR=
cleanup() {
    [[ -n $WORK_DIR && -d $WORK_DIR ]] && rm -rf "$WORK_DIR"
    [[ -n $STAGE_DIR && -d $STAGE_DIR ]] && rm -rf "$STAGE_DIR"
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# fetch_source MAJOR.MINOR LOG -> downloads or verifies the upstream source tarball into
# $WORK_DIR and prints "UPSTREAM_VERSION TARBALL DESCRIPTION".
fetch_source() {
    local want=$1 logf=$2
    case $want in
    3.14)
        # The release tarball beside the project (../shared/cpython), checked against its SHA256SUMS.
        local tarball sums
        tarball=$(find "$SOURCE_DIR" -maxdepth 1 -name "Python-$want.*.tar.xz" -print 2>/dev/null | sort -V | tail -n 1)
        [[ -n $tarball ]] || die "no Python-$want.*.tar.xz in $SOURCE_DIR (set INTERHEAP_CPYTHON_SOURCE_DIR, or install CPython $want and put it in pyenv or on PATH)"
        sums=$SOURCE_DIR/SHA256SUMS
        [[ -f $sums ]] || die "no SHA256SUMS beside $tarball: refusing to build an unchecked source"
        log "checking ${tarball##*/} against ${sums}"
        (cd "$SOURCE_DIR" && grep -E "[[:space:]]\*?${tarball##*/}\$" SHA256SUMS | sha256sum --check --strict --quiet -) >>"$logf" 2>&1 ||
            die "${tarball##*/} does not match its checksum in $sums (or is not listed there)"
        local upver=${tarball##*/Python-}
        upver=${upver%.tar.xz}
        printf '%s %s %s\n' "$upver" "$tarball" "${tarball##*/}"
        ;;
    3.13)
        setup_private_apt
        printf '\n===== apt-get update (private deb-src list)\n' >>"$logf"
        if ! apt-get "${APT_OPTS[@]}" update >>"$logf" 2>&1; then
            log "warning: apt-get update of the deb-src list reported errors (see $logf); trying to continue"
        fi
        local v spec got=
        for v in "${DEB_VERSIONS[@]}"; do
            if [[ $v == [0-9]* ]]; then spec=python3.13=$v; else spec=python3.13/$v; fi
            log "downloading Debian source $spec"
            printf '\n===== apt-get source %s\n' "$spec" >>"$logf"
            if (cd "$WORK_DIR" && apt-get "${APT_OPTS[@]}" source --download-only --tar-only "$spec") >>"$logf" 2>&1; then
                got=$spec
                break
            fi
            log "$spec could not be downloaded"
        done
        rm -rf "$APT_DIR" # ~70 MB of indexes, only needed for this download
        if [[ -z $got ]]; then
            tail -n 30 "$logf" >&2
            die "could not download Debian source of python3.13 (tried: ${DEB_VERSIONS[*]}; log: $logf)"
        fi
        local tarball
        tarball=$(find "$WORK_DIR" -maxdepth 1 -name 'python3.13_*.orig.tar.*' ! -name '*.asc' -print -quit)
        [[ -n $tarball ]] || die "no upstream orig tarball among downloaded files: $(ls "$WORK_DIR")"
        local upver=${tarball##*/python3.13_}
        upver=${upver%%.orig.tar.*}
        printf '%s %s %s\n' "$upver" "$tarball" "Debian-$got"
        ;;
    *) die "no source known for CPython $want" ;;
    esac
}

# build_cpython MAJOR.MINOR KIND -> builds (or reuses) the cached CPython and prints its executable.
# Shared library with an rpath, no PGO (a few minutes on 2 cores), cached under $CPY_CACHE/<version>[-ft].
build_cpython() {
    local want=$1 kind=$2 py lock_fd
    # We run inside $(...), which does not inherit the EXIT trap: set it here.
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    if py=$(find_cached "$want" "$kind"); then
        printf '%s\n' "$py"
        return 0
    fi
    mkdir -p "$CPY_CACHE/logs"
    local lock=$CPY_CACHE/.build-$want-$kind.lock
    exec {lock_fd}>"$lock"
    if ! flock -n "$lock_fd"; then
        log "another invocation is building CPython $want ($kind); waiting for lock $lock"
        flock "$lock_fd"
    fi
    # Someone else may have finished the build while we waited.
    if py=$(find_cached "$want" "$kind"); then
        exec {lock_fd}>&-
        printf '%s\n' "$py"
        return 0
    fi
    rm -rf "$CPY_CACHE"/.staging-"$want-$kind".* # leftovers of interrupted builds (we hold the lock)

    local logf=$CPY_CACHE/logs/build-$want-$kind.log
    : >"$logf"
    local t0=$SECONDS
    log "building CPython $want ($kind); this takes a few minutes (log: $logf)"
    install_build_deps "$logf"
    WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/interheap-cpython.XXXXXX")
    local upver tarball origin
    read -r upver tarball origin <<<"$(fetch_source "$want" "$logf")"
    [[ $upver =~ ^${want//./\\.}\.[0-9]+$ ]] || die "unexpected upstream version '$upver' from $tarball"

    local prefix suffix=
    [[ $kind == ft ]] && suffix=-ft
    prefix=$CPY_CACHE/$upver$suffix
    local -a cfg=(--prefix="$prefix" --enable-shared --with-ensurepip=install "LDFLAGS=-Wl,-rpath,$prefix/lib")
    [[ $kind == ft ]] && cfg+=(--disable-gil)

    run_logged "$logf" "unpacking ${tarball##*/}" tar -xf "$tarball" -C "$WORK_DIR"
    local src=$WORK_DIR/Python-$upver
    [[ -d $src ]] || die "expected source dir $src after unpacking"
    (
        cd "$src"
        run_logged "$logf" "configure ${cfg[*]}" ./configure "${cfg[@]}"
        run_logged "$logf" "make -j$(nproc)" make -j"$(nproc)"
    )
    # Install into a staging dir on the same filesystem, then rename into place atomically.
    STAGE_DIR=$(mktemp -d "$CPY_CACHE/.staging-$want-$kind.XXXXXX")
    (
        cd "$src"
        run_logged "$logf" "make install (staged)" make install DESTDIR="$STAGE_DIR"
    )
    local staged=$STAGE_DIR$prefix
    if [[ $kind == ft ]]; then py=python${want}t; else py=python$want; fi
    [[ -x $staged/bin/$py ]] || die "build produced no bin/$py (log: $logf)"
    local mods='sys, ssl, sqlite3, ctypes, zlib, lzma, bz2, _interpreters'
    [[ $want == 3.14 ]] && mods+=', concurrent.interpreters, compression.zstd'
    # The staged interpreter runs with the staged libpython (its rpath points at the final prefix).
    LD_LIBRARY_PATH=$staged/lib "$staged/bin/$py" -I -c "import $mods" >>"$logf" 2>&1 ||
        die "built interpreter lacks required modules ($mods); see $logf"
    printf '%s %s built %s\n' "$origin" "$kind" "$(date -u +%FT%TZ)" >"$staged/.interheap-complete"
    [[ -e $prefix ]] && rm -rf "$prefix" # stale, incomplete or broken (find_cached rejected it)
    mv -T "$staged" "$prefix"
    rm -rf "$STAGE_DIR"
    STAGE_DIR=

    py=$prefix/bin/$py
    if ! "$py" -I -m pip --version >>"$logf" 2>&1; then
        run_logged "$logf" "ensurepip" "$py" -I -m ensurepip --upgrade
    fi
    rm -rf "$WORK_DIR"
    WORK_DIR=
    exec {lock_fd}>&-
    log "built CPython $upver ($kind) in $((SECONDS - t0))s -> $prefix"
    find_cached "$want" "$kind" || die "freshly built $py does not pass checks (log: $logf)"
}

# ---------------------------------------------------------------------------
# Resolving tags
# ---------------------------------------------------------------------------

resolve_tag() {
    local tag=$1 py
    case $tag in
    3.12)
        find_python 3.12 gil ||
            die "no usable CPython 3.12 (default GIL build with --enable-shared) found in pyenv or on PATH; install one (e.g. 'env PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install 3.12') or set INTERHEAP_PYTHONS=\"3.12=/path/to/python3.12 ...\""
        ;;
    3.13 | 3.14)
        if py=$(find_python "$tag" gil); then
            printf '%s\n' "$py"
        else
            log "no usable CPython $tag in pyenv or on PATH; using a cached/built one"
            build_cpython "$tag" gil
        fi
        ;;
    3.14t)
        if py=$(find_python 3.14 ft); then
            printf '%s\n' "$py"
        else
            build_cpython 3.14 ft
        fi
        ;;
    3.15)
        if py=$(find_python 3.15 gil); then
            printf '%s\n' "$py"
        else
            "$ROOT/scripts/cpython315.sh"
        fi
        ;;
    3.13t) die "free-threaded 3.13 (3.13t) is no longer supported: it was experimental, and PyO3 0.29+ refuses it. Use free-threaded 3.14 (tag 3.14t)" ;;
    *) die "unknown tag '$tag' (known: ${DEFAULT_TAGS[*]})" ;;
    esac
}

# Parse INTERHEAP_PYTHONS into TAGS/PATHS arrays.
parse_env_pythons() {
    local entry tag path seen=" " info exe ver gil shared
    local -a entries
    read -r -a entries <<<"$INTERHEAP_PYTHONS" || true
    ((${#entries[@]})) || die "INTERHEAP_PYTHONS is set but empty; unset it or give 'tag=/path/to/python' entries"
    for entry in "${entries[@]}"; do
        [[ $entry =~ ^([^=]+)=(.+)$ ]] ||
            die "malformed INTERHEAP_PYTHONS entry '$entry': expected tag=/path/to/python (e.g. 3.12=/usr/bin/python3.12)"
        tag=${BASH_REMATCH[1]}
        path=${BASH_REMATCH[2]}
        [[ $tag =~ ^[A-Za-z0-9._+-]+$ ]] || die "malformed tag '$tag' in INTERHEAP_PYTHONS entry '$entry'"
        [[ $seen != *" $tag "* ]] || die "duplicate tag '$tag' in INTERHEAP_PYTHONS"
        seen+="$tag "
        if [[ $path != */* ]]; then
            path=$(command -v "$path") || die "INTERHEAP_PYTHONS entry '$entry': '$path' not found on PATH"
        fi
        [[ $path == /* ]] || path=$PWD/$path
        [[ -f $path && -x $path ]] || die "INTERHEAP_PYTHONS entry '$entry': $path is not an executable file"
        info=$(probe "$path") || die "INTERHEAP_PYTHONS entry '$entry': $path does not run as a Python interpreter"
        read -r exe ver gil shared <<<"$info"
        if [[ $gil == 1 ]] && [[ $(printf '%s\n' "$ver" 3.14 | sort -V | head -n 1) != 3.14 ]]; then
            die "INTERHEAP_PYTHONS entry '$entry': $path is free-threaded CPython ${ver}t, which is no longer supported (experimental, and PyO3 0.29+ refuses it); use free-threaded 3.14 (3.14t) or later"
        fi
        if [[ $tag == *t && $gil != 1 ]]; then
            log "warning: '$tag' looks free-threaded but $path has the GIL (Py_GIL_DISABLED=$gil)"
        elif [[ $tag != *t && $gil == 1 ]]; then
            log "warning: '$tag' looks like a GIL build but $path is free-threaded"
        fi
        [[ $tag == "$ver"* ]] || log "warning: tag '$tag' but $path is Python $ver"
        [[ $shared == 1 ]] || log "warning: $path is not a shared-library build (Py_ENABLE_SHARED=$shared)"
        TAGS+=("$tag")
        PATHS+=("$path")
    done
}

main() {
    local only=
    while (($#)); do
        case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --tag)
            (($# >= 2)) || die "--tag needs an argument (one of ${DEFAULT_TAGS[*]})"
            only=$2
            shift 2
            ;;
        --tag=*)
            only=${1#--tag=}
            shift
            ;;
        *) die "unknown argument '$1' (see --help)" ;;
        esac
    done

    TAGS=()
    PATHS=()
    local i
    if [[ -n ${INTERHEAP_PYTHONS+set} ]]; then
        parse_env_pythons
        if [[ -n $only ]]; then
            for i in "${!TAGS[@]}"; do
                if [[ ${TAGS[i]} == "$only" ]]; then
                    printf '%s\n' "${PATHS[i]}"
                    return 0
                fi
            done
            die "tag '$only' is not in INTERHEAP_PYTHONS (has: ${TAGS[*]})"
        fi
    else
        local -a want=("${DEFAULT_TAGS[@]}")
        if [[ -n $only ]]; then
            [[ " ${DEFAULT_TAGS[*]} " == *" $only "* || $only == 3.13t ]] || die "unknown tag '$only' (known: ${DEFAULT_TAGS[*]})"
            want=("$only")
        fi
        local t p
        for t in "${want[@]}"; do
            if [[ -z $only && $OPTIONAL_TAGS == *" $t "* ]]; then
                p=$(resolve_tag "$t") || {
                    log "warning: CPython $t cannot be had here; the matrix goes on without it"
                    continue
                }
            else
                p=$(resolve_tag "$t")
            fi
            [[ $p == /* ]] || die "internal error: resolved '$t' to non-absolute '$p'"
            TAGS+=("$t")
            PATHS+=("$p")
        done
        if [[ -n $only ]]; then
            printf '%s\n' "${PATHS[0]}"
            return 0
        fi
    fi
    # Print only once everything resolved, so stdout is all-or-nothing.
    for i in "${!TAGS[@]}"; do
        printf '%s %s\n' "${TAGS[i]}" "${PATHS[i]}"
    done
}

main "$@"
