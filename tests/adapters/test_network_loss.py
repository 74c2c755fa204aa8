"""Network loss for real: the engine and the server on two hosts (network namespaces)
joined by a veth pair; the test takes the client's link down mid-transfer, then brings
it back (bits-core.md §2.2: TRANSIENT_ERROR with BG_E_NETWORK_DISCONNECTED, no error
counted, no retry timer; back to QUEUED when the network returns)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from peers.netns import linked_hosts

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.peer


def _cli(home: Path, *args: str) -> str:
    result = subprocess.run(
        [str(BIN / "backhaul"), "--home", str(home), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _info(home: Path, job: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_cli(home, "info", job, "--json"))
    return data


def _wait(home: Path, job: str, done: Any, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    info = _info(home, job)
    while not done(info):
        assert time.monotonic() < deadline, f"timed out; last: {info}"
        time.sleep(0.2)
        info = _info(home, job)
    return info


def test_pulling_the_link_waits_without_errors_and_resumes(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(24 * 1024 * 1024)
    (www / "big.bin").write_bytes(data)
    home = tmp_path / "home"
    dest = tmp_path / "dl"
    dest.mkdir()
    with linked_hosts() as hosts:
        hosts.shape("40mbit")  # ~5 MB/s: the transfer takes ~5 s
        server = hosts.popen(
            hosts.server_ns,
            [
                sys.executable,
                "-m",
                "backhaul.adapters.fileserver",
                str(www),
                "--host",
                hosts.server_ip,
                "--port",
                "8080",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        engine = None
        try:
            url = f"http://{hosts.server_ip}:8080/big.bin"
            job = _cli(home, "create", "netloss").strip()
            _cli(home, "addfile", job, url, str(dest / "big.bin"))
            _cli(home, "setminretrydelay", job, "600")  # a retry timer would show as a long wait
            _cli(home, "resume", job)
            engine = hosts.popen(
                hosts.client_ns,
                [str(BIN / "backhaul"), "--home", str(home), "serve", "--poll", "0.1"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            _wait(home, job, lambda i: i["state"] == "TRANSFERRING" and i["bytes_transferred"] > 0)
            hosts.client_link(up=False)
            down = _wait(home, job, lambda i: i["state"] == "TRANSIENT_ERROR", timeout=20)
            assert down["blocked_by"] == "BG_E_NETWORK_DISCONNECTED"
            assert down["error"]["name"] == "BG_E_NETWORK_DISCONNECTED"
            assert down["error_count"] == 0
            time.sleep(1.5)
            assert _info(home, job)["state"] == "TRANSIENT_ERROR"  # waits, no retry timer
            hosts.client_link(up=True)
            done = _wait(home, job, lambda i: i["state"] == "TRANSFERRED", timeout=60)
            assert done["error_count"] == 0
            engine.send_signal(signal.SIGTERM)
            assert engine.wait(timeout=20) == 0
            _cli(home, "complete", job)
        finally:
            if engine is not None and engine.poll() is None:
                engine.kill()
            server.terminate()
            server.wait(timeout=10)
    got = (dest / "big.bin").read_bytes()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
