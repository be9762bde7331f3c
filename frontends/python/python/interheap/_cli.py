"""``python -m interheap``: run a program under the hooks, or show a saved report.

    python -m interheap run [--json FILE] [--no-report] [--sites [RATE]] (SCRIPT | -m MODULE | -c CODE) ...
    python -m interheap report [--html OUT.html] FILE.json
    python -m interheap check [--json FILE] (SCRIPT | -m MODULE | -c CODE) ...

``run`` installs the hooks before the program starts, runs it the way
``python`` would (``sys.argv``, ``sys.path[0]``, ``__main__``), passes its
exit status through, and at exit (after its threads and its own ``atexit``
handlers) prints the per-interpreter table to stderr and writes the JSON.
"""

from __future__ import annotations

import argparse
import atexit
import os
import runpy
import sys
import types

RUN_USAGE = (
    "python -m interheap run [--json FILE] [--no-report] [--limit SIZE] [--main-limit SIZE] "
    "[--sites [RATE]] [--timeline [MS]] [--html FILE] [--live] (SCRIPT | -m MODULE | -c CODE) [ARGS...]"
)
RUN_DESCRIPTION = """\
Run a Python program with interheap's hooks installed before it starts, and
report its memory per interpreter and per domain (raw, mem, object) at exit.

The program runs as `python SCRIPT ARGS`, `python -m MODULE ARGS` or
`python -c CODE ARGS` would run it: same sys.argv, sys.path[0] and __main__,
and the same exit status. Everything after SCRIPT, MODULE or CODE is passed
to the program untouched. The report goes to stderr once the program's
threads and atexit handlers have finished.

Memory limits (live bytes, exact; the interpreter that would cross its limit
gets MemoryError): --limit SIZE gives every interpreter the program creates a
limit of its own, --main-limit SIZE limits the main interpreter. SIZE is
bytes or a text such as 256MB or 1.5GiB. The environment variables
INTERHEAP_LIMIT and INTERHEAP_MAIN_LIMIT do the same; the options win."""


class UsageError(Exception):
    """Bad command-line arguments."""


class RunRequest:
    """What `run` or `check` was asked to do, from the command line and the
    environment. (A plain class, not a dataclass: `python -m interheap run`
    imports no more than it needs before the program starts, since every
    module it loads is memory the program's figures and peak RSS carry.)"""

    __slots__ = (
        "args",
        "check",
        "html_path",
        "json_path",
        "kind",
        "leaks",
        "limit",
        "live",
        "main_limit",
        "memory_errors",
        "report",
        "sites",
        "target",
        "timeline_ms",
    )

    def __init__(
        self,
        kind: str,
        target: str,
        args: list[str] | None = None,
        *,
        json_path: str | None = None,
        report: bool = True,
        limit: str | None = None,
        main_limit: str | None = None,
        sites: str | None = None,
        timeline_ms: float | None = None,
        html_path: str | None = None,
        live: bool = False,
        check: bool = False,
        leaks: bool = False,
        memory_errors: bool = False,
    ) -> None:
        #: "script", "module" or "code", and the script's path, the module or the code.
        self.kind = kind
        self.target = target
        self.args = [] if args is None else args
        self.json_path = json_path
        self.report = report
        self.limit = limit
        self.main_limit = main_limit
        #: Sample allocation sites at this mean rate (text such as "512KiB"), or not at all.
        self.sites = sites
        #: Record the timeline every this many milliseconds, or not at all.
        self.timeline_ms = timeline_ms
        #: Also write the HTML report here.
        self.html_path = html_path
        #: Show the live view in the terminal while the program runs.
        self.live = live
        #: `check`: install the checking hooks, print findings, exit non-zero on any.
        self.check = check
        #: `check --leaks`: blocks an isolated interpreter holds when it ends are findings.
        self.leaks = leaks
        #: `check --memory-errors`: buffer overruns and uses after free (interheap-python only).
        self.memory_errors = memory_errors

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"RunRequest({fields})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RunRequest):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


