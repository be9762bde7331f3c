"""Condense a failed check's output to the lines that say what went wrong.

scripts/test.sh prints this at the very end of `make test`, because a CI log
that keeps only its tail would otherwise show which command failed but not
why. A sanitizer report keeps its headline, the first frames of each stack
and its summary; any other output keeps its last lines.

Usage: python scripts/condense_report.py LOG [--lines N]
"""

import argparse
import re
import sys

# The lines of a TSan/ASan/LSan/UBSan report worth keeping whole.
HEADLINE = re.compile(
    r"^(WARNING: ThreadSanitizer|==\d+==ERROR: |SUMMARY: |ThreadSanitizer: reported"
    r"|  (Write|Read|Atomic|Previous|Location|Mutex|Thread T\d+)"
    r"|\S+ of size \d+ at|runtime error:)"
)
FRAME = re.compile(r"^\s+#(\d+) ")
FRAMES_PER_STACK = 6


def condense(lines: list[str], tail: int) -> list[str]:
    """The sanitizer report in `lines`, shortened, or else their last `tail` lines."""
    start = next(
        (
            i
            for i, line in enumerate(lines)
            if line.startswith("WARNING: ThreadSanitizer") or re.match(r"^==\d+==ERROR: ", line)
        ),
        None,
    )
    if start is None:
        return lines[-tail:]
    kept = []
    for line in lines[start:]:
        frame = FRAME.match(line)
        if frame:
            if int(frame.group(1)) < FRAMES_PER_STACK:
                # Frames as "#N function file:line", without the long paths' prefixes.
                kept.append(re.sub(r"(?<=\s)\S*/(?=[^/\s]+:\d+)", "", line.rstrip()))
        elif HEADLINE.match(line):
            kept.append(line.rstrip())
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log")
    parser.add_argument("--lines", type=int, default=20, help="lines kept of output with no sanitizer report")
    args = parser.parse_args()
    with open(args.log, errors="replace") as f:
        lines = f.read().splitlines()
    print("\n".join(condense(lines, args.lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
