"""The Python API: install/uninstall, the context manager, snapshots."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import FREE_THREADED, scenario


def test_import_keeps_the_gil_as_the_build_has_it():
    # On a free-threaded build the extension declares it needs no GIL, so
    # importing it must not turn the GIL back on.
    out = scenario(
        """
        import sys, interheap
        from scenario_support import result
        result(gil=getattr(sys, "_is_gil_enabled", lambda: True)())
        """
    )
    assert out["gil"] is (not FREE_THREADED)


def test_the_package_refuses_free_threaded_3_13_naming_3_14t():
    # 3.13t is retired. A wheel cannot be built for it (PyO3 refuses, checked
    # in scripts/test.sh); the package also says so itself if it meets one.
    # The child makes this interpreter look like 3.13t before the import.
    out = scenario(
        """
        import sys, sysconfig
        from scenario_support import result
        real = sysconfig.get_config_var
        sysconfig.get_config_var = lambda name: 1 if name == "Py_GIL_DISABLED" else real(name)
        sys.version_info = (3, 13, 5, "final", 0)
        try:
            import interheap
        except ImportError as e:
            result(error=str(e), native="interheap._native" in sys.modules)
        else:
            result(error=None)
        """
    )
    assert out["error"] and "3.13t" in out["error"] and "3.14t" in out["error"], out
    assert out["native"] is False, "the refusal must come before the extension loads"


def test_install_uninstall_round_trip_and_errors():
    out = scenario(
        """
        import interheap
        from scenario_support import result
        errors = {}
        before = interheap.is_installed()
        interheap.install()
        installed = interheap.is_installed()
        top = interheap.on_top()
        try:
            interheap.install()
        except RuntimeError as e:
            errors["double_install"] = str(e)
        interheap.uninstall()
        try:
            interheap.uninstall()
        except RuntimeError as e:
            errors["double_uninstall"] = str(e)
        result(before=before, installed=installed, top=top, after=interheap.is_installed(),
               after_top=interheap.on_top(), errors=errors)
        """
    )
    assert out["before"] is False and out["installed"] is True and out["after"] is False
    assert out["top"] == {"raw": True, "mem": True, "object": True}
    assert out["after_top"] == {"raw": False, "mem": False, "object": False}
    assert "already installed" in out["errors"]["double_install"]
    assert "not installed" in out["errors"]["double_uninstall"]


def test_context_manager_keeps_final_figures_and_counts_a_known_allocation():
    out = scenario(
        """
        import interheap
        from scenario_support import result
        with interheap.hooks() as h:
            base = interheap.stats().interpreter(0).live_bytes
            blob = bytearray(8 * 1024 * 1024)
            grown = interheap.stats().interpreter(0).live_bytes
        result(installed=interheap.is_installed(), delta=grown - base,
               final_has_main=h.stats.interpreter(0) is not None, blob=len(blob))
        """
    )
    assert out["installed"] is False
    assert out["final_has_main"] is True
    assert 8 * 1024 * 1024 <= out["delta"] <= 8 * 1024 * 1024 * 1.01


def test_install_resets_figures():
    out = scenario(
        """
        import interheap
        from scenario_support import result
        interheap.install()
        keep = [bytes(1000) for _ in range(1000)]
        first = interheap.stats().interpreter(0).object.allocations
        interheap.uninstall()
        interheap.install()
        second = interheap.stats().interpreter(0).object.allocations
        interheap.uninstall()
        result(first=first, second=second)
        """
    )
    assert out["first"] >= 1000
    assert out["second"] < 100


def test_snapshot_shape_and_json_round_trip():
    import interheap

    snap = interheap.stats()  # hooks not installed in this process: empty but well-formed
    data = snap.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) >= {"interpreters", "totals", "untracked_frees", "missed_frees", "table", "python"}
    assert set(data["totals"]) == {"raw", "mem", "object", "all"}
    assert data["free_threaded"] is FREE_THREADED
    again = interheap.Snapshot.from_dict(data)
    assert again.to_dict() == data


def test_snapshot_lists_interpreters_with_domains_and_alive_state():
    out = scenario(
        """
        import interheap
        from scenario_support import create, run, destroy, result
        interheap.install()
        alive_id = create()
        dead_id = create()
        run(alive_id, "x = [bytes(2000) for _ in range(100)]")
        run(dead_id, "x = 1")
        destroy(dead_id)
        snap = interheap.stats()
        data = snap.to_dict()
        text = snap.format_table()
        result(data=data, text=text, alive_id=alive_id, dead_id=dead_id)
        """
    )
    entries = {e["id"]: e for e in out["data"]["interpreters"] if e["kind"] == "interpreter"}
    assert entries[0]["alive"] is True and entries[0]["name"] == "main"
    assert entries[out["alive_id"]]["alive"] is True
    assert entries[out["dead_id"]]["alive"] is False
    for entry in entries.values():
        assert set(entry["domains"]) == {"raw", "mem", "object"}
        assert set(entry["domains"]["object"]) == {
            "live_bytes",
            "peak_bytes",
            "live_blocks",
            "allocations",
            "reallocations",
            "frees",
            "failures",
        }
    assert entries[out["alive_id"]]["domains"]["object"]["live_bytes"] >= 100 * 2000
    assert "destroyed" in out["text"] and "main (0)" in out["text"] and "MiB" in out["text"]


def test_human_bytes():
    from interheap import human_bytes

    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(50 * 1024 * 1024) == "50.0 MiB"
    assert human_bytes(-2048) == "-2.0 KiB"
    assert human_bytes(None) == "-"


@pytest.mark.skipif(sys.version_info < (3, 12), reason="interheap supports 3.12+ only")
def test_version_is_supported():
    assert sys.version_info >= (3, 12)
