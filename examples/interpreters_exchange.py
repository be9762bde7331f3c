"""Four isolated subinterpreters in parallel threads that churn memory and pass
objects to each other through cross-interpreter queues (channels on 3.12).

The interpreters form a ring: interpreter k puts messages (bytes of varying
size with a checked header and payload, and a checked str) on queue k and takes
them from queue k-1, for
``--seconds`` of churn. Every message is received exactly once; the receiver
keeps its last ``--keep`` messages. In the final phase each interpreter sends
its neighbour ``--hold`` bytes objects of a size of its own, which the
neighbour keeps until it is destroyed, so a per-interpreter report can show
where those blocks live.

Under ``interheap-python`` (the interheap allocator) the script then checks
the allocator's figures: every interpreter's held blocks are in that
interpreter's heaps (not the sender's, not main's), every heap's counts add
up, nothing failed, cross-thread frees were counted, and destroyed
interpreters' heaps have ended. It prints ``RESULT ok`` and exits 0, or says
what is wrong and exits 1. Under plain ``python`` it checks delivery only.

    interheap-python examples/interpreters_exchange.py [--seconds 3] [--keep 200] [--hold 2000]

Uses ``concurrent.interpreters`` (PEP 734: ``create()``, ``create_queue()``,
``Interpreter.exec``/``prepare_main``/``close``, ``QueueEmpty``) on CPython
3.14+, including free-threaded builds (where the allocator serves only the raw
domain); only where that is missing, the private modules: ``_interpreters`` +
``_interpqueues`` on 3.13, ``_xxsubinterpreters`` + ``_xxinterpchannels`` on 3.12.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import threading
import time

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

# The subinterpreter API, per version. Interpreters and queues are named by
# their IDs in the host; code run in an interpreter names its queues by the
# variables that bind() set in its __main__; host_get() takes from a queue in
# the host. PUT, GET and EMPTY are source text for the interpreters' code.
if sys.version_info >= (3, 14):
    import concurrent.interpreters as interpreters

    IMPORT = "from concurrent.interpreters import QueueEmpty"
    PUT = "{q}.put({obj})"
    GET = "{q}.get_nowait()"
    EMPTY = "QueueEmpty"
    _interps: dict[int, interpreters.Interpreter] = {}
    _queues: dict[int, interpreters.Queue] = {}

    def create() -> int:
        interp = interpreters.create()  # isolated: own GIL and obmalloc state
        _interps[interp.id] = interp
        return interp.id

    def run(interp: int, code: str) -> None:
        try:
            _interps[interp].exec(code)
        except interpreters.ExecutionFailed as exc:
            raise RuntimeError(f"interpreter {interp} failed:\n{exc}") from exc

    def destroy(interp: int) -> None:
        _interps.pop(interp).close()

    def make_pipe() -> int:
        queue = interpreters.create_queue()  # unbounded
        _queues[queue.id] = queue
        return queue.id

    def close_pipe(q: int) -> None:
        # A queue is destroyed when no interpreter holds it any more.
        _queues.pop(q)

    def bind(interp: int, **queues: int) -> None:
        _interps[interp].prepare_main({name: _queues[q] for name, q in queues.items()})

    def host_get(q: int) -> object:
        return _queues[q].get_nowait()

elif sys.version_info >= (3, 13):
    import _interpqueues
    import _interpreters

    IMPORT = "import _interpqueues"
    # fmt 0 (default), unboundop 1 (an item whose sender is gone is removed)
    PUT = "_interpqueues.put({q}, {obj}, 0, 1)"
    GET = "_interpqueues.get({q})[0]"
    EMPTY = "_interpqueues.QueueError"  # its QueueEmpty subclass when nothing is there

    def create() -> int:
        return int(_interpreters.create("isolated"))

    def run(interp: int, code: str) -> None:
        failure = _interpreters.exec(interp, code)
        if failure is not None:
            raise RuntimeError(f"interpreter {interp} failed:\n{getattr(failure, 'formatted', failure)}")

    def destroy(interp: int) -> None:
        _interpreters.destroy(interp)

    def make_pipe() -> int:
        return int(_interpqueues.create(0, 0, 1))  # unbounded

    def close_pipe(q: int) -> None:
        _interpqueues.destroy(q)

    def bind(interp: int, **queues: int) -> None:
        run(interp, "".join(f"{name} = {q}\n" for name, q in queues.items()))

    def host_get(q: int) -> object:
        return eval(GET.format(q=q))

else:  # 3.12
    import _xxinterpchannels
    import _xxsubinterpreters

    IMPORT = "import _xxinterpchannels"
    PUT = "_xxinterpchannels.send({q}, {obj})"
    GET = "_xxinterpchannels.recv({q})"
    EMPTY = "_xxinterpchannels.ChannelEmptyError"
    _handles: dict[int, object] = {}

    def create() -> int:
        handle = _xxsubinterpreters.create(isolated=True)
        _handles[int(handle)] = handle
        return int(handle)

    def run(interp: int, code: str) -> None:
        _xxsubinterpreters.run_string(interp, code)

    def destroy(interp: int) -> None:
        _xxsubinterpreters.destroy(interp)
        _handles.pop(interp, None)

    # As with interpreters, 3.12 destroys a channel when its last ChannelID
    # handle is garbage collected: keep the handles until close_pipe().
    _channels: dict[int, object] = {}

    def make_pipe() -> int:
        handle = _xxinterpchannels.create()
        _channels[int(handle)] = handle
        return int(handle)

    def close_pipe(q: int) -> None:
        _xxinterpchannels.destroy(q)
        _channels.pop(q, None)

    def bind(interp: int, **queues: int) -> None:
        run(interp, "".join(f"{name} = {q}\n" for name, q in queues.items()))

    def host_get(q: int) -> object:
        return eval(GET.format(q=q))


# Runs in each subinterpreter. Sends and receives until the deadline, then
# drains what its neighbour sent; `stats` (a dict in the interpreter's
# __main__) is read back by the host. `out_q`, `in_q` and `pipe` are bound by
# bind() beforehand.
CHURN = """
import random, time
{import_pipe}
rng = random.Random({k})
stats = dict(sent=0, received=0, bad=0)
kept = []
deadline = time.monotonic() + {seconds}
def take():
    try:
        msg = {get_in}
    except {empty}:
        return False
    if isinstance(msg, bytes):
        seq, size, sender = int.from_bytes(msg[:4], "little"), int.from_bytes(msg[4:6], "little"), msg[6]
        ok = len(msg) == 7 + size and msg[7:] == bytes([seq % 256]) * size
    else:
        sender, seq, tail = msg.split(":")
        ok = tail == "x" * (int(seq) % 50)
    stats["received"] += 1
    stats["bad"] += not ok
    kept.append(msg)
    if len(kept) > {keep}:
        del kept[:len(kept) - {keep}]
    return True
