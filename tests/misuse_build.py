"""Building ``interheap_misuse`` (tests/c/misuse_ext.c) for the running interpreter.

The module misuses the allocator API on purpose (see the comment at the top of
the C source); tests import it only in child processes. It is compiled with
gcc directly against this interpreter's headers (free-threaded builds get
``Py_GIL_DISABLED`` from their pyconfig.h) and cached under
``${INTERHEAP_CACHE:-~/.cache/interheap}/misuse-ext/<tag>/<key>/``, the key a
hash of the source, ``sys.version`` and the extension suffix, so reruns reuse
the build. The library is compiled into a temporary file and renamed into
place, so concurrent builds never expose a half-written module.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SOURCE = TESTS / "c" / "misuse_ext.c"
MODULE = "interheap_misuse"
CFLAGS = ["-shared", "-fPIC", "-O1", "-g", "-Wall", "-Wextra", "-Werror"]


def _cache_root() -> Path:
    root = os.environ.get("INTERHEAP_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "interheap"


def interpreter_tag() -> str:
    """3.12, 3.14t, ...: the same tag as the Makefile's per-interpreter target dirs."""
    ft = "t" if sysconfig.get_config_var("Py_GIL_DISABLED") else ""
    return "%d.%d%s" % (*sys.version_info[:2], ft)  # noqa: UP031


def ext_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX")


def _key(source: bytes, include: str) -> str:
    h = hashlib.sha256()
    parts = (source, sys.version, ext_suffix(), include, " ".join(CFLAGS))
    for part in (p if isinstance(p, bytes) else p.encode() for p in parts):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def build_misuse_extension() -> Path:
    """The directory holding ``interheap_misuse{EXT_SUFFIX}`` for ``sys.executable``'s
    interpreter (built on first use, then taken from the cache)."""
    include = sysconfig.get_config_var("INCLUDEPY") or sysconfig.get_paths()["include"]
    source = SOURCE.read_bytes()
    out_dir = _cache_root() / "misuse-ext" / interpreter_tag() / _key(source, include)
    target = out_dir / (MODULE + ext_suffix())
    if target.exists():
        return out_dir

    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("building interheap_misuse needs gcc on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{MODULE}-", suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        cmd = [gcc, *CFLAGS, f"-I{include}", str(SOURCE), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"building {MODULE} for {sys.executable} failed (exit {proc.returncode}):\n"
                f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
            )
        os.replace(tmp, target)  # atomic: a concurrent builder's rename wins or loses whole
    finally:
        tmp.unlink(missing_ok=True)
    return out_dir


if __name__ == "__main__":
    print(build_misuse_extension())
