"""A throwaway Samba ``smbd`` serving one share on 127.0.0.1, for SMB transport tests.

``running_samba()`` writes an smb.conf into a fresh temp dir (``/tmp/bh-samba.XXXXXXXX``), gives
the test user a password with ``smbpasswd`` (a tdbsam passdb inside the temp dir), starts ``smbd``
in the foreground on a free high port, waits until a login works, and on exit stops it and removes
the temp dir::

    with running_samba() as smb:
        smb.url("dir/file.bin")        # smb://127.0.0.1:PORT/share/dir/file.bin
        smb.share_path / "dir"         # the same directory on the local disk
        smb.grant("SeSecurityPrivilege")   # net sam rights grant (new sessions only)
        smb.kill_sessions()            # SIGKILL the per-connection smbd children: clients drop
        smb.restart()                  # same dir, same port, new PID
        smb.put("dir/f.bin", data)     # a file the SMB user owns; returns its URL
        smb.query_security("dir/f.bin", 7)  # an independent client (smbprotocol's smbclient)
        smb.smbclient("get f.bin /tmp/x")   # Samba's own CLI, for comparisons

The share keeps NT ACLs in the ``security.NTACL`` xattr (``vfs objects = acl_xattr``), so owner,
group, DACL and SACL set through SMB read back as set. ``rpc start on demand helpers = no``: no
samba-dcerpcd helpers that would outlive smbd (file access needs no RPC).

smbd must run as root (it switches to the SMB user per session, and acl_xattr writes a
``security.*`` xattr). SMB users must be Unix users: the helper creates the system user
``bh-smbtest`` (no login, no home) once if it is missing; that is the only change it makes outside
its temp dir. The share directory belongs to that user. Binaries: ``smbd``, ``smbpasswd``, ``net``,
``smbclient`` on PATH or in /usr/sbin, /usr/bin (Debian: ``samba``, ``smbclient`` and
``samba-vfs-modules``, which holds vfs_acl_xattr).

Every failure raises RuntimeError with the relevant log tail; nothing is ever skipped. Processes
are stopped by their PID only: SIGTERM to the smbd parent (SIGKILL after 10 s), then SIGKILL to
any per-connection child that outlived it (recorded by PID and start time while it ran).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from peers.daemon import free_port, tail

SMB_TEST_USER = "bh-smbtest"
SHARE = "share"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
_CHILD_GRACE_S = 2.0
_PORT_ATTEMPTS = 3  # bind(0) then close is racy: retry with a new port if another process took it


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/bin"):
        if Path(folder, name).exists():
            return str(Path(folder, name))
    raise RuntimeError(f"{name} is not installed (apt-get install samba smbclient)")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], start [19])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int, start_time: str | None = None) -> bool:
    """Running (a zombie counts as gone) and, given ``start_time``, still the same process."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start_time is None or fields[19] == start_time


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _children(pid: int) -> dict[int, str]:
    """Direct children of ``pid``: PID -> start time."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            found[int(entry.name)] = fields[19]
    return found


def _ensure_unix_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    result = subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--shell",
         "/usr/sbin/nologin", name],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0 and "already exists" not in result.stderr:
        raise RuntimeError(f"cannot create the Unix user {name}: {result.stderr.strip()}")
    return pwd.getpwnam(name)


def _config(d: Path, port: int, user: str) -> str:
    return f"""[global]
  server role = standalone server
  workgroup = BACKHAUL
  netbios name = BHSMBTEST
  smb ports = {port}
  interfaces = 127.0.0.1
  bind interfaces only = yes
  disable netbios = yes
  server min protocol = SMB2_10
  lock directory = {d}/lock
  state directory = {d}/state
  cache directory = {d}/cache
  pid directory = {d}/run
  private dir = {d}/private
  ncalrpc dir = {d}/ncalrpc
  log file = {d}/log/log.%m
  log level = 1
  passdb backend = tdbsam:{d}/private/passdb.tdb
  map to guest = never
  load printers = no
  printcap name = /dev/null
  disable spoolss = yes
  rpc start on demand helpers = no
[{SHARE}]
  path = {d}/{SHARE}
  read only = no
  valid users = {user}
  vfs objects = acl_xattr
  store dos attributes = yes
  map acl inherit = yes
  ea support = yes
