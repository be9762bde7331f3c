"""How the report names interpreters (ID, isolated or legacy, where it came
from), and the PEP 734 examples: parallel_interpreters.py under python and
interheap-python, interpreter_pool.py (InterpreterPoolExecutor) under ``run``.

Each scenario runs in a child process under ``python -m interheap run --json``.
What each CPython can tell (README, "Seeing memory per interpreter"):
whence from 3.13 on; own GIL from 3.13 on; own obmalloc state on 3.12 too.
Where a version cannot tell, the tests assert that the report says so.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap

import pytest
from c_build import build_shared
from conftest import ROOT, run_python

HAS_WHENCE = sys.version_info >= (3, 13)
HAS_GIL = sys.version_info >= (3, 13)
STDLIB = "concurrent.interpreters" if sys.version_info >= (3, 14) else "_interpreters"
POOL = ROOT / "examples" / "interpreter_pool.py"
PARALLEL = ROOT / "examples" / "parallel_interpreters.py"


def run_reported(tmp_path, code: str, *args: str, launcher: bool = False) -> tuple[dict, str, str]:
    """Runs ``code`` as a script under ``python -m interheap run --json``;
    returns (the JSON report, stdout, stderr with the table)."""
    script = tmp_path / "scenario.py"
    script.write_text(textwrap.dedent(code))
    out = tmp_path / "report.json"
    proc = run_python(
        ["-m", "interheap", "run", "--json", str(out), str(script), *args], timeout=300, launcher=launcher
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, proc.stderr


def entry(report: dict, interp_id: int) -> dict:
    found = [i for i in report["interpreters"] if i["kind"] == "interpreter" and i["id"] == interp_id]
    assert len(found) == 1, (interp_id, [i["id"] for i in report["interpreters"]])
    return found[0]


def expected(own: bool, whence: str, origin: str) -> dict:
    """What the report must say about a subinterpreter on this CPython."""
    if HAS_GIL:
        isolation = "isolated" if own else "legacy"
    else:  # 3.12: only the obmalloc state is known
        isolation = "own obmalloc" if own else "shared obmalloc"
    return {
        "whence": whence if HAS_WHENCE else None,
        "origin": origin if HAS_WHENCE else "unknown",
        "own_gil": own if HAS_GIL else None,
        "own_obmalloc": own,
        "isolation": isolation,
    }


def check_main(report: dict, table: str) -> None:
    main = entry(report, 0)
    assert (main["whence"], main["origin"], main["isolation"]) == ("runtime", "runtime", None)
    assert "main (0)" in table


def check(report: dict, table: str, interp_id: int, want: dict) -> None:
    got = entry(report, interp_id)
    assert {k: got[k] for k in want} == want, (interp_id, got)
    assert got["domains"]["object"]["allocations"] > 0
    assert f"interp {interp_id} ({want['isolation']}, {want['origin']})" in table


@pytest.mark.parametrize("launcher", [False, True], ids=["python", "interheap-python"])
def test_report_names_isolated_and_legacy_interpreters(tmp_path, launcher):
    report, out, table = run_reported(
        tmp_path,
        """
        from scenario_support import create, run, destroy
        iso, leg = create("isolated"), create("legacy")
        for interp in (iso, leg):
            run(interp, "kept = [str(n) * 4 for n in range(5000)]")
        late = create("isolated")   # never runs code; destroyed below, or left to exit
        destroy(iso)
        destroy(leg)
        print("IDS", iso, leg, late)
        """,
        launcher=launcher,
    )
    iso, leg, late = (int(x) for x in re.search(r"IDS (\d+) (\d+) (\d+)", out).groups())
    check_main(report, table)
    check(report, table, iso, expected(True, "stdlib", STDLIB))
    check(report, table, leg, expected(False, "stdlib", STDLIB))
    check(report, table, late, expected(True, "stdlib", STDLIB))
    assert entry(report, iso)["alive"] is False and entry(report, leg)["alive"] is False


def test_report_names_c_api_interpreters(tmp_path):
    # Py_NewInterpreter (legacy C API, main's GIL and obmalloc) and
    # Py_NewInterpreterFromConfig (C API, isolated config), both ended before
    # the report: what was recorded while they lived is what is shown.
    lib = build_shared(ROOT / "tests" / "c" / "capi_interpreters.c", tmp_path / "capi_interpreters.so")
    report, out, table = run_reported(
        tmp_path,
        """
        import ctypes, sys
        lib = ctypes.PyDLL(sys.argv[1])
        ids = (ctypes.c_longlong * 2)()
        assert lib.make_capi_interpreters(ids) == 0
        print("IDS", ids[0], ids[1])
        """,
        str(lib),
    )
    legacy, isolated = (int(x) for x in re.search(r"IDS (\d+) (\d+)", out).groups())
    check_main(report, table)
    check(report, table, legacy, expected(False, "legacy_capi", "legacy C API"))
    check(report, table, isolated, expected(True, "capi", "C API"))


def test_json_written_before_names_is_still_readable(tmp_path):
    code = "from scenario_support import create, run\nrun(create(), 'x = 1')\n"
    report, _, _ = run_reported(tmp_path, code)
    for interp in report["interpreters"]:
        for key in ("whence", "own_gil", "own_obmalloc", "origin", "isolation"):
            interp.pop(key)
    old = tmp_path / "old.json"
    old.write_text(json.dumps(report))
    shown = run_python(["-m", "interheap", "report", str(old)])
    assert shown.returncode == 0, shown.stderr
    assert "main (0)" in shown.stdout and "interp 1 (unknown, unknown)" in shown.stdout


@pytest.mark.parametrize("launcher", [False, True], ids=["python", "interheap-python"])
def test_parallel_interpreters_example_runs(launcher):
    # The example itself (concurrent.interpreters on 3.14+, the private modules
    # below), both configs; `run` over it is tested in test_cli.py.
    for config in ("isolated", "legacy"):
        args = [str(PARALLEL), "--scale", "0.05", "--hold", "0", "--config", config]
        proc = run_python(args, launcher=launcher, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        rows = [line.split() for line in proc.stdout.splitlines()]
        ids = [int(r[1]) for r in rows if r and r[0] in ("keeper", "churn", "bytes", "dicts")]
        assert len(ids) == 4 and len(set(ids)) == 4 and 0 not in ids, proc.stdout


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="3.14+ has InterpreterPoolExecutor (tested below)")
def test_interpreter_pool_example_refuses_below_3_14():
    proc = run_python([str(POOL)])
    assert proc.returncode == 2
    assert "needs CPython 3.14+" in proc.stderr


@pytest.mark.skipif(sys.version_info < (3, 14), reason="InterpreterPoolExecutor is new in 3.14")
@pytest.mark.parametrize("launcher", [False, True], ids=["python", "interheap-python"])
def test_interpreter_pool_example_under_run_shows_each_worker(tmp_path, launcher):
    out = tmp_path / "pool.json"
    proc = run_python(
        ["-m", "interheap", "run", "--json", str(out), str(POOL), "--workers", "4", "--tasks", "8",
         "--scale", "0.5"],
        timeout=300,
        launcher=launcher,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RESULT ok" in proc.stdout
    kept = {
        int(m[1]): int(m[3].replace(",", ""))
        for m in re.finditer(r"^interp\s+(\d+)\s+(\d+)\s+([\d,]+)$", proc.stdout, re.M)
    }
    report = json.loads(out.read_text())
    subs = [i for i in report["interpreters"] if i["kind"] == "interpreter" and i["id"] != 0]
    # One entry per worker interpreter (the pool made 4), all distinct from main.
    assert len(subs) == 4, [i["id"] for i in subs]
    assert set(kept) <= {i["id"] for i in subs} and kept
    check_main(report, proc.stderr)
    for sub in subs:
        assert sub["alive"] is False  # the pool ended its interpreters
        assert sub["domains"]["object"]["allocations"] > 0
        assert (sub["isolation"], sub["origin"]) == ("isolated", "concurrent.interpreters")
        peaks = sum(d["peak_bytes"] for d in sub["domains"].values())
        # What the worker's tasks kept is at most what it held at its peaks.
        assert peaks >= 0.9 * kept.get(sub["id"], 0), (sub["id"], peaks, kept)
