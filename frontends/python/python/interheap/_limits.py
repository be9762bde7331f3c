"""Per-interpreter memory limits, enforced by the hooks or by the allocator.

A limit caps an interpreter's live bytes. The allocation that would cross it
fails, so CPython raises MemoryError in that interpreter only; the
interpreter can catch it, free memory and go on. After a refusal the
interpreter may go up to 256 KiB over its limit (once, until it is back
under), so that raising and handling the MemoryError does not fail too. Raw
calls made without a thread state are never refused.

Two back ends enforce limits, and a limit set here goes to each one present:

* the hooks (:func:`interheap.install`, ``python -m interheap run``) count
  mem and object blocks and the raw blocks allocated while the interpreter's
  thread state was current, exact to the byte, over any allocator (also
  free-threaded builds);
* the interheap allocator (``interheap-python``) counts the interpreter's
  mem, object and raw heaps (raw: calls made while its thread state was
  current), and checks on its slow paths only, so an interpreter can go over
  by what the current pages of its size classes still hold free (16 KiB per
  class for most). Free-threaded builds keep mem and object in CPython's
  mimalloc, so there only the hooks can limit.

    from concurrent import interpreters
    import interheap

    interheap.install()
    worker = interpreters.create()
    interheap.set_limit(worker, "64 MB")
"""

from __future__ import annotations

from . import _native

# (No typing, json or _stats at import: `python -m interheap run --limit`
# loads this module before the program starts; see RunRequest.)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

Size = int | str

_NO_HOOKS = (
    "memory limits are enforced by interheap's hooks or the interheap allocator, and neither is "
    "installed: call interheap.install() first, or run the program under python -m interheap run "
    "(or interheap-python)"
)


def _allocator_limits() -> bool:
    """Whether the interheap allocator serves mem and object here (so it can limit)."""
    mask = _native.allocator_domains()
    return mask & 6 == 6


def _back_ends(size: int | None) -> tuple[bool, bool]:
    """(hooks, allocator): which back ends take the limit; RuntimeError if
    a limit is set and neither is there."""
    hooks, allocator = _native.is_installed(), _allocator_limits()
    if size is not None and not hooks and not allocator:
        raise RuntimeError(_NO_HOOKS)
    return hooks, allocator


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


def _alive_interpreter_ids() -> set[int] | None:
    """IDs of the interpreters that exist now, or None if that can't be known."""
    try:
        import _interpreters as mod  # 3.13+
    except ImportError:
        try:
            import _xxsubinterpreters as mod  # 3.12
        except ImportError:
            return None
    ids = set()
    for entry in mod.list_all():
        # 3.13: (id, whence) tuples; 3.12: InterpreterID objects.
        ids.add(int(entry[0] if isinstance(entry, tuple) else entry))
    return ids


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
    stays, even above it. Needs the hooks (:func:`interheap.install`) or
    the interheap allocator (``interheap-python``); with both, both enforce it.
    """
    interp_id = interpreter_id(interp)
    size = None if limit is None else parse_size(limit)
    hooks, allocator = _back_ends(size)
    if allocator:
        # First: it is the one that can refuse (an interpreter with no heaps).
        _native.allocator_set_limit(interp_id, size)
    if hooks or not allocator:
        _native.set_limit(interp_id, size)


def get_limit(interp: Any) -> int | None:
    """An interpreter's limit in bytes, or None."""
    interp_id = interpreter_id(interp)
    if not _native.is_installed() and _allocator_limits():
        return _native.allocator_get_limit(interp_id)
    return _native.get_limit(interp_id)


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
    hooks, allocator = _back_ends(size)
    alive = _alive_interpreter_ids() or {0}
    if allocator:
        _native.allocator_set_default_limit(size, max(alive) + 1)
    if hooks or not allocator:
        _native.set_default_limit(size, max(alive) + 1)


def get_default_limit() -> int | None:
    """The limit every new interpreter gets, or None."""
    if not _native.is_installed() and _allocator_limits():
        import json

        text = _native.allocator_report_json()
        found = json.loads(text).get("default_limit") if text else None
    else:
        found = _native.get_default_limit()
    return None if found is None else found[0]


def remove_limit(interp: Any) -> None:
    """Removes an interpreter's limit (same as ``set_limit(interp, None)``)."""
    set_limit(interp, None)
