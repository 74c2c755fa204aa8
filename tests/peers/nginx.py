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

Optional extras (keyword arguments of ``running_nginx``):

* ``tls=NginxTls(certificate, key, client_ca)``: a second server on its own port
  (``nginx.tls_url``) serving the same docroot over HTTPS with ``ssl_verify_client on``: a
  request without a client certificate, or with one not issued by ``client_ca``, gets HTTP 400
  (nginx refuses after the handshake); the verified client's subject DN comes back in the
  ``X-Client-DN`` response header.
* ``basic_auth=(user, password)``: ``/private/`` (on both servers) requires HTTP Basic auth
  (nginx's ``{SHA}`` password file, no external tool), else 401.
"""

from __future__ import annotations

import base64
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
from typing import Any

from peers.daemon import free_port, tail, terminate

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


@dataclass(frozen=True)
class NginxTls:
    """Files for the HTTPS server: its PEM certificate chain and key, and the PEM CA bundle
    that client certificates must chain to."""

    certificate: Path
    key: Path
    client_ca: Path
    require_client: bool = True  # False: a client certificate is optional


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
    tls_url: str | None = None  # with running_nginx(tls=...)
    tls_port: int | None = None

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
            terminate(proc, STOP_TIMEOUT_S)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _config(
    d: Path,
    docroot: Path,
    port: int,
    tls: NginxTls | None = None,
    tls_port: int | None = None,
    basic_auth: tuple[str, str] | None = None,
) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""
    tmp = d / "tmp"
    temp_paths = "\n".join(
        f"  {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    private = ""
    if basic_auth is not None:
        name, password = basic_auth
        digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
        (d / "htpasswd").write_text(f"{name}:{{SHA}}{digest}\n")
        private = f'    location /private/ {{ auth_basic "peers"; auth_basic_user_file {d / "htpasswd"}; }}\n'
    secure = ""
    if tls is not None:
        secure = f"""  server {{
    listen 127.0.0.1:{tls_port} ssl;
    root {docroot};
    ssl_certificate {tls.certificate};
    ssl_certificate_key {tls.key};
    ssl_client_certificate {tls.client_ca};
    ssl_verify_client {"on" if tls.require_client else "optional"};
    ssl_verify_depth 3;
    add_header X-Client-DN $ssl_client_s_dn always;
{private}  }}
"""
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
{private}  }}
{secure}}}
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


def _start(
    d: Path,
    docroot: Path,
    binary: str,
    tls: NginxTls | None = None,
    basic_auth: tuple[str, str] | None = None,
) -> NginxServer:
    port = free_port()
    tls_port = free_port() if tls is not None else None
    conf = d / "nginx.conf"
    conf.write_text(_config(d, docroot, port, tls, tls_port, basic_auth))
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
        tls_url=f"https://127.0.0.1:{tls_port}" if tls_port else None, tls_port=tls_port,
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
        f"--- {error_log} ---\n{tail(error_log)}\n--- {stdout_log} ---\n{tail(stdout_log)}"
    )


@contextlib.contextmanager
def running_nginx(
    docroot: Path,
    *,
    tls: NginxTls | None = None,
    basic_auth: tuple[str, str] | None = None,
) -> Iterator[NginxServer]:
    """Serve ``docroot`` on 127.0.0.1 (and over HTTPS with ``tls``); always stop nginx and
    remove its temp dir."""
    binary = nginx_binary()
    d = Path(tempfile.mkdtemp(prefix="bh-nginx.", dir="/tmp"))
    server: NginxServer | None = None
    try:
        (d / "tmp").mkdir()
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                server = _start(d, docroot, binary, tls, basic_auth)
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


# =================================================================================================
# A PKI for the HTTPS tests (trustme): a CA, a server certificate for 127.0.0.1 / localhost, a
# client certificate from that CA (PEM with a plain key, PEM with an encrypted key, PKCS#12) and
# one from a foreign CA with the same subject.
# =================================================================================================

PEM_PASSPHRASE = "pem-pass phrase"
P12_PASSPHRASE = "p12-pass phrase"
BASIC_USER, BASIC_PASSWORD = "alice", "s3cret"


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Any  # trustme.CA
    ca_pem: Path  # trust for the servers, and the CA nginx checks client certificates against
    server_pem: Path
    server_key: Path
    client_pem: Path  # alice: certificate + plain key
    client_sha1: str
    client_subject: str  # its simple subject: RDN values in certificate order
    client_encrypted_pem: Path  # the same certificate, key encrypted with PEM_PASSPHRASE
    client_p12: Path  # the same certificate in PKCS#12 with P12_PASSPHRASE
    foreign_pem: Path  # a client certificate from another CA (same subject, other hash)
    foreign_sha1: str


def make_pki(d: Path) -> Pki:
    """Write the PKI into directory ``d``."""
    import trustme
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    def sha1_of(pem: bytes) -> str:
        cert = x509.load_pem_x509_certificate(pem)
        return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    names = {"common_name": "backhaul-alice", "organization_name": "Backhaul Tests"}
    client = ca.issue_cert("alice.client.test", organization_unit_name="Clients", **names)
    foreign = other.issue_cert("alice.client.test", organization_unit_name="Clients", **names)
    cert_pem = client.cert_chain_pems[0].bytes()
    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), None)
    (d / "alice.pem").write_bytes(cert_pem + client.private_key_pem.bytes())
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PEM_PASSPHRASE.encode()),
    )
    (d / "alice-encrypted.pem").write_bytes(cert_pem + encrypted)
    p12 = pkcs12.serialize_key_and_certificates(
        b"alice",
        key,  # type: ignore[arg-type]
        x509.load_pem_x509_certificate(cert_pem),
        None,
        serialization.BestAvailableEncryption(P12_PASSPHRASE.encode()),
    )
    (d / "alice.p12").write_bytes(p12)
    foreign_pem = foreign.cert_chain_pems[0].bytes()
    (d / "foreign.pem").write_bytes(foreign_pem + foreign.private_key_pem.bytes())
    cert = x509.load_pem_x509_certificate(cert_pem)
    subject = ", ".join(str(a.value) for rdn in cert.subject.rdns for a in rdn)
    return Pki(
        dir=d, ca=ca, ca_pem=d / "ca.pem", server_pem=d / "server.pem",
        server_key=d / "server.key", client_pem=d / "alice.pem", client_sha1=sha1_of(cert_pem),
        client_subject=subject, client_encrypted_pem=d / "alice-encrypted.pem",
        client_p12=d / "alice.p12", foreign_pem=d / "foreign.pem",
        foreign_sha1=sha1_of(foreign_pem),
    )  # fmt: skip
