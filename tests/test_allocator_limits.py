"""Per-interpreter memory limits enforced by the interheap allocator
(interheap-python): the interpreter that crosses its limit gets MemoryError,
recovers, and nobody else notices; limits from the environment; bad input and
free-threaded builds are refused with a clear error."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import FREE_THREADED, run_python, scenario
from test_limits import CLI_PROGRAM, MB, PARALLEL, check_cli_program_with_8_mb_each, check_parallel

per_interpreter = pytest.mark.skipif(
    FREE_THREADED, reason="free-threaded builds keep CPython's mimalloc for mem and object (refusal tested)"
)

# A page per size class in use (16 KiB for most classes): what an interpreter
# may hold beyond its limit with the allocator, whose check is on the slow path.
SLACK = 1 * MB


@per_interpreter
def test_only_the_limited_interpreter_gets_memoryerror_and_recovers():
    out = scenario(PARALLEL.replace("ALLOCATOR = False", "ALLOCATOR = True"), launcher=True, timeout=240)
    # A refusal is not a failure of the heap (the OS gave no less); the check
    # on the slow path lets an interpreter go over by a page per size class.
    check_parallel(out, slack=SLACK, refusals_are_failures=False)


# The hooks' command-line program (tests/test_limits.py), reading the allocator's figures.
ENV_PROGRAM = CLI_PROGRAM.replace("s = interheap.stats()", "s = interheap.allocator_stats()")


@per_interpreter
def test_the_environment_limits_every_subinterpreter_and_main(tmp_path):
    report = tmp_path / "report.json"
    proc = run_python(
        ["-c", ENV_PROGRAM], launcher=True, env={"INTERHEAP_LIMIT": "8MB", "INTERHEAP_REPORT": str(report)}
    )
    check_cli_program_with_8_mb_each(proc)
    document = json.loads(report.read_text())
    assert document["default_limit"] == [8 * MB, 1]
    limited = [b for b in document["limits"] if b["limit"] == 8 * MB]
    assert len(limited) == 2 and all(b["refused"] == 1 for b in limited)

    proc = run_python(
        ["-c", ENV_PROGRAM],
        launcher=True,
        env={"INTERHEAP_MAIN_LIMIT": "10 MB", "INTERHEAP_LIMIT": "", "INTERHEAP_REPORT": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "default None main 10000000"
    assert lines[1:5] == ["kept 40", "then kept 3"] * 2
    assert lines[5] == "main MemoryError"
    # The report at exit has a line for main's limit and its refusal.
    section = proc.stderr[proc.stderr.index("memory limits") :].splitlines()
    assert section[1].split()[:5] == ["main", "(0)", "limit", "9.5", "MiB"], section
    assert "refused 1" in section[1]


# Why a limit cannot be applied when the allocator does not serve mem and object.
UNSERVED = "free-threaded build" if FREE_THREADED else "does not serve the mem and object"


def test_a_bad_or_unusable_limit_stops_the_launcher_before_the_program_starts():
    for env, expected in (
        ({"INTERHEAP_LIMIT": "lots"}, "INTERHEAP_LIMIT"),
        ({"INTERHEAP_MAIN_LIMIT": "-1 MB"}, "INTERHEAP_MAIN_LIMIT"),
        ({"INTERHEAP_LIMIT": "1 MB", "INTERHEAP_ALLOCATOR": "raw"}, UNSERVED),
        # (Free-threaded builds know only mimalloc here.)
        ({"INTERHEAP_LIMIT": "1 MB", "PYTHONMALLOC": "mimalloc" if FREE_THREADED else "malloc"}, UNSERVED),
    ):
        if FREE_THREADED and "INTERHEAP_ALLOCATOR" not in env and "PYTHONMALLOC" not in env:
            continue
        proc = run_python(["-c", "print('ran')"], launcher=True, env=env)
        assert proc.returncode == 2, (env, proc.stderr)
        assert proc.stdout == "" and expected in proc.stderr, (env, proc.stderr)


@pytest.mark.skipif(not FREE_THREADED, reason="free-threaded builds only")
def test_free_threaded_builds_refuse_allocator_limits_and_name_the_hooks():
    proc = run_python(["-c", "print('ran')"], launcher=True, env={"INTERHEAP_LIMIT": "64 MB"})
    assert proc.returncode == 2 and "ran" not in proc.stdout
    assert "free-threaded build" in proc.stderr and "python -m interheap run --limit" in proc.stderr
    # From Python, without the hooks, the limit is refused the same way.
    out = scenario(
        """
        import interheap
        from scenario_support import result
        try:
            interheap.set_limit(0, "64 MB")
            result(error=None)
        except RuntimeError as exc:
            result(error=str(exc))
        """,
        launcher=True,
    )
    assert "neither is installed" in out["error"]


BAD_INPUT = r"""
import interheap
from scenario_support import create, run, destroy, refusal, result
iid = create("isolated")
interheap.set_limit(iid, "64 MB")
errors = {}
errors["negative"] = refusal(lambda: interheap.set_limit(iid, -1))
errors["unparseable"] = refusal(lambda: interheap.set_limit(iid, "lots"))
errors["unknown interpreter"] = refusal(lambda: interheap.set_limit(10_000, "1 MB"))
after_bad = interheap.get_limit(iid)
from interheap import _native
errors["no heaps"] = refusal(lambda: _native.allocator_set_limit(10_000, 10**6))
destroy(iid)
errors["ended"] = refusal(lambda: _native.allocator_set_limit(iid, 10**6))
errors["ended, public"] = refusal(lambda: interheap.set_limit(iid, "1 MB"))
result(errors=errors, after_bad=after_bad)
"""


@per_interpreter
def test_bad_limits_are_refused_with_a_clear_error_and_change_nothing():
    out = scenario(BAD_INPUT, launcher=True)
    errors = out["errors"]
    assert all(e != "accepted" for e in errors.values()), errors
    assert "cannot be negative" in errors["negative"] and "invalid size" in errors["unparseable"]
    assert "does not exist" in errors["unknown interpreter"]
    assert errors["no heaps"] == "ValueError: interpreter 10000 has no heaps (it does not exist)"
    assert errors["ended"].endswith("has ended")
    assert "already ended" in errors["ended, public"]
    assert out["after_bad"] == 64 * MB


@per_interpreter
@pytest.mark.skipif(sys.version_info < (3, 14), reason="InterpreterPoolExecutor is new in 3.14")
def test_each_pool_worker_gets_its_own_default_limit(tmp_path):
    from test_limits import POOL_MAIN, POOL_TASKS, check_pool_workers

    (tmp_path / "pool_tasks.py").write_text(POOL_TASKS)
    main = POOL_MAIN.replace("s = interheap.stats()", "s = interheap.allocator_stats()").replace(
        'if e.kind == "interpreter" and e.id != 0', "if e.id != 0"
    )
    (tmp_path / "main.py").write_text(main)
    check_pool_workers(run_python([str(tmp_path / "main.py")], launcher=True))
