"""Hooks stack over and under other allocator wrappers (tracemalloc), and
uninstall refuses, changing nothing, when they are not on top."""

from __future__ import annotations

from conftest import scenario


def test_hooks_under_tracemalloc_and_uninstall_refuses():
    out = scenario(
        r"""
        import tracemalloc, interheap
        from scenario_support import result, live_bytes, uninstall_error
        interheap.install()
        tracemalloc.start()               # tracemalloc now wraps our hooks
        top = interheap.on_top()
        refused = uninstall_error()
        still = interheap.is_installed()
        # Both layers still see new memory.
        base_ih = live_bytes(interheap.stats(), 0)
        base_tm = tracemalloc.get_traced_memory()[0]
        blob = [bytes(4000) for _ in range(1000)]
        grew_ih = live_bytes(interheap.stats(), 0) - base_ih
        grew_tm = tracemalloc.get_traced_memory()[0] - base_tm
        tracemalloc.stop()                # removes tracemalloc, restores our hooks
        top_after = interheap.on_top()
        interheap.uninstall()
        result(top=top, refused=refused, still=still, grew_ih=grew_ih, grew_tm=grew_tm,
               top_after=top_after, installed=interheap.is_installed())
        """
    )
    assert out["top"] == {"raw": False, "mem": False, "object": False}
    assert out["refused"] and "tracemalloc" in out["refused"] and "object" in out["refused"]
    assert out["still"] is True
    assert out["grew_ih"] >= 4_000_000 and out["grew_tm"] >= 4_000_000
    assert out["top_after"] == {"raw": True, "mem": True, "object": True}
    assert out["installed"] is False


def test_hooks_over_tracemalloc():
    out = scenario(
        r"""
        import tracemalloc, interheap
        from scenario_support import result, live_bytes
        tracemalloc.start()
        interheap.install()               # we wrap tracemalloc
        base_ih = live_bytes(interheap.stats(), 0)
        base_tm = tracemalloc.get_traced_memory()[0]
        blob = [bytes(4000) for _ in range(1000)]
        grew_ih = live_bytes(interheap.stats(), 0) - base_ih
        grew_tm = tracemalloc.get_traced_memory()[0] - base_tm
        top = interheap.on_top()
        interheap.uninstall()             # on top: allowed, tracemalloc keeps tracing
        more = [bytes(4000) for _ in range(500)]
        after_tm = tracemalloc.get_traced_memory()[0] - base_tm
        tracing = tracemalloc.is_tracing()
        tracemalloc.stop()
        result(grew_ih=grew_ih, grew_tm=grew_tm, top=top, after_tm=after_tm, tracing=tracing)
        """
    )
    assert out["top"] == {"raw": True, "mem": True, "object": True}
    assert out["grew_ih"] >= 4_000_000 and out["grew_tm"] >= 4_000_000
    assert out["tracing"] is True and out["after_tm"] >= 6_000_000


def test_replaced_hooks_are_reported_not_restored_blindly():
    # tracemalloc.stop() restores what *it* wrapped: if it was started first,
    # that removes our hooks too. That cannot be told apart from something
    # sitting on top of them, so uninstall refuses rather than "restore"
    # allocators over whatever is there now; the process keeps working.
    out = scenario(
        r"""
        import tracemalloc, interheap
        from scenario_support import result, uninstall_error
        tracemalloc.start()
        interheap.install()
        tracemalloc.stop()
        top = interheap.on_top()
        refused = uninstall_error()
        x = [bytes(1000) for _ in range(1000)]
        result(top=top, refused=refused, n=len(x))
        """
    )
    assert out["top"] == {"raw": False, "mem": False, "object": False}
    assert out["refused"] and "no longer the installed allocator" in out["refused"]
    assert out["n"] == 1000


def test_allocator_put_back_by_someone_else_uninstalls_cleanly():
    # Someone restored exactly what interheap wrapped (here with ctypes,
    # as an embedder might): nothing is left to undo, so uninstall succeeds.
    out = scenario(
        r"""
        import ctypes, interheap
        from scenario_support import result

        class Allocator(ctypes.Structure):
            _fields_ = [(n, ctypes.c_void_p) for n in ("ctx", "malloc", "calloc", "realloc", "free")]

        api = ctypes.PyDLL(None)
        saved = [Allocator() for _ in range(3)]
        for d in range(3):
            api.PyMem_GetAllocator(d, ctypes.byref(saved[d]))
        interheap.install()
        api.PyMem_SetAllocator(1, ctypes.byref(saved[1]))   # mem domain put back
        top = interheap.on_top()
        interheap.uninstall()
        now = [Allocator() for _ in range(3)]
        for d in range(3):
            api.PyMem_GetAllocator(d, ctypes.byref(now[d]))
        restored = [now[d].malloc == saved[d].malloc for d in range(3)]
        result(top=top, installed=interheap.is_installed(), restored=restored)
        """
    )
    assert out["top"] == {"raw": True, "mem": False, "object": True}
    assert out["installed"] is False
    assert out["restored"] == [True, True, True]


def test_unknown_allocator_on_top_is_refused_and_nothing_changes():
    # Something that is neither our hook nor what we wrapped sits on top
    # (here: tracemalloc started after us): uninstall refuses, changes
    # nothing, and works once that is gone.
    out = scenario(
        r"""
        import tracemalloc, interheap
        from scenario_support import result, uninstall_error
        interheap.install()
        tracemalloc.start()
        refused = uninstall_error()
        still = interheap.is_installed()
        tracing = tracemalloc.is_tracing()
        tracemalloc.stop()
        interheap.uninstall()
        result(refused=refused, still=still, tracing=tracing, after=interheap.is_installed())
        """
    )
    assert out["refused"] and "sits on top" in out["refused"]
    assert out["still"] is True and out["tracing"] is True
    assert out["after"] is False


def test_hooks_over_debug_hooks():
    # PYTHONMALLOC=debug puts CPython's debug hooks underneath; we forward
    # unchanged pointers and sizes, so their checks stay happy.
    out = scenario(
        r"""
        import interheap
        from scenario_support import result, consistency
        interheap.install()
        x = [bytes(i % 700) for i in range(20000)]
        d = {i: [i] * (i % 50) for i in range(5000)}
        del x, d
        snap = interheap.stats()
        interheap.uninstall()
        result(**consistency(snap))
        """,
        env={"PYTHONMALLOC": "debug"},
    )
    assert out["negative"] == []
    assert out["ledger_live_blocks"] == out["table_entries"]
