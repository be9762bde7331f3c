"""Exact figures per interpreter and per domain, with real subinterpreters
running in parallel threads (own GIL), plain threads, and raw calls made
without a thread state."""

from __future__ import annotations

from conftest import FREE_THREADED, scenario

MiB = 1024 * 1024

# Each interpreter keeps a different, known amount; the sizes differ enough
# that a leak of one interpreter's bytes into another's figures would show.
PARALLEL_KEEP = r"""
import threading, interheap
from scenario_support import create, run, destroy, result, live_bytes

WARMUP = "import sys\nkeep = None\n"
# Objects of several sizes: small pymalloc blocks (unique str), medium ones,
# and large ones that pymalloc hands to the raw allocator. Only types with no
# free list and no hidden children, so getsizeof is exactly what they hold.
WORKLOAD = '''
import sys
keep = []
for i in range({count}):
    keep.append(bytes({size}))
    keep.append("x" * 40 + str(i))
expected = sys.getsizeof(keep) + sum(sys.getsizeof(o) for o in keep)
with open({path!r}, "w") as fh:
    fh.write(str(expected))
'''
PLANS = [(5000, 200), (4000, 1500), (3000, 4000), (2000, 9000)]

interheap.install()
parties = len(PLANS) + 1
barrier = threading.Barrier(parties, timeout=120)
ids = [None] * len(PLANS)
errors = []

def worker(k, tmpdir):
    try:
        iid = create("isolated")
        ids[k] = iid
        run(iid, WARMUP)
        barrier.wait()   # 1: all interpreters warmed up
        barrier.wait()   # 2: host took "before"
        count, size = PLANS[k]
        run(iid, WORKLOAD.format(count=count, size=size, path=f"{tmpdir}/{k}"))
        barrier.wait()   # 3: all workloads done
        barrier.wait()   # 4: host took "after"
        run(iid, "del keep")
        destroy(iid)
    except BaseException as exc:
        errors.append(repr(exc))
        barrier.abort()

import tempfile
tmpdir = tempfile.mkdtemp()
threads = [threading.Thread(target=worker, args=(k, tmpdir)) for k in range(len(PLANS))]
for t in threads:
    t.start()
try:
    barrier.wait()
    before = interheap.stats()
    barrier.wait()
    barrier.wait()
    after = interheap.stats()
    barrier.wait()
except threading.BrokenBarrierError:
    for t in threads:
        t.join()
    result(errors=errors or ["barrier broken"])
    raise SystemExit(0)
for t in threads:
    t.join()
final = interheap.stats()
# A baseline: what an isolated interpreter that does nothing leaves behind.
baseline_id = create("isolated")
run(baseline_id, WARMUP)
destroy(baseline_id)
baseline = live_bytes(interheap.stats(), baseline_id)
expected = [int(open(f"{tmpdir}/{k}").read()) for k in range(len(PLANS))]
result(
    errors=errors, ids=ids, expected=expected,
    delta=[live_bytes(after, i) - live_bytes(before, i) for i in ids],
    main_delta=live_bytes(after, 0) - live_bytes(before, 0),
    leaked=[live_bytes(final, i) for i in ids],
    baseline_leak=baseline,
    peak=[sum(s.peak_bytes for s in final.interpreter(i).domains.values()) for i in ids],
    alive=[final.interpreter(i).alive for i in ids],
)
"""


def test_parallel_isolated_interpreters_show_their_own_bytes():
    out = scenario(PARALLEL_KEEP)
    assert out["errors"] == []
    for k, (delta, expected) in enumerate(zip(out["delta"], out["expected"], strict=False)):
        # Within 5% of what the interpreter keeps, against its own figure before.
        assert abs(delta - expected) <= 0.05 * expected, (k, delta, expected)
    # The host interpreter did not get the workers' bytes (at least 1.8 MB
    # each). Main's own figure moves a little meanwhile: by up to 39 KB on
    # 3.14t (seen; its cause inside CPython is not pinned down).
    assert abs(out["main_delta"]) < max(0.02 * min(out["expected"]), 64 * 1024), out["main_delta"]


