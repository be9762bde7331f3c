"""The live view (``python -m interheap run --live``) in a real terminal: tmux
runs it on its own server, and ``capture-pane`` reads the screen while two
isolated interpreters fill memory in parallel threads."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from conftest import TESTS, child_env, run_python

TMUX = shutil.which("tmux")

WORKLOAD = r"""
import threading
from scenario_support import create, run, destroy

ids = [create("isolated") for _ in range(2)]
CODE = '''
import time
def hold_{n}():
    keep = []
    for _ in range(30):
        keep.append(bytearray({size}))
        time.sleep(0.1)
    return keep
kept = hold_{n}()
'''
threads = [threading.Thread(target=run, args=(i, CODE.format(n=n, size=(n + 1) * 400_000)))
           for n, i in enumerate(ids)]
[t.start() for t in threads]
print("the program's own output", flush=True)
[t.join() for t in threads]
for i in ids:
    destroy(i)
"""


class Tmux:
    """A tmux server of the test's own (-L), so nothing else is touched."""

    def __init__(self, name: str) -> None:
        self.base = [TMUX, "-L", name]

    def __call__(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=30).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "live")


@pytest.mark.skipif(TMUX is None, reason="tmux is installed by scripts/setup.sh")
def test_the_live_view_shows_the_interpreters_and_refreshes(tmp_path):
    script = tmp_path / "workload.py"
    script.write_text(WORKLOAD)
    env = child_env({"TERM": "xterm-256color", "COLUMNS": "160", "LINES": "45"})
    command = " ".join(
        [
            "env",
            *(shlex.quote(f"{k}={env[k]}") for k in ("PYTHONPATH", "PATH", "TERM", "COLUMNS", "LINES")),
            shlex.quote(sys.executable),
            "-m interheap run --live",
            shlex.quote(str(script)),
            "; echo EXIT=$?; sleep 120",
        ]
    )
    tmux = Tmux(f"interheap-live-{os.getpid()}")
    tmux("new-session", "-d", "-s", "live", "-x", "160", "-y", "45", "-c", str(TESTS), command)
    try:
        screens = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.5)
            screen = tmux.screen()
            if "interheap live:" in screen and "EXIT=" not in screen:
                screens.append(screen)
            if "EXIT=" in screen:
                break
        assert screens, f"the view never showed:\n{tmux.screen()}"
        # While both interpreters run, the view lists them with main.
        both = [s for s in screens if len(re.findall(r"interp \d+ \((isolated|own obmalloc)", s)) == 2]
        assert both, screens[-1]
        view = both[-1]
        assert "main (0)" in view and "raw" in view and "object" in view and "limit" in view
        assert "top sites" in view and "(hold_" in view, view
        assert "the program's own output" in view
        # It refreshes: the elapsed time differs between screens.
        times = {m for s in screens for m in re.findall(r"interheap live:\s+([\d.]+) s", s)}
        assert len(times) >= 2, times
        final = tmux.screen()
        assert "EXIT=0" in final, final
        # At exit the usual report follows the view.
        assert "allocation sites (sampled" in final or "memory by interpreter" in final, final
    finally:
        tmux("kill-server")


def test_live_without_rich_is_refused_clearly(tmp_path):
    fake = tmp_path / "rich"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('rich is hidden for this test')\n")
    proc = run_python(
        ["-m", "interheap", "run", "--live", "-c", "print('ran')"],
        env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{TESTS}"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'interheap[live]'" in proc.stderr and "ran" not in proc.stdout


def test_live_with_stdout_redirected_leaves_the_program_output_alone(tmp_path):
    program = "import time; print('to stdout'); time.sleep(1.5)"
    proc = run_python(["-m", "interheap", "run", "--live", "--no-report", "-c", program])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "to stdout\n"
    assert "interheap live:" in proc.stderr and "main" in proc.stderr
