#!/usr/bin/env python3
"""Seconds between two events of a servicebusdemo log (text format, RFC 3339 UTC timestamps).

Usage:
    logspan.py FILE START END            # first line matching START -> last line matching END
    logspan.py FILE --since-ns NS END    # an epoch time in ns (process start) -> first END

START and END are regular expressions. Prints the seconds with microsecond precision, or exits
non-zero naming what was not found.
"""

from __future__ import annotations

import datetime
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z")


def stamped_lines(path: str):
    with open(path, encoding="utf-8", errors="replace") as log:
        for raw in log:
            line = ANSI.sub("", raw)
            match = STAMP.match(line)
            if not match:
                continue
            text = match.group(1)
            if "." in text:
                head, fraction = text.split(".")
                text = f"{head}.{fraction[:6].ljust(6, '0')}"
            else:
                text += ".000000"
            when = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f").replace(
                tzinfo=datetime.timezone.utc
            )
            yield when.timestamp(), line


def main() -> None:
    args = sys.argv[1:]
    if len(args) == 4 and args[1] == "--since-ns":
        path, start_at, end = args[0], int(args[2]) / 1e9, re.compile(args[3])
        for when, line in stamped_lines(path):
            if end.search(line):
                print(f"{when - start_at:.6f}")
                return
        raise SystemExit(f"{path}: no line matches {args[3]!r}")
    if len(args) != 3:
        raise SystemExit(__doc__)
    path, start, end = args[0], re.compile(args[1]), re.compile(args[2])
    started = finished = None
    for when, line in stamped_lines(path):
        if started is None and start.search(line):
            started = when
        if end.search(line):
            finished = when
    if started is None or finished is None:
        raise SystemExit(f"{path}: no span from {args[1]!r} to {args[2]!r}")
    print(f"{finished - started:.6f}")


if __name__ == "__main__":
    main()
