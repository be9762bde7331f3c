"""Figures read from interheap-python's heaps, with no hook installed.

Under ``interheap-python -m interheap run`` the allocator's heaps keep each
block's requested size, and ``interheap.install(figures="heaps")`` (what
``run`` picks) reads the figures from them instead of wrapping the
allocators with PEP 445 hooks. These tests hold the two ways of counting to
the same figures for the same work, and check where it is refused.
"""

from __future__ import annotations

import json

import pytest
from conftest import FREE_THREADED, run_python, scenario

# Two isolated interpreters do deterministic work (hash seed fixed), then
# every figure of theirs is read. Interpreters made after the install are
# counted whole by both ways.
WORKLOAD = """
import interheap
from scenario_support import create, destroy, result, run
interheap.install(figures={figures!r})
source = interheap.figures_source()
ids = []
for n in (2000, 3000):
    i = create("isolated")
    run(i, f"blocks = [bytes(k) for k in range({{n}})]\\nkeep = [str(k) * 3 for k in range({{n}} * 2)]\\n"
           "grow = []\\nfor k in range(5000): grow.append(k)\\ndel blocks")
    ids.append(i)
snap = interheap.stats()
figures = {{}}
for i in ids:
    entry = snap.interpreter(i)
    figures[str(i)] = {{
        d: [getattr(entry, d).live_bytes, getattr(entry, d).peak_bytes, getattr(entry, d).allocations,
            getattr(entry, d).frees, getattr(entry, d).reallocations]
        for d in ("mem", "object")
    }}
destroy(ids[0])
after = interheap.stats().interpreter(ids[0])
result(source=source, on_top=interheap.on_top(), figures=figures,
       ended_alive=after.alive, ended_live=after.live_bytes, origin=after.origin,
       footer=interheap.stats().format_table().splitlines()[-1])
"""

# The same seed and the same heap layout for both runs: a set or dict keyed
# by objects orders them by address, so the work allocates alike only if the
# addresses are alike.
SAME_RUN = {"PYTHONHASHSEED": "0", "INTERHEAP_REQUESTED_SIZES": "1"}


@pytest.mark.skipif(FREE_THREADED, reason="mem and object stay CPython's mimalloc on free-threaded builds")
def test_the_heaps_count_what_the_hooks_count_for_the_same_work():
    heaps = scenario(WORKLOAD.format(figures="heaps"), env=SAME_RUN, launcher=True)
    hooks = scenario(WORKLOAD.format(figures="hooks"), env=SAME_RUN, launcher=True)
    assert heaps["source"] == "heaps" and hooks["source"] == "hooks"
    # No hook is installed: CPython calls the allocator directly.
    assert heaps["on_top"] == {"raw": False, "mem": False, "object": False}
    assert hooks["on_top"] == {"raw": True, "mem": True, "object": True}
    # Live and peak bytes (requested sizes), allocations, frees and
    # reallocations: the same per interpreter and domain.
    assert heaps["figures"] == hooks["figures"]
    mem = heaps["figures"]["2"]["mem"]
    assert mem[0] > 10_000 and mem[1] >= mem[0] and mem[4] > 0, heaps
    # An interpreter that ended keeps its figures (what it leaked: nothing
    # on 3.13+, some of its objects on 3.12) and what it was.
    assert heaps["ended_alive"] is False
    assert heaps["ended_live"] == hooks["ended_live"]
    assert heaps["origin"] == hooks["origin"]
    assert "no hooks" in heaps["footer"]


@pytest.mark.skipif(FREE_THREADED, reason="mem and object stay CPython's mimalloc on free-threaded builds")
def test_run_under_the_launcher_installs_no_hook_unless_asked_for_what_only_hooks_do(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(
        "import interheap, json\n"
        "data = [bytes(100) for _ in range(1000)]\n"
        "print('SEEN', json.dumps([interheap.figures_source(), interheap.on_top()]))\n"
    )
    proc = run_python(["-m", "interheap", "run", "--json", "-", "--no-report", str(script)], launcher=True)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(next(line[5:] for line in proc.stdout.splitlines() if line.startswith("SEEN ")))
    assert seen == ["heaps", {"raw": False, "mem": False, "object": False}]
    rest = [line for line in proc.stdout.splitlines() if not line.startswith("SEEN ")]
    document = json.loads("\n".join(rest))
    assert document["source"] == "heaps"
    main = next(i for i in document["interpreters"] if i["id"] == 0)
    # The whole process, from start-up: more than the 100 KB the script holds.
    assert main["domains"]["object"]["live_bytes"] + main["domains"]["mem"]["live_bytes"] > 100_000
    # Sampled sites need the hooks: run installs them then.
    proc = run_python(["-m", "interheap", "run", "--sites", "--no-report", str(script)], launcher=True)
    assert proc.returncode == 0, proc.stderr
    assert '"hooks"' in proc.stdout


def test_reading_the_heaps_is_refused_where_they_do_not_hold_the_figures():
    # Plain python: no interheap allocator.
    out = scenario(
        """
        import interheap
        from scenario_support import result
        try:
            interheap.install(figures="heaps")
        except RuntimeError as e:
            refused = str(e)
        try:
            interheap.install(figures="everything")
        except ValueError as e:
            bad = str(e)
        interheap.install(figures="auto")
        result(refused=refused, bad=bad, source=interheap.figures_source(),
               available=interheap.heap_figures_available())
        """
    )
    assert "interheap-python" in out["refused"]
    assert "figures must be" in out["bad"]
    assert out["source"] == "hooks" and out["available"] is False
    # The launcher without requested sizes, or on a free-threaded build.
    out = scenario(
        """
        import interheap
        from scenario_support import result
        try:
            interheap.install(figures="heaps")
        except RuntimeError as e:
            refused = str(e)
        result(refused=refused, source=interheap.figures_source())
        """,
        env={"INTERHEAP_REQUESTED_SIZES": "0"},
        launcher=True,
    )
    assert out["source"] is None
    expected = "free-threaded" if FREE_THREADED else "INTERHEAP_REQUESTED_SIZES=1"
    assert expected in out["refused"], out


@pytest.mark.skipif(FREE_THREADED, reason="mem and object stay CPython's mimalloc on free-threaded builds")
def test_with_the_heaps_read_sites_and_the_checker_are_refused_and_the_timeline_runs():
    out = scenario(
        """
        import time
        import interheap
        from scenario_support import create, destroy, result, run
        interheap.install(figures="heaps")
        errors = []
        calls = (
            lambda: interheap.start_sites(),
            lambda: interheap.install(),
            lambda: interheap.install(figures="heaps"),
            lambda: interheap._native.install(True, True),
        )
        for call in calls:
            try:
                call()
            except (RuntimeError, ValueError) as e:
                errors.append(str(e))
        interheap.start_timeline(0.005)
        i = create("isolated")
        run(i, "x = [bytes(1000) for _ in range(3000)]")
        time.sleep(0.1)
        interheap.stop_timeline()
        points = [p for p in interheap.timeline().points if p.interp == i]
        interheap.uninstall()
        result(errors=errors, worker_peak=max(p.mem + p.object for p in points),
               source=interheap.figures_source())
        """,
        env={"INTERHEAP_REQUESTED_SIZES": "1"},
        launcher=True,
    )
    assert len(out["errors"]) == 4, out
    assert "figures='hooks'" in out["errors"][0]
    assert "already" in out["errors"][1] and "already" in out["errors"][2]
    assert "checker needs the hooks" in out["errors"][3]
    assert out["worker_peak"] > 3_000_000
    assert out["source"] is None
