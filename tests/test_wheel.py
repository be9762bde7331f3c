"""The wheel: built by maturin for the interpreter running the tests, installed
with pip into a fresh venv outside the repository, it gives a working
``python -m interheap``, ``interheap`` and ``interheap-python``.

The release build is cached: CARGO_TARGET_DIR is
``${INTERHEAP_CACHE:-~/.cache/interheap}/target/<tag>``, the directory in which
scripts/setup.sh's ``maturin develop`` built the same crates for the same
interpreter, so after setup the wheel costs a few seconds
(``INTERHEAP_WHEEL_TARGET_DIR`` replaces ``.../target``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
from c_build import EMBED_RUSTFLAGS
from conftest import FREE_THREADED, ROOT

EXAMPLE = ROOT / "examples" / "parallel_interpreters.py"
EXPECTED_DOMAINS = ["raw"] if FREE_THREADED else ["raw", "mem", "object"]
TAG = f"{sys.version_info[0]}.{sys.version_info[1]}{'t' if FREE_THREADED else ''}"
CACHE = Path(os.environ.get("INTERHEAP_CACHE") or Path.home() / ".cache" / "interheap")
TARGET_DIR = Path(os.environ.get("INTERHEAP_WHEEL_TARGET_DIR") or CACHE / "target") / TAG
# What would point a child at the repository, the test venv or a libpython.
FOREIGN_ENV = {"PYTHONPATH", "PYTHONHOME", "PYTHONMALLOC", "VIRTUAL_ENV", "LD_LIBRARY_PATH"}
BUILT_BINARY = "frontends/python/wheel-data/scripts/interheap-python-bin"


def clean_env() -> dict[str, str]:
    """The caller's environment without FOREIGN_ENV (the venv must stand alone)."""
    return {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}


def run(args: list[str | Path], *, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", clean_env())
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Builds the wheel for this interpreter with maturin, as a user would."""
    out = tmp_path_factory.mktemp("wheel")
    env = clean_env()
    env.pop("CARGO_TARGET_DIR", None)  # scripts/test.sh exports one for clippy
    env["PYO3_PYTHON"] = sys.executable
    # The linker flags scripts/setup.sh built with (only an interpreter on its
    # own glibc needs any): the launcher links libpython, and the cache matches.
    env["RUSTFLAGS"] = EMBED_RUSTFLAGS
    maturin = [sys.executable, "-m", "maturin", "build", "--release", "--quiet", "-i", sys.executable]
    # One build at a time across processes (make test runs two interpreters'
    # suites at once): build.rs puts this interpreter's launcher in the one
    # wheel-data/scripts/ that maturin packs.
    # (Not in wheel-data/ itself: maturin refuses anything there but its dirs.)
    with open(ROOT / "frontends" / "python" / ".wheel-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = run(
            [*maturin, "--out", out],
            cwd=ROOT / "frontends" / "python",
            env={**env, "CARGO_TARGET_DIR": str(TARGET_DIR)},
            timeout=1800,
        )
    assert proc.returncode == 0, f"maturin build failed\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    wheels = list(out.glob("interheap-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def make_venv(path: Path, wheel: Path) -> Path:
    """A fresh venv at ``path`` with only the wheel installed (no index)."""
    proc = run([sys.executable, "-m", "venv", path], timeout=120)
    assert proc.returncode == 0, proc.stderr
    pip = [path / "bin" / "python", "-m", "pip", "--disable-pip-version-check"]
    proc = run([*pip, "install", "--no-index", "-q", wheel])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    path = make_venv(tmp_path_factory.mktemp("venv") / "env", wheel)
    assert ROOT not in path.parents, "the venv must be outside the repository"
    return path


def test_wheel_carries_the_launcher(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    scripts = sorted(n.split("/", 2)[2] for n in names if ".data/scripts/" in n)
    assert scripts == ["interheap-python", "interheap-python-bin"]
    assert any(n.startswith("interheap/_native.") for n in names)
    # The in-interpreter module (its native part is a second module in _native).
    assert "interheap_interp/__init__.py" in names, names
    # The HTML report's charting library, inlined into every report.
    assert "interheap/_vendor/chart.min.js" in names, names


def test_the_installed_wheel_writes_the_html_report(venv, tmp_path):
    out = tmp_path / "report.html"
    proc = run(
        [venv / "bin" / "python", "-m", "interheap", "run", "--no-report", "--sites", "--timeline",
         "--html", out, "-c", "keep = [bytearray(1000) for _ in range(20_000)]"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "Chart.js v3.9.1" in text and '"flame"' in text and "main (0)" in text


def test_the_in_interpreter_module_imports_in_an_isolated_interpreter(venv, tmp_path):
    code = textwrap.dedent(
        """
        import interheap
        from concurrent import interpreters
        interheap.install()
        worker = interpreters.create()
        interheap.set_limit(worker, "64 MB")
        worker.exec("import interheap_interp as ii; ii.lower_limit('32 MB'); print(ii.limit())")
        print(interheap.get_limit(worker))
        """
    )
    if sys.version_info < (3, 14):
        pytest.skip("concurrent.interpreters is new in 3.14")
    proc = run([venv / "bin" / "python", "-c", code], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["32000000", "32000000"], proc.stdout


def test_scripts_are_installed(venv):
    for name in ("interheap", "interheap-python", "interheap-python-bin"):
        path = venv / "bin" / name
        assert path.is_file() and os.access(path, os.X_OK), f"{path} is missing or not executable"
    # pip rewrote the wrapper's "#!python" to this venv's interpreter.
    first = (venv / "bin" / "interheap-python").read_text().splitlines()[0]
    assert first.startswith(f"#!{venv}/bin/python"), first


def test_python_m_interheap_runs_the_demo_from_the_venv(venv, tmp_path):
    py = venv / "bin" / "python"
    where = run([py, "-c", "import interheap; print(interheap.__file__)"], cwd=tmp_path)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    out = tmp_path / "demo.json"
    proc = run([py, "-m", "interheap", "run", "--json", out, EXAMPLE, "--scale", "0.2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "keeper" in proc.stdout  # the example's own table
    assert "interheap: memory by interpreter" in proc.stderr and "interp 4" in proc.stderr
    interps = [i for i in json.loads(out.read_text())["interpreters"] if i["kind"] == "interpreter"]
    assert [i["alive"] for i in interps] == [True, False, False, False, False]
    # The console script on PATH is the same CLI.
    cli = run([venv / "bin" / "interheap", "run", "--no-report", "-c", "print('ok')"], cwd=tmp_path)
    assert (cli.returncode, cli.stdout.strip()) == (0, "ok"), cli.stderr


PROBE = textwrap.dedent("""
    import json, subprocess, sys, interheap
    code = "import interheap, json; print(json.dumps(list(interheap.allocator_domains())))"
    # env={}: the child must not depend on anything its parent's environment holds.
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={})
    print(json.dumps({"version": sys.version, "executable": sys.executable, "prefix": sys.prefix,
                      "module": interheap.__file__, "domains": list(interheap.allocator_domains()),
                      "child": child.stdout.strip(), "child_err": child.stderr[-2000:]}))
