"""The timeline (interheap.start_timeline, python -m interheap run
--timeline): each interpreter's exact live bytes over time, read by a native
thread while isolated interpreters run in parallel; a limit's first refusal
is on it; an idle interpreter adds no points."""

from __future__ import annotations

import json

from conftest import run_python, scenario

MB = 1000 * 1000


def test_the_timeline_follows_each_interpreter_and_marks_the_limit():
    out = scenario(
        r"""
        import threading, time, interheap
        from scenario_support import create, run, destroy, result
        interheap.install()
        interheap.start_timeline(0.002)
        grow, limited = create("isolated"), create("isolated")
        interheap.set_limit(limited, "10 MB")
        def work_grow():
            run(grow, "import time\nkeep = [bytearray(1000) for _ in range(40_000)]\n"
                      "time.sleep(0.3)\nkeep = None\ntime.sleep(0.1)\n")
        def work_limited():
            run(limited, "keep = []\ntry:\n    while True:\n        keep.append(bytearray(100_000))\n"
                         "except MemoryError:\n    keep = None\n")
        ts = [threading.Thread(target=work_grow), threading.Thread(target=work_limited)]
        [t.start() for t in ts]; [t.join() for t in ts]
        interheap.stop_timeline()
        tl = interheap.timeline()
        s = tl.series(grow)
        peak_t, peak = tl.peak(grow)
        # Points of `grow` while it slept holding its blocks (nothing changed).
        quiet = [t for t, total in zip(s["t"], s["total"]) if peak_t < t and total == peak]
        lim_peak = tl.peak(limited)[1]
        result(ids=[grow, limited], peak=peak, peak_t=peak_t, last=s["total"][-1], quiet=len(quiet),
               first_refusal=tl.first_refusal(limited), limited_peak=lim_peak,
               interps=tl.interpreters(), points=len(tl.points), summary=tl.format_summary(),
               running=interheap._native.timeline_running())
        for i in (grow, limited):
            destroy(i)
        """,
        timeout=240,
    )
    grow, limited = out["ids"]
    assert grow in out["interps"] and limited in out["interps"] and 0 in out["interps"]
    # 40,000 bytearrays of 1,000 B (about 42 MB with the list) at the peak.
    assert 40 * MB < out["peak"] < 50 * MB, out
    assert out["last"] < out["peak"] - 35 * MB, "the freed blocks leave the timeline"
    # Readings are kept only when something changed: none while it slept.
    assert out["quiet"] == 0, out
    assert out["first_refusal"] is not None and out["first_refusal"] > 0
    assert out["limited_peak"] <= 10 * MB + 256 * 1024 + MB, out
    assert not out["running"]
    assert f"interp {grow}" in out["summary"] and "limit first hit" in out["summary"]


def test_run_timeline_writes_points_and_reports_peaks(tmp_path):
    report = tmp_path / "out.json"
    code = "import time\nkeep = [bytes(1000) for _ in range(20_000)]\ntime.sleep(0.05)\n"
    proc = run_python(["-m", "interheap", "run", "--timeline", "2", "--json", str(report), "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert "timeline (" in proc.stderr and "every 2 ms" in proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.strip().startswith("interp 0"))
    assert "peak" in line, line
    document = json.loads(report.read_text())
    points = document["timeline"]["points"]
    assert document["timeline"]["interval"] == 0.002 and points
    main = [p for p in points if p[1] == 0]
    assert max(p[2] + p[3] + p[4] for p in main) > 20 * MB
    shown = run_python(["-m", "interheap", "report", str(report)])
    assert shown.returncode == 0 and "timeline (" in shown.stdout


def test_bad_input_is_refused():
    for bad in ("--timeline=0", "--timeline=abc", "--timeline=-5"):
        proc = run_python(["-m", "interheap", "run", bad, "-c", "pass"])
        assert proc.returncode == 2 and "--timeline" in proc.stderr, (bad, proc.stderr)
    out = scenario(
        r"""
        import interheap
        from scenario_support import result
        seen = {}
        try:
            interheap.start_timeline()
        except RuntimeError as exc:
            seen["no hooks"] = str(exc)
        interheap.install()
        bad = (("zero", 0), ("negative", -1), ("text", "1s"), ("bool", True), ("nan", float("nan")))
        for name, value in bad:
            try:
                interheap.start_timeline(value)
                seen[name] = "accepted"
            except ValueError:
                seen[name] = "ValueError"
        seen["running"] = interheap._native.timeline_running()
        result(**seen)
        """
    )
    assert "call interheap.install() first" in out["no hooks"]
    assert {out[k] for k in ("zero", "negative", "text", "bool", "nan")} == {"ValueError"}, out
    assert out["running"] is False


def test_a_forked_child_exits_cleanly_with_the_timeline_on():
    # The child has no recorder thread: stopping the timeline there (as
    # `run`'s report at exit does) must not wait for it.
    out = scenario(
        r"""
        import os, interheap
        from scenario_support import result
        interheap.install()
        interheap.start_timeline(0.001)
        keep = [bytes(1000) for _ in range(10_000)]
        pid = os.fork()
        if pid == 0:
            interheap.stop_timeline()
            ok = interheap._native.timeline_running() is False
            interheap.timeline()
            os._exit(0 if ok else 1)
        status = os.waitpid(pid, 0)[1]
        running = interheap._native.timeline_running()
        interheap.stop_timeline()
        result(status=status, running=running, points=len(interheap.timeline().points))
        """,
        timeout=120,
    )
    assert out["status"] == 0 and out["running"] is True and out["points"] > 0, out


def test_the_timeline_marks_when_each_interpreter_was_destroyed():
    out = scenario(
        r"""
        import time, interheap
        from scenario_support import create, run, destroy, result
        interheap.install()
        interheap.start_timeline(0.002)
        first, second, kept = create("isolated"), create("isolated"), create("isolated")
        for i in (first, second, kept):
            run(i, "x = [bytes(100) for _ in range(1000)]")
        destroy(first)
        time.sleep(0.3)
        destroy(second)
        time.sleep(0.05)
        interheap.stop_timeline()
        tl = interheap.timeline()
        again = interheap.Timeline.from_dict(tl.to_dict())
        result(ids=[first, second, kept], ends={str(k): v for k, v in tl.ends.items()},
               starts={str(i): tl.series(i)["t"][0] for i in (first, second, kept)},
               again={str(k): v for k, v in again.ends.items()}, summary=tl.format_summary())
        destroy(kept)
        """,
        timeout=240,
    )
    first, second, kept = out["ids"]
    ends = {int(k): v for k, v in out["ends"].items()}
    assert first in ends and second in ends, out
    assert kept not in ends, "an interpreter still alive has no end"
    assert 0.25 < ends[second] - ends[first] < 2.0, ends
    assert ends[first] > out["starts"][str(first)]
    assert out["again"] == out["ends"], "the ends survive the JSON round trip"
    assert f"destroyed at {ends[first]:.3f} s" in out["summary"]
