"""The stack reader (cpython/src/stack.rs, src/stack.c): the calling thread's
Python stack read from CPython's frame structs, without running Python code,
as an allocator hook will read it for allocation sites and the checker. Shown
through interheap_interp.stack(), in the main interpreter, in isolated
subinterpreters running in parallel threads, and in free-threaded threads."""

from __future__ import annotations

from conftest import FREE_THREADED, scenario

# Functions at known lines: what each thread runs, and where it calls stack().
# Each interpreter (or thread) gets its own function names, so a stack read
# from the wrong thread state would show someone else's names.
WORK = r"""
import interheap_interp as ii

def inner_TAG(depth):
    if depth:
        return inner_TAG(depth - 1)
    return ii.stack()          # line 7 of this snippet (line 1 is empty)

def outer_TAG():
    return inner_TAG(DEPTH)    # line 10

frames = outer_TAG()
"""


def work(tag: str, depth: int) -> str:
    return WORK.replace("TAG", tag).replace("DEPTH", str(depth))


def check_stack(frames: list, tag: str, depth: int, filename: str, module_line: int = 12) -> None:
    """Innermost first: `depth + 1` frames of inner_<tag> at line 7 (the
    deepest) and 6 (the recursive calls), then outer_<tag> at line 10, then
    the module's code at `module_line`."""
    names = [name for _, name, _ in frames]
    lines = [line for _, _, line in frames]
    files = {file for file, _, _ in frames[: depth + 2]}
    assert names[: depth + 2] == [f"inner_{tag}"] * (depth + 1) + [f"outer_{tag}"], names
    assert lines[: depth + 2] == [7] + [6] * depth + [10], lines
    assert files == {filename}, files
    # The snippet's own module code called outer_<tag>; frames below it
    # belong to whoever ran the snippet.
    assert names[depth + 2] == "<module>" and lines[depth + 2] == module_line, frames[: depth + 3]


def test_the_main_interpreter_reads_its_own_stack():
    out = scenario(
        "from scenario_support import result\n"
        "ns = {}\n"
        f"exec(compile({work('main', 3)!r}, 'snippet.py', 'exec'), ns)\n"
        "result(frames=ns['frames'])\n"
    )
    check_stack(out["frames"], "main", 3, "snippet.py")


def test_isolated_interpreters_in_parallel_threads_read_their_own_stacks():
    out = scenario(
        r"""
        import json, os, tempfile, threading
        from scenario_support import create, run, destroy, result
        tmp = tempfile.mkdtemp()
        ids = [create("isolated") for _ in range(4)]
        WORK = WORK_TEXT
        def go(k, iid):
            code = WORK.replace("TAG", f"i{k}").replace("DEPTH", str(k + 1))
            path = os.path.join(tmp, str(k))
            # 200 reads each (line 14), while the other interpreters read theirs.
            run(iid, code + f"for _ in range(200):\n    frames = outer_i{k}()\n"
                f"import json\njson.dump(frames, open({path!r}, 'w'))\n")
        threads = [threading.Thread(target=go, args=(k, i)) for k, i in enumerate(ids)]
        [t.start() for t in threads]; [t.join() for t in threads]
        seen = [json.load(open(os.path.join(tmp, str(k)))) for k in range(4)]
        for i in ids:
            destroy(i)
        result(seen=seen)
        """.replace("WORK_TEXT", repr(WORK)),
        timeout=240,
    )
    for k, frames in enumerate(out["seen"]):
        # Run as each interpreter's __main__ code: filename "<string>" or the
        # name concurrent.interpreters gives it; the stack is that one file's.
        filename = frames[0][0]
        check_stack(frames, f"i{k}", k + 1, filename, module_line=14)


def test_threads_read_their_own_stacks_at_once():
    # On 3.14t these threads run Python at the same time (no GIL).
    out = scenario(
        r"""
        import threading
        from scenario_support import result
        WORK = WORK_TEXT
        seen, barrier = {}, threading.Barrier(8)
        def go(k):
            ns = {}
            code = compile(WORK.replace("TAG", f"t{k}").replace("DEPTH", str(k % 4)), f"t{k}.py", "exec")
            barrier.wait()
            for _ in range(500):
                exec(code, ns)
            seen[k] = ns["frames"]
        threads = [threading.Thread(target=go, args=(k,)) for k in range(8)]
        [t.start() for t in threads]; [t.join() for t in threads]
        import sys
        result(seen=[seen[k] for k in range(8)], gil=getattr(sys, "_is_gil_enabled", lambda: True)())
        """.replace("WORK_TEXT", repr(WORK))
    )
    assert out["gil"] is (not FREE_THREADED)
    for k, frames in enumerate(out["seen"]):
        check_stack(frames, f"t{k}", k % 4, f"t{k}.py")


def test_no_python_frame_is_an_empty_stack():
    # A thread state with no Python frame: the C-level entry frames of
    # PyRun/exec are owned by the C stack and skipped, so a call straight from
    # C sees only the code that called it. From the command line's -c code:
    out = scenario(
        "import interheap_interp as ii\nfrom scenario_support import result\nresult(frames=ii.stack())\n"
    )
    assert [name for _, name, _ in out["frames"]] == ["<module>"], out