def test_destroyed_interpreters_keep_only_what_they_leaked():
    out = scenario(PARALLEL_KEEP)
    assert out["errors"] == []
    assert out["alive"] == [False] * 4
    # CPython itself leaves a little behind when an isolated interpreter ends
    # (the baseline: an interpreter that ran nothing). A workload interpreter
    # must leave the same, not its workload.
    assert 0 <= out["baseline_leak"] < 1 * MiB
    for leaked, peak, expected in zip(out["leaked"], out["peak"], out["expected"], strict=False):
        assert peak >= expected  # the workload really happened here
        assert abs(leaked - out["baseline_leak"]) < 0.01 * expected + 16 * 1024, (leaked, expected)


STRESS = r"""
import os, random, threading, time, interheap
from scenario_support import create, run, destroy, result, consistency, quiet_stats, FREE_THREADED

MODE = {mode!r}
SECONDS = {seconds}
CHURN = '''
import random, time
rng = random.Random({{seed}})
pool = []
deadline = time.monotonic() + {{seconds}}
while time.monotonic() < deadline:
    for _ in range(200):
        kind = rng.random()
        if kind < 0.4:
            pool.append(bytes(rng.randrange(1, 3000)))
        elif kind < 0.7:
            pool.append([0] * rng.randrange(0, 200))
        elif kind < 0.85 and pool:
            b = pool[rng.randrange(len(pool))]
            if isinstance(b, list):
                b.extend(range(rng.randrange(1, 300)))   # realloc
        else:
            pool.append({{{{i: str(i) for i in range(rng.randrange(1, 50))}}}})
    while len(pool) > 3000:
        pool.pop(rng.randrange(len(pool)))
pool = None
'''

interheap.install()
errors = []

def in_interpreter(seed):
    try:
        iid = create("isolated")
        run(iid, CHURN.format(seed=seed, seconds=SECONDS))
        destroy(iid)
    except BaseException as exc:
        errors.append(repr(exc))

def in_thread(seed):
    try:
        ns = {{}}
        exec(CHURN.format(seed=seed, seconds=SECONDS), ns)
    except BaseException as exc:
        errors.append(repr(exc))

target = in_interpreter if MODE == "interpreters" else in_thread
threads = [threading.Thread(target=target, args=(seed,)) for seed in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
snap = quiet_stats()
result(errors=errors, buckets=len(snap.interpreters), allocations=snap.total.allocations,
       **consistency(snap))
"""


def _assert_exact(out):
    assert out["errors"] == []
    assert out["allocations"] > 100_000  # the stress really ran
    assert out["negative"] == []
    # Two independent records agree exactly: the ledger's counters and the
    # block table's own entries.
    assert out["ledger_live_blocks"] == out["table_entries"]
    assert out["ledger_allocations_minus_frees"] == out["table_entries"]
    assert out["ledger_live_bytes"] == out["table_live_bytes"]


def test_stress_eight_interpreters_figures_stay_exact():
    out = scenario(STRESS.format(mode="interpreters", seconds=4), timeout=240)
    _assert_exact(out)
    assert out["buckets"] >= 9  # main + 8 interpreters (+ no-interpreter bucket)


def test_stress_eight_threads_figures_stay_exact():
    # On the free-threaded build these threads run with no GIL at all.
    out = scenario(STRESS.format(mode="threads", seconds=4), timeout=240)
    _assert_exact(out)


def test_blocks_freed_by_other_threads_stay_exact():
    # Producers allocate, consumers free: most frees hit a block that sits in
    # another thread's nursery (the claim path) or was evicted from it. On
    # 3.14t this runs with no GIL at all.
    out = scenario(
        r"""
        import queue, threading, time, interheap
        from scenario_support import result, consistency, quiet_stats
        interheap.install()
        q = queue.Queue(maxsize=20000)
        stop = threading.Event()
        made = [0] * 4
        def produce(k):
            while not stop.is_set():
                batch = [bytes(16 + (i * 37) % 900) for i in range(64)]
                batch.append({"k": k, "v": list(range(k + 5))})
                q.put(batch)
                made[k] += 1
        def consume():
            while True:
                batch = q.get()
                if batch is None:
                    return
                del batch
        producers = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
        consumers = [threading.Thread(target=consume) for _ in range(4)]
        for t in producers + consumers:
            t.start()
        time.sleep(3)
        stop.set()
        for t in producers:
            t.join()
        for _ in consumers:
            q.put(None)
        for t in consumers:
            t.join()
        snap = quiet_stats()
        result(batches=sum(made), missed=snap.missed_frees, **consistency(snap))
        """,
        timeout=120,
    )
    assert out["batches"] > 1000
    assert out["negative"] == []
    assert out["missed"] == {"raw": 0, "mem": 0, "object": 0}
    assert out["ledger_live_blocks"] == out["table_entries"]
    assert out["ledger_live_bytes"] == out["table_live_bytes"]


