"""``python -m interheap run`` and ``report``: behaves like ``python``, reports at exit."""

from __future__ import annotations

import json
import os
import textwrap

from conftest import FREE_THREADED, ROOT, run_python

EXAMPLE = ROOT / "examples" / "parallel_interpreters.py"


def cli(*args: str, **kwargs):
    return run_python(["-m", "interheap", *args], **kwargs)


def test_help_documents_run():
    proc = cli("run", "--help")
    assert proc.returncode == 0
    for word in ("--json", "SCRIPT", "-m MODULE", "-c CODE", "exit status", "per interpreter"):
        assert word in proc.stdout
    top = cli("--help")
    assert top.returncode == 0 and "run" in top.stdout and "report" in top.stdout


def test_bad_arguments_get_a_clear_error_and_exit_2(tmp_path):
    cases = {
        (): "nothing to run",
        ("--bogus", "x.py"): "unknown option '--bogus'",
        ("--json",): "--json needs a FILE",
        ("-m",): "-m needs a MODULE",
        ("-c",): "-c needs a CODE",
        (str(tmp_path / "missing.py"),): "can't open file",
        ("--json", str(tmp_path / "no" / "dir.json"), "-c", "pass"): "does not exist",
        ("--json", str(tmp_path), "-c", "pass"): "is a directory",
    }
    for args, message in cases.items():
        proc = cli("run", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "usage:" in proc.stderr
        assert "Traceback" not in proc.stderr
    unknown = cli("frobnicate")
    assert unknown.returncode == 2 and "unknown command" in unknown.stderr


def test_exit_status_passes_through():
    assert cli("run", "--no-report", "-c", "raise SystemExit(7)").returncode == 7
    assert cli("run", "--no-report", "-c", "import sys; sys.exit('bye')").returncode == 1
    crashed = cli("run", "--no-report", "-c", "1/0")
    assert crashed.returncode == 1
    assert "ZeroDivisionError" in crashed.stderr and "Traceback" in crashed.stderr
    assert cli("run", "--no-report", "-c", "pass").returncode == 0


def test_script_gets_argv_path_and_main_like_python(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys
            print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "name": __name__,
                              "file": __file__}))
            """
        )
    )
    proc = cli("run", "--no-report", str(script), "a", "--json", "-m", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["argv"] == [str(script), "a", "--json", "-m"]
    assert seen["path0"] == str(tmp_path)
    assert seen["name"] == "__main__"
    assert seen["file"] == str(script)


def test_module_and_code_modes(tmp_path):
    (tmp_path / "mymod.py").write_text("import sys\nprint('module', __name__, sys.argv[1:])\n")
    proc = cli("run", "--no-report", "-m", "mymod", "x", "-y", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "module __main__ ['x', '-y']"
    missing = cli("run", "--no-report", "-m", "no_such_module_xyz", cwd=tmp_path)
    assert missing.returncode == 1 and "No module named" in missing.stderr
    code = cli("run", "--no-report", "-c", "import sys; print(__name__, sys.argv)", "q")
    assert code.stdout.strip() == "__main__ ['-c', 'q']"


def test_report_after_program_and_its_threads(tmp_path):
    # The report comes after non-daemon threads and the program's own atexit
    # handlers, so memory they allocate is in it.
    code = textwrap.dedent(
        """
        import atexit, threading
        def late(): print("program atexit", flush=True)
        atexit.register(late)
        keep = []
        t = threading.Thread(target=lambda: keep.append(bytearray(3_000_000)))
        t.start()
        print("main done", flush=True)
        """
    )
    out = tmp_path / "out.json"
    proc = cli("run", "--json", str(out), "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["main done", "program atexit"]
    assert "interheap: memory by interpreter and domain" in proc.stderr
    data = json.loads(out.read_text())
    main = next(i for i in data["interpreters"] if i["id"] == 0)
    live = sum(d["live_bytes"] for d in main["domains"].values())
    assert live >= 3_000_000


def test_json_to_stdout_and_report_command(tmp_path):
    proc = cli("run", "--no-report", "--json", "-", "-c", "x = [bytes(5000) for _ in range(100)]")
    assert proc.returncode == 0
    data = json.loads(proc.stdout)
    assert data["installed"] is True and data["free_threaded"] is FREE_THREADED
    saved = tmp_path / "saved.json"
    saved.write_text(proc.stdout)
    shown = cli("report", str(saved))
    assert shown.returncode == 0 and "main (0)" in shown.stdout
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    bad = cli("report", str(broken))
    assert bad.returncode == 2 and "cannot read" in bad.stderr


def test_example_under_run_reports_five_interpreters_matching_workloads(tmp_path):
    out = tmp_path / "demo.json"
    proc = cli("run", "--json", str(out), str(EXAMPLE), "--scale", "0.2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    # Same shape as interheap.stats().to_dict().
    import interheap

    assert set(data) == set(interheap.stats().to_dict())
    interps = [i for i in data["interpreters"] if i["kind"] == "interpreter"]
    assert len(interps) == 5
    assert [i["alive"] for i in interps] == [True, False, False, False, False]
    # Each subinterpreter's peak (summed over domains) reflects its workload.
    # keeper keeps ~10 MB at scale 0.2, bytes ~6 MB, dicts ~4 MB; churn peaks small.
    peaks = {i["id"]: sum(d["peak_bytes"] for d in i["domains"].values()) for i in interps}
    ordered = sorted(peaks[i] for i in peaks if i != 0)
    assert ordered[-1] >= 9_000_000  # the keeper
    assert "interp 1" in proc.stderr and "destroyed" in proc.stderr


def test_run_under_environment_python_flags():
    # -X options of the hosting python still apply (here: tracemalloc under us).
    proc = run_python(
        [
            "-X",
            "tracemalloc=1",
            "-m",
            "interheap",
            "run",
            "--no-report",
            "-c",
            "import tracemalloc, interheap; print(tracemalloc.is_tracing(), interheap.on_top())",
        ],
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True {'raw': True, 'mem': True, 'object': True}"
    assert os.path.exists(EXAMPLE)
