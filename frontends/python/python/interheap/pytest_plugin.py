"""pytest plugin: per-interpreter memory limits on tests.

    @pytest.mark.interheap_limit("24 MB")
    def test_parse_big_file():
        ...

fails the test if any interpreter's live bytes rose more than 24 MB above
where they were when the test started, at any moment of the test. The figure
is exact: interheap's hooks count every block of the raw, mem and object
domains, per interpreter, and the peak of their sum is kept at each
allocation while the test runs. An interpreter the test starts (with
``concurrent.interpreters``, an ``InterpreterPoolExecutor``...) counts from
zero, its start-up included, and is checked on its own. The failure message
names the interpreter, the domain that grew most, the peak and the limit.

The plugin is registered through the ``pytest11`` entry point as
``interheap``: with plugin autoloading on, installing interheap is enough;
with ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``, pass ``-p interheap`` (or add it to
``addopts``). Marked tests are enforced whenever the plugin is loaded. It installs
the hooks when the first marked test runs. The ini option ``interheap = true``
(or ``--interheap``) installs them when the session starts, so that blocks
allocated by earlier tests are known too (a block allocated before the hooks
were installed does not count as freed when it is freed).

``--interheap-check`` installs the checking hooks (``python -m interheap
check``) when the session starts and fails every test during which the
checker found something (a cross-interpreter free, a domain mismatch, a call
without a thread state, a double free, a foreign pointer), with the
findings' kinds, interpreters and Python stacks in the failure message.

Compared with pytest-memray's ``limit_memory`` (active with ``--memray``):
memray intercepts every allocation of the process, native ones included,
with its stack, and fails a test whose high-water mark of memory allocated
during it exceeds the limit, listing the functions that allocated most. It
cannot tell interpreters apart: an isolated subinterpreter's memory is the
process's. This marker counts CPython's raw, mem and object domains per
interpreter, exactly, and checks each interpreter against its own start, so
a test's subinterpreters are limited one by one; it costs the hooks'
overhead only (no stacks), names the domain rather than the line, and does
not see memory that C code takes from ``malloc`` directly.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

import interheap

# _stats now, not on the first interheap.stats(): a test's measured window
# must not count the import (the package loads its submodules lazily).
from . import _native, _stats  # noqa: F401
from ._check import check_report
from ._limits import parse_size
from ._report import human_bytes

MARKER = "interheap_limit"
_INSTALLED_BY_US = pytest.StashKey[bool]()
_CHECKING = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "interheap",
        type="bool",
        default=False,
        help="install interheap's hooks when the session starts (interheap_limit markers work without it)",
    )
    parser.getgroup("interheap").addoption(
        "--interheap",
        action="store_true",
        default=False,
        help="install interheap's hooks when the session starts (same as the ini option interheap = true)",
    )
    parser.getgroup("interheap").addoption(
        "--interheap-check",
        action="store_true",
        default=False,
        help="install interheap's checking hooks when the session starts and fail each test during "
        "which they found a memory bug (cross-interpreter free, domain mismatch, no thread state, "
        "double free, foreign pointer)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(size): fail the test if an interpreter's live bytes (raw + mem + object, counted "
        "exactly by interheap's hooks) rise more than size (bytes, or text such as '24 MB') above "
        "where they were when the test started; interpreters the test starts count from zero",
    )
    if config.getoption("interheap_check"):
        if _native.is_installed() and not _native.check_enabled():
            raise pytest.UsageError(
                "--interheap-check: interheap's hooks are already installed without checking; "
                "they cannot be switched to the checking ones while the process runs"
            )
        if not _native.is_installed():
            interheap.install(check=True)
            config.stash[_INSTALLED_BY_US] = True
        config.stash[_CHECKING] = True
    elif config.getoption("interheap") or config.getini("interheap"):
        _ensure_hooks(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(_INSTALLED_BY_US, False):
        try:
            interheap.uninstall()
        except RuntimeError:
            pass  # another allocator was stacked on top of the hooks: leave them


def _ensure_hooks(config: pytest.Config) -> None:
    if not _native.is_installed():
        interheap.install()
        config.stash[_INSTALLED_BY_US] = True


def _marker_limit(marker: pytest.Mark) -> int:
    if len(marker.args) != 1 or marker.kwargs:
        raise ValueError(f"{MARKER} takes one argument, the limit (bytes, or text such as '24 MB')")
    return parse_size(marker.args[0])


def _finding_counts() -> dict[tuple[str, str, str], int]:
    return {(f.kind, f.where, f.interpreters): f.count for f in check_report().findings}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    if not item.config.stash.get(_CHECKING, False):
        return (yield from _limited_call(item))
    before, undetailed = _finding_counts(), check_report().undetailed
    result = yield from _limited_call(item)
    report = check_report()
    new = [f for f in report.findings if f.count > before.get((f.kind, f.where, f.interpreters), 0)]
    if new or report.undetailed > undetailed:
        text = "\n\n".join(str(f) for f in new)
        more = report.undetailed - undetailed
        if more:
            text += f"\n\n{more} more findings were counted without a stack (rate limit)"
        pytest.fail(f"interheap check: memory bugs found during this test:\n\n{text}", pytrace=False)
    return result


def _limited_call(item: pytest.Item) -> Generator[None, Any, Any]:
    """The test call under its ``interheap_limit`` marker, if it has one."""
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return (yield)
    try:
        limit, problem = _marker_limit(marker), None
    except (TypeError, ValueError) as exc:
        limit, problem = 0, str(exc)
    if problem is not None:
        pytest.fail(f"bad @pytest.mark.{MARKER}: {problem}", pytrace=False)
    _ensure_hooks(item.config)
    before = {e.id: e for e in interheap.stats().interpreters if e.kind == "interpreter"}
    _native.watch_peaks(True)
    try:
        result = yield
    finally:
        after = interheap.stats()
        _native.watch_peaks(False)
    over = []
    for e in after.interpreters:
        if e.kind != "interpreter":
            continue
        start = before.get(e.id)
        start_bytes = start.live_bytes if start is not None and start.alive is not False else 0
        grown = e.total_peak - start_bytes
        if grown > limit:
            over.append(_describe(e, start, grown, limit))
    if over:
        given = marker.args[0]
        shown = human_bytes(limit) if isinstance(given, int) else f"{given!r} = {human_bytes(limit)}"
        pytest.fail(f"{MARKER}({shown}) exceeded:\n" + "\n".join(over), pytrace=False)
    return result


def _describe(e: Any, start: Any, grown: int, limit: int) -> str:
    """One line per interpreter over its limit: who, by how much, and where."""
    growth = {
        name: d.peak_bytes - (start.domains[name].live_bytes if start is not None else 0)
        for name, d in e.domains.items()
    }
    domain = max(growth, key=lambda name: growth[name])
    origin = "started by the test" if start is None else "running before the test"
    now = "ended since" if e.alive is False else "still alive"
    return (
        f"  {e.label}, {origin}: peak {human_bytes(grown)} above its start, "
        f"{human_bytes(grown - limit)} over the limit; most of it in the {domain} domain "
        f"(its peak rose {human_bytes(growth[domain])}); {now}"
    )
