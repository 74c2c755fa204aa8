"""A throwaway PostgreSQL 15 cluster for the test suite.

``running_postgres()`` runs initdb in a fresh temp dir (``/tmp/bh-pg.XXXXXXXX``), starts the
server on 127.0.0.1 at a free high port (scram-sha-256 password auth over TCP) plus a unix socket
in the temp dir (trust), creates one database, and on exit stops the server and removes the temp
dir::

    with running_postgres() as pg:
        psycopg.connect(pg.url)
        url = create_database(pg, "t_something")  # a fresh database on the same cluster
        pg.restart()                              # same data dir, same port, new PID

initdb is the slow step (1-3 s), so use one cluster per test session and a fresh database per test.

initdb and postgres refuse to run as root: as root every server-side command runs as the Debian
``postgres`` user via ``runuser -u postgres --``; as any other user it runs as that user. The
binaries come from /usr/lib/postgresql/15/bin, or from the directory in env ``BACKHAUL_PG_BIN``.

Every failure to start raises RuntimeError with the tail of the relevant log; nothing is skipped.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from peers.daemon import free_port, tail

DEFAULT_PG_BIN = "/usr/lib/postgresql/15/bin"
PG_BIN_ENV = "BACKHAUL_PG_BIN"
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10.0
_PORT_ATTEMPTS = 3  # bind(0) then close is racy: retry with a new port if another process took it
_ROOT_OS_USER = "postgres"


def pg_bin_dir() -> Path:
    return Path(os.environ.get(PG_BIN_ENV) or DEFAULT_PG_BIN)


def _proc_start_time(pid: int) -> str | None:
    """Start time of a process (field 22 of /proc/PID/stat), to notice PID reuse; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start_time: str | None) -> bool:
    """True while the process runs. A zombie counts as gone: once pg_ctl has exited, the postmaster
    belongs to PID 1 (or some subreaper), which may reap it late, and kill(pid, 0) still succeeds on
    a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to kill(0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    after_comm = stat.rsplit(")", 1)[1].split()
    if after_comm[0] in ("Z", "X"):
        return False
    return start_time is None or after_comm[19] == start_time


@dataclass
class PostgresServer:
    """One running (or stopped) throwaway cluster. Connect with ``url``, or over the unix socket
    with ``host=dir``."""

    dir: Path
    port: int
    user: str
    password: str
    dbname: str
    host: str = "127.0.0.1"
    pid: int = 0
    bin_dir: Path = field(default_factory=pg_bin_dir)
    initdb_seconds: float = 0.0  # how long initdb took
    start_seconds: float = 0.0  # how long the last `pg_ctl -w start` took
    setup_seconds: float = 0.0  # the whole of running_postgres() up to the yield
    _start_time: str | None = field(default=None, repr=False)

    # -- addresses -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        """postgresql:// URL (TCP, password) of another database on this server."""
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(dbname, safe='')}"
        )

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        return self.dir

    def eventsourcing_env(self, dbname: str | None = None) -> dict[str, str]:
        """Env for ``eventsourcing.postgres`` (tables are created on first use)."""
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": dbname or self.dbname,
            "POSTGRES_HOST": self.host,
            "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": self.user,
            "POSTGRES_PASSWORD": self.password,
            # A wrong address or password only shows up as a pool timeout (default 30 s).
            "POSTGRES_CONNECT_TIMEOUT": "5",
            "CREATE_TABLE": "y",
        }

    # -- lifecycle -------------------------------------------------------------------------------

    def is_running(self) -> bool:
        return self.pid > 0 and _alive(self.pid, self._start_time)

    def start(self) -> None:
        """`pg_ctl -w start` on the existing data dir and port; RuntimeError with the log tail."""
        if self.is_running():
            raise RuntimeError(f"postgres in {self.dir} is already running (pid {self.pid})")
        t0 = time.monotonic()
        out = self.dir / "pg_ctl.log"
        cmd = [
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_path),
            "-w", "-t", str(START_TIMEOUT_S), "start",
        ]  # fmt: skip
        rc, err = _run_as_owner(cmd, cwd=self.dir, log=out, timeout=START_TIMEOUT_S + 15)
        if rc != 0:
            self._kill_leftover_postmaster()
            raise RuntimeError(
                f"postgres failed to start in {self.dir} on 127.0.0.1:{self.port} "
                f"({err or f'rc={rc}'})\n--- pg_ctl output ---\n{tail(out, 10)}\n"
                f"--- {self.log_path} ---\n{tail(self.log_path)}"
            )
        try:
            self.pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError) as e:
            raise RuntimeError(f"postgres started but postmaster.pid is unreadable: {e}") from e
        self._start_time = _proc_start_time(self.pid)
        self.start_seconds = time.monotonic() - t0

    def shutdown(self, *, immediate: bool = False) -> None:
        """Stop the server but keep the data dir. SIGINT = fast shutdown (rolls back open
        transactions and disconnects clients; SIGTERM would wait for every pooled client).
        ``immediate=True`` sends SIGQUIT instead, i.e. a crash, so the next start runs crash
        recovery. SIGKILL after 10 s."""
        if self.pid <= 0:
            return
        pid, started = self.pid, self._start_time
        try:
            if _alive(pid, started):
                os.kill(pid, signal.SIGQUIT if immediate else signal.SIGINT)
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while _alive(pid, started) and time.monotonic() < deadline:
                    time.sleep(0.02)
                if _alive(pid, started):
                    self._kill_tree(pid)
                    deadline = time.monotonic() + 5
                    while _alive(pid, started) and time.monotonic() < deadline:
                        time.sleep(0.02)
        except ProcessLookupError:
            pass
        self.pid = 0
        self._start_time = None

    def restart(self, *, immediate: bool = False) -> None:
        """Stop, then start again on the same data dir and port (the PID changes). Open client
        connections break; new ones work once this returns."""
        self.shutdown(immediate=immediate)
        self.start()

    def stop(self) -> None:
        """Stop the server and remove the temp dir. Safe to call twice."""
        try:
            self.shutdown()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------------

    def _kill_tree(self, pid: int) -> None:
        """SIGKILL the postmaster and its children (each backend leads its own process group, so
        killpg would miss them), so that no orphan keeps the shared memory or the port."""
        children = []
        with contextlib.suppress(OSError):
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = Path(entry.path, "stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry.name))
        for p in (pid, *children):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)

    def _kill_leftover_postmaster(self) -> None:
        """After a failed `pg_ctl -w start` (e.g. timeout), the postmaster may still be running."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        cmdline = b""
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if str(self.data_dir).encode() in cmdline:  # PIDs get reused: only kill our own postmaster
            self._kill_tree(pid)


def _as_owner_prefix() -> list[str]:
    return ["runuser", "-u", _ROOT_OS_USER, "--"] if os.geteuid() == 0 else []


def _run_as_owner(cmd: list[str], *, cwd: Path, log: Path, timeout: float) -> tuple[int, str]:
    """Run a PostgreSQL binary as the cluster owner, output to `log` (never a pipe: the postmaster
    started by pg_ctl would inherit it). Returns (returncode, error text)."""
    try:
        with open(log, "ab") as f:
            proc = subprocess.run(
                _as_owner_prefix() + cmd,
                cwd=cwd,  # else "could not change directory to /root"
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                start_new_session=True,  # Ctrl-C in the test terminal must not reach the server
                check=False,
            )
    except FileNotFoundError as e:
        return 127, str(e)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout} s"
    return proc.returncode, ""


def _owner_name() -> str:
    if os.geteuid() == 0:
        return _ROOT_OS_USER
    return pwd.getpwuid(os.geteuid()).pw_name


def _init_cluster(bin_dir: Path, dbname: str) -> PostgresServer:
    """mkdtemp + initdb + config. Does not start the server."""
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(_ROOT_OS_USER)
        except KeyError:
            raise RuntimeError(
                f"running as root, but there is no '{_ROOT_OS_USER}' OS user to run initdb and "
                "postgres as (install postgresql-15, e.g. with .ci/setup)"
            ) from None
    for tool in ("initdb", "pg_ctl"):
        if not os.access(bin_dir / tool, os.X_OK):
            raise RuntimeError(
                f"{bin_dir / tool} not found or not executable (set {PG_BIN_ENV}, or install "
                "postgresql-15, e.g. with .ci/setup)"
            )
    # Keep the path short: the unix socket path (DIR/.s.PGSQL.PORT) must fit in 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="bh-pg.", dir="/tmp"))
    server = PostgresServer(
        dir=d, port=0, user=_owner_name(), password=secrets.token_urlsafe(18), dbname=dbname,
        bin_dir=bin_dir,
    )  # fmt: skip
    try:
        pwfile = d / "pwfile"
        pwfile.write_text(server.password + "\n")
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            os.chown(d, owner.pw_uid, owner.pw_gid)
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        t0 = time.monotonic()
        log = d / "initdb.log"
        cmd = [
            str(bin_dir / "initdb"), "-D", str(server.data_dir), "-U", server.user,
            f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C",
            "-N",  # no fsync of the new cluster: much faster, and the data is throwaway
            "--auth-local=trust", "--auth-host=scram-sha-256",
        ]  # fmt: skip
        rc, err = _run_as_owner(cmd, cwd=d, log=log, timeout=120)
        if rc != 0:
            raise RuntimeError(f"initdb failed in {d} ({err or f'rc={rc}'}):\n{tail(log)}")
        server.initdb_seconds = time.monotonic() - t0
        pwfile.unlink()
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return server


def _configure(server: PostgresServer) -> None:
    """(Re)write our settings; PostgreSQL takes the last occurrence of each setting in the file."""
    conf = server.data_dir / "postgresql.conf"
    base = conf.read_text().split("\n# --- backhaul test settings ---\n", 1)[0]
    conf.write_text(
        base
        + "\n# --- backhaul test settings ---\n"
        + f"listen_addresses = '127.0.0.1'\nport = {server.port}\n"
        + f"unix_socket_directories = '{server.dir}'\n"
        # fsync=off is safe unless the OS crashes. synchronous_commit stays ON: with fsync off it
        # costs little, and with it off a crash (restart(immediate=True)) could lose the last
        # ~0.5 s of *acknowledged* commits, which a reliability test would wrongly blame on us.
        + "fsync = off\nsynchronous_commit = on\nfull_page_writes = off\n"
        + "max_connections = 100\nshared_buffers = 32MB\n"
    )


def _start_fresh(server: PostgresServer) -> None:
    """First start: pick a free port; retry with a new one if another process grabbed it."""
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        server.port = free_port()
        _configure(server)
        try:
            server.start()
            return
        except RuntimeError as e:
            if attempt == _PORT_ATTEMPTS or "already in use" not in str(e):
                raise
            server.log_path.unlink(missing_ok=True)


def create_database(server: PostgresServer, name: str) -> str:
    """CREATE DATABASE `name` (owned by the server's user) and return its postgresql:// URL."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=str(server.socket_dir), port=server.port, user=server.user, dbname="postgres",
        autocommit=True, connect_timeout=10,
    ) as conn:  # fmt: skip
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return server.url_for(name)