CHECK_DESCRIPTION = """\
Run a Python program under interheap's checking hooks and report the memory
bugs that isolated interpreters and free-threading turn into corruption:
cross-interpreter frees and reallocs (the block is kept out of the wrong
obmalloc state), domain mismatches, mem/object calls without a thread
state, double frees, foreign pointers, and with --leaks the mem and object
blocks an isolated interpreter still holds when it ends (off by default:
CPython itself leaves blocks behind in interpreters that used
concurrent.interpreters queues). With --sites RATE, findings about sampled
blocks also say where the block was allocated (--sites 1 samples every
allocation). Each is printed once per call site with the interpreters
involved and its Python stack; the program keeps running. The exit status
is 1 if anything was found and the program succeeded, else the program's
own. Takes the same options as `run`."""


def _run_parser(command: str = "run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m interheap {command}",
        usage=RUN_USAGE.replace(" run ", f" {command} ", 1),
        description=CHECK_DESCRIPTION if command == "check" else RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--json", metavar="FILE", help="also write the figures as JSON to FILE ('-' for stdout)"
    )
    parser.add_argument("--no-report", action="store_true", help="do not print the table at exit")
    parser.add_argument(
        "--limit", metavar="SIZE", help="limit every interpreter the program creates (each its own budget)"
    )
    parser.add_argument("--main-limit", metavar="SIZE", help="limit the main interpreter")
    parser.add_argument(
        "--sites",
        metavar="RATE",
        nargs="?",
        const="512KiB",
        help="sample allocation sites, one per RATE bytes on average (default 512KiB); "
        "the report shows each interpreter's top sites",
    )
    parser.add_argument(
        "--timeline",
        metavar="MS",
        nargs="?",
        const="10",
        help="record each interpreter's live bytes every MS milliseconds (default 10); "
        "the report gives each one's peak and when, the JSON every point",
    )
    parser.add_argument(
        "--html",
        metavar="FILE",
        help="also write the HTML report (timeline chart, flame graph, sites) to FILE",
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="show a live view in the terminal every second (interpreters, limits, top sites; "
        "turns on --sites); needs the 'rich' package",
    )
    if command == "check":
        parser.add_argument(
            "--memory-errors",
            action="store_true",
            help="buffer overruns and uses after free: only under interheap-python, which "
            "INTERHEAP_CHECK=1 interheap-python PROGRAM runs with this option",
        )
        parser.add_argument(
            "--leaks",
            action="store_true",
            help="report the mem and object blocks an isolated interpreter still holds when it ends "
            "(with --sites RATE: per allocation site)",
        )
    parser.add_argument(
        "program", nargs="*", metavar="SCRIPT | -m MODULE | -c CODE", help="what to run, then its arguments"
    )
    return parser


