"""interheap: see and control memory per interpreter and per allocator domain.

Run-time hooks (PEP 445 wrappers, option 6 of the "custom allocators and the
GIL" discussion) stack over whatever allocator CPython uses and count every
block, exactly, per interpreter and per domain (raw, mem, object). They are
thread-safe with per-interpreter GILs and on free-threaded builds.

    import interheap
    with interheap.hooks() as h:
        run_workload()
    print(h.stats)              # the figures when the block ended

or ``python -m interheap run script.py`` to run a program under the hooks and
print a report at exit.

The package loads in the main interpreter only (it is a PyO3 module); the
hooks it installs count allocations of every interpreter.
"""

from __future__ import annotations

import importlib
import sys

# (sysconfig only where it can matter: it costs a few milliseconds at start-up.)
if sys.version_info < (3, 14) and __import__("sysconfig").get_config_var("Py_GIL_DISABLED"):
    _version = "{}.{}".format(*sys.version_info[:2])
    raise ImportError(
        f"interheap does not support free-threaded CPython {_version}t: it was experimental, and PyO3 0.29+ "
        "refuses it. Use free-threaded CPython 3.14 (3.14t) or later, or a default build."
    )

from . import _native

# typing's own TYPE_CHECKING, without importing typing at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._stats import Snapshot

# The public names that live in submodules, loaded on first use (PEP 562): a
# program run under `python -m interheap run` pays for the native module and
# the command line, not for dataclasses, typing, ctypes and the report code
# (several MiB of peak RSS on a small program: bench/pyperformance_hooks.py).
_LAZY = {
    "adapters": "adapters",
    "AdapterStats": "_stats",
    "AllocatorStats": "_allocator",
    "HeapStats": "_allocator",
    "InterpreterHeaps": "_allocator",
    "allocator_domains": "_allocator",
    "allocator_installed": "_allocator",
    "allocator_stats": "_allocator",
    "parse_report": "_allocator",
    "raw_swap_guard": "_allocator",
    "CheckReport": "_check",
    "Finding": "_check",
    "check_enabled": "_check",
    "check_report": "_check",
    "get_default_limit": "_limits",
    "get_limit": "_limits",
    "parse_size": "_limits",
    "remove_limit": "_limits",
    "set_default_limit": "_limits",
    "set_limit": "_limits",
    "human_bytes": "_report",
    "Frame": "_sites",
    "SitesSnapshot": "_sites",
    "SiteStatistic": "_sites",
    "reset_sites": "_sites",
    "sites_snapshot": "_sites",
    "start_sites": "_sites",
    "stop_sites": "_sites",
    "DOMAINS": "_stats",
    "DomainStats": "_stats",
    "InterpreterStats": "_stats",
    "Snapshot": "_stats",
    "build_snapshot": "_stats",
    "Timeline": "_timeline",
    "TimelinePoint": "_timeline",
    "start_timeline": "_timeline",
    "stop_timeline": "_timeline",
    "timeline": "_timeline",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'interheap' has no attribute {name!r}")
    module = importlib.import_module(f".{module_name}", __name__)
    value = module if name == module_name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "DOMAINS",
    "AdapterStats",
    "AllocatorStats",
    "CheckReport",
    "DomainStats",
    "Finding",
    "Frame",
    "HeapStats",
    "Hooks",
    "InterpreterHeaps",
    "InterpreterStats",
    "SiteStatistic",
    "SitesSnapshot",
    "Snapshot",
    "Timeline",
    "TimelinePoint",
    "adapters",
    "allocator_domains",
    "allocator_installed",
    "allocator_stats",
    "check_enabled",
    "check_report",
    "figures_source",
    "get_default_limit",
    "get_limit",
    "heap_figures_available",
    "hooks",
    "human_bytes",
    "install",
    "is_installed",
    "on_top",
    "parse_report",
    "parse_size",
    "raw_swap_guard",
    "remove_limit",
    "reset_sites",
    "set_default_limit",
    "set_limit",
    "sites_snapshot",
    "start_sites",
    "start_timeline",
    "stats",
    "stop_sites",
    "stop_timeline",
    "timeline",
    "uninstall",
]

__version__ = "0.1.0"