def test_free_threaded_threads_attribute_exact_known_bytes():
    # 8 plain threads (no GIL on 3.14t) each keep a known amount; the main
    # interpreter's live bytes rise by exactly the sum, within 5%.
    out = scenario(
        r"""
        import sys, threading, interheap
        from scenario_support import result, live_bytes, consistency, quiet_stats
        interheap.install()
        kept = [None] * 8
        start = threading.Barrier(9)
        def work(k):
            start.wait()
            kept[k] = [bytes(500 + k) for _ in range(20000)]
        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads: t.start()
        before = live_bytes(interheap.stats(), 0)
        start.wait()
        for t in threads: t.join()
        after = quiet_stats()
        expected = sum(sys.getsizeof(x) + sum(map(sys.getsizeof, x)) for x in kept)
        gil = getattr(sys, "_is_gil_enabled", lambda: True)()
        result(delta=live_bytes(after, 0) - before, expected=expected, gil=gil, **consistency(after))
        """
    )
    assert out["gil"] is (not FREE_THREADED)
    assert abs(out["delta"] - out["expected"]) <= 0.05 * out["expected"]
    assert out["ledger_live_blocks"] == out["table_entries"]


def test_large_object_allocation_is_counted_once_in_object_domain():
    # pymalloc serves >512-byte objects through PyMem_RawMalloc; the re-entry
    # guard must keep that inner raw call from counting the block twice.
    out = scenario(
        r"""
        import interheap
        from scenario_support import result
        interheap.install()
        def figures():
            e = interheap.stats().interpreter(0)
            return e.raw.live_bytes, e.object.live_bytes
        raw0, obj0 = figures()
        blobs = [bytes(100_000) for _ in range(50)]
        raw1, obj1 = figures()
        result(raw=raw1 - raw0, obj=obj1 - obj0)
        """
    )
    assert out["obj"] >= 50 * 100_000
    assert out["obj"] < 50 * 100_000 * 1.02
    assert abs(out["raw"]) < 64 * 1024  # not another 5 MB in raw


def test_blocks_from_before_install_are_counted_apart():
    out = scenario(
        r"""
        import interheap
        from scenario_support import result, consistency
        old = [bytes(300) for _ in range(20000)]
        interheap.install()
        del old
        snap = interheap.stats()
        result(untracked=snap.untracked_frees, **consistency(snap))
        """
    )
    assert out["untracked"]["object"] >= 20000
    assert out["negative"] == []
    assert out["ledger_live_blocks"] == out["table_entries"]
    assert out["ledger_live_bytes"] == out["table_live_bytes"]