def parse_run_args(argv: list[str], command: str = "run") -> RunRequest:
    """Splits ``run``'s own options from the program and its arguments.

    interheap's options come first; the first ``-m``, ``-c`` or non-option word
    starts the program, and nothing after it is interpreted by interheap.
    """
    json_path: str | None = None
    html_path: str | None = None
    live = False
    report = True
    sites: str | None = None
    timeline_ms: float | None = None
    leaks = False
    memory_errors = False
    limits: dict[str, str | None] = {
        "limit": os.environ.get("INTERHEAP_LIMIT") or None,
        "main_limit": os.environ.get("INTERHEAP_MAIN_LIMIT") or None,
    }

    def request(kind: str, target: str, args: list[str]) -> RunRequest:
        return RunRequest(
            kind,
            target,
            args,
            json_path=json_path,
            report=report,
            **limits,
            sites=sites,
            timeline_ms=timeline_ms,
            html_path=html_path,
            live=live,
            leaks=leaks,
            memory_errors=memory_errors,
        )

    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            _run_parser(command).print_help()
            raise SystemExit(0)
        option = arg.split("=", 1)[0]
        if option in ("--limit", "--main-limit"):
            if "=" in arg:
                value, i = arg.split("=", 1)[1], i + 1
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 2
            else:
                raise UsageError(f"{option} needs a SIZE argument (bytes, or such as 256MB)")
            limits[option[2:].replace("-", "_")] = value
        elif arg == "--json":
            if i + 1 >= len(argv):
                raise UsageError("--json needs a FILE argument")
            json_path = argv[i + 1]
            i += 2
        elif arg.startswith("--json="):
            json_path = arg[len("--json=") :]
            i += 1
        elif arg == "--html" or arg.startswith("--html="):
            if "=" in arg:
                html_path, i = arg.split("=", 1)[1], i + 1
            elif i + 1 < len(argv):
                html_path, i = argv[i + 1], i + 2
            else:
                raise UsageError("--html needs a FILE argument")
        elif arg == "--live":
            live, i = True, i + 1
            # The view shows top sites: sample them unless a rate was given.
            sites = sites or "512KiB"
        elif arg in ("--leaks", "--memory-errors"):
            if command != "check":
                raise UsageError(f"{arg} is an option of 'check' (python -m interheap check {arg} ...)")
            if arg == "--leaks":
                leaks = True
            else:
                memory_errors = True
            i += 1
        elif arg == "--no-report":
            report = False
            i += 1
        elif arg == "--sites":
            # The rate is optional: a following word is the rate only if it is a size.
            sites, i = "512KiB", i + 1
            if i < len(argv) and argv[i][:1].isdigit():
                sites, i = argv[i], i + 1
        elif arg.startswith("--sites="):
            sites, i = arg[len("--sites=") :], i + 1
        elif arg == "--timeline" or arg.startswith("--timeline="):
            # The interval is optional: a following word is it only if it starts with a digit.
            if arg.startswith("--timeline="):
                text, i = arg[len("--timeline=") :], i + 1
            else:
                text, i = "10", i + 1
                if i < len(argv) and argv[i][:1].isdigit():
                    text, i = argv[i], i + 1
            try:
                timeline_ms = float(text)
            except ValueError:
                raise UsageError(f"--timeline: {text!r} is not a number of milliseconds") from None
            if not timeline_ms > 0 or timeline_ms != timeline_ms or timeline_ms == float("inf"):
                raise UsageError(
                    f"--timeline: the interval must be a positive number of milliseconds, not {text!r}"
                )
        elif arg in ("-m", "-c"):
            if i + 1 >= len(argv):
                what = "a MODULE" if arg == "-m" else "a CODE"
                raise UsageError(f"{arg} needs {what} argument")
            kind = "module" if arg == "-m" else "code"
            return request(kind, argv[i + 1], argv[i + 2 :])
        elif arg.startswith("-m") or arg.startswith("-c"):
            # -mMODULE / -cCODE, as python accepts them.
            kind = "module" if arg[1] == "m" else "code"
            return request(kind, arg[2:], argv[i + 1 :])
        elif arg == "--":
            if i + 1 >= len(argv):
                raise UsageError("nothing to run after '--'")
            return request("script", argv[i + 1], argv[i + 2 :])
        elif arg.startswith("-"):
            raise UsageError(f"unknown option {arg!r} (interheap's options come before the program)")
        else:
            return request("script", arg, argv[i + 1 :])
    raise UsageError("nothing to run: give a SCRIPT, -m MODULE or -c CODE")


def _check_request(req: RunRequest) -> None:
    """Refuses, before anything runs, what would fail only at exit."""
    if req.kind == "script" and not os.path.exists(req.target):
        raise UsageError(f"can't open file {req.target!r}: no such file or directory")
    if req.kind == "module" and not req.target:
        raise UsageError("-m needs a MODULE argument")
    from ._limits import parse_size

    for name, value in (
        ("--limit / INTERHEAP_LIMIT", req.limit),
        ("--main-limit / INTERHEAP_MAIN_LIMIT", req.main_limit),
        ("--sites", req.sites),
    ):
        if value is not None:
            try:
                parse_size(value)
            except ValueError as exc:
                raise UsageError(f"{name}: {exc}") from None
    if req.memory_errors:
        from . import _native

        if not _native.allocator_checks_on():
            raise UsageError(
                "--memory-errors (buffer overruns and uses after free) needs every block to be made by "
                "interheap's allocator from the start, with a guard after it and a quarantine after its "
                "free; interheap's hooks are installed after start-up, over blocks CPython already holds, "
                "so they cannot. Run INTERHEAP_CHECK=1 interheap-python PROGRAM (it runs this check with "
                "--memory-errors) on a default (not free-threaded) build"
            )
    if req.json_path not in (None, "-"):
        check_output_path("--json", req.json_path)
    if req.html_path is not None:
        check_output_path("--html", req.html_path)
    if req.live:
        from ._live import require_rich

        try:
            require_rich()
        except ImportError as exc:
            raise UsageError(str(exc)) from None


