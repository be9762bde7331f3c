"""Imported by test scenarios that run in a child process.

Hides the difference between 3.14's ``concurrent.interpreters`` (PEP 734),
3.13's ``_interpreters`` and 3.12's ``_xxsubinterpreters`` (the private
modules only where 3.14's public one is missing), and reports results to the
parent test as one JSON line.
"""

from __future__ import annotations

import json
import sys
import sysconfig

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

if sys.version_info >= (3, 14):
    import concurrent.interpreters as _interpreters_api

    _interps: dict[int, _interpreters_api.Interpreter] = {}

    def create(kind: str = "isolated") -> int:
        """A new interpreter: 'isolated' (own GIL and obmalloc) or 'legacy'."""
        if kind == "isolated":
            interp = _interpreters_api.create()
        else:
            # concurrent.interpreters makes isolated interpreters only; the
            # module behind it makes the legacy one, with create()'s reference
            # counting, and it is then used like any other.
            import _interpreters

            interp = _interpreters_api.Interpreter(_interpreters.create(kind, reqrefs=True))
        _interps[interp.id] = interp
        return interp.id

    def run(interp_id: int, code: str) -> None:
        """Runs ``code`` in the interpreter; raises if it raised."""
        try:
            _interps[interp_id].exec(code)
        except _interpreters_api.ExecutionFailed as exc:
            raise RuntimeError(f"interpreter {interp_id} failed:\n{exc}") from exc

    def destroy(interp_id: int) -> None:
        _interps.pop(interp_id).close()

elif sys.version_info >= (3, 13):
    import _interpreters as _mod

    def create(kind: str = "isolated") -> int:
        """A new interpreter: 'isolated' (own GIL and obmalloc) or 'legacy'."""
        return int(_mod.create(kind))

    def run(interp_id: int, code: str) -> None:
        """Runs ``code`` in the interpreter; raises if it raised."""
        failure = _mod.exec(interp_id, code)
        if failure is not None:
            detail = getattr(failure, "formatted", None) or repr(failure)
            raise RuntimeError(f"interpreter {interp_id} failed:\n{detail}")

    def destroy(interp_id: int) -> None:
        _mod.destroy(interp_id)

else:  # 3.12
    import _xxsubinterpreters as _mod

    # 3.12 destroys an interpreter when its last InterpreterID handle is
    # garbage collected, so keep the handles until destroy().
    _handles: dict[int, object] = {}

    def create(kind: str = "isolated") -> int:
        handle = _mod.create(isolated=(kind == "isolated"))
        _handles[int(handle)] = handle
        return int(handle)

    def run(interp_id: int, code: str) -> None:
        _mod.run_string(interp_id, code)

    def destroy(interp_id: int) -> None:
        _mod.destroy(interp_id)
        _handles.pop(interp_id, None)


def result(**data: object) -> None:
    """Sends the scenario's findings to the parent test."""
    print("RESULT:" + json.dumps(data), flush=True)


def live_bytes(snapshot, interp_id: int | None) -> int:
    entry = snapshot.interpreter(interp_id)
    return 0 if entry is None else entry.live_bytes


def uninstall_error() -> str | None:
    """Calls interheap.uninstall(); returns its error message, or None if it worked."""
    import interheap

    try:
        interheap.uninstall()
    except RuntimeError as exc:
        return str(exc)
    return None


def quiet_stats(timeout: float = 5.0):
    """A snapshot taken once the process is quiet.

    ``Thread.join()`` returns before the OS thread has finished tearing down
    (CPython frees the thread state with ``PyMem_RawFree`` afterwards), so a
    snapshot taken right after joining can catch a free in flight: the block
    already gone from the table, the ledger not yet updated. Such a mismatch is
    transient; an accounting bug is not. Wait (up to ``timeout``) for a
    snapshot whose two independent records agree and return it, or return the
    last one, whose mismatch the test then reports.
    """
    import time

    import interheap

    deadline = time.monotonic() + timeout
    while True:
        snap = interheap.stats()
        c = consistency(snap)
        if c["ledger_live_blocks"] == c["table_entries"] and c["ledger_live_bytes"] == c["table_live_bytes"]:
            return snap
        if time.monotonic() > deadline:
            return snap
        time.sleep(0.01)


def consistency(snapshot) -> dict:
    """The ledger's totals next to the block table's own count of live blocks."""
    total = snapshot.total
    return {
        "ledger_live_blocks": total.live_blocks,
        "ledger_live_bytes": total.live_bytes,
        "ledger_allocations_minus_frees": total.allocations - total.frees,
        "table_entries": snapshot.table["entries"],
        "table_live_bytes": snapshot.table["live_bytes"],
        "negative": [
            (e.name, d)
            for e in snapshot.interpreters
            for d, s in e.domains.items()
            if s.live_bytes < 0 or s.live_blocks < 0
        ],
    }


def refusal(fn) -> str:
    """Calls ``fn``: "ValueError: ..." or "TypeError: ..." if it refused, "accepted" if not."""
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


__all__ = [
    "FREE_THREADED",
    "consistency",
    "create",
    "destroy",
    "live_bytes",
    "quiet_stats",
    "refusal",
    "result",
    "run",
    "sys",
    "uninstall_error",
]