def install(*, check: bool = False, figures: str = "hooks") -> None:
    """Start counting every interpreter's memory, per domain.

    ``figures`` says how:

    * ``"hooks"`` (the default): wrap the raw, mem and object allocators and
      count from zero. The hooks forward every call to the allocators
      installed before them (pymalloc, mimalloc, tracemalloc, ...). Call it
      while no other thread is allocating, ideally at start-up.
    * ``"heaps"``: install no hook; read the figures from the interheap
      allocator's heaps, which count the same things (bytes asked for, per
      interpreter and domain, exact peaks) at no cost per call, since the
      process started. Needs ``interheap-python`` serving every domain with
      requested sizes kept (on by default for ``interheap-python -m
      interheap``; ``INTERHEAP_REQUESTED_SIZES=1`` otherwise), so not
      free-threaded builds. Sampled allocation sites and the checker need
      the hooks; limits are the allocator's (see :func:`set_limit`).
      RuntimeError, saying why, where it cannot be done.
    * ``"auto"``: ``"heaps"`` where it can be done, else ``"hooks"``
      (``python -m interheap run`` without ``--sites``, ``--limit`` or
      ``check``).

    Raises RuntimeError if interheap is already counting.

    With ``check=True`` the hooks also look for misuse (cross-interpreter
    frees, domain mismatches, calls without a thread state, double frees,
    foreign pointers): see :func:`check_report` and ``python -m interheap
    check``. Without it they carry no checking code at all.
    """
    # Everything the API may run later, loaded before anything is counted: a
    # first use after install() would otherwise show interheap's own import
    # in the figures (and in tracemalloc's, and among sampled sites).
    for module_name in sorted(set(_LAZY.values())):
        importlib.import_module(f".{module_name}", __name__)
    _install(check, figures)


def _install(check: bool, figures: str) -> None:
    """install() without loading the package's submodules first: ``python -m
    interheap run`` loads just what its options use, then calls this."""
    if figures not in ("hooks", "heaps", "auto"):
        raise ValueError(f"figures must be 'hooks', 'heaps' or 'auto', not {figures!r}")
    if figures == "auto":
        figures = "heaps" if not check and heap_figures_available() else "hooks"
    _native.install(check, figures == "heaps")


def heap_figures_available() -> bool:
    """Whether :func:`install` can read the figures from the interheap
    allocator's heaps here (``figures="heaps"``)."""
    return bool(_native.heap_figures_available())


def uninstall() -> None:
    """Stop counting: remove the hooks and restore the allocators they wrapped
    (or stop reading the heaps).

    Raises RuntimeError, and changes nothing, if the hooks are not installed or
    if something was installed on top of them since (tracemalloc, say): stop
    that first. The figures stay readable with :func:`stats`.
    """
    _native.uninstall()


def is_installed() -> bool:
    """Whether interheap is counting: its hooks are installed (possibly under
    something else), or it reads the allocator's heaps."""
    return figures_source() is not None


def figures_source() -> str | None:
    """Where :func:`stats` reads the figures: ``"hooks"``, ``"heaps"`` (see
    :func:`install`), or None when interheap is not counting."""
    return _native.figures_source()


def on_top() -> dict[str, bool]:
    """Per domain: whether interheap's hook is the first allocator called."""
    return dict(_native.on_top())


def stats() -> Snapshot:
    """A snapshot of every interpreter's figures, per domain.

    Interpreters that have been destroyed stay in it with what they left
    allocated. Raw calls made without a thread state appear as the entry with
    ``kind == "none"``. ``adapters`` lists the adapters installed with
    :mod:`interheap.adapters` and their figures (calls, lock acquisitions,
    contended acquisitions, mode).
    """
    return _present(_read_figures())


def _read_figures() -> tuple[Any, str | None]:
    """The native figures and their source, as they are now."""
    return _native.snapshot(), figures_source()


def _present(read: tuple[Any, str | None]) -> Snapshot:
    """The Snapshot of figures read before: the first import of the code that
    presents them (the package loads _stats lazily) must not show in them."""
    from ._stats import build_snapshot

    figures, source = read
    return build_snapshot(figures, installed=source is not None, source=source)


def current_interpreter_id() -> int | None:
    """The interpreter ID the hooks attribute the calling thread's blocks to."""
    return _native.current_interpreter_id()


class Hooks:
    """Context manager: installs the hooks on entry, removes them on exit.

    After the block, :attr:`stats` holds the figures as they were at exit.
    """

    def __init__(self) -> None:
        self.stats: Snapshot | None = None

    def __enter__(self) -> Hooks:
        install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stats = stats()
        uninstall()


def hooks() -> Hooks:
    """``with interheap.hooks() as h: ...``: see :class:`Hooks`."""
    return Hooks()