seq = 0
while time.monotonic() < deadline:
    garbage = [{{i: str(i) * 4}} for i in range(rng.randrange(10, 60))]
    size = rng.randrange(1, 4000)
    data = seq.to_bytes(4, "little") + size.to_bytes(2, "little") + bytes([{k}]) + bytes([seq % 256]) * size
    text = f"{k}:{{seq}}:" + "x" * (seq % 50)
    {put_out_data}
    {put_out_text}
    stats["sent"] += 2
    seq += 1
    del garbage, data, text
    take()
"""

# Drains the neighbour's messages once everyone has stopped sending.
DRAIN = """
while take():
    pass
"""

# Final phase: send `hold` bytes of this interpreter's own size; the receiver keeps them.
SEND_HELD = """
for _ in range({hold}):
    {put_out_held}
"""
RECEIVE_HELD = """
held = []
while len(held) < {hold}:
    try:
        held.append({get_in})
    except {empty}:
        time.sleep(0.001)
"""


def held_size(k: int) -> int:
    return 5000 + 900 * k


def run_all(interps: list[int], codes: list[str]) -> None:
    errors: list[BaseException] = []

    def target(interp: int, code: str) -> None:
        try:
            run(interp, code)
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i, c)) for i, c in zip(interps, codes, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def read_stats(interp: int, pipe: int) -> dict:
    """Copies the interpreter's `stats` dict out through a pipe (as JSON text)."""
    run(interp, f"import json\n{PUT.format(q='pipe', obj='json.dumps(stats)')}")
    return json.loads(host_get(pipe))


