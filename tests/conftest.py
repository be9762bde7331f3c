"""Shared fixtures: run scenarios in a fresh child interpreter.

Hooks are process-wide, so every scenario that installs them runs in its own
child process, with a timeout that turns a deadlock into a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
# The interheap-python launcher that scripts/setup.sh installs beside the venv's python.
LAUNCHER = Path(sys.executable).with_name("interheap-python")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env.pop("PYTHONMALLOC", None)
    env.update(extra or {})  # a test may set PYTHONMALLOC itself
    return env


def run_python(
    args: list[str],
    *,
    timeout: float = 180,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    input: str | None = None,
    launcher: bool = False,
) -> subprocess.CompletedProcess:
    """Runs the venv's python (or, with ``launcher``, interheap-python) with ``args``."""
    return subprocess.run(
        [str(LAUNCHER) if launcher else sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(env),
        cwd=cwd,
        input=input,
    )


def scenario(
    code: str, *, timeout: float = 180, env: dict[str, str] | None = None, launcher: bool = False
) -> dict:
    """Runs ``code`` in a child (under interheap-python with ``launcher``);
    returns the dict it passed to ``result(...)``."""
    proc = run_python(["-c", textwrap.dedent(code)], timeout=timeout, env=env, launcher=launcher)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT:")]
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"scenario failed (exit {proc.returncode})\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1][len("RESULT:") :])


@pytest.fixture
def run_scenario():
    return scenario
