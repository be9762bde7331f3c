"""An interpreter's own memory figures and limit, from inside it.

``interheap`` itself is a PyO3 extension, and PyO3 modules cannot be
imported in a subinterpreter. This small package can: its native part,
``interheap_interp._core``, is a second module in the same library as
``interheap._native``, written against CPython's C API directly, with
multi-phase init, declaring that it supports a GIL per interpreter. This file
loads that library under the second module's name (without importing the
``interheap`` package, whose ``__init__`` imports the PyO3 module). Code running in an isolated
interpreter (``concurrent.interpreters``, an ``InterpreterPoolExecutor``
worker) reads what interheap counts for that interpreter and can tighten its
own budget, never loosen it:

    import interheap_interp
    interheap_interp.live_bytes()        # what this interpreter holds now
    interheap_interp.limit()             # its limit in bytes, or None
    interheap_interp.lower_limit("32 MB")

The figures come from whichever back end counts the interpreter: interheap's
hooks (installed in the main interpreter with ``interheap.install()`` or
``python -m interheap run``) and the interheap allocator (``interheap-python``).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from typing import Any


def _load_core() -> Any:
    spec = importlib.util.find_spec("interheap")  # finds it; runs nothing of it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("interheap_interp needs the interheap package installed beside it")
    for directory in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(directory, "_native" + suffix)
            if os.path.exists(path):
                name = __name__ + "._core"
                loader = importlib.machinery.ExtensionFileLoader(name, path)
                core_spec = importlib.util.spec_from_file_location(name, path, loader=loader)
                assert core_spec is not None
                module = importlib.util.module_from_spec(core_spec)
                loader.exec_module(module)
                return module
    raise ImportError(f"no interheap._native extension in {spec.submodule_search_locations}")


_core = _load_core()
figures = _core.figures
interpreter_id = _core.interpreter_id
lower_limit = _core.lower_limit
#: The calling thread's Python stack as interheap reads it inside an allocator
#: call (without running Python code): [(filename, qualname, line)], innermost first.
stack = _core.stack

__all__ = ["figures", "interpreter_id", "limit", "live_bytes", "lower_limit", "refused", "stack"]


def _back_ends() -> list[dict[str, Any]]:
    found = figures()
    return [found[name] for name in ("hooks", "allocator") if found[name] is not None]


def _require() -> list[dict[str, Any]]:
    back_ends = _back_ends()
    if not back_ends:
        raise RuntimeError(
            "neither interheap's hooks nor the interheap allocator count this interpreter "
            "(run interheap.install() in the main interpreter, or the program under interheap-python)"
        )
    return back_ends


def live_bytes() -> int:
    """This interpreter's live bytes: the hooks' figure (raw + mem + object,
    exact) where they are installed, else the allocator's (mem + object)."""
    return _require()[0]["live_bytes"]


def limit() -> int | None:
    """This interpreter's limit in bytes (the lowest over the back ends), or None."""
    limits = [b["limit"] for b in _require() if b["limit"] is not None]
    return min(limits) if limits else None


def refused() -> int:
    """How many of this interpreter's requests its limit refused."""
    return max(b["refused"] for b in _require())