""")


def probe(launcher: Path, cwd: Path) -> dict:
    proc = run([launcher, "-c", PROBE], cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def check_launcher(venv: Path, launcher: Path, cwd: Path) -> None:
    got = probe(launcher, cwd)
    plain = run([venv / "bin" / "python", "-c", "import sys; print(sys.version)"])
    assert got["version"] == plain.stdout.strip(), "the launcher runs this venv's CPython"
    assert got["executable"] == str(launcher)
    assert got["prefix"] == str(venv), "the launcher finds the venv beside it"
    assert got["module"].startswith(str(venv))
    assert got["domains"] == EXPECTED_DOMAINS
    assert got["child"] == json.dumps(EXPECTED_DOMAINS), got["child_err"]


def test_interheap_python_has_the_allocator_and_so_do_its_subprocesses(venv, tmp_path):
    check_launcher(venv, venv / "bin" / "interheap-python", tmp_path)
    proc = run([venv / "bin" / "interheap-python", "-c", "raise SystemExit(7)"])
    assert proc.returncode == 7
    proc = run([venv / "bin" / "interheap-python", "-I", "-c", "import sys; print(sys.flags.isolated)"])
    assert proc.stdout.strip() == "1"


def test_launcher_finds_libpython_when_its_rpath_does_not(wheel, venv, tmp_path):
    """A wheel installed for an interpreter at another path than the one it was
    built with: the binary's rpath leads nowhere, the wrapper's
    LD_LIBRARY_PATH finds this interpreter's libpython."""
    libdir = sysconfig.get_config_var("LIBDIR").encode()
    other = make_venv(tmp_path / "moved", wheel)
    binary = other / "bin" / "interheap-python-bin"
    data = binary.read_bytes()
    assert data.count(libdir + b"\0") == 1, "the rpath names the build interpreter's LIBDIR once"
    # Same length, so the ELF layout stays as it is.
    binary.write_bytes(data.replace(libdir + b"\0", b"/" + b"x" * (len(libdir) - 1) + b"\0"))
    direct = run([binary, "-c", "pass"])
    if direct.returncode == 0:
        pytest.skip(f"libpython is found without the rpath (a system directory); nothing to show: {libdir}")
    assert "libpython" in direct.stderr, direct.stderr
    check_launcher(other, other / "bin" / "interheap-python", tmp_path)


def test_regrtest_under_interheap_python(venv, tmp_path):
    py = venv / "bin" / "python"
    if run([py, "-c", "import test.libregrtest"]).returncode != 0:
        pytest.skip(f"{sys.executable} has no test package (CPython's regression tests)")
    proc = run([venv / "bin" / "interheap-python", "-m", "test", "test_dict"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Result: SUCCESS" in proc.stdout or "Tests result: SUCCESS" in proc.stdout, proc.stdout[-2000:]


def test_built_launcher_is_ignored_by_git():
    """build.rs writes the binary into the source tree; git must ignore it."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    proc = run(["git", "-C", ROOT, "check-ignore", "-q", BUILT_BINARY])
    assert proc.returncode == 0, f"{BUILT_BINARY} is not ignored by git"
