"""The limit torture test's short sweep (tests/limit_torture.py --quick; the
full one is make torture): CPython's test_re and pyperformance's json_dumps in
a limited subinterpreter, limits from far too small to ample, both back ends.
Every run ends with success or a MemoryError there, never a crash or hang."""

from __future__ import annotations

import json

from conftest import FREE_THREADED, ROOT, run_python


def test_every_limit_ends_in_success_or_a_memoryerror_never_a_crash(tmp_path):
    report = tmp_path / "torture.json"
    script = ROOT / "tests" / "limit_torture.py"
    proc = run_python([str(script), "--quick", "--json", str(report)], timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(report.read_text())
    back_ends = {"hooks"} if FREE_THREADED else {"hooks", "allocator"}
    assert {r["back_end"] for r in results} == back_ends
    by_limit = {}
    for r in results:
        by_limit.setdefault(r["limit"], set()).add(r["outcome"])
    # The sweep spans the whole range: 2 MB is less than an interpreter's
    # start-up (refused before any code runs), 256 MB is ample.
    assert by_limit["2MB"] <= {"refused at entry", "MemoryError"}, by_limit
    assert by_limit["256MB"] == {"ok"}, by_limit
    # pyperformance is a dev requirement: its workload ran too.
    assert {r["workload"] for r in results} == {"test_re", "json_dumps"}
    # With an ample limit the workloads pass as they do without one (some
    # CPython tests fail in isolated interpreters anyway: test_re's fork test on 3.13).
    runs = {(r["back_end"], r["workload"], r["limit"]): r for r in results}
    for back_end in back_ends:
        ample, unlimited = runs[back_end, "test_re", "256MB"], runs[back_end, "test_re", "none"]
        assert ample["ran"] == unlimited["ran"] > 100, (ample, unlimited)
        assert ample["problems"] == unlimited["problems"] and ample["other"] == unlimited["other"], ample
