"""Adapters for legacy allocators (options 2, 3, 4, 5): the lock wrapper, the
thread-safe flag and the interpreter-aware interface, installed at run time
from Python over the deliberately unsafe test allocators of
``tests/c/legacy_allocators.c``. Every scenario runs in a child process."""

from __future__ import annotations

import sys

import pytest
from c_build import ROOT, build_shared
from conftest import FREE_THREADED, scenario

PY312 = sys.version_info < (3, 13)


@pytest.fixture(scope="session")
def allocators_env(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("c") / "legacy_allocators.so"
    build_shared(ROOT / "tests" / "c" / "legacy_allocators.c", out)
    return {"INTERHEAP_TEST_ALLOCATORS": str(out)}


# Four isolated interpreters run the workload in parallel threads over the
# bookkeeping allocator installed for mem and object, bare or wrapped. The
# allocator's checksums are read once every workload has finished.
PARALLEL = r"""
import threading, interheap, interheap.adapters as adapters
from scenario_support import create, run, destroy, result
from adapter_support import lib, quiet_report, MEM, OBJECT, NAMES, WORKLOAD

MODE, ROUNDS = {mode!r}, {rounds}
handles = []
for d in (MEM, OBJECT):
    allocator = lib.bk_setup(d)
    if MODE == "bare":
        lib.bk_install_bare(d)
    else:
        handles.append(adapters.install(NAMES[d], allocator, name="bookkeeper " + NAMES[d]))
ids = [create("isolated") for _ in range(4)]
finished = threading.Barrier(len(ids) + 1, timeout=120)
errors = []

def work(iid):
    try:
        run(iid, WORKLOAD.format(rounds=ROUNDS))
    except BaseException as exc:
        errors.append(repr(exc))
    finished.wait()

threads = [threading.Thread(target=work, args=(i,)) for i in ids]
for t in threads:
    t.start()
finished.wait()
for t in threads:
    t.join()
reports = {{NAMES[d]: quiet_report(d) for d in (MEM, OBJECT)}}
for h in handles:
    h.uninstall()
if MODE == "bare":
    for d in (MEM, OBJECT):
        lib.bk_restore(d)
for i in ids:
    destroy(i)
snap = interheap.stats()
result(errors=errors, reports=reports, adapters=[a.to_dict() for a in snap.adapters], ids=ids)
"""


def test_bare_legacy_allocator_loses_bookkeeping_under_parallel_interpreters(allocators_env):
    # The hazard is real: installed bare, the allocator's calls overlap and
    # its checksums disagree. A race may need a retry; it must show.
    attempts = []
    for _ in range(3):
        out = scenario(PARALLEL.format(mode="bare", rounds=60_000), env=allocators_env)
        assert out["errors"] == []
        attempts.append(out["reports"])
        if any(not r["exact"] for r in out["reports"].values()):
            break
    else:
        pytest.fail(f"no corruption detected in {len(attempts)} bare runs: {attempts}")
    assert any(r["overlaps"] > 0 for r in attempts[-1].values())


def test_lock_wrapper_makes_the_same_run_exact(allocators_env):
    out = scenario(PARALLEL.format(mode="wrapped", rounds=60_000), env=allocators_env)
    assert out["errors"] == []
    for domain, r in out["reports"].items():
        assert r["overlaps"] == 0, (domain, r)
        assert r["exact"], (domain, r)
        assert r["calls"] > 100_000
    for a in out["adapters"]:
        assert a["kind"] == "legacy" and not a["installed"]
        assert a["mode"] == "locked"
        assert a["lock_acquisitions"] > 0
        assert a["calls"] >= a["lock_acquisitions"]
        if FREE_THREADED:
            assert a["calls"] == a["lock_acquisitions"] and a["switched_by"] is None
        else:
            # Switched by the first call of an isolated interpreter.
            assert a["switched_by"] in out["ids"]


MAIN_ONLY = r"""
import threading, interheap, interheap.adapters as adapters
from scenario_support import result
from adapter_support import lib, quiet_report, MEM, OBJECT, NAMES, WORKLOAD

handles = [adapters.install(NAMES[d], lib.bk_setup(d)) for d in (MEM, OBJECT)]
exec(WORKLOAD.format(rounds=20_000))
# Plain threads share the main GIL: still no lock.
threads = [threading.Thread(target=exec, args=(WORKLOAD.format(rounds=10_000),)) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
stats = [a.to_dict() for a in interheap.stats().adapters]
reports = {NAMES[d]: quiet_report(d) for d in (MEM, OBJECT)}
for h in handles:
    h.uninstall()
result(adapters=stats, reports=reports)
"""


def test_only_the_main_interpreter_takes_no_lock(allocators_env):
    out = scenario(MAIN_ONLY, env=allocators_env)
    for a in out["adapters"]:
        assert a["calls"] > 10_000
        if FREE_THREADED:
            # No GIL at all: every call locks.
            assert a["mode"] == "locked"
            assert a["lock_acquisitions"] == a["calls"]
        else:
            assert a["mode"] == "unlocked"
            assert a["lock_acquisitions"] == 0
            assert a["contended_acquisitions"] == 0
            assert a["switched_by"] is None
    for r in out["reports"].values():
        assert r["exact"] and r["overlaps"] == 0


RAW = r"""
import threading, interheap.adapters as adapters
from scenario_support import result
from adapter_support import lib, nogil, quiet_report, RAW

allocator = lib.bk_setup(RAW)
lib.bk_set_pause_every({pause_every})
handle = None
if {wrapped}:
    handle = adapters.install("raw", allocator)
else:
    lib.bk_install_bare(RAW)
# Threads of the main interpreter only, calling PyMem_RawMalloc with the GIL released.
threads = [threading.Thread(target=nogil.bk_hammer_raw, args=(300_000,)) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
r = quiet_report(RAW)
stats = handle.stats().to_dict() if handle else None
if handle:
    handle.uninstall()
else:
    lib.bk_restore(RAW)
result(report=r, adapter=stats)
"""


def test_raw_domain_is_not_protected_by_the_gil_bare(allocators_env):
    for _ in range(3):
        out = scenario(RAW.format(wrapped=False, pause_every=5000), env=allocators_env)
        if not out["report"]["exact"]:
            break
    else:
        pytest.fail(f"bare raw allocator never lost bookkeeping: {out['report']}")


def test_raw_domain_always_locks_even_with_only_main(allocators_env):
    # Every 5,000th insertion sleeps 0.2 ms inside the allocator, so other
    # threads reach the lock while it is held even on a machine too busy to
    # run two test threads at once: contention must show.
    out = scenario(RAW.format(wrapped=True, pause_every=5000), env=allocators_env)
    a, r = out["adapter"], out["report"]
    assert r["exact"] and r["overlaps"] == 0, r
    assert a["mode"] == "locked"
    assert a["calls"] >= 4 * 300_000 // 2
    assert a["lock_acquisitions"] == a["calls"]
    assert a["contended_acquisitions"] > 0


# An allocator that calls back into its own domain (the raw domain, which
# always locks), from two threads with the GIL released: the nested call
# passes the lock its own thread holds instead of waiting for itself for
# ever, and the other thread still waits for the outer call.
NESTED = r"""
import threading, interheap.adapters as adapters
from scenario_support import result
from adapter_support import lib, nogil, RAW

handle = adapters.install("raw", lib.re_setup(RAW), name="calls back into raw")
threads = [threading.Thread(target=nogil.bk_hammer_raw, args=(20_000,)) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
stats = handle.stats().to_dict()
handle.uninstall()
result(adapter=stats, nested=lib.re_nested(RAW))
"""


def test_an_allocator_calling_back_into_its_own_domain_does_not_wait_for_itself(allocators_env):
    out = scenario(NESTED, env=allocators_env, timeout=120)
    a = out["adapter"]
    assert a["mode"] == "locked"
    # Each of the 2 x 20,000 rounds that allocates makes one nested malloc
    # and one nested free.
    assert out["nested"] >= 10_000, out
    assert a["calls"] >= a["lock_acquisitions"] + 2 * out["nested"], a


# The switch under stress: main threads allocate as hard as they can while
# isolated interpreters start and allocate at once. Any overlap of two calls
# (including one in flight during the switch) shows in the overlap counter.
SWITCH = r"""
import threading, time, interheap.adapters as adapters
from scenario_support import create, run, destroy, result
from adapter_support import lib, quiet_report, MEM, OBJECT, NAMES, WORKLOAD

handles = [adapters.install(NAMES[d], lib.bk_setup(d)) for d in (MEM, OBJECT)]
stop = False
def hammer():
    while not stop:
        x = [str(i) for i in range(200)]
        y = {{i: x for i in range(50)}}
        del x, y
mains = [threading.Thread(target=hammer) for _ in range(2)]
for t in mains:
    t.start()
time.sleep({delay})
subs = []
def sub():
    iid = create("isolated")
    run(iid, WORKLOAD.format(rounds=3000))
    destroy(iid)
subs = [threading.Thread(target=sub) for _ in range(2)]
for t in subs:
    t.start()
for t in subs:
    t.join()
stop = True
for t in mains:
    t.join()
reports = {{NAMES[d]: quiet_report(d) for d in (MEM, OBJECT)}}
modes = [h.stats().mode for h in handles]
for h in handles:
    h.uninstall()
result(reports=reports, modes=modes)
"""


def test_switch_to_locked_under_stress_never_overlaps(allocators_env):
    for i in range(8):
        out = scenario(SWITCH.format(delay=0.02 * (i % 4)), env=allocators_env)
        assert out["modes"] == ["locked", "locked"]
        for domain, r in out["reports"].items():
            assert r["overlaps"] == 0, (i, domain, r)
            assert r["exact"], (i, domain, r)


def test_switch_under_stress_with_fences_instead_of_membarrier(allocators_env):
    env = dict(allocators_env, INTERHEAP_NO_MEMBARRIER="1")
    out = scenario(SWITCH.format(delay=0.01) + "\nimport interheap\n", env=env)
    for r in out["reports"].values():
        assert r["overlaps"] == 0 and r["exact"], r


LEGACY_SUB = r"""
import interheap.adapters as adapters
from scenario_support import create, run, destroy, result
from adapter_support import lib, quiet_report, OBJECT, WORKLOAD

h = adapters.install("object", lib.bk_setup(OBJECT))
iid = create("legacy")
run(iid, WORKLOAD.format(rounds=2000))
destroy(iid)
s = h.stats().to_dict()
h.uninstall()
result(adapter=s, iid=iid, report=quiet_report(OBJECT))
"""


def test_legacy_subinterpreter_and_the_lock(allocators_env):
    out = scenario(LEGACY_SUB, env=allocators_env)
    a = out["adapter"]
    assert out["report"]["exact"]
    if FREE_THREADED:
        assert a["mode"] == "locked"
    elif PY312:
        # 3.12 cannot tell a shared GIL: conservative, it locks.
        assert a["mode"] == "locked" and a["switched_by"] == out["iid"]
    else:
        # 3.13 reads the interpreter's config: shared GIL, no lock needed.
        assert a["mode"] == "unlocked" and a["lock_acquisitions"] == 0


THREAD_SAFE = r"""
import threading, interheap.adapters as adapters
from scenario_support import create, run, destroy, result
from adapter_support import lib, report, OBJECT, WORKLOAD

# The bookkeeper is not thread-safe, so the figures are only checked for the
# adapter's own behaviour: no lock, every call forwarded.
h = adapters.install("object", lib.bk_setup(OBJECT), thread_safe=True)
ids = [create("isolated") for _ in range(2)]
threads = [threading.Thread(target=run, args=(i, WORKLOAD.format(rounds=5000))) for i in ids]
for t in threads:
    t.start()
for t in threads:
    t.join()
calls = report(OBJECT)["calls"]
s = h.stats().to_dict()
h.uninstall()
for i in ids:
    destroy(i)
result(adapter=s, calls=calls)
"""


def test_thread_safe_flag_never_locks(allocators_env):
    out = scenario(THREAD_SAFE, env=allocators_env)
    a = out["adapter"]
    assert a["mode"] == "thread-safe"
    assert a["lock_acquisitions"] == 0 and a["switched_by"] is None
    # Every call reached the allocator. The adapter was read a little later
    # (reading the allocator's report allocates a few objects in between).
    assert out["calls"] > 10_000
    assert 0 <= a["calls"] - out["calls"] < 100


AWARE = r"""
import interheap.adapters as adapters
from scenario_support import create, run, destroy, result
from adapter_support import lib, aware_report, OBJECT, WORKLOAD

h = adapters.install("object", lib.aw_setup(OBJECT), interpreter_aware=True)
exec(WORKLOAD.format(rounds=1000))
iso = create("isolated")
run(iso, WORKLOAD.format(rounds=1000))
leg = create("legacy")
run(leg, WORKLOAD.format(rounds=1000))
destroy(iso)
destroy(leg)
s = h.stats().to_dict()
h.uninstall()
result(report=aware_report(), adapter=s, iso=iso, leg=leg)
"""


def test_interpreter_aware_allocator_sees_each_call_s_interpreter(allocators_env):
    out = scenario(AWARE, env=allocators_env)
    r = out["report"]
    interps = {int(k): v for k, v in r["interpreters"].items()}
    assert r["wrong_domain"] == 0 and r["inconsistent"] == 0
    assert out["adapter"]["kind"] == "interpreter-aware"
    main, iso, leg = interps[0], interps[out["iso"]], interps[out["leg"]]
    assert min(main["calls"], iso["calls"], leg["calls"]) > 1000
    assert (main["own_gil"], main["own_obmalloc"]) == (1, 1)
    assert iso["own_obmalloc"] == 1 and leg["own_obmalloc"] == 0
    if PY312:
        assert iso["own_gil"] == -1 and leg["own_gil"] == -1  # unknown on 3.12
    else:
        assert iso["own_gil"] == 1 and leg["own_gil"] == 0


API = r"""
import ctypes, interheap, interheap.adapters as adapters
from scenario_support import result
from adapter_support import lib, OBJECT, MEM, RAW

errors = {}
def err(key, fn):
    try:
        fn()
    except Exception as exc:
        errors[key] = f"{type(exc).__name__}: {exc}"

addr = lib.bk_setup(OBJECT)
# A capsule holding a PyMemAllocatorEx*.
new_capsule = ctypes.pythonapi.PyCapsule_New
new_capsule.restype = ctypes.py_object
new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
cap = new_capsule(addr, b"PyMemAllocatorEx", None)
first = adapters.install("object", cap, name="from a capsule")
# A ctypes structure (copied from the C one).
struct = adapters.PyMemAllocatorEx.from_address(lib.bk_setup(MEM))
second = adapters.install("mem", ctypes.pointer(struct))
x = [str(i) for i in range(1000)]
third = adapters.install("object", addr, name="stacked")
err("not_on_top", first.uninstall)
third.uninstall()
first.uninstall()
err("twice", first.uninstall)
second.uninstall()
err("owns_memory", lambda: adapters.install("raw", addr, owns_memory=True))
err("owns_memory_object", lambda: adapters.install("object", addr, owns_memory=True))
err("domain", lambda: adapters.install("heap", addr))
err("null", lambda: adapters.install("object", 0))
copy = adapters.PyMemAllocatorEx()
ctypes.memmove(ctypes.addressof(copy), addr, ctypes.sizeof(copy))
copy.free = ctypes.cast(None, type(copy.free))
err("null_free", lambda: adapters.install("object", copy))
py_cb = adapters.PyMemAllocatorEx()
ctypes.memmove(ctypes.addressof(py_cb), addr, ctypes.sizeof(py_cb))
py_cb.malloc = type(py_cb.malloc)(lambda ctx, size: None)
err("python_callback", lambda: adapters.install("object", py_cb))
err("type", lambda: adapters.install("object", "nope"))
snap = interheap.stats()
d = snap.to_dict()
again = interheap.Snapshot.from_dict(d)
result(errors=errors, adapters=[a.to_dict() for a in snap.adapters],
       roundtrip=again.adapters == snap.adapters, report="adapters:" in snap.format_table())
"""


def test_api_forms_errors_and_figures(allocators_env):
    out = scenario(API, env=allocators_env)
    e = out["errors"]
    assert "something installed after it" in e["not_on_top"]
    assert "not installed" in e["twice"]
    assert e["owns_memory"].startswith("RuntimeError") and "before Py_Initialize" in e["owns_memory"]
    if FREE_THREADED:
        assert "free-threaded" in e["owns_memory_object"]
    else:
        assert "before Py_Initialize" in e["owns_memory_object"]
    assert e["domain"].startswith("ValueError") and "unknown domain" in e["domain"]
    assert e["null"].startswith("ValueError")
    assert e["null_free"].startswith("ValueError") and "free is NULL" in e["null_free"]
    assert e["python_callback"].startswith("ValueError") and "written in Python" in e["python_callback"]
    assert e["type"].startswith("TypeError")
    names = [a["name"] for a in out["adapters"]]
    assert names == ["from a capsule", "legacy mem", "stacked"]
    assert all(not a["installed"] and not a["on_top"] for a in out["adapters"])
    assert out["adapters"][0]["calls"] > 0 and out["adapters"][1]["calls"] > 0
    assert out["roundtrip"] and out["report"]


FORK = r"""
import os, threading, time, warnings
import interheap.adapters as adapters
from scenario_support import result
from adapter_support import lib, nogil, quiet_report, RAW

warnings.simplefilter("ignore")  # "multi-threaded process, fork() may deadlock": the point
h = adapters.install("raw", lib.bk_setup(RAW))
stop = False
def hammer():
    while not stop:
        nogil.bk_hammer_raw(20000)
threads = [threading.Thread(target=hammer) for _ in range(3)]
for t in threads:
    t.start()
time.sleep(0.1)
outcomes = []
for i in range(20):
    pid = os.fork()
    if pid == 0:
        # The only thread left: the adapter's lock must be free and the
        # allocator's state whole (no call was in flight at the fork).
        nogil.bk_hammer_raw(5000)
        os._exit(0 if quiet_report(RAW)["exact"] else 3)
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            outcomes.append(os.waitstatus_to_exitcode(status))
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            outcomes.append("hung")
            break
        time.sleep(0.005)
stop = True
for t in threads:
    t.join()
result(outcomes=outcomes, contended=h.stats().contended_acquisitions, exact=quiet_report(RAW)["exact"])
"""


def test_fork_while_other_threads_hold_the_lock(allocators_env):
    # Three threads keep the raw adapter's lock busy while the main thread
    # forks: the fork handlers take the lock first, so each child starts
    # with a free lock and a consistent allocator.
    out = scenario(FORK, env=allocators_env)
    assert out["outcomes"] == [0] * 20
    assert out["contended"] > 0 and out["exact"]
