"""Argument types the command's verbs share (adapters/cli.py, and adapters/cli_upload.py,
which imports nothing else of the command so that ``upload-server`` starts lean)."""

from __future__ import annotations

import argparse
import math

__all__ = ["interval_arg", "seconds_arg"]


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
