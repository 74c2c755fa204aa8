"""A throwaway squid forward proxy on 127.0.0.1, for proxy tests.

``running_squid()`` writes a config into a fresh temp dir (``/tmp/bh-squid.XXXXXXXX``), starts
``squid -N -f CONF`` (no daemon, no SMP kids) with two ports in one process, waits until it
answers, and on exit stops it by its PID (SIGTERM; ``shutdown_lifetime 0`` so it exits within
1-3 s; SIGKILL after 10 s) and removes the temp dir::

    with running_squid() as squid:
        squid.url          # open proxy for 127.0.0.1 clients
        squid.auth_url     # requires proxy Basic auth: squid.user / squid.password, else 407
        squid.access_lines()   # [(port name, method, URL, status)], one per request

Squid passes byte ranges through (``range_offset_limit`` is 0 by default), caches nothing
(``cache deny all``), binds every socket (DNS ones too: ``udp_*_address``) to 127.0.0.1 and
does not ping. As root it drops to ``proxy``, so the temp dir is chowned to that user. The proxy
password file is made with ``htpasswd`` (apache2-utils) or, without it, ``openssl passwd -apr1``.

The binary is ``squid`` on PATH or /usr/sbin/squid, or env ``BACKHAUL_SQUID``; the Basic helper
is /usr/lib/squid/basic_ncsa_auth or env ``BACKHAUL_SQUID_BASIC_AUTH``. Every failure to start
raises RuntimeError with the log tail; nothing is skipped.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from peers.daemon import free_port, tail, terminate

SQUID_ENV = "BACKHAUL_SQUID"
HELPER_ENV = "BACKHAUL_SQUID_BASIC_AUTH"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
_PORT_ATTEMPTS = 3


def squid_binary() -> str:
    return os.environ.get(SQUID_ENV) or shutil.which("squid") or "/usr/sbin/squid"


@dataclass
class SquidServer:
    """One running squid with an open port and a Basic-auth port."""

    url: str
    port: int
    auth_url: str
    auth_port: int
    pid: int
    dir: Path
    user: str
    password: str = field(repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def access_log(self) -> Path:
        return self.dir / "access.log"

    def access_lines(self, wait_for: int = 0) -> list[tuple[str, str, str, str]]:
        """(port name, method, URL, status) per request, oldest first; waits up to 2 s for
        ``wait_for`` lines (squid logs when a transaction ends)."""
        deadline = time.monotonic() + 2.0
        while True:
            try:
                text = self.access_log.read_text(errors="replace")
            except (FileNotFoundError, PermissionError):
                text = ""
            rows = [line.split(" ") for line in text.splitlines() if line]
            if len(rows) >= wait_for or time.monotonic() > deadline:
                return [(r[0], r[1], r[2], r[3]) for r in rows if len(r) >= 4]
            time.sleep(0.05)

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        proc, self._process = self._process, None
        try:
            terminate(proc, STOP_TIMEOUT_S)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _password_file(path: Path, user: str, password: str) -> None:
    htpasswd = shutil.which("htpasswd")
    if htpasswd:
        subprocess.run(
            [htpasswd, "-b", "-c", str(path), user, password], check=True, capture_output=True
        )
        return
    hashed = subprocess.run(
        ["openssl", "passwd", "-apr1", password], check=True, capture_output=True, text=True
    ).stdout.strip()
    path.write_text(f"{user}:{hashed}\n")


def _config(d: Path, port: int, auth_port: int) -> str:
    helper = os.environ.get(HELPER_ENV) or "/usr/lib/squid/basic_ncsa_auth"
    return f"""http_port 127.0.0.1:{port} name=open
http_port 127.0.0.1:{auth_port} name=auth
pid_filename {d}/squid.pid
cache_log {d}/cache.log
logformat backhaul %>lp %rm %ru %>Hs
access_log stdio:{d}/access.log logformat=backhaul
cache_store_log none
coredump_dir {d}
cache deny all
cache_mem 8 MB
visible_hostname localhost
pinger_enable off
netdb_filename none
shutdown_lifetime 0 seconds
dns_nameservers 127.0.0.1
udp_incoming_address 127.0.0.1
udp_outgoing_address 127.0.0.1
auth_param basic program {helper} {d}/htpasswd
auth_param basic children 2 startup=1 idle=1
auth_param basic realm peers-proxy
acl to_auth_port myportname auth
acl authed proxy_auth REQUIRED
acl me src 127.0.0.1/32 ::1
http_access deny !me
http_access allow to_auth_port authed
http_access deny to_auth_port
http_access allow me
http_access deny all
"""


def _answers(port: int) -> bool:
    """Any HTTP answer from squid itself (400 for a non-proxy request) means it serves."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/")
    except OSError:
        return False


def _start(d: Path, binary: str) -> tuple[subprocess.Popen[bytes], int, int]:
    port, auth_port = free_port(), free_port()
    conf = d / "squid.conf"
    conf.write_text(_config(d, port, auth_port))
    if os.geteuid() == 0:  # squid drops to cache_effective_user (Debian: proxy)
        entry = pwd.getpwnam("proxy")
        for p in (d, *d.rglob("*")):
            os.chown(p, entry.pw_uid, entry.pw_gid)
    stdout_log = d / "stdout.log"
    with open(stdout_log, "ab") as out:
        try:
            proc = subprocess.Popen(
                [binary, "-N", "-f", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            raise RuntimeError(f"cannot run {binary} (set {SQUID_ENV}): {e}") from e
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _answers(port) and _answers(auth_port):
            return proc, port, auth_port
        time.sleep(0.05)
    rc = proc.poll()
    if rc is None:
        proc.kill()
        proc.wait(5)
    raise RuntimeError(
        f"squid failed to start in {d} on 127.0.0.1:{port}/{auth_port} "
        f"({'timed out' if rc is None else f'rc={rc}'})\n"
        f"--- cache.log ---\n{tail(d / 'cache.log')}\n--- stdout ---\n{tail(stdout_log)}"
    )


@contextlib.contextmanager
def running_squid(user: str = "carol", password: str = "pr0xy") -> Iterator[SquidServer]:
    """An open proxy port and a Basic-auth proxy port on 127.0.0.1; always stopped."""
    binary = squid_binary()
    d = Path(tempfile.mkdtemp(prefix="bh-squid.", dir="/tmp"))
    server: SquidServer | None = None
    try:
        _password_file(d / "htpasswd", user, password)
        proc = None
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                proc, port, auth_port = _start(d, binary)
                break
            except RuntimeError as e:
                if attempt == _PORT_ATTEMPTS or "Address already in use" not in str(e):
                    raise
        assert proc is not None
        server = SquidServer(
            url=f"http://127.0.0.1:{port}", port=port,
            auth_url=f"http://127.0.0.1:{auth_port}", auth_port=auth_port,
            pid=proc.pid, dir=d, user=user, password=password, _process=proc,
        )  # fmt: skip
        yield server
    finally:
        if server is not None:
            server.stop()
        else:
            shutil.rmtree(d, ignore_errors=True)
