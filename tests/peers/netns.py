"""Two network namespaces joined by a veth pair: the project's own test hosts.

``linked_hosts()`` creates namespaces ``<prefix>-srv`` and ``<prefix>-cli`` with the
addresses ``SERVER_IP`` / ``CLIENT_IP`` on a /30 that exists only between them, and
removes everything on exit. Traffic never leaves these namespaces. Needs root (CI and
the development machines run as root); a failure to create them fails the test.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Sequence

import attrs

SERVER_IP = "10.213.77.1"
CLIENT_IP = "10.213.77.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@attrs.frozen
class LinkedHosts:
    server_ns: str
    client_ns: str
    server_if: str
    client_if: str
    server_ip: str = SERVER_IP
    client_ip: str = CLIENT_IP

    def run(
        self, ns: str, argv: Sequence[str], **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], text=True, **kwargs)  # type: ignore[call-overload, no-any-return]

    def popen(self, ns: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)  # type: ignore[call-overload, no-any-return]

    def client_link(self, up: bool) -> None:
        _ip("-n", self.client_ns, "link", "set", self.client_if, "up" if up else "down")

    def shape(self, rate: str, latency: str = "100ms") -> None:
        """Shape the server -> client direction (downloads) to ``rate`` with a token
        bucket filter holding ``latency`` of queue (this kernel has no netem)."""
        tbf = ["tbf", "rate", rate, "burst", "64kbit", "latency", latency]
        _ip("-n", self.server_ns, "link", "set", self.server_if, "txqueuelen", "1000")
        subprocess.run(
            ["tc", "-n", self.server_ns, "qdisc", "replace", "dev", self.server_if, "root", *tbf],
            check=True,
            capture_output=True,
            text=True,
        )


@contextlib.contextmanager
def linked_hosts(prefix: str | None = None) -> Iterator[LinkedHosts]:
    tag = prefix or f"bh{os.getpid() % 100000}"
    hosts = LinkedHosts(f"{tag}-srv", f"{tag}-cli", f"{tag}s", f"{tag}c")
    try:
        _ip("netns", "add", hosts.server_ns)
        _ip("netns", "add", hosts.client_ns)
        _ip("link", "add", hosts.server_if, "type", "veth", "peer", "name", hosts.client_if)
        _ip("link", "set", hosts.server_if, "netns", hosts.server_ns)
        _ip("link", "set", hosts.client_if, "netns", hosts.client_ns)
        for ns, ifname, ip in (
            (hosts.server_ns, hosts.server_if, SERVER_IP),
            (hosts.client_ns, hosts.client_if, CLIENT_IP),
        ):
            _ip("-n", ns, "addr", "add", f"{ip}/30", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield hosts
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"cannot set up the test hosts: {exc.stderr}") from exc
    finally:
        for ns in (hosts.server_ns, hosts.client_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
