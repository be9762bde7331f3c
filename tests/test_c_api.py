"""The C library and header: the example program, the dispatcher under
stress, and every refusal, each compiled with gcc against this interpreter
(libpython) and libinterheap, then run."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys

import pytest
from c_build import ROOT, build_program, embedding_env
from conftest import FREE_THREADED, child_env


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("c-programs")


def run_program(path, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(path), *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=child_env({**embedding_env(), **(env or {})}),
        cwd=path.parent,
    )
    if proc.returncode != 0 or "RESULT ok" not in proc.stdout:
        pytest.fail(
            f"{path.name} {' '.join(args)} failed (exit {proc.returncode})\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def section(out: str, title: str) -> str:
    return out.split(title, 1)[1].split("\n\n", 1)[0]


@pytest.mark.parametrize("static", [False, True], ids=["shared", "static"])
def test_example_embeds_python_with_a_legacy_allocator(build_dir, static):
    exe = build_program(
        ROOT / "examples" / "embed_legacy_allocator.c", build_dir / f"example-{static}", static=static
    )
    out = run_program(exe)
    only_main = out.split("main interpreter only:", 1)[1].split("after 4 isolated", 1)[0]
    after = out.split("after 4 isolated interpreters in parallel:", 1)[1]
    assert re.search(r"raw +mode=locked", only_main)  # raw: never GIL-protected
    if FREE_THREADED:
        assert "mem: not installed (INTERHEAP_ERR_FREE_THREADED)" in out
        assert "object: not installed (INTERHEAP_ERR_FREE_THREADED)" in out
    else:
        for domain in ("mem", "object"):
            assert re.search(rf"{domain} +mode=unlocked calls=[1-9]\d* lock_acquisitions=0 ", only_main)
            assert re.search(rf"{domain} +mode=locked .* switched_by=[1-4]", after)
    assert "after Py_Initialize: INTERHEAP_ERR_" in out
    assert "overlapping_calls=0" in out and "consistent=NO" not in out


def test_dispatcher_under_parallel_interpreters(build_dir):
    exe = build_program(ROOT / "tests" / "c" / "dispatcher_stress.c", build_dir / "dispatcher_stress")
    out = run_program(exe, "all")
    assert f"installed for {1 if FREE_THREADED else 3} domain(s)" in out
    assert "FAILED" not in out


def test_dispatcher_releases_instances_of_ended_interpreters(build_dir):
    # Raw only, and no pymalloc (which leaks three raw blocks per
    # interpreter): every ended interpreter's instance must be released.
    exe = build_program(ROOT / "tests" / "c" / "dispatcher_stress.c", build_dir / "dispatcher_stress_raw")
    env = None if FREE_THREADED else {"PYTHONMALLOC": "malloc"}
    out = run_program(exe, "raw", env=env)
    assert "instances created: 6, released: 4" in out
    assert out.count("(released)") == 4


def test_dispatcher_keeps_instances_that_still_hold_blocks(build_dir):
    # With pymalloc on 3.12 and 3.13, each ended interpreter leaves three raw
    # blocks behind (its arena vector and radix-tree nodes): the dispatcher
    # reports them and keeps the instance. 3.14's pymalloc frees them when the
    # interpreter ends, so there every instance is released, as without pymalloc.
    if FREE_THREADED:
        pytest.skip("free-threaded builds have no pymalloc (the release is tested above)")
    exe = build_program(ROOT / "tests" / "c" / "dispatcher_stress.c", build_dir / "dispatcher_stress_keep")
    out = run_program(exe, "raw")
    if sys.version_info >= (3, 14):
        assert "instances created: 6, released: 4" in out
        assert not re.search(r"interpreter [1-4] holds [1-9]\d* raw", out)
    else:
        assert "released: 0" in out
        assert re.search(r"interpreter [1-4] holds [1-9]\d* raw", out)


@pytest.mark.skipif(
    sys.version_info >= (3, 13),
    reason="3.13 starts interpreters without swapping (no _Py_ClearStandardStreamEncoding) and calls "
    "_PyMem_SetDefaultAllocator directly, so a program cannot count swaps",
)
def test_the_raw_allocator_is_never_swapped_out_while_subinterpreters_start(build_dir):
    # CPython 3.12 swaps the raw domain back to malloc in every interpreter's
    # start-up (gh-111924); with other interpreters running, that crashed the
    # pre-init programs above about 1 run in 150. The program counts the
    # swaps (it interposes _PyMem_SetDefaultAllocator); interheap's guard must
    # leave none in subinterpreters. Python's own start-up keeps its swaps,
    # which shows that the counting sees them.
    exe = build_program(ROOT / "tests" / "c" / "raw_allocator_swaps.c", build_dir / "raw_allocator_swaps")
    out = run_program(exe)
    counts = re.search(r"SWAPS start-up (\d+) subinterpreters (\d+)", out)
    assert counts, out
    assert int(counts[1]) > 0, "the program did not see Python's start-up swaps: the count proves nothing"
    assert int(counts[2]) == 0, (
        f"the raw allocator was swapped out {counts[2]} times as subinterpreters started"
    )


def test_c_api_refusals(build_dir):
    exe = build_program(ROOT / "tests" / "c" / "api_errors.c", build_dir / "api_errors")
    out = run_program(exe)
    assert "FAILED" not in out


def test_embedding_program_installs_the_interheap_allocator(build_dir):
    import json

    exe = build_program(ROOT / "tests" / "c" / "embed_allocator.c", build_dir / "embed_allocator")
    out = run_program(exe, "1" if FREE_THREADED else "7")  # raw only on free-threaded builds
    assert "second install refused: the interheap allocator is already installed" in out
    expected = 1 if FREE_THREADED else 7
    assert f"installed={expected}" in out
    report = json.loads(out.split("REPORT ", 1)[1].splitlines()[0])
    assert report["installed"] == (["raw"] if FREE_THREADED else ["raw", "mem", "object"])
    if not FREE_THREADED:
        main_object = [h for h in report["heaps"] if h["kind"] == "interpreter" and h["domain"] == "object"]
        assert main_object and main_object[0]["live_blocks"] >= 30000, (
            "bytes(200) objects live in main's heap"
        )
    else:
        proc = subprocess.run(
            [str(exe), "7"], capture_output=True, text=True, timeout=60, env=child_env(embedding_env())
        )
        assert proc.returncode == 3 and "free-threaded build" in proc.stdout
    assert "unknown option refused: unknown option bits 0x10" in out
    assert report["requested_sizes"] is False


def test_an_embedding_program_can_have_the_heaps_keep_requested_sizes(build_dir):
    import json

    exe = build_program(ROOT / "tests" / "c" / "embed_allocator.c", build_dir / "embed_allocator")
    domains = "1" if FREE_THREADED else "7"
    reports = {
        options: json.loads(run_program(exe, domains, options).split("REPORT ", 1)[1].splitlines()[0])
        for options in ("0", "1")
    }
    assert reports["1"]["requested_sizes"] is True and reports["0"]["requested_sizes"] is False
    if not FREE_THREADED:

        def main_object_live(report) -> int:
            heaps = [h for h in report["heaps"] if h["kind"] == "interpreter" and h["domain"] == "object"]
            return heaps[0]["live_bytes"]

        # 30,000 bytes(200) objects live: 233 bytes asked for each, in 240-byte blocks.
        asked, blocks = main_object_live(reports["1"]), main_object_live(reports["0"])
        assert asked >= 30000 * 233, asked
        assert blocks - asked >= 30000 * 7, (blocks, asked)


@pytest.mark.skipif(FREE_THREADED, reason="free-threaded builds keep CPython's mimalloc for mem and object")
def test_a_thread_state_reborn_at_a_freed_address_serves_its_own_interpreter(build_dir):
    import json

    exe = build_program(
        ROOT / "tests" / "c" / "alternating_thread_states.c", build_dir / "alternating_thread_states"
    )
    out = run_program(exe)
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    states = lines["STATES"].split()
    # The scenario the cache must survive really happens: the other
    # interpreter's thread state takes the address just freed.
    assert any(a == b for a, b in itertools.pairwise(states)), f"no thread state address reused: {states}"
    ids = [int(i) for i in lines["IDS"].split()]
    report = json.loads(lines["REPORT"])

    def live_blocks(interp_id: int, size: int) -> int:
        heaps = [h for h in report["heaps"] if h["kind"] == "interpreter" and h["id"] == interp_id]
        return sum(
            a - f - r for h in heaps for _, bs, a, f, r in h["classes"] if size <= bs < 1.25 * size + 9
        )

    turns_each = 8 * 500
    for mine, other, size, other_size in ((ids[0], ids[1], 3001, 5001), (ids[1], ids[0], 5001, 3001)):
        assert live_blocks(mine, size) >= turns_each, f"interpreter {mine} lost its ~{size} B blocks"
        assert live_blocks(mine, other_size) < 100, (
            f"interpreter {mine} holds interpreter {other}'s ~{other_size} B blocks"
        )


@pytest.mark.skipif(FREE_THREADED, reason="free-threaded builds keep CPython's mimalloc for mem and object")
def test_an_interpreter_reborn_at_a_freed_address_gets_fresh_heaps(build_dir):
    import json

    exe = build_program(ROOT / "tests" / "c" / "reborn_interpreters.c", build_dir / "reborn_interpreters")
    out = run_program(exe)

    def allocations(doc: dict, ended_only: bool) -> dict:
        return {
            (h["id"], h["domain"]): h["allocations"]
            for h in doc["heaps"]
            if h["kind"] == "interpreter" and (h["ended"] or not ended_only)
        }

    before, after, addresses = {}, {}, []
    for line in out.splitlines():
        tag, _, rest = line.partition(" ")
        if tag == "BEFORE":
            k, doc = rest.split(" ", 1)
            before[int(k)] = json.loads(doc)
        elif tag == "AFTER":
            k, interp_id, address, doc = rest.split(" ", 3)
            after[int(k)] = (int(interp_id), json.loads(doc))
            addresses.append(address)
    assert len(after) == 12, out[-2000:]
    # The scenario the cache must survive really happens: an address comes back.
    assert len(set(addresses)) < len(addresses), f"no interpreter address was reused: {addresses}"
    for k, (interp_id, doc) in after.items():
        ended_before = allocations(before[k], ended_only=True)
        now = allocations(doc, ended_only=False)
        moved = {key: (n, now[key]) for key, n in ended_before.items() if now[key] != n}
        assert not moved, f"round {k}: interpreter {interp_id} allocated from ended heaps {moved}"
        size = 3000 + 200 * k + 1
        mine = [h for h in doc["heaps"] if h["kind"] == "interpreter" and h["id"] == interp_id]
        kept = sum(a - f - r for h in mine for _, bs, a, f, r in h["classes"] if size <= bs < 1.25 * size + 9)
        assert kept >= 3000, f"round {k}: interpreter {interp_id} keeps {kept} blocks of ~{size} B"


@pytest.mark.skipif(FREE_THREADED, reason="free-threaded builds keep CPython's mimalloc for mem and object")
def test_raw_blocks_count_for_the_interpreter_whose_thread_state_is_current(build_dir):
    import json

    exe = build_program(ROOT / "tests" / "c" / "raw_limits.c", build_dir / "raw_limits")
    out = run_program(exe)
    checks = [line for line in out.splitlines() if line.startswith("CHECK ")]
    assert len(checks) == 5 and all(" ok " in line for line in checks), out
    report = json.loads(out.split("REPORT ", 1)[1].splitlines()[0])
    raw = [h for h in report["heaps"] if h["kind"] == "interpreter" and h["domain"] == "raw" and h["id"] > 0]
    # The subinterpreter's raw heap: the 100 blocks of 10,000 B and the 1 MB
    # one among its allocations, that last one freed from main (remote).
    assert raw and raw[0]["ended"] and raw[0]["allocations"] >= 101 and raw[0]["remote_frees"] >= 1, raw
    # A refusal is the budget's, not a failure of the heap (the OS gave no less).
    budget = [b for b in report["limits"] if b["id"] == raw[0]["id"]]
    assert raw[0]["failures"] == 0 and budget[0]["refused"] == 1, (raw, budget)
    assert budget[0]["largest_refused"] >= 1000 * 1000, budget