def allocator_checks(interps: list[int], ended: bool) -> list[str]:
    """What is wrong with the allocator's figures (empty if nothing)."""
    import interheap

    problems = []
    s = interheap.allocator_stats()
    for heap in s.raw_json["heaps"]:
        counted = sum(a - f - r for _, _, a, f, r in heap["classes"])
        if counted != heap["live_blocks"] or heap["failures"] or heap["live_bytes"] > heap["peak_bytes"]:
            problems.append(f"inconsistent heap: {heap}")
    remote = sum(x.mem.remote_frees + x.object.remote_frees + x.raw.remote_frees for x in s.interpreters)
    if s.shared.remote_frees + remote == 0:
        problems.append("no cross-thread or cross-interpreter free was counted")
    if FREE_THREADED:
        return problems
    for k, interp in enumerate(interps):
        mine = s.interpreter(interp)
        if mine.ended != ended:
            problems.append(f"interpreter {interp}: ended={mine.ended}, expected {ended}")
        if ended:
            continue
        # Interpreter k holds `hold` blocks of its neighbour's size (k-1), made
        # in its own heaps from the data. (The sender's originals live until
        # CPython runs the sender's pending release calls, so they are not checked.)
        n = held_size((k - 1) % len(interps)) + 1
        held, by_main = (
            sum(
                a - f - r
                for size, (a, f, r) in (x.mem + x.object).classes.items()
                if n <= size < 1.25 * n + 16
            )
            for x in (mine, s.interpreter(0))
        )
        if held < ARGS.hold:
            problems.append(f"interpreter {interp} holds {held} blocks of ~{n} B, expected {ARGS.hold}")
        if by_main >= ARGS.hold:
            problems.append(f"main holds interpreter {interp}'s blocks: {by_main}")
    return problems


def main() -> int:
    interps = [create() for _ in range(4)]
    queues = [make_pipe() for _ in interps]
    pipe = make_pipe()
    fmt = dict(import_pipe=IMPORT, empty=EMPTY, seconds=ARGS.seconds, keep=ARGS.keep, hold=ARGS.hold)
    codes = []
    for k, interp in enumerate(interps):
        bind(interp, out_q=queues[k], in_q=queues[(k - 1) % 4], pipe=pipe)
        codes.append(
            CHURN.format(
                k=k,
                get_in=GET.format(q="in_q"),
                put_out_data=PUT.format(q="out_q", obj="data"),
                put_out_text=PUT.format(q="out_q", obj="text"),
                **fmt,
            )
        )
    start = time.monotonic()
    run_all(interps, codes)
    run_all(interps, [DRAIN] * 4)
    stats = [read_stats(i, pipe) for i in interps]
    sent, received = sum(x["sent"] for x in stats), sum(x["received"] for x in stats)
    problems = []
    if sent != received or any(x["bad"] for x in stats):
        problems.append(f"messages lost or damaged: {stats}")
    run_all(
        interps,
        [
            SEND_HELD.format(hold=ARGS.hold, put_out_held=PUT.format(q="out_q", obj=f"b'x' * {held_size(k)}"))
            + RECEIVE_HELD.format(get_in=GET.format(q="in_q"), **fmt)
            for k in range(4)
        ],
    )
    allocator = False
    try:
        import interheap

        allocator = interheap.allocator_installed()
    except ImportError:
        pass
    if allocator:
        problems += allocator_checks(interps, ended=False)
    for q in [*queues, pipe]:
        close_pipe(q)
    for interp in interps:
        destroy(interp)
    if allocator:
        problems += allocator_checks(interps, ended=True)
    elapsed = time.monotonic() - start
    print(
        f"4 interpreters, {elapsed:.1f} s: {sent} messages sent, {received} received"
        f"{', allocator figures checked' if allocator else ''}"
    )
    for problem in problems:
        print("PROBLEM:", problem)
    print("RESULT", "ok" if not problems else "FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of churn")
    parser.add_argument("--keep", type=int, default=200, help="messages each receiver keeps while churning")
    parser.add_argument(
        "--hold", type=int, default=2000, help="bytes objects each interpreter keeps at the end"
    )
    ARGS = parser.parse_args()
    sys.exit(main())
