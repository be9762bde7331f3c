"""interheap-python behaves like python, with the interheap allocator installed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import FREE_THREADED, LAUNCHER, ROOT, run_python

EXPECTED_DOMAINS = ["raw"] if FREE_THREADED else ["raw", "mem", "object"]


def launch(*args: str, **kw):
    return run_python(list(args), launcher=True, **kw)


def test_launcher_is_installed_beside_python():
    assert LAUNCHER.is_file(), f"{LAUNCHER} is missing: scripts/setup.sh installs it"


def test_same_interpreter_and_allocator_installed():
    code = (
        "import sys, json, interheap; print(json.dumps([sys.version, sys.executable, sys.prefix, "
        "list(interheap.allocator_domains())]))"
    )
    ours = json.loads(launch("-c", code).stdout)
    plain = json.loads(run_python(["-c", code]).stdout)
    assert ours[0] == plain[0], "same CPython"
    assert ours[1] == str(LAUNCHER), "sys.executable is the launcher, so subprocesses run on it"
    assert ours[2] == plain[2], "same venv (sys.prefix)"
    assert ours[3] == EXPECTED_DOMAINS
    assert plain[3] == [], "plain python does not have the allocator"


def test_command_line_forms_and_exit_codes(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text("import sys\nprint(sys.argv)\nsys.exit(int(sys.argv[1]))\n")
    proc = launch(str(script), "7", "x")
    assert proc.returncode == 7
    assert proc.stdout.strip() == repr([str(script), "7", "x"])

    proc = launch("-c", "import sys; print(sys.argv); raise SystemExit(4)", "a")
    assert (proc.returncode, proc.stdout.strip()) == (4, "['-c', 'a']")

    proc = launch("-m", "json.tool", input='{"b": 1}')
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"b": 1}

    proc = launch("-", "arg", input="import sys; print(sys.argv)")
    assert proc.stdout.strip() == "['-', 'arg']"

    proc = launch("-c", "raise ValueError('boom')")
    assert proc.returncode == 1 and "ValueError: boom" in proc.stderr

    proc = launch("-c", "def (")
    assert proc.returncode == 1 and "SyntaxError" in proc.stderr

    proc = launch("--definitely-not-an-option")
    assert proc.returncode == 2 and "unknown option" in proc.stderr.lower()

    proc = launch("-I", "-X", "dev", "-c", "import sys; print(sys.flags.isolated, sys.flags.dev_mode)")
    assert proc.stdout.split() == ["1", "True"]

    proc = launch("-V")
    assert proc.stdout.strip() == f"Python {sys.version.split()[0]}"


def test_subprocesses_run_on_the_launcher(tmp_path):
    script = tmp_path / "spawn.py"
    script.write_text("""
import subprocess, sys, multiprocessing as mp
child = subprocess.run([sys.executable, "-c", "import interheap; print(interheap.allocator_installed())"],
                       capture_output=True, text=True)
def probe(_):
    import interheap
    return interheap.allocator_installed()
if __name__ == "__main__":
    with mp.get_context("spawn").Pool(2) as pool:
        workers = pool.map(probe, range(2))
    print(child.stdout.strip(), workers)
""")
    proc = launch(str(script), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True [True, True]"


def test_report_at_exit_to_stderr_and_json(tmp_path):
    proc = launch("-c", "x = [bytes(64) for _ in range(10000)]", env={"INTERHEAP_REPORT": "1"})
    assert proc.returncode == 0
    assert "interheap allocator report" in proc.stderr
    assert "main (0)" in proc.stderr or FREE_THREADED

    path = tmp_path / "report-%p.json"
    proc = launch(
        "-c",
        "import os; print(os.getpid()); x = [bytes(64) for _ in range(10000)]",
        env={"INTERHEAP_REPORT": str(path)},
    )
    written = tmp_path / f"report-{proc.stdout.strip()}.json"
    document = json.loads(written.read_text())
    assert document["installed"] == EXPECTED_DOMAINS
    import interheap

    stats = interheap.parse_report(document)
    if not FREE_THREADED:
        main = stats.interpreter(0)
        assert main.object.allocations >= 10000
        # bytes(64) is a 97-byte object (33-byte header, 64 bytes, NUL): the 112-byte class.
        assert main.object.classes[112][0] >= 10000
    assert stats.shared.allocations > 0


def test_start_up_code_of_the_launcher_is_given_back():
    # frontends/launcher/src/text.rs: once Python runs, the launcher's
    # read-only pages (mostly Rust's std) and libgcc_s's (Rust's unwinder,
    # which python does not load) are unmapped; only what runs comes back.
    code = """
import re
sizes, rss, cur = {}, {}, None
for line in open("/proc/self/smaps"):
    if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
        cur = line.split()
    elif line.startswith("Rss:") and len(cur) > 5 and "libgcc_s" in cur[5] and "w" not in cur[1]:
        lo, hi = (int(x, 16) for x in cur[0].split("-"))
        sizes[cur[0]] = (hi - lo) // 1024
        rss[cur[0]] = int(line.split()[1])
