"""Argument types the command's verbs share (adapters/cli.py, and adapters/cli_upload.py,
which imports nothing else of the command so that ``upload-server`` starts lean)."""

from __future__ import annotations

import argparse
import math
import sys

__all__ = ["header_lines", "interval_arg", "seconds_arg"]


def seconds_arg(text: str, *, zero: bool = True) -> float:
    """A number of seconds on the command line: finite, not negative (with ``zero`` False,
    more than 0); argparse refuses anything else with exit 2 (NaN reached the job's
    settings as a traceback). The message states the rule that refused it."""
    rule = "0 or more" if zero else "more than 0"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds ({rule})") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds ({rule})")
    return value


def interval_arg(text: str) -> float:
    """A wait between two steps, or a timeout: more than 0 seconds."""
    return seconds_arg(text, zero=False)


def header_lines(values: list[str] | None) -> list[str] | None:
    """Header arguments (``-H``, ``setcustomheaders``): each ``'NAME: VALUE'``, or ``@FILE``
    (``@-``: stdin) for the non-empty lines of a file, as curl's ``-H @FILE``, so that a
    token never stands in the command line (/proc/PID/cmdline, which every user can read).
    Raises OSError when a file cannot be read."""
    if not values:
        return values
    lines: list[str] = []
    for value in values:
        if not value.startswith("@"):
            lines.append(value)
            continue
        name = value[1:]
        if name == "-":
            text = sys.stdin.read()
        else:
            with open(name, encoding="utf-8") as file:
                text = file.read()
        lines += [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    return lines