def check_output_path(option: str, path: str) -> None:
    """Refuses a file that could not be written, before anything runs."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{option}: directory {directory!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{option}: {path!r} is a directory")
    if not os.access(directory, os.W_OK):
        raise UsageError(f"{option}: directory {directory!r} is not writable")


_live_view = None


def _report_at_exit(req: RunRequest) -> None:
    import interheap

    if _live_view is not None:
        _live_view.stop()
    # Every figure is read before the report's code first loads (at exit, not
    # at start-up, to keep the program's own run lean), so none of them shows it.
    wanted = req.report or req.json_path is not None or req.html_path is not None
    figures = interheap._read_figures() if wanted else None
    findings = interheap.check_report() if req.check else None
    sites = interheap.sites_snapshot() if req.sites is not None else None
    timeline = None
    if req.timeline_ms is not None:
        interheap.stop_timeline()
        timeline = interheap.timeline()
    snap = interheap._present(figures) if figures is not None else None
    if findings is not None:
        print(findings.format(), file=sys.stderr, flush=True)
    elif snap is not None and req.report:
        print(snap.format_table(), file=sys.stderr, flush=True)
        if sites is not None:
            print(sites.format_table(), file=sys.stderr, flush=True)
        if timeline is not None:
            print(timeline.format_summary(), file=sys.stderr, flush=True)
    if snap is not None and req.json_path is not None:
        document = snap.to_dict()
        if findings is not None:
            document["check"] = findings.to_dict()
        if sites is not None:
            document["sites"] = sites.to_dict()
        if timeline is not None:
            document["timeline"] = timeline.to_dict()
        import json

        text = json.dumps(document, indent=2) + "\n"
        if req.json_path == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            try:
                with open(req.json_path, "w", encoding="utf-8") as fh:
                    fh.write(text)
            except OSError as exc:
                print(f"interheap: could not write {req.json_path}: {exc}", file=sys.stderr)
    if snap is not None and req.html_path is not None:
        from ._html import render_html

        try:
            with open(req.html_path, "w", encoding="utf-8") as fh:
                fh.write(render_html(snap, sites, timeline, _program_title(req)))
        except OSError as exc:
            print(f"interheap: could not write {req.html_path}: {exc}", file=sys.stderr)
    if findings is not None and findings.total and _program_status in (0, None):
        # The program succeeded but has findings: exit 1. atexit handlers
        # cannot change the status, so end here, everything flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(CHECK_FINDINGS_STATUS)


#: `check`'s exit status when the program succeeded but has findings.
CHECK_FINDINGS_STATUS = 1
#: The program's exit status once it ended (None: still running, or 0).
_program_status: int | str | None = None


def _program_title(req: RunRequest) -> str:
    """The program as its command line names it, for the HTML report's title."""
    head = {"script": req.target, "module": f"-m {req.target}", "code": "-c ..."}[req.kind]
    return " ".join([head, *req.args])[:200]


def _fresh_main(filename: str | None) -> dict:
    module = types.ModuleType("__main__")
    if filename is not None:
        module.__file__ = filename
    module.__builtins__ = __builtins__  # type: ignore[attr-defined]
    sys.modules["__main__"] = module
    return module.__dict__


def run(req: RunRequest) -> None:
    """Installs the hooks and runs the program. Exceptions and SystemExit
    propagate, so the interpreter reports and exits exactly as for ``python``."""
    import interheap

    _check_request(req)
    # Under interheap-python the figures come from its heaps, at no cost per
    # call, unless something only the hooks do is asked for (exact limits,
    # sampled sites, the checker).
    needs_hooks = req.check or req.sites is not None or req.live or bool(req.limit or req.main_limit)
    # The code the options use while the program runs, loaded before the
    # hooks count anything (so the figures and sampled sites do not show it);
    # the report's code loads at exit, after the figures are read.
    if req.check:
        from . import _check  # noqa: F401
    if req.limit or req.main_limit:
        from . import _limits  # noqa: F401
    if req.sites is not None:
        from . import _sites  # noqa: F401
    if req.timeline_ms is not None:
        from . import _timeline  # noqa: F401
    interheap._install(req.check, "hooks" if needs_hooks else "auto")
    if req.leaks:
        interheap._native.set_check_leaks(True)
    if req.main_limit is not None:
        interheap.set_limit(0, req.main_limit)
    if req.limit is not None:
        interheap.set_default_limit(req.limit)
    if req.sites is not None:
        interheap.start_sites(req.sites)
    if req.timeline_ms is not None:
        interheap.start_timeline(req.timeline_ms / 1000)
    atexit.register(_report_at_exit, req)
    if req.live:
        from ._live import LiveView

        global _live_view
        _live_view = LiveView()
        _live_view.start()
    global _program_status
    try:
        _run_program(req)
    except SystemExit as exc:
        _program_status = exc.code
        raise
    except BaseException:
        _program_status = 1
        raise