print(sum(sizes.values()), sum(rss.values()))
"""
    mapped, resident = map(int, launch("-c", code).stdout.split())
    assert mapped > 0, "the launcher loads libgcc_s (Rust's unwinder)"
    assert resident <= mapped // 2, f"libgcc_s: {resident} of {mapped} KiB of read-only pages still resident"
    # Still a working process that can fault pages back in: a traceback uses the runtime fully.
    proc = launch("-c", "import json, decimal; print(json.dumps({'d': str(decimal.Decimal(1) / 7)})); 1/0")
    assert proc.returncode == 1 and "ZeroDivisionError" in proc.stderr and '"d": "0.1428' in proc.stdout


def test_invalid_options_are_refused_clearly():
    proc = launch("-c", "pass", env={"INTERHEAP_ALLOCATOR": "raw,heap"})
    assert proc.returncode == 2
    assert 'unknown domain "heap"' in proc.stderr

    show = "import interheap; print(interheap.allocator_domains())"
    proc = launch("-c", show, env={"INTERHEAP_ALLOCATOR": "0"})
    assert proc.stdout.strip() == "()"

    proc = launch(
        "-c", "import interheap; print(interheap.allocator_domains())", env={"INTERHEAP_ALLOCATOR": "raw"}
    )
    assert proc.stdout.strip() == "('raw',)"


@pytest.mark.skipif(not FREE_THREADED, reason="the refusal applies to free-threaded builds only")
def test_free_threaded_build_refuses_mem_and_object():
    proc = launch("-c", "pass", env={"INTERHEAP_ALLOCATOR": "raw,object"})
    assert proc.returncode == 2
    assert "free-threaded build" in proc.stderr and "mimalloc" in proc.stderr


@pytest.mark.skipif(FREE_THREADED, reason="default builds serve every domain")
def test_default_build_serves_mem_and_object_when_asked():
    show = "import interheap; print(interheap.allocator_domains())"
    proc = launch("-c", show, env={"INTERHEAP_ALLOCATOR": "mem,object"})
    assert proc.stdout.strip() == "('mem', 'object')"


def test_pythonmalloc_choices_are_honoured():
    code = "import interheap, sys; print(interheap.allocator_domains())"
    # Free-threaded builds accept only mimalloc (and its debug variant) as PYTHONMALLOC.
    proc = launch("-c", code, env={"PYTHONMALLOC": "mimalloc" if FREE_THREADED else "malloc"})
    assert proc.stdout.strip() == "()", "an explicit PYTHONMALLOC allocator replaces ours"
    # CPython's debug hooks fill new blocks with 0xCD: they sit on top of our allocator.
    probe = (
        "import ctypes, interheap; f = ctypes.pythonapi.PyMem_Malloc; f.restype = ctypes.c_void_p; "
        "p = f(16); print(interheap.allocator_domains(), ctypes.string_at(p, 16).hex())"
    )
    proc = launch("-c", probe, env={"PYTHONMALLOC": "debug"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split(")")[0] + ")" == str(tuple(EXPECTED_DOMAINS))
    assert proc.stdout.strip().endswith("cd" * 16)


# CPython 3.12 swaps the raw domain back to malloc in every interpreter's
# start-up (gh-111924); 3.13 never does.
SWAPS_RAW_AT_START = sys.version_info < (3, 13)


def test_the_raw_swap_guard_is_reported_by_the_launcher_and_the_package():
    code = (
        "import json, interheap; "
        "print(json.dumps([interheap.raw_swap_guard(), interheap.allocator_stats().raw_swap_guard]))"
    )
    expected = "installed" if SWAPS_RAW_AT_START else "not needed"
    assert json.loads(launch("-c", code).stdout) == [expected, expected]

    report = launch("-c", "pass", env={"INTERHEAP_REPORT": "1"}).stderr
    line = "raw-swap guard (CPython 3.12, gh-111924): installed"
    if SWAPS_RAW_AT_START:
        assert line in report
    else:
        assert "raw-swap guard" not in report, "no line where nothing needs guarding"


def test_the_raw_swap_guard_follows_the_hooks_under_plain_python():
    code = (
        "import json, interheap\n"
        "before = interheap.raw_swap_guard()\n"
        "interheap.install()\n"
        "during = interheap.raw_swap_guard()\n"
        "interheap.uninstall()\n"
        "print(json.dumps([before, during, interheap.raw_swap_guard()]))\n"
    )
    states = json.loads(run_python(["-c", code]).stdout)
    if SWAPS_RAW_AT_START:
        # Nothing to guard until the hooks replace the raw domain; the guard
        # then stays (it only ever skips a swap that has nothing left to do).
        assert states == [None, "installed", "installed"]
    else:
        assert states == ["not needed"] * 3


def test_the_wrapper_without_its_binary_says_how_to_get_it(tmp_path):
    # `make demo` installs the package without the launcher binary: the
    # wrapper script must say so, not fail on exec.
    wrapper = tmp_path / "interheap-python"
    wrapper.write_text((ROOT / "frontends/python/wheel-data/scripts/interheap-python").read_text())
    proc = subprocess.run([sys.executable, str(wrapper), "-c", "pass"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "launcher binary is not installed beside this script" in proc.stderr
    assert "make setup" in proc.stderr
