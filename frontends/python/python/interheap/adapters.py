"""Adapters for existing custom allocators (options 2, 3, 4 and 5).

Install an allocator written before per-interpreter GILs so that it is safe
with isolated subinterpreters and free-threaded builds:

* **lock wrapper** (default): its calls never overlap. On a default build the
  mem and object domains take no lock while the process has only the main GIL
  (the main interpreter and interpreters sharing its GIL); the first call
  from an interpreter with its own GIL switches the adapter to locking, for
  good. The raw domain is never protected by a GIL, so it always locks, and
  so does every domain of a free-threaded build.
* ``thread_safe=True`` (option 3): no lock, only the forwarding and the figures.
* ``interpreter_aware=True`` (options 4 and 5): the allocator is an
  ``interheap_aware_allocator`` (see ``include/interheap.h``) whose every
  call receives the calling interpreter's ID, the domain, and whether that
  interpreter has its own GIL and its own object-allocator state.

The allocator is a C struct (``PyMemAllocatorEx`` or
``interheap_aware_allocator``) given as a capsule holding a pointer to it, a
:mod:`ctypes` structure (or pointer to one), or an integer address. Its
functions must be C code: a ctypes callback written in Python would run
Python inside an allocator and is refused. The struct is copied; its
functions and ``ctx`` must stay valid as long as the process lives (the
adapter keeps a reference to the Python object you pass).

Run-time installation means *wrapping*: the allocator must forward to the
allocator that was installed before it (get it with ``PyMem_GetAllocator``),
because CPython already holds blocks from that one. ``owns_memory=True``
(a replacement allocator) is refused here, with an error; replacements are
installed before ``Py_Initialize`` by an embedding program through
``include/interheap.h``.

Install while no other thread allocates (``PyMem_SetAllocator``'s rule).

    import interheap.adapters as adapters
    a = adapters.install("object", my_capsule)      # lock wrapper
    ...
    print(a.stats().lock_acquisitions)
    a.uninstall()
"""

from __future__ import annotations

import ctypes
from typing import Any

from . import _native
from ._stats import AdapterStats

__all__ = [
    "Adapter",
    "AdapterStats",
    "PyMemAllocatorEx",
    "adapters",
    "install",
]

_ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_CALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t)
_REALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


class PyMemAllocatorEx(ctypes.Structure):
    """CPython's ``PyMemAllocatorEx``, for filling in from ctypes."""

    _fields_ = [
        ("ctx", ctypes.c_void_p),
        ("malloc", _ALLOC),
        ("calloc", _CALLOC),
        ("realloc", _REALLOC),
        ("free", _FREE),
    ]


# Objects passed to install(): kept alive for the process's life, because
# CPython may call their functions (or use their ctx) at any time.
_KEEP: list[Any] = []


class Adapter:
    """An installed adapter: its ID, figures, and removal."""

    def __init__(self, adapter_id: int, domain: str, name: str) -> None:
        self.id = adapter_id
        self.domain = domain
        self.name = name

    def stats(self) -> AdapterStats:
        for entry in _native.adapter_list():
            if entry["id"] == self.id:
                return AdapterStats(**entry)
        raise ValueError(f"no adapter has ID {self.id}")

    def uninstall(self) -> None:
        """Restores the allocator installed before this adapter.

        Raises RuntimeError, changing nothing, if something was installed on
        top of it since, or if it owns its memory.
        """
        _native.adapter_uninstall(self.id)

    def __repr__(self) -> str:
        return f"<interheap adapter {self.id} {self.name!r} on {self.domain}>"


def _python_callbacks(objects: Any) -> bool:
    """Whether a ctypes object's kept objects include a Python callback."""
    if objects is None:
        return False
    if type(objects).__name__ == "CThunkObject":
        return True
    if isinstance(objects, dict):
        return any(_python_callbacks(v) for v in objects.values())
    return False


def _address(allocator: Any) -> int:
    """The address of the C struct behind ``allocator``."""
    if isinstance(allocator, bool):
        raise TypeError("expected a capsule, a ctypes structure or pointer, or an address")
    if isinstance(allocator, int):
        return allocator
    if type(allocator).__name__ == "PyCapsule":
        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype = ctypes.c_char_p
        get_name.argtypes = [ctypes.py_object]
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype = ctypes.c_void_p
        get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        return get_pointer(allocator, get_name(allocator)) or 0
    if isinstance(allocator, ctypes._Pointer):
        allocator = allocator.contents
    if isinstance(allocator, ctypes.Structure):
        if _python_callbacks(getattr(allocator, "_objects", None)):
            raise ValueError(
                "the allocator's functions include a ctypes callback written in Python; an "
                "allocator must be C code (it runs inside CPython's allocator, where Python "
                "cannot run)"
            )
        return ctypes.addressof(allocator)
    if isinstance(allocator, ctypes.c_void_p):
        return allocator.value or 0
    raise TypeError(
        f"expected a capsule, a ctypes structure or pointer, or an address, not {type(allocator).__name__}"
    )


def install(
    domain: str,
    allocator: Any,
    *,
    thread_safe: bool = False,
    interpreter_aware: bool = False,
    owns_memory: bool = False,
    name: str | None = None,
) -> Adapter:
    """Installs ``allocator`` for ``domain`` ("raw", "mem" or "object").

    See the module docs for the modes and the accepted objects. Raises
    ValueError for a bad allocator (NULL function, Python callback, unknown
    domain) and RuntimeError for one that cannot be installed now
    (``owns_memory`` after initialization, or for mem/object on a
    free-threaded build).
    """
    address = _address(allocator)
    kind = "interpreter-aware" if interpreter_aware else "legacy"
    label = name or f"{kind} {domain}"
    adapter_id = _native.adapter_install(domain, address, kind, thread_safe, owns_memory, label)
    _KEEP.append(allocator)
    return Adapter(adapter_id, domain, label)


def adapters() -> tuple[AdapterStats, ...]:
    """Every adapter installed in this process (uninstalled ones too)."""
    return tuple(AdapterStats(**entry) for entry in _native.adapter_list())
