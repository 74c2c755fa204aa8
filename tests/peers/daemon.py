"""What every peer server of the tests shares: a free loopback port, the tail of a log for
error messages, and stopping a server process by PID (SIGTERM, then SIGKILL to its process
group)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    """A port free on 127.0.0.1 right now (bind(0) then close is racy: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log, or why there are none."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(no log at {path}: {e})"
    return "\n".join(text.splitlines()[-lines:]) or f"(empty log {path})"


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM to ``proc``; after ``timeout`` s, SIGKILL to its process group (the servers
    start in a session of their own, with their workers). Nothing if it already exited."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
