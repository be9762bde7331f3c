"""Compiling the tests' C code against the running interpreter (gcc).

Shared libraries for ctypes are built without libpython (the process has
it); programs that embed CPython link libinterheap (built per interpreter by
``scripts/setup.sh`` into ``<venv>/interheap-c/``) and libpython, with rpaths
so they run as they are.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = ROOT / "include"
C_LIB_DIR = Path(sys.prefix) / "interheap-c" / "lib"
# Extra linker flags for programs linking libpython, written by scripts/setup.sh:
# empty except for an interpreter that runs on its own glibc (Debian
# unstable's 3.15 here, scripts/cpython315.sh).
_LINK_FLAGS_FILE = C_LIB_DIR.parent / "link-flags"
EMBED_LINK_FLAGS = _LINK_FLAGS_FILE.read_text().split() if _LINK_FLAGS_FILE.exists() else []
# The same flags as RUSTFLAGS, for cargo builds of binaries linking libpython.
_RUSTFLAGS_FILE = C_LIB_DIR.parent / "rustflags"
EMBED_RUSTFLAGS = _RUSTFLAGS_FILE.read_text().strip() if _RUSTFLAGS_FILE.exists() else ""


def embedding_env() -> dict[str, str]:
    """Environment an embedding program needs: such a relocated interpreter's
    libpython has /usr as its built-in prefix, so it is told its home."""
    return {"PYTHONHOME": sys.base_prefix} if EMBED_LINK_FLAGS else {}


def python_include() -> str:
    return sysconfig.get_paths()["include"]


def python_libdir() -> str:
    return sysconfig.get_config_var("LIBDIR")


def python_lib() -> str:
    """The -l name of libpython for this interpreter (python3.13, python3.13t, ...)."""
    return "python" + sysconfig.get_config_var("LDVERSION")


def _gcc(args: list[str]) -> None:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    proc = subprocess.run([gcc, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling failed: {' '.join(args)}\n{proc.stderr}")


def build_shared(source: Path, out: Path) -> Path:
    """A shared library to load with ctypes into this interpreter."""
    _gcc(["-O2", "-g", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{python_include()}", f"-I{INCLUDE}",
          str(source), "-o", str(out)])  # fmt: skip
    return out


def build_program(source: Path, out: Path, *, static: bool = False) -> Path:
    """A program embedding this interpreter and libinterheap (shared, or static)."""
    lib = C_LIB_DIR / ("libinterheap.a" if static else "libinterheap.so")
    if not lib.exists():
        raise RuntimeError(f"{lib} is missing: run scripts/setup.sh (make test does)")
    interheap = [str(lib)] if static else [f"-L{C_LIB_DIR}", "-linterheap", f"-Wl,-rpath,{C_LIB_DIR}"]
    _gcc(["-O2", "-g", "-Wall", "-Werror", "-pthread", f"-I{python_include()}", f"-I{INCLUDE}", str(source),
          *interheap, f"-L{python_libdir()}", f"-l{python_lib()}", f"-Wl,-rpath,{python_libdir()}",
          "-ldl", "-lm", *EMBED_LINK_FLAGS, "-o", str(out)])  # fmt: skip
    return out
