"""The example third-party transport (examples/backhaul-ftp) as a plugin author ships it:
pip-installed into this venv as its own distribution, found through its ``backhaul.transports``
entry point by adapters/registry.py, proven with the conformance kit against a real FTP server
(pyftpdlib, started here), and used by the real engine to run a job.

The editable install is made once and kept: later sessions find it and skip pip (a checkout
in another folder reinstalls). pyftpdlib must be installed (backhaul's ``test`` extra)."""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import json
import os
import site
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backhaul.adapters import registry
from backhaul.adapters.engine import Engine
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.registry import LazyTransports, TransportRegistry
from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import PlainCredentials, RequestOptions, Transport, Uploader
from backhaul.core.vocabulary import AuthScheme, AuthTarget, ErrorContext, JobState
from backhaul.transports.conformance import TransportConformance, UploadConformance, read_all

pytestmark = pytest.mark.peer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "backhaul-ftp"
DIST = "backhaul-ftp"
USER, PASSWORD = "plugin-author", "s3cret-pass"
PIP_INSTALL = (sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q")

# =================================================================================================
# The plugin, installed as a user would (pip install -e), once
# =================================================================================================


def _installed_from_here() -> bool:
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    declared = {(ep.group, ep.name, ep.value) for ep in dist.entry_points}
    return (
        direct.get("url") == EXAMPLE.as_uri()
        and bool(direct.get("dir_info", {}).get("editable"))
        and (registry.GROUP, "ftp", "backhaul_ftp:FtpTransport") in declared
        and (registry.UPLOAD_GROUP, "ftp", "backhaul_ftp:FtpTransport") in declared
    )


def _activate() -> None:
    """Make a plugin installed after this interpreter started importable: Python reads the
    .pth files of site-packages only at start-up."""
    importlib.invalidate_caches()
    try:
        importlib.import_module("backhaul_ftp")
        return
    except ImportError:
        pass
    purelib = Path(sysconfig.get_paths()["purelib"])
    for pth in sorted(purelib.glob("__editable__*backhaul_ftp*.pth")):
        site.addpackage(str(purelib), pth.name, None)  # type: ignore[attr-defined]
    importlib.invalidate_caches()
    importlib.import_module("backhaul_ftp")


@pytest.fixture(scope="session")
def ftp_plugin() -> TransportRegistry:
    if not _installed_from_here():
        result = subprocess.run(
            [*PIP_INSTALL, "-e", str(EXAMPLE)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pip install -e {EXAMPLE} failed:\n{result.stdout}{result.stderr}")
        assert _installed_from_here(), "pip installed backhaul-ftp, but not from this checkout"
    _activate()
    return TransportRegistry()


# =================================================================================================
# A real FTP server (pyftpdlib) in a subprocess, serving a fresh directory
# =================================================================================================

_SERVER = """
import logging, sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer
logging.basicConfig(filename=sys.argv[4], level=logging.INFO)
authorizer = DummyAuthorizer()
authorizer.add_user(sys.argv[2], sys.argv[3], sys.argv[1], perm="elradfmwMT")
settings = {"authorizer": authorizer, "banner": "backhaul test", "auth_failed_timeout": 0}
handler = type("Handler", (FTPHandler,), settings)
server = FTPServer(("127.0.0.1", 0), handler)
print(server.address[1], flush=True)
server.serve_forever()
"""


@pytest.fixture(scope="module")
def ftp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    root = tmp_path_factory.mktemp("ftp-root")
    log = root.parent / f"{root.name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(root), USER, PASSWORD, str(log)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            rest = proc.stdout.read() if proc.poll() is not None else ""
            raise RuntimeError(f"the FTP server did not start: {line}{rest}")
        yield int(line), root
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


CREDENTIALS = RequestOptions(
    credentials=(PlainCredentials(AuthTarget.SERVER, AuthScheme.BASIC, USER, PASSWORD),)
)

# =================================================================================================
# The conformance kit, with the transport the registry finds
# =================================================================================================


class TestFtpPluginConformance(TransportConformance, UploadConformance):
    options = CREDENTIALS
    not_found_hresult = hr.hresult_from_win32(hr.ERROR_FILE_NOT_FOUND)

    @pytest.fixture(autouse=True)
    def _server(self, ftp_plugin: TransportRegistry, ftp_server: tuple[int, Path]) -> None:
        self.registry = ftp_plugin
        self.port, self.root = ftp_server

    def make_transport(self) -> Transport:
        return self.registry.create("ftp")

    def url_for(self, name: str) -> str:
        return f"ftp://127.0.0.1:{self.port}/{name}"

    def publish(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return self.url_for(name)

    def replace(self, name: str, data: bytes) -> None:
        # MDTM has whole seconds: the new version gets a later mtime, as a real change would
        path = self.root / name
        later = int(path.stat().st_mtime) + 10
        path.write_bytes(data)
        os.utime(path, (time.time(), later))

    def make_uploader(self) -> Uploader:
        uploaders = LazyTransports[Uploader](TransportRegistry(group=registry.UPLOAD_GROUP))
        return uploaders["ftp"]

    def upload_url(self, name: str) -> str:
        return self.url_for(name)

    def fetch(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.exists() else None


# =================================================================================================
# Through the registry and the real engine
# =================================================================================================


def test_the_registry_lists_the_plugin_with_its_distribution(ftp_plugin: TransportRegistry) -> None:
    rows = {row[0]: row for row in ftp_plugin.rows()}
    version = importlib.metadata.version(DIST)
    assert rows["ftp"] == ("ftp", "backhaul_ftp:FtpTransport", DIST, version, registry.ACTIVE)
    assert type(ftp_plugin.create("ftp")).__name__ == "FtpTransport"
    assert ("upload", *rows["ftp"]) in registry.installed_rows()


def test_wrong_credentials_are_a_fatal_access_denied(
    ftp_plugin: TransportRegistry, ftp_server: tuple[int, Path]
) -> None:
    port, root = ftp_server
    (root / "guarded.bin").write_bytes(b"x")
    transport = ftp_plugin.create("ftp")
    url = f"ftp://{USER}:wrong@127.0.0.1:{port}/guarded.bin"
    with pytest.raises(TransferError) as info:
        asyncio.run(transport.stat(url, RequestOptions()))
    assert (info.value.hresult, info.value.context, info.value.transient) == (
        hr.E_ACCESSDENIED,
        ErrorContext.REMOTE_FILE,
        False,
    )
    assert "wrong" not in str(info.value)  # no password in messages


def test_credentials_in_the_url_are_used_without_job_credentials(
    ftp_plugin: TransportRegistry, ftp_server: tuple[int, Path]
) -> None:
    port, root = ftp_server
    (root / "open.bin").write_bytes(b"hello")
    transport = ftp_plugin.create("ftp")
    url = f"ftp://{USER}:{PASSWORD}@127.0.0.1:{port}/open.bin"

    async def body() -> bytes:
        return await read_all(await transport.open(url, RequestOptions()))

    assert asyncio.run(body()) == b"hello"


def test_a_refused_connection_is_a_transient_connect_failure(
    ftp_plugin: TransportRegistry,
) -> None:
    from peers.nginx import free_port

    transport = ftp_plugin.create("ftp")
    with pytest.raises(TransferError) as info:
        asyncio.run(transport.stat(f"ftp://127.0.0.1:{free_port()}/x.bin", CREDENTIALS))
    assert (info.value.hresult, info.value.transient) == (hr.BG_E_CONNECT_FAILURE, True)


def test_a_job_downloads_through_the_plugin_with_the_real_engine(
    ftp_plugin: TransportRegistry, ftp_server: tuple[int, Path], tmp_path: Path
) -> None:
    port, root = ftp_server
    data = os.urandom(5 * 1024 * 1024 + 3)
    (root / "job.bin").write_bytes(data)
    (root / "second.bin").write_bytes(b"second file")
    out = tmp_path / "downloads"
    out.mkdir()
    with TransferManager("memory:", schemes=ftp_plugin.schemes()) as manager:
        job = manager.create_job("through the ftp plugin")
        job.set_credentials(AuthTarget.SERVER, AuthScheme.BASIC, USER, PASSWORD)
        job.add_files(
            [
                (f"ftp://127.0.0.1:{port}/job.bin", out / "job.bin"),
                (f"ftp://127.0.0.1:{port}/second.bin", out / "second.bin"),
            ]
        )
        job.resume()
        engine = Engine(manager, transports=ftp_plugin.lazy(), poll_interval=0.05)
        asyncio.run(engine.run(until_idle=True))
        assert job.state is JobState.TRANSFERRED, job.error
        assert job.progress.bytes_transferred == len(data) + len(b"second file")
        job.complete()
    assert (out / "job.bin").read_bytes() == data
    assert (out / "second.bin").read_bytes() == b"second file"
