"""Imported by adapter scenarios in a child process: the test allocators of
``tests/c/legacy_allocators.c`` (path in ``INTERHEAP_TEST_ALLOCATORS``),
loaded with ctypes, and checks of their bookkeeping."""

from __future__ import annotations

import ctypes
import os

RAW, MEM, OBJECT = 0, 1, 2
NAMES = {RAW: "raw", MEM: "mem", OBJECT: "object"}

# PyDLL: calls keep the GIL (the setup and reports must not race).
lib = ctypes.PyDLL(os.environ["INTERHEAP_TEST_ALLOCATORS"])
lib.bk_setup.restype = ctypes.c_void_p
lib.bk_setup.argtypes = [ctypes.c_int]
lib.bk_install_bare.argtypes = [ctypes.c_int]
lib.bk_restore.argtypes = [ctypes.c_int]
lib.bk_set_pause_every.argtypes = [ctypes.c_long]
lib.bk_report.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_longlong)]
lib.aw_setup.restype = ctypes.c_void_p
lib.aw_setup.argtypes = [ctypes.c_int]
lib.aw_report.argtypes = [ctypes.POINTER(ctypes.c_longlong)]
lib.re_setup.restype = ctypes.c_void_p
lib.re_setup.argtypes = [ctypes.c_int]
lib.re_nested.restype = ctypes.c_long
lib.re_nested.argtypes = [ctypes.c_int]
# CDLL: calls release the GIL, so several threads hammer the raw domain at once.
nogil = ctypes.CDLL(os.environ["INTERHEAP_TEST_ALLOCATORS"])
nogil.bk_hammer_raw.restype = ctypes.c_long
nogil.bk_hammer_raw.argtypes = [ctypes.c_long]

FIELDS = (
    "table_entries",
    "table_bytes",
    "live_blocks",
    "live_bytes",
    "allocations",
    "frees",
    "stale",
    "unknown_frees",
    "table_full",
    "overlaps",
    "calls",
)


def report(domain: int) -> dict:
    out = (ctypes.c_longlong * len(FIELDS))()
    lib.bk_report(domain, out)
    r = dict(zip(FIELDS, out, strict=True))
    # The allocator's three checksums: they agree unless calls overlapped.
    r["exact"] = (
        r["table_entries"] == r["live_blocks"]
        and r["table_bytes"] == r["live_bytes"]
        and r["allocations"] - r["frees"] - r["stale"] == r["live_blocks"]
        and r["table_full"] == 0
    )
    return r


def quiet_report(domain: int, timeout: float = 2.0) -> dict:
    """``report(domain)`` once it is exact, or the last one after ``timeout``.

    A report is read without the allocator's lock, so on a free-threaded
    build (no GIL) a thread that is still ending may be inside the allocator
    while it is read. That passing disagreement clears; lost or corrupted
    bookkeeping does not, so a report that stays inexact is real.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        r = report(domain)
        if r["exact"] or time.monotonic() > deadline:
            return r
        time.sleep(0.01)


def aware_report() -> dict:
    out = (ctypes.c_longlong * (3 + 4 * 64))()
    lib.aw_report(out)
    interps = {}
    for i in range(64):
        calls, own_gil, own_obmalloc, seen = out[3 + 4 * i : 7 + 4 * i]
        if seen:
            interps[i] = {"calls": calls, "own_gil": own_gil, "own_obmalloc": own_obmalloc}
    return {"calls_none": out[0], "wrong_domain": out[1], "inconsistent": out[2], "interpreters": interps}


# A workload for each interpreter: many small objects of several kinds.
WORKLOAD = """
keep = []
for i in range({rounds}):
    keep.append([str(i)] * (i % 7))
    keep.append({{"k": i, "s": "x" * (i % 50)}})
    keep.append(str(i) * 3)
    if len(keep) > 3000:
        del keep[:1500]
del keep
"""
