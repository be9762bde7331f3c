"""Per-interpreter memory limits, enforced by the hooks.

A limit caps an interpreter's live bytes: its mem and object blocks, and the
raw blocks allocated while its thread state was current, as the hooks count
them (exact to the byte). The allocation that would cross it fails, so CPython
raises MemoryError in that interpreter only; the interpreter can catch it,
free memory and go on. After a refusal the interpreter may go up to 256 KiB
over its limit (once, until it is back under), so that raising and handling
the MemoryError does not fail too. Raw calls made without a thread state are
never refused.

    from concurrent import interpreters
    import interheap

    interheap.install()
    worker = interpreters.create()
    interheap.set_limit(worker, "64 MB")
"""

from __future__ import annotations

from typing import Any

from . import _native
from ._stats import _alive_interpreter_ids

Size = int | str

_NO_HOOKS = (
    "memory limits are enforced by interheap's hooks, which are not installed: "
    "call interheap.install() first, or run the program under python -m interheap run"
)


def parse_size(size: Size) -> int:
    """Bytes from an int or a text such as ``"256 MB"`` (powers of 1000) or
    ``"1.5 GiB"`` (powers of 1024). ValueError for a negative, fractional
    or unparseable size; TypeError for anything else."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"a size is an int (bytes) or a str such as '256 MB', not {type(size).__name__}")
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"invalid size {size}: a limit cannot be negative")
        if size >= 1 << 63:
            raise ValueError(f"size {size} is too large")
        return size
    return _native.parse_size(size)


def interpreter_id(interp: Any) -> int:
    """The ID of a ``concurrent.interpreters.Interpreter`` (or anything with an
    ``id``), or of an int, checked to be an interpreter that exists now."""
    value = getattr(interp, "id", interp)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            "expected an interpreter (concurrent.interpreters.Interpreter) or its ID, "
            f"not {type(interp).__name__}"
        )
    alive = _alive_interpreter_ids()
    if alive is not None and value not in alive:
        raise ValueError(f"interpreter {value} does not exist (never created, or already ended)")
    return value


def set_limit(interp: Any, limit: Size | None) -> None:
    """Limits an interpreter's live bytes (or with None removes its limit).

    ``interp`` is a ``concurrent.interpreters.Interpreter`` or an interpreter
    ID (0 is main); ``limit`` is bytes or a text such as ``"256 MB"``. The
    limit applies to requests from now on: what the interpreter holds already
    stays, even above it. Needs the hooks (:func:`interheap.install`).
    """
    interp_id = interpreter_id(interp)
    size = None if limit is None else parse_size(limit)
    if size is not None and not _native.is_installed():
        raise RuntimeError(_NO_HOOKS)
    _native.set_limit(interp_id, size)


def get_limit(interp: Any) -> int | None:
    """An interpreter's limit in bytes, or None."""
    return _native.get_limit(interpreter_id(interp))


def set_default_limit(limit: Size | None) -> None:
    """Gives every interpreter created from now on a limit of its own (None
    removes the default; interpreters that got it keep it).

    Each interpreter gets its own budget of that size: set it before creating
    an ``InterpreterPoolExecutor`` and every worker is limited separately. An
    interpreter's own :func:`set_limit` wins over the default. The default
    applies once the interpreter is created, not to its start-up, for
    interpreters made by ``concurrent.interpreters`` and
    ``InterpreterPoolExecutor`` on 3.13+ (CPython records where they came
    from); on 3.12 it counts the start-up too, and an interpreter made with
    the C API gets it only through :func:`set_limit`.
    """
    size = None if limit is None else parse_size(limit)
    if size is not None and not _native.is_installed():
        raise RuntimeError(_NO_HOOKS)
    alive = _alive_interpreter_ids() or {0}
    _native.set_default_limit(size, max(alive) + 1)


def get_default_limit() -> int | None:
    """The limit every new interpreter gets, or None."""
    found = _native.get_default_limit()
    return None if found is None else found[0]


def remove_limit(interp: Any) -> None:
    """Removes an interpreter's limit (same as ``set_limit(interp, None)``)."""
    set_limit(interp, None)