def _run_program(req: RunRequest) -> None:
    if req.kind == "script":
        sys.argv = [req.target, *req.args]
        sys.path[0] = os.path.dirname(os.path.abspath(req.target))
        runpy.run_path(req.target, run_name="__main__")
    elif req.kind == "module":
        sys.argv = [req.target, *req.args]
        sys.path[0] = os.getcwd()
        runpy._run_module_as_main(req.target, alter_argv=True)  # type: ignore[attr-defined]
    else:
        sys.argv = ["-c", *req.args]
        sys.path[0] = ""
        exec(compile(req.target, "<string>", "exec"), _fresh_main(None))


def report(path: str, html_path: str | None = None) -> int:
    """Prints the tables of a JSON file written by ``run --json``, or writes
    its HTML report to ``html_path``."""
    import json

    from ._sites import SitesSnapshot
    from ._stats import Snapshot
    from ._timeline import Timeline

    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        snap = Snapshot.from_dict(data)
        sites = SitesSnapshot.from_dict(data["sites"]) if "sites" in data else None
        timeline = Timeline.from_dict(data["timeline"]) if "timeline" in data else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"interheap report: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    if html_path is not None:
        from ._html import render_html

        try:
            with open(html_path, "w", encoding="utf-8") as fh:
                fh.write(render_html(snap, sites, timeline, os.path.basename(path)))
        except OSError as exc:
            print(f"interheap report: cannot write {html_path}: {exc}", file=sys.stderr)
            return 2
        print(f"interheap report: wrote {html_path}", file=sys.stderr)
        return 0
    print(snap.format_table())
    if sites is not None:
        print(sites.format_table())
    if timeline is not None:
        print(timeline.format_summary())
    return 0


def parse_report_args(argv: list[str]) -> tuple[str, str | None]:
    """``report [--html OUT.html] FILE.json`` -> (FILE.json, OUT.html or None)."""
    html_path: str | None = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--html":
            if i + 1 >= len(argv):
                raise UsageError("--html needs an OUT.html argument")
            html_path, i = argv[i + 1], i + 2
        elif arg.startswith("--html="):
            html_path, i = arg[len("--html=") :], i + 1
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown option {arg!r}")
        else:
            rest.append(arg)
            i += 1
    if len(rest) != 1:
        raise UsageError("give exactly one FILE.json")
    if html_path is not None:
        check_output_path("--html", html_path)
    return rest[0], html_path


REPORT_USAGE = "usage: python -m interheap report [--html OUT.html] FILE.json"


MAIN_DESCRIPTION = """\
interheap: exact memory per interpreter and per allocator domain.

commands:
  run      run a program under the hooks and report at exit
           (python -m interheap run --help)
  check    run a program under the checking hooks; print the memory bugs
           found (cross-interpreter frees, domain mismatches, calls without
           a thread state, double frees, foreign pointers) and exit 1 if any
  report   print the tables of a JSON file written by `run --json`,
           or write its HTML report (report --html OUT.html FILE.json)"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "python -m interheap"
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} {{run,check,report,--version}} ...\n\n{MAIN_DESCRIPTION}")
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "--version":
        from . import __version__

        print(f"interheap {__version__}")
        return
    try:
        if command in ("run", "check"):
            req = parse_run_args(rest, command)
            req.check = command == "check"
            _check_request(req)
        elif command == "report":
            if rest and rest[0] in ("-h", "--help"):
                print(REPORT_USAGE)
                raise SystemExit(0)
            path, html_path = parse_report_args(rest)
            raise SystemExit(report(path, html_path))
        else:
            raise UsageError(f"unknown command {command!r}; expected 'run', 'check' or 'report'")
    except UsageError as exc:
        run_usage = RUN_USAGE.replace(" run ", f" {command} ", 1)
        usage = REPORT_USAGE if command == "report" else f"usage: {run_usage}"
        print(f"{prog}: error: {exc}\n{usage}", file=sys.stderr)
        raise SystemExit(2) from None
    run(req)
