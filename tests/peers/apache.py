"""A throwaway apache2 with HTTP Digest authentication on 127.0.0.1, for transport tests.

``running_apache()`` writes a config into a fresh temp dir (``/tmp/bh-apache.XXXXXXXX``, mode
0755 because apache's children run as www-data when started by root), starts
``apache2 -f CONF -DFOREGROUND`` (event MPM, one child) on a free high port, waits until it
answers, and on exit stops it by its PID (SIGTERM to the parent, SIGKILL after 10 s) and
removes the temp dir::

    with running_apache() as apache:
        (apache.docroot / "digest" / "f.bin").write_bytes(data)   # under Digest auth
        apache.url + "/digest/f.bin"; apache.digest_user; apache.digest_password
        apache.access_lines()     # [(user, request line, status)], one per request

``/digest/`` requires Digest (mod_auth_digest: MD5, qop=auth) for ``digest_user`` in realm
``digest_realm``; everything else in the docroot is public. Files the test adds must be
world-readable (the default umask gives 0644). Apache writes its access log after the response
is sent: ``access_lines(wait_for=n, matching=text)`` waits up to 2 s for n lines whose
request line holds ``text``.

The binary is ``apache2`` on PATH or /usr/sbin/apache2, or the path in env ``BACKHAUL_APACHE``;
modules come from /usr/lib/apache2/modules (env ``BACKHAUL_APACHE_MODULES``). Every failure to
start raises RuntimeError with the log tail; nothing is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from peers.daemon import free_port, tail, terminate

APACHE_ENV = "BACKHAUL_APACHE"
MODULES_ENV = "BACKHAUL_APACHE_MODULES"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_PORT_ATTEMPTS = 3
_MODULES = (
    ("mpm_event_module", "mod_mpm_event.so"),
    ("authn_core_module", "mod_authn_core.so"),
    ("authn_file_module", "mod_authn_file.so"),
    ("authz_core_module", "mod_authz_core.so"),
    ("authz_user_module", "mod_authz_user.so"),
    ("auth_digest_module", "mod_auth_digest.so"),
    ("mime_module", "mod_mime.so"),
)


def apache_binary() -> str:
    return os.environ.get(APACHE_ENV) or shutil.which("apache2") or "/usr/sbin/apache2"


@dataclass
class ApacheServer:
    """One running apache2. ``url`` has no trailing slash."""

    url: str
    port: int
    pid: int
    dir: Path
    docroot: Path
    digest_user: str
    digest_password: str = field(repr=False)
    digest_realm: str
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def access_log(self) -> Path:
        return self.dir / "access.log"

    @property
    def error_log(self) -> Path:
        return self.dir / "error.log"

    def access_lines(self, wait_for: int = 0, matching: str = "") -> list[tuple[str, str, str]]:
        """(user, request line, status) per request whose request line holds ``matching``,
        oldest first (with no ``matching``, the readiness probe and other tests' requests
        too)."""
        deadline = time.monotonic() + 2.0
        while True:
            try:
                text = self.access_log.read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            rows = [tuple(line.split("\t")[:3]) for line in text.splitlines() if line]
            rows = [r for r in rows if len(r) == 3 and matching in r[1]]
            if len(rows) >= wait_for or time.monotonic() > deadline:
                return [(r[0], r[1], r[2]) for r in rows]
            time.sleep(0.05)

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the parent (it stops its children), SIGKILL to the process group after
        10 s; remove the temp dir. Safe to call twice."""
        proc, self._process = self._process, None
        try:
            terminate(proc, STOP_TIMEOUT_S)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _config(d: Path, port: int, realm: str) -> str:
    modules = Path(os.environ.get(MODULES_ENV) or "/usr/lib/apache2/modules")
    loads = "\n".join(f"LoadModule {name} {modules / so}" for name, so in _MODULES)
    runas = "User www-data\nGroup www-data\n" if os.geteuid() == 0 else ""
    return f"""ServerRoot {d}
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {d}/run/httpd.pid
DefaultRuntimeDir {d}/run
Mutex file:{d}/run default
ErrorLog {d}/error.log
LogLevel info
{runas}{loads}
TypesConfig /etc/mime.types
StartServers 1
ServerLimit 1
ThreadsPerChild 16
MinSpareThreads 1
MaxSpareThreads 16
MaxRequestWorkers 16
KeepAlive On
LogFormat "%u\\t%r\\t%>s" backhaul
CustomLog {d}/access.log backhaul
DocumentRoot {d}/www
<Directory {d}/www>
  Require all granted
</Directory>
<Location /digest/>
  AuthType Digest
  AuthName "{realm}"
  AuthDigestDomain /digest/
  AuthDigestProvider file
  AuthUserFile {d}/htdigest
  Require valid-user
</Location>
"""


def _answers(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("HEAD", "/")
        conn.getresponse().read()
    except OSError:
        return False
    finally:
        conn.close()
    return True


def _start(d: Path, binary: str, realm: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = d / "httpd.conf"
    conf.write_text(_config(d, port, realm))
    stdout_log = d / "stdout.log"
    with open(stdout_log, "ab") as out:
        try:
            proc = subprocess.Popen(
                [binary, "-f", str(conf), "-DFOREGROUND"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            raise RuntimeError(f"cannot run {binary} (set {APACHE_ENV}): {e}") from e
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _answers(port):
            return proc, port
        time.sleep(0.05)
    rc = proc.poll()
    if rc is None:
        proc.kill()
        proc.wait(5)
    raise RuntimeError(
        f"apache2 failed to start in {d} on 127.0.0.1:{port} "
        f"({'timed out' if rc is None else f'rc={rc}'})\n"
        f"--- error.log ---\n{tail(d / 'error.log')}\n--- stdout ---\n{tail(stdout_log)}"
    )


@contextlib.contextmanager
def running_apache(
    user: str = "bob", password: str = "d1gest", realm: str = "peers"
) -> Iterator[ApacheServer]:
    """Serve a fresh docroot on 127.0.0.1 with Digest auth under /digest/; always stop."""
    binary = apache_binary()
    d = Path(tempfile.mkdtemp(prefix="bh-apache.", dir="/tmp"))
    d.chmod(0o755)  # the children (www-data) read the docroot and the password file
    proc: subprocess.Popen[bytes] | None = None
    server: ApacheServer | None = None
    try:
        for sub in ("www/digest", "run"):
            (d / sub).mkdir(parents=True)
        (d / "www" / "hello.txt").write_text("hello from apache\n")
        # htdigest has no batch mode: write user:realm:MD5(user:realm:password) directly
        ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
        (d / "htdigest").write_text(f"{user}:{realm}:{ha1}\n")
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                proc, port = _start(d, binary, realm)
                break
            except RuntimeError as e:
                if attempt == _PORT_ATTEMPTS or "Address already in use" not in str(e):
                    raise
        assert proc is not None
        server = ApacheServer(
            url=f"http://127.0.0.1:{port}", port=port, pid=proc.pid, dir=d,
            docroot=d / "www", digest_user=user, digest_password=password,
            digest_realm=realm, _process=proc,
        )  # fmt: skip
        yield server
    finally:
        if server is not None:
            server.stop()
        else:
            shutil.rmtree(d, ignore_errors=True)
