"""A throwaway nginx serving a directory on 127.0.0.1, for HTTP transport tests.

``running_nginx(docroot)`` writes a config into a fresh temp dir (``/tmp/bh-nginx.XXXXXXXX``),
starts ``nginx`` in the foreground (``daemon off``) on a free high port, waits until it answers,
and on exit stops it (SIGTERM to the master, SIGKILL after 10 s) and removes the temp dir::

    with running_nginx(docroot) as nginx:
        urlopen(f"{nginx.url}/file.bin")
        nginx.access_lines()          # one line per request, format ACCESS_LOG_FIELDS

nginx serves static files with ETag, Last-Modified, Accept-Ranges and byte ranges (206,
If-Range, 416). The access log records the connection serial number of every request, so a
test can tell whether requests shared a connection.

As root, nginx needs ``user root root;`` (otherwise its worker runs as ``nobody`` and cannot
read the 0700 temp dirs). The binary is ``nginx`` on PATH or /usr/sbin/nginx, or the path in
env ``BACKHAUL_NGINX``. Every failure to start raises RuntimeError with the log tail; nothing
is skipped.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

NGINX_ENV = "BACKHAUL_NGINX"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_PORT_ATTEMPTS = 3  # bind(0) then close is racy: retry with a new port if another process took it

ACCESS_LOG_FIELDS = (
    "connection",  # nginx's connection serial number
    "connection_requests",  # how many requests this connection has carried so far
    "status",
    "request",  # the request line, e.g. "GET /blob.bin HTTP/1.1"
    "body_bytes_sent",
    "http_range",
    "http_if_range",
)
_LOG_FORMAT = "\\t".join(f"${name}" for name in ACCESS_LOG_FIELDS)


def nginx_binary() -> str:
    explicit = os.environ.get(NGINX_ENV)
    if explicit:
        return explicit
    return shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(no log at {path}: {e})"
    return "\n".join(text.splitlines()[-lines:]) or f"(empty log {path})"


@dataclass
class NginxServer:
    """One running nginx. ``url`` has no trailing slash."""

    url: str
    port: int
    pid: int
    dir: Path
    access_log: Path
    docroot: Path
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def error_log(self) -> Path:
        return self.dir / "error.log"

    def access_lines(self) -> list[dict[str, str]]:
        """The access log so far, one dict per request (keys: ACCESS_LOG_FIELDS)."""
        try:
            text = self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [
            dict(zip(ACCESS_LOG_FIELDS, line.split("\t"), strict=False))
            for line in text.splitlines()
            if line
        ]

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the master (fast shutdown), SIGKILL after 10 s; remove the temp dir.
        Safe to call twice."""
        proc, self._process = self._process, None
        try:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    # The worker is in the master's session (start_new_session): kill both.
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _config(d: Path, docroot: Path, port: int) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""
    tmp = d / "tmp"
    temp_paths = "\n".join(
        f"  {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}worker_processes 1;
daemon off;
pid {d / "nginx.pid"};
error_log {d / "error.log"} info;
events {{ worker_connections 256; }}
http {{
  types {{ text/plain txt; text/html html; application/octet-stream bin; }}
  default_type application/octet-stream;
  log_format backhaul escape=none "{_LOG_FORMAT}";
  access_log {d / "access.log"} backhaul;
{temp_paths}
  sendfile on;
  keepalive_timeout 75s;
  keepalive_requests 10000;
  server {{
    listen 127.0.0.1:{port};
    root {docroot};
  }}
}}
"""


def _answers(port: int) -> bool:
    """Any HTTP answer (even 404) means nginx is serving."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("HEAD", "/")
        conn.getresponse().read()
    except OSError:
        return False
    finally:
        conn.close()
    return True


def _start(d: Path, docroot: Path, binary: str) -> NginxServer:
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(_config(d, docroot, port))
    error_log, stdout_log = d / "error.log", d / "stdout.log"
    with open(stdout_log, "ab") as out:
        try:
            proc = subprocess.Popen(
                # -e: otherwise nginx opens its compiled-in error log before reading the config
                [binary, "-p", str(d), "-c", str(conf), "-e", str(error_log)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the test terminal must not reach it
            )
        except OSError as e:
            raise RuntimeError(f"cannot run {binary} (set {NGINX_ENV}): {e}") from e
    server = NginxServer(
        url=f"http://127.0.0.1:{port}", port=port, pid=proc.pid, dir=d,
        access_log=d / "access.log", docroot=docroot, _process=proc,
    )  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _answers(port):
            return server
        time.sleep(0.05)
    rc = proc.poll()
    if rc is None:
        proc.kill()
        proc.wait(5)
    raise RuntimeError(
        f"nginx failed to start in {d} on 127.0.0.1:{port} "
        f"({'timed out' if rc is None else f'rc={rc}'})\n"
        f"--- {error_log} ---\n{_tail(error_log)}\n--- {stdout_log} ---\n{_tail(stdout_log)}"
    )


@contextlib.contextmanager
def running_nginx(docroot: Path) -> Iterator[NginxServer]:
    """Serve ``docroot`` on 127.0.0.1; always stop nginx and remove its temp dir."""
    binary = nginx_binary()
    d = Path(tempfile.mkdtemp(prefix="bh-nginx.", dir="/tmp"))
    server: NginxServer | None = None
    try:
        (d / "tmp").mkdir()
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                server = _start(d, docroot, binary)
                break
            except RuntimeError as e:
                if attempt == _PORT_ATTEMPTS or "Address already in use" not in str(e):
                    raise
                (d / "error.log").unlink(missing_ok=True)
        assert server is not None
        yield server
    finally:
        if server is not None:
            server.stop()
        else:
            shutil.rmtree(d, ignore_errors=True)
