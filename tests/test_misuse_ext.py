"""Smoke tests of ``interheap_misuse`` (tests/c/misuse_ext.c), the extension
that misuses the allocator API on purpose for memory-checker tests.

Only its safe functions run here: the plain alloc/realloc/free wrappers and
keep_static + free_static in one interpreter, in this process, in a child
and in an isolated subinterpreter. No function that commits a bug is called,
except mem_alloc_without_gil in the one configuration where it is harmless
(see its test).
"""

from __future__ import annotations

import ctypes
import sys

import pytest
from conftest import FREE_THREADED, scenario
from misuse_build import MODULE, build_misuse_extension, ext_suffix

DOMAINS = ("mem", "obj", "raw")
SIZES = (0, 1, 24, 512, 513, 4096, 1 << 20)


@pytest.fixture(scope="session")
def misuse_dir():
    return build_misuse_extension()


@pytest.fixture(scope="session")
def misuse(misuse_dir):
    import importlib.machinery
    import importlib.util

    path = misuse_dir / (MODULE + ext_suffix())
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_is_cached(misuse_dir):
    path = misuse_dir / (MODULE + ext_suffix())
    assert path.is_file()
    before = path.stat().st_mtime_ns
    assert build_misuse_extension() == misuse_dir  # the cached build, not a new one
    assert path.stat().st_mtime_ns == before
    assert not [p.name for p in misuse_dir.iterdir() if p.name.endswith(".tmp")]


def test_imports_in_the_main_interpreter(misuse_dir):
    out = scenario(
        f"""
        import sys
        sys.path.insert(0, {str(misuse_dir)!r})
        import interheap_misuse as m
        from scenario_support import result
        result(
            file=m.__file__,
            names=sorted(n for n in dir(m) if not n.startswith("_")),
            gil=getattr(sys, "_is_gil_enabled", lambda: True)(),
        )
        """
    )
    assert out["file"].endswith(MODULE + ext_suffix())
    expected = {"mem_alloc", "obj_realloc", "raw_free", "keep_static", "free_static", "double_free_obj",
                "mismatch_obj_raw", "overrun_mem", "use_after_free_mem", "mem_free_without_gil"}  # fmt: skip
    assert expected <= set(out["names"])
    # Py_mod_gil = Py_MOD_GIL_NOT_USED: importing it does not re-enable the GIL.
    assert out["gil"] is (not FREE_THREADED)


@pytest.mark.parametrize("domain", DOMAINS)
def test_alloc_realloc_free(misuse, domain):
    alloc = getattr(misuse, f"{domain}_alloc")
    realloc = getattr(misuse, f"{domain}_realloc")
    free = getattr(misuse, f"{domain}_free")
    for n in SIZES:
        addr = alloc(n)
        assert isinstance(addr, int) and addr > 0 and addr % 8 == 0, (n, addr)
        ctypes.memset(addr, 0x41, n)
        grown = realloc(addr, n + 100)
        assert isinstance(grown, int) and grown > 0 and grown % 8 == 0
        assert ctypes.string_at(grown, n) == b"\x41" * n  # contents survive the move
        shrunk = realloc(grown, n // 2)
        assert shrunk > 0
        assert ctypes.string_at(shrunk, n // 2) == b"\x41" * (n // 2)
        assert free(shrunk) is None
    assert free(0) is None  # freeing NULL is allowed in every domain


@pytest.mark.parametrize("domain", DOMAINS)
def test_bad_arguments(misuse, domain):
    with pytest.raises(ValueError):
        getattr(misuse, f"{domain}_alloc")(-1)
    with pytest.raises(ValueError):
        getattr(misuse, f"{domain}_realloc")(0, -1)
    with pytest.raises(TypeError):
        getattr(misuse, f"{domain}_alloc")("8")
    with pytest.raises(TypeError):
        getattr(misuse, f"{domain}_realloc")(0)
    with pytest.raises(MemoryError):
        getattr(misuse, f"{domain}_alloc")(sys.maxsize)
    with pytest.raises(ValueError):
        misuse.keep_static(-1)


def test_keep_static_then_free_static(misuse):
    addr = misuse.keep_static(32)
    assert isinstance(addr, int) and addr > 0
    assert ctypes.string_at(addr, 32) == b"\x5a" * 32
    assert misuse.free_static() is None
    assert misuse.free_static() is None  # kept is NULL now: PyMem_Free(NULL)


@pytest.mark.skipif(
    FREE_THREADED, reason="mimalloc (the only allocator of free-threaded builds) needs a thread state"
)
def test_mem_alloc_without_gil_then_mem_free(misuse_dir):
    # PyMem_Malloc without a thread state crashes under pymalloc (3.12+ finds
    # its per-interpreter state through the NULL thread state); with
    # PYTHONMALLOC=malloc it is plain malloc, harmless in a single thread.
    out = scenario(
        f"""
        import sys
        sys.path.insert(0, {str(misuse_dir)!r})
        import interheap_misuse as m
        from scenario_support import result
        addrs = []
        for n in (1, 64, 4096, 1 << 20):
            a = m.mem_alloc_without_gil(n)
            addrs.append(a)
            m.mem_free(a)
        result(addrs=addrs)
        """,
        env={"PYTHONMALLOC": "malloc"},
    )
    assert len(out["addrs"]) == 4 and all(isinstance(a, int) and a > 0 for a in out["addrs"])


def test_isolated_subinterpreter(misuse_dir):
    out = scenario(
        f"""
        import sys
        from scenario_support import create, destroy, result, run

        interp = create("isolated")
        run(interp, '''
        import sys
        sys.path.insert(0, {str(misuse_dir)!r})
        import interheap_misuse as m
        for domain in ("mem", "obj", "raw"):
            alloc = getattr(m, domain + "_alloc")
            realloc = getattr(m, domain + "_realloc")
            free = getattr(m, domain + "_free")
            for n in (0, 16, 512, 4096, 1 << 20):
                a = alloc(n)
                assert isinstance(a, int) and a > 0, (domain, n, a)
                a = realloc(a, n + 64)
                assert isinstance(a, int) and a > 0, (domain, n, a)
                free(a)
        a = m.keep_static(48)
        assert a > 0
        m.free_static()
        ''')
        destroy(interp)

        # The same module in the main interpreter, after the subinterpreter.
        sys.path.insert(0, {str(misuse_dir)!r})
        import interheap_misuse as m
        a = m.obj_alloc(100)
        m.obj_free(a)
        result(ok=True, gil=getattr(sys, "_is_gil_enabled", lambda: True)())
        """
    )
    assert out["ok"]
    assert out["gil"] is (not FREE_THREADED)
