"""Hooks stack over and under other allocator wrappers (tracemalloc), and
uninstall refuses, changing nothing, when they are not on top."""

from __future__ import annotations

from conftest import scenario


def test_hooks_under_tracemalloc_and_uninstall_refuses():
    out = scenario(
        r"""
        import tracemalloc, interheap
        from scenario_support import result, live_bytes
        interheap.install()
        tracemalloc.start()               # tracemalloc now wraps our hooks
        top = interheap.on_top()
        try:
            interheap.uninstall()
            refused = None
        except RuntimeError as e:
            refused = str(e)
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
    # tracemalloc.stop() restores what *it* wrapped: if it was installed
    # first, that removes our hooks too. uninstall must then refuse rather
    # than "restore" allocators over whatever is there now.
    out = scenario(
        r"""
        import tracemalloc, interheap
        from scenario_support import result
        tracemalloc.start()
        interheap.install()
        tracemalloc.stop()
        top = interheap.on_top()
        try:
            interheap.uninstall()
            refused = None
        except RuntimeError as e:
            refused = str(e)
        x = [bytes(1000) for _ in range(1000)]   # the process keeps working
        result(top=top, refused=refused, n=len(x))
        """
    )
    assert out["top"] == {"raw": False, "mem": False, "object": False}
    assert out["refused"] and "no longer the installed allocator" in out["refused"]
    assert out["n"] == 1000


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