def drop_database(server: PostgresServer, name: str) -> None:
    """DROP DATABASE `name` if it exists, disconnecting clients still on it (pools left open)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=str(server.socket_dir), port=server.port, user=server.user, dbname="postgres",
        autocommit=True, connect_timeout=10,
    ) as conn:  # fmt: skip
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


_DB_NAME_RE = re.compile(r"[^a-z0-9_]+")


def unique_database_name(hint: str = "t") -> str:
    """A new valid database name derived from `hint` (e.g. the test's name): t_<hint>_<random>."""
    slug = _DB_NAME_RE.sub("_", hint.lower()).strip("_")[:40]
    return f"t_{slug}_{secrets.token_hex(4)}" if slug else f"t_{secrets.token_hex(4)}"


@contextlib.contextmanager
def running_postgres(dbname: str = "backhaul") -> Iterator[PostgresServer]:
    """Start a throwaway cluster with database `dbname`; always stop it and remove its dir."""
    t0 = time.monotonic()
    server = _init_cluster(pg_bin_dir(), dbname)
    try:
        _start_fresh(server)
        try:
            create_database(server, dbname)
        except Exception as e:
            msg = f"postgres started but CREATE DATABASE {dbname} failed: {e}"
            raise RuntimeError(f"{msg}\n{tail(server.log_path)}") from e
        server.setup_seconds = time.monotonic() - t0
        yield server
    finally:
        server.stop()