CTYPES_RAW = r"""
import ctypes, sys, interheap
from scenario_support import result
# CDLL releases the GIL around each call, so these raw calls run with no
# thread state: the hooks must file them under "no interpreter".
lib = ctypes.CDLL(None)
for name in ("PyMem_RawMalloc", "PyMem_RawCalloc", "PyMem_RawRealloc"):
    getattr(lib, name).restype = ctypes.c_void_p
lib.PyMem_RawMalloc.argtypes = [ctypes.c_size_t]
lib.PyMem_RawCalloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
lib.PyMem_RawRealloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
lib.PyMem_RawFree.argtypes = [ctypes.c_void_p]
# PyDLL keeps the GIL (and the thread state): calls are the main interpreter's.
api = ctypes.PyDLL(None)
api.PyMem_RawMalloc.restype = ctypes.c_void_p
api.PyMem_RawMalloc.argtypes = [ctypes.c_size_t]

def none_raw():
    e = interheap.stats().interpreter(None)
    return e.raw if e else interheap.DomainStats()

interheap.install()
steps = {}
s0 = none_raw()
p = lib.PyMem_RawMalloc(10 * 1024 * 1024)
steps["malloc"] = none_raw().live_bytes - s0.live_bytes
p = lib.PyMem_RawRealloc(p, 12 * 1024 * 1024)
steps["realloc_grow"] = none_raw().live_bytes - s0.live_bytes
p = lib.PyMem_RawRealloc(p, 1024)
steps["realloc_shrink"] = none_raw().live_bytes - s0.live_bytes
lib.PyMem_RawFree(p)
steps["free"] = none_raw().live_bytes - s0.live_bytes
z1, z2 = lib.PyMem_RawMalloc(0), lib.PyMem_RawMalloc(0)
steps["zero_unique"] = bool(z1) and bool(z2) and z1 != z2
steps["zero_blocks"] = none_raw().live_blocks - s0.live_blocks
lib.PyMem_RawFree(z1); lib.PyMem_RawFree(z2)
q = lib.PyMem_RawRealloc(None, 4096)       # realloc(NULL, n) allocates
steps["realloc_null"] = none_raw().live_bytes - s0.live_bytes
lib.PyMem_RawFree(q)
c = lib.PyMem_RawCalloc(1000, 3)
steps["calloc"] = none_raw().live_bytes - s0.live_bytes
lib.PyMem_RawFree(c)
# PyMem_RawCalloc refuses nelem * elsize overflows before any hook; call
# the installed hook itself to check that it refuses them too.
CallocFn = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t)
class Allocator(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_void_p), ("malloc", ctypes.c_void_p), ("calloc", CallocFn),
                ("realloc", ctypes.c_void_p), ("free", ctypes.c_void_p)]
raw_hook = Allocator()
lib.PyMem_GetAllocator(0, ctypes.byref(raw_hook))
fail0 = none_raw().failures
steps["calloc_overflow_null"] = raw_hook.calloc(raw_hook.ctx, 2**33, 2**32) is None
steps["calloc_overflow_failures"] = none_raw().failures - fail0
# Allocated by the main interpreter, freed with no thread state: charged to main.
m0 = interheap.stats().interpreter(0).raw.live_bytes
r = api.PyMem_RawMalloc(3 * 1024 * 1024)
steps["main_malloc"] = interheap.stats().interpreter(0).raw.live_bytes - m0
lib.PyMem_RawFree(r)
steps["main_after_foreign_free"] = interheap.stats().interpreter(0).raw.live_bytes - m0
s1 = none_raw()
steps["none_allocs_minus_frees"] = (s1.allocations - s0.allocations) - (s1.frees - s0.frees)
result(**steps)
"""


def test_raw_calls_without_thread_state_and_c_edge_cases():
    out = scenario(CTYPES_RAW)
    assert out["malloc"] == 10 * MiB
    assert out["realloc_grow"] == 12 * MiB
    assert out["realloc_shrink"] == 1024
    assert out["free"] == 0
    assert out["zero_unique"] is True and out["zero_blocks"] == 2
    assert out["realloc_null"] == 4096
    assert out["calloc"] == 3000
    assert out["calloc_overflow_null"] is True and out["calloc_overflow_failures"] == 1
    assert out["main_malloc"] == 3 * MiB
    assert out["main_after_foreign_free"] == 0
    assert out["none_allocs_minus_frees"] == 0


def test_fork_while_threads_allocate_does_not_deadlock():
    out = scenario(
        r"""
        import os, threading, time, interheap
        from scenario_support import result
        interheap.install()
        stop = threading.Event()
        def churn():
            while not stop.is_set():
                x = [bytes(100) for _ in range(1000)]
        threads = [threading.Thread(target=churn) for _ in range(3)]
        for t in threads: t.start()
        codes = []
        for _ in range(20):
            pid = os.fork()
            if pid == 0:
                y = [str(i) for i in range(10000)]
                s = interheap.stats()
                os._exit(0 if s.interpreter(0) is not None else 3)
            codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        stop.set()
        for t in threads: t.join()
        result(codes=codes)
        """,
        timeout=120,
        env={"PYTHONWARNINGS": "ignore::DeprecationWarning"},
    )
    assert out["codes"] == [0] * 20
