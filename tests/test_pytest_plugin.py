"""The pytest plugin: @pytest.mark.interheap_limit fails a test whose
interpreters' live bytes rise above the limit, exactly, per interpreter; it is
found through the pytest11 entry point; bad markers get a clear error."""

from __future__ import annotations

import sys

import pytest

pytest_plugins = ["pytester"]

MB = 1000 * 1000

TESTS = """
import pytest

@pytest.mark.interheap_limit("24 MB")
def test_thirty_mb():
    data = bytearray(30 * 1000 * 1000)
    del data

@pytest.mark.interheap_limit("24 MB")
def test_twenty_mb():
    data = bytearray(20 * 1000 * 1000)
    del data

@pytest.mark.interheap_limit("24 MB")
def test_thirty_mb_in_small_pieces_freed_as_it_goes():
    # Never more than ~1 MB live at once: the peak is what counts, not the total.
    for _ in range(30):
        data = [bytes(1000) for _ in range(1000)]
        del data

@pytest.mark.interheap_limit("24 MB")
def test_peak_reached_then_freed():
    keep = [bytearray(10**6) for _ in range(26)]
    keep.clear()
    small = bytearray(10**6)
"""


def run(pytester: pytest.Pytester, *args: str, **env: str) -> pytest.RunResult:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=300)


def test_a_test_over_its_limit_fails_with_a_readable_message_and_one_under_passes(pytester):
    pytester.makepyfile(TESTS)
    result = run(pytester, "-v")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 2 and outcomes.get("failed") == 2, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*::test_thirty_mb FAILED*",
            "*::test_twenty_mb PASSED*",
            "*::test_thirty_mb_in_small_pieces_freed_as_it_goes PASSED*",
            "*::test_peak_reached_then_freed FAILED*",
        ]
    )
    text = result.stdout.str()
    # The message names the interpreter, the domain, the peak and the limit.
    assert "interheap_limit('24 MB' = 22.9 MiB) exceeded:" in text, text
    assert "main (0), running before the test: peak 28.6 MiB above its start, 5.7 MiB over the limit" in text
    # bytearray's buffer comes from PyObject_Malloc on 3.12, PyMem_Malloc on
    # 3.13 and 3.14; 3.15 keeps it in a bytes object.
    domain = "mem" if (3, 13) <= sys.version_info < (3, 15) else "object"
    assert f"most of it in the {domain} domain (its peak rose 28.6 MiB); still alive" in text, text
    # The second failure is about a peak that was freed before the test ended.
    assert "peak 24.8 MiB above its start" in text, text


SUBINTERPRETER_TESTS = """
import pytest
from scenario_support import create, run, destroy

@pytest.mark.interheap_limit("24 MB")
def test_a_subinterpreter_over_the_limit():
    iid = create("isolated")
    try:
        run(iid, "data = bytearray(30 * 1000 * 1000); del data")
    finally:
        destroy(iid)

@pytest.mark.interheap_limit("24 MB")
def test_four_subinterpreters_each_under_the_limit():
    # 4 x 15 MB = 60 MB in all, but each interpreter stays under 24 MB.
    ids = [create("isolated") for _ in range(4)]
    try:
        for iid in ids:
            run(iid, "keep = bytearray(15 * 1000 * 1000)")
    finally:
        for iid in ids:
            destroy(iid)
"""


def test_each_interpreter_the_test_starts_is_checked_on_its_own(pytester):
    from conftest import ROOT

    pytester.makepyfile(SUBINTERPRETER_TESTS)
    result = run(pytester, "-v", PYTHONPATH=str(ROOT / "tests"))
    result.stdout.fnmatch_lines(
        [
            "*::test_a_subinterpreter_over_the_limit FAILED*",
            "*::test_four_subinterpreters_each_under_the_limit PASSED*",
        ]
    )
    text = result.stdout.str()
    message = text.split("exceeded:")[1].splitlines()[1]
    # 30 MB and the interpreter's start-up: 30.5 MiB on 3.14.
    assert ", started by the test: peak 3" in message and "; ended since" in message, message
    assert "main (0)" not in text, text


def test_a_bad_marker_fails_its_test_with_a_clear_error(pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.interheap_limit("lots")
        def test_unparseable():
            pass

        @pytest.mark.interheap_limit()
        def test_no_size():
            pass

        @pytest.mark.interheap_limit(-5)
        def test_negative():
            pass
        """
    )
    result = run(pytester)
    assert result.parseoutcomes().get("failed") == 3
    text = result.stdout.str()
    assert 'bad @pytest.mark.interheap_limit: invalid size "lots"' in text, text
    assert "During handling" not in text, text
    assert "takes one argument" in text and "cannot be negative" in text, text


def test_the_plugin_loads_by_name_and_the_ini_option_installs_the_hooks_for_the_session(pytester):
    pytester.makepyfile(
        """
        import interheap

        def test_hooks_installed():
            assert interheap.is_installed()
        """
    )
    pytester.makeini("[pytest]\ninterheap = true\n")
    # Without autoloading, the marker and the ini option exist only with -p interheap.
    result = run(pytester, "-p", "interheap", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.ret == 0, result.stdout.str()
    result = run(pytester, "--strict-config", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.ret != 0
    assert "interheap" in result.stdout.str() + result.stderr.str()