"""


@dataclass
class SambaServer:
    """One running smbd with one share. ``password`` is the test user's SMB password."""

    port: int
    dir: Path
    user: str
    password: str
    uid: int
    gid: int
    host: str = "127.0.0.1"
    share: str = SHARE
    pid: int = 0
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _seen_children: dict[int, str] = field(default_factory=dict, repr=False)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def conf(self) -> Path:
        return self.dir / "smb.conf"

    @property
    def share_path(self) -> Path:
        return self.dir / self.share

    @property
    def log(self) -> Path:
        return self.dir / "smbd.log"

    def url(self, path: str = "") -> str:
        """smb://host:port/share/path (path components percent-encoded)."""
        return f"smb://{self.host}:{self.port}/{self.share}/{quote(path)}"

    def unc(self, path: str = "") -> str:
        r"""\\host\share\path (no port: UNC names cannot carry one)."""
        return f"\\\\{self.host}\\{self.share}\\" + path.replace("/", "\\")

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- privileges ------------------------------------------------------------------------------

    def _net(self, *args: str) -> str:
        result = subprocess.run(
            [_binary("net"), "-s", str(self.conf), *args],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"net {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def grant(self, *privileges: str) -> None:
        """``net sam rights grant``: effective for sessions set up afterwards."""
        self._net("sam", "rights", "grant", self.user, *privileges)

    def revoke(self, *privileges: str) -> None:
        self._net("sam", "rights", "revoke", self.user, *privileges)

    # -- processes -------------------------------------------------------------------------------

    def children(self) -> dict[int, str]:
        """The smbd children now running (one per client connection): PID -> start time."""
        if not self.is_running():
            return {}
        found = _children(self.pid)
        self._seen_children.update(found)
        return found

    def sessions(self) -> dict[int, str]:
        """The per-connection children (named ``smbd``; the helpers are ``smbd-notifyd`` and
        ``smbd-cleanupd``): PID -> start time."""
        return {p: s for p, s in self.children().items() if _comm(p) == "smbd"}

    def kill_sessions(self) -> int:
        """SIGKILL every per-connection smbd child: each client's TCP connection drops. Returns
        how many were killed."""
        killed = 0
        sessions = self.sessions()
        for pid, start in sessions.items():
            if _alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in sessions.items()):
            time.sleep(0.02)
        return killed

    def start(self) -> None:
        """Start smbd on ``port`` (a stopped server starts again on the same port and dir)."""
        binary = _binary("smbd")
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(
                [binary, "--foreground", "--no-process-group", "--debug-stdout",
                 "-s", str(self.conf)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the test terminal must not reach it
            )  # fmt: skip
        self._process, self.pid = proc, proc.pid
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=1),
            ):
                return
            time.sleep(0.05)
        rc = proc.poll()
        self.stop(remove=False)
        raise RuntimeError(
            f"smbd failed to start in {self.dir} on {self.host}:{self.port} "
            f"({'timed out' if rc is None else f'rc={rc}'})\n--- {self.log} ---\n{tail(self.log)}"
        )

    def stop(self, *, remove: bool = False) -> None:
        """SIGTERM the parent (SIGKILL after 10 s), then SIGKILL children that outlived it.
        Safe to call twice. ``remove`` also deletes the temp dir."""
        self.reset_client()
        proc, self._process = self._process, None
        try:
            if proc is not None:
                if proc.poll() is None:
                    self.children()  # record the children's PIDs while the parent still runs
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(STOP_TIMEOUT_S)
                    except subprocess.TimeoutExpired:
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                        proc.wait(5)
                self._reap_children()
        finally:
            if remove:
                shutil.rmtree(self.dir, ignore_errors=True)

    def _reap_children(self) -> None:
        """Children exit on their own when the parent goes; SIGKILL the ones still there after
        a grace period (by the PID and start time recorded while they ran)."""
        started = time.monotonic()
        while True:
            left = [p for p, s in self._seen_children.items() if _alive(p, s)]
            if not left or time.monotonic() - started > STOP_TIMEOUT_S:
                break
            if time.monotonic() - started > _CHILD_GRACE_S:
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self._seen_children.clear()

    def restart(self) -> None:
        """Stop and start again: same dir, same port, same passdb and privileges, new PID."""
        self.stop(remove=False)
        self.start()

    # -- files and a reference client ------------------------------------------------------------

    def put(self, path: str, data: bytes, *, mtime: float | None = None) -> str:
        """Write ``path`` (``/``-separated, inside the share) as the SMB user would own it;
        return its smb:// URL."""
        target = self.share_path / path
        for parent in reversed(target.relative_to(self.share_path).parents[:-1]):
            folder = self.share_path / parent
            if not folder.exists():
                folder.mkdir()
                os.chown(folder, self.uid, self.gid)
        target.write_bytes(data)
        os.chown(target, self.uid, self.gid)
        if mtime is not None:
            os.utime(target, (mtime, mtime))
        return self.url(path)

    def query_security(self, path: str, information: int, *, directory: bool = False) -> bytes:
        """The self-relative security descriptor of ``path`` as smbprotocol's high-level client
        reads it (an independent check on the transport). ``information``: OWNER 1, GROUP 2,
        DACL 4, SACL 8."""
        from smbclient._io import SMBDirectoryIO, SMBFileIO, SMBFileTransaction
        from smbprotocol.file_info import InfoType
        from smbprotocol.open import FilePipePrinterAccessMask as Access
        from smbprotocol.open import SMB2QueryInfoRequest, SMB2QueryInfoResponse

        access = Access.READ_CONTROL | (Access.ACCESS_SYSTEM_SECURITY if information & 8 else 0)
        kind = SMBDirectoryIO if directory else SMBFileIO
        raw = kind(self._unc(path), mode="r", desired_access=access, **self._client())
        request = SMB2QueryInfoRequest()
        request["info_type"] = InfoType.SMB2_0_INFO_SECURITY
        request["output_buffer_length"] = 65536
        request["additional_information"] = information
        request["file_id"] = raw.fd.file_id

        def unpack(sent: Any) -> bytes:
            response = SMB2QueryInfoResponse()
            response.unpack(raw.fd.connection.receive(sent)["data"].get_value())
            return bytes(response["buffer"].get_value())

        with SMBFileTransaction(raw) as transaction:
            transaction += (request, unpack)
        return bytes(transaction.results[0])

    def set_security(
        self, path: str, descriptor: bytes, information: int, *, directory: bool = False
    ) -> None:
        """Set parts of the descriptor of ``path`` with smbprotocol's high-level client."""
        from smbclient._io import SMBDirectoryIO, SMBFileIO, SMBFileTransaction
        from smbprotocol.file_info import InfoType
        from smbprotocol.open import FilePipePrinterAccessMask as Access
        from smbprotocol.open import SMB2SetInfoRequest

        access = Access.READ_CONTROL | Access.WRITE_DAC | Access.WRITE_OWNER
        if information & 8:
            access |= Access.ACCESS_SYSTEM_SECURITY
        kind = SMBDirectoryIO if directory else SMBFileIO
        raw = kind(self._unc(path), mode="r", desired_access=access, **self._client())
        request = SMB2SetInfoRequest()
        request["info_type"] = InfoType.SMB2_0_INFO_SECURITY
        request["file_info_class"] = 0
        request["additional_information"] = information
        request["file_id"] = raw.fd.file_id
        request["buffer"] = descriptor
        with SMBFileTransaction(raw) as transaction:
            transaction += (request, lambda sent: raw.fd.connection.receive(sent))

    def reset_client(self) -> None:
        """Log the reference client off (privileges are read at session setup)."""
        if not self._cache:
            return
        import smbclient

        with contextlib.suppress(Exception):
            smbclient.reset_connection_cache(connection_cache=self._cache)
        self._cache.clear()

    def _client(self) -> dict[str, Any]:
        import smbclient

        options: dict[str, Any] = {
            "port": self.port, "username": self.user, "password": self.password,
            "connection_cache": self._cache,
        }  # fmt: skip
        if not self._cache:
            smbclient.register_session(self.host, **options)
        return options

    def _unc(self, path: str) -> str:
        return self.unc(path).rstrip("\\")

    # -- the reference CLI -------------------------------------------------------------------------

    def smbclient(self, command: str, *, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run Samba's ``smbclient`` CLI against the share (e.g. ``get file /tmp/x``)."""
        return subprocess.run(
            [_binary("smbclient"), f"//{self.host}/{self.share}", "-p", str(self.port),
             "-U", f"{self.user}%{self.password}", "-c", command],
            capture_output=True, text=True, check=False, timeout=timeout,
        )  # fmt: skip


def _prepare(d: Path, port: int, user: pwd.struct_passwd, password: str) -> SambaServer:
    for sub in ("lock", "state", "cache", "run", "private", "ncalrpc", "log", SHARE):
        (d / sub).mkdir(exist_ok=True)
    os.chmod(d, 0o711)  # sessions run as the SMB user: it must be able to reach the share
    os.chown(d / SHARE, user.pw_uid, user.pw_gid)
    server = SambaServer(
        port=port, dir=d, user=user.pw_name, password=password, uid=user.pw_uid, gid=user.pw_gid
    )
    server.conf.write_text(_config(d, port, user.pw_name))
    result = subprocess.run(
        [_binary("smbpasswd"), "-c", str(server.conf), "-s", "-a", user.pw_name],
        input=f"{password}\n{password}\n", capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"smbpasswd failed: {result.stdout}{result.stderr}")
    return server


@contextlib.contextmanager
def running_samba(user_name: str = SMB_TEST_USER) -> Iterator[SambaServer]:
    """Serve one share on 127.0.0.1; always stop smbd and remove its temp dir."""
    if os.geteuid() != 0:
        raise RuntimeError("smbd must be started as root (it setuid()s per session)")
    user = _ensure_unix_user(user_name)
    d = Path(tempfile.mkdtemp(prefix="bh-samba.", dir="/tmp"))
    server: SambaServer | None = None
    try:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            server = _prepare(d, free_port(), user, "Pw-" + secrets.token_urlsafe(12))
            try:
                server.start()
                break
            except RuntimeError as e:
                if attempt == _PORT_ATTEMPTS or "Address already in use" not in str(e):
                    raise
        assert server is not None
        check = server.smbclient("ls", timeout=30)
        if check.returncode != 0:
            log = tail(server.log)
            hint = (
                "\nvfs_acl_xattr is missing: apt-get install samba-vfs-modules"
                if "acl_xattr" in log
                else ""
            )
            raise RuntimeError(
                f"smbd answers but login failed:\n{check.stdout}{check.stderr}\n"
                f"--- {server.log} ---\n{log}{hint}"
            )
        yield server
    finally:
        if server is not None:
            server.stop(remove=True)
        else:
            shutil.rmtree(d, ignore_errors=True)
