"""interheap_interp: an isolated interpreter reads its own figures and limit
and lowers its limit, never raises it, with the hooks and with the allocator;
it imports where the PyO3 package cannot."""

from __future__ import annotations

import sys

import pytest
from conftest import FREE_THREADED, run_python, scenario

MB = 1000 * 1000

# Four isolated interpreters in parallel threads, each with its own limit set
# from main (10, 20, 30, 40 MB), read their own figures, lower their limit by
# 4 MB, fail to raise it, and get MemoryError past the lowered limit.
PARALLEL = r"""
import threading, interheap
from scenario_support import create, run, destroy, result
HOOKS = True  # replaced for the allocator
if HOOKS:
    interheap.install()
ids = [create("isolated") for _ in range(4)]
for k, i in enumerate(ids):
    interheap.set_limit(i, (k + 1) * 10 * 1000 * 1000)
import tempfile, os, json
tmp = tempfile.mkdtemp()
CODE = '''
import json, interheap_interp as ii
out = {{"id": ii.interpreter_id(), "limit": ii.limit(), "live": ii.live_bytes()}}
ii.lower_limit(out["limit"] - 4 * 1000 * 1000)
out["lowered"] = ii.limit()
try:
    ii.lower_limit(out["limit"])
    out["raise"] = "accepted"
except ValueError as exc:
    out["raise"] = str(exc)
keep = []
try:
    while True:
        keep.append(bytearray(1000 * 1000))
except MemoryError:
    out["kept"] = len(keep)
keep = None
out["refused"] = ii.refused()
out["figures"] = ii.figures()
with open({path!r}, "w") as fh:
    json.dump(out, fh)
'''
errors = []
def work(k, i):
    try:
        run(i, CODE.format(path=os.path.join(tmp, str(k))))
    except BaseException as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=work, args=(k, i)) for k, i in enumerate(ids)]
[t.start() for t in threads]; [t.join() for t in threads]
seen = [json.load(open(os.path.join(tmp, str(k)))) for k in range(4)]
from_main = [interheap.get_limit(i) for i in ids]
for i in ids:
    destroy(i)
result(ids=ids, seen=seen, from_main=from_main, errors=errors)
"""


def check_parallel(out: dict, back_end: str) -> None:
    assert out["errors"] == []
    for k, (iid, seen) in enumerate(zip(out["ids"], out["seen"], strict=True)):
        limit = (k + 1) * 10 * MB
        assert seen["id"] == iid and seen["limit"] == limit, seen
        assert 0 < seen["live"] < limit
        assert seen["lowered"] == limit - 4 * MB
        assert seen["raise"].startswith("an interpreter can lower its own limit, never raise it"), seen
        # It filled up to its lowered limit, then MemoryError. What it held before
        # (start-up, measured as "live": 4.8-5.1 MB on 3.14t) counts too.
        room = (limit - 4 * MB - seen["live"]) / MB
        assert room - 3 <= seen["kept"] <= (limit - 4 * MB) / MB, seen
        assert seen["refused"] >= 1
        figures = seen["figures"][back_end]
        assert figures["limit"] == limit - 4 * MB and figures["peak"] <= limit - 4 * MB + 256 * 1024 + MB
    # The main interpreter sees the lowered limits.
    assert out["from_main"] == [(k + 1) * 10 * MB - 4 * MB for k in range(4)]


def test_each_interpreter_lowers_its_own_limit_under_the_hooks():
    check_parallel(scenario(PARALLEL, timeout=240), "hooks")


@pytest.mark.skipif(FREE_THREADED, reason="free-threaded builds keep mem and object in mimalloc")
def test_each_interpreter_lowers_its_own_limit_under_the_allocator():
    code = PARALLEL.replace("HOOKS = True", "HOOKS = False")
    check_parallel(scenario(code, launcher=True, timeout=240), "allocator")


def test_it_imports_where_the_pyo3_package_cannot_and_refuses_bad_input():
    out = scenario(
        r"""
        import interheap
        from scenario_support import create, run, destroy, result
        import tempfile, os, json
        path = os.path.join(tempfile.mkdtemp(), "out")
        iid = create("isolated")
        code = '''
        import json
        out = {}
        try:
            import interheap
            out["pyo3"] = "imported"
        except ImportError as exc:
            out["pyo3"] = "ImportError"
        import interheap_interp as ii
        try:
            ii.limit()
        except RuntimeError as exc:
            out["no back end"] = str(exc)
        for name, value in (("negative", -1), ("unparseable", "lots"), ("bool", True), ("float", 1.5)):
            try:
                ii.lower_limit(value)
                out[name] = "accepted"
            except (ValueError, TypeError) as exc:
                out[name] = type(exc).__name__ + ": " + str(exc)
        try:
            ii.lower_limit("1 MB")
        except RuntimeError as exc:
            out["lower without back end"] = str(exc)
        out["figures"] = ii.figures()
        json.dump(out, open(PATH, "w"))
        '''
        run(iid, code.replace("PATH", repr(path)))
        destroy(iid)
        result(**json.load(open(path)))
        """
    )
    assert out["pyo3"] == "ImportError", "PyO3 modules do not import in isolated subinterpreters (fact 9)"
    assert "neither interheap's hooks nor the interheap allocator" in out["no back end"]
    assert "neither interheap's hooks nor the interheap allocator" in out["lower without back end"]
    assert "cannot be negative" in out["negative"] and out["negative"].startswith("ValueError")
    assert out["unparseable"].startswith("ValueError: invalid size")
    assert out["bool"].startswith("TypeError") and out["float"].startswith("TypeError")
    assert out["figures"]["hooks"] is None and out["figures"]["allocator"] is None


@pytest.mark.skipif(sys.version_info < (3, 14), reason="InterpreterPoolExecutor is new in 3.14")
def test_pool_workers_read_their_own_default_limit(tmp_path):
    (tmp_path / "pool_tasks.py").write_text(
        "def task(n):\n    import interheap_interp as ii\n    return ii.interpreter_id(), ii.limit()\n"
    )
    (tmp_path / "main.py").write_text(
        "from concurrent.futures import InterpreterPoolExecutor\n"
        "import interheap\n"
        "from pool_tasks import task\n"
        "interheap.set_default_limit('16 MB')\n"
        "with InterpreterPoolExecutor(2) as pool:\n"
        "    print(sorted(set(pool.map(task, range(8)))))\n"
    )
    proc = run_python(["-m", "interheap", "run", "--no-report", str(tmp_path / "main.py")])
    assert proc.returncode == 0, proc.stderr
    seen = eval(proc.stdout)
    assert [limit for _, limit in seen] == [16 * MB] * len(seen) and 1 <= len(seen) <= 2, seen
    assert all(iid > 0 for iid, _ in seen)
