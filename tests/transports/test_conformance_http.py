"""HttpTransport passes the conformance kit against a real nginx (tests/peers/nginx.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from peers.nginx import NginxServer

from backhaul.core import hresult as hr
from backhaul.transports.conformance import TransportConformance
from backhaul.transports.http import HttpTransport

pytestmark = pytest.mark.peer


class TestHttpConformance(TransportConformance):
    not_found_hresult = hr.http_status_hresult(404)

    @pytest.fixture(autouse=True)
    def _nginx(self, nginx_server: tuple[NginxServer, Path]) -> None:
        self.server, self.docroot = nginx_server

    def make_transport(self) -> HttpTransport:
        return HttpTransport()

    def url_for(self, name: str) -> str:
        return f"{self.server.url}/{name}"

    def publish(self, name: str, data: bytes) -> str:
        (self.docroot / name).write_bytes(data)
        return self.url_for(name)

    def replace(self, name: str, data: bytes) -> None:
        # nginx's ETag is "<mtime seconds>-<size>": a same-size rewrite within the same second
        # keeps it, so the new version gets a later mtime.
        path = self.docroot / name
        later = int(path.stat().st_mtime) + 10
        fresh = self.docroot / f".{name}.new"
        fresh.write_bytes(data)
        os.utime(fresh, (time.time(), later))
        os.replace(fresh, path)
