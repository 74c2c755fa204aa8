"""``backhaul put LOCAL URL``: an upload (``--reply FILE``: an upload-reply) as a foreground
job, followed to its end and completed, as ``get`` does for downloads; a job that fails for
good is cancelled. Against the ``backhaul upload-server`` command as a real process, with
Basic authentication from its users file, and a small HTTP backend for the reply."""

from __future__ import annotations

import http.server
import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers.nginx import running_nginx
from test_cli_limits import _no_backhaul_environment  # noqa: F401
from test_engine_cli import left_by, the_only_job
from test_upload_end_to_end import serving
from test_url_password import assert_not_in_store

from backhaul.adapters.cli import main
from backhaul.adapters.manager import TransferManager
from backhaul.core.vocabulary import JobState, JobType

PASSWORD = "put-Marker-0b3e"
REPLY = b'{"stored": true, "id": 42}'


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "inbox").mkdir(parents=True)
    return root


@pytest.fixture
def backend() -> Iterator[str]:
    """The application an upload-reply server notifies by value: it answers REPLY."""

    class Reply(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", str(len(REPLY)))
            self.end_headers()
            self.wfile.write(REPLY)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Reply)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/notify"
    finally:
        server.shutdown()
        server.server_close()


def put(home: Path, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(["--home", str(home), "put", "--quiet", *argv], out), out.getvalue()


@pytest.mark.parametrize("login", ["url", "--user"])
def test_put_uploads_with_the_urls_password_and_completes(
    tmp_path: Path, home: Path, root: Path, login: str
) -> None:
    """The login in the URL, or given as curl's -u (--user alice:PASSWORD): either way the
    upload server's Basic challenge is answered and no password reaches the store."""
    users = tmp_path / "users"
    users.write_text(f"alice:{PASSWORD}\n")
    source = tmp_path / "report.bin"
    source.write_bytes(os.urandom(700 * 1024))
    with serving("--root", str(root), "--port", "0", "--auth-file", str(users)) as (base, _):
        url = f"{base}/inbox/report.bin"
        if login == "url":
            code, out = put(
                home, str(source), url.replace("http://", f"http://alice:{PASSWORD}@"), "--json"
            )
        else:
            code, out = put(home, str(source), url, "--json", "--user", f"alice:{PASSWORD}")

    assert code == 0, out
    assert (root / "inbox" / "report.bin").read_bytes() == source.read_bytes()
    assert json.loads(out.splitlines()[-1])["state"] == "ACKNOWLEDGED"
    with TransferManager(home=home) as m:
        (job,) = m.jobs(include_final=True)
        assert job.job_type is JobType.UPLOAD
        user = "alice@" if login == "url" else ""
        assert job.files()[0].remote_name.startswith(f"http://{user}127.0.0.1:")
    assert_not_in_store(home, PASSWORD)


def test_put_with_reply_keeps_the_servers_answer(
    tmp_path: Path, home: Path, root: Path, backend: str
) -> None:
    source = tmp_path / "query.json"
    source.write_bytes(b'{"q": "store me"}')
    answer = tmp_path / "answer.json"
    notify = ("--notification", "by-value", "--notification-url", backend)
    with serving("--root", str(root), "--port", "0", *notify) as (base, _):
        code, out = put(home, str(source), f"{base}/inbox/query.json", "--reply", str(answer))

    assert code == 0, out
    assert answer.read_bytes() == REPLY
    with TransferManager(home=home) as m:
        (job,) = m.jobs(include_final=True)
        assert (job.job_type, job.state) == (JobType.UPLOAD_REPLY, JobState.ACKNOWLEDGED)


def test_a_refused_put_fails_and_cancels_its_job(
    tmp_path: Path, home: Path, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "users"
    users.write_text(f"alice:{PASSWORD}\n")
    source = tmp_path / "x.bin"
    source.write_bytes(b"x" * 1000)
    with serving("--root", str(root), "--port", "0", "--auth-file", str(users)) as (base, _):
        url = f"{base}/inbox/x.bin".replace("http://", "http://alice:wrong@")
        code, _out = put(home, str(source), url)

    assert code == 1
    err = capsys.readouterr().err
    assert "backhaul put: job" in err and "BG_E_HTTP_ERROR_401" in err
    assert "wrong" not in err
    assert not (root / "inbox" / "x.bin").exists()
    with TransferManager(home=home) as m:
        (job,) = m.jobs(include_final=True)
        assert job.state is JobState.CANCELLED


def test_a_put_to_a_server_without_bits_uploads_says_what_the_server_lacks(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plain web server (nginx) answers BITS_POST with 405: the message says that the
    server does not take BITS uploads, not only the status."""
    source = tmp_path / "x.bin"
    source.write_bytes(b"x" * 1000)
    docroot = tmp_path / "www"
    docroot.mkdir()
    with running_nginx(docroot) as server:
        code, _out = put(home, str(source), f"{server.url}/x.bin")

    assert code == 1
    err = capsys.readouterr().err
    assert "BG_E_HTTP_ERROR_405" in err
    assert "the server does not take BITS uploads (BITS_POST)" in err
    assert "`backhaul upload-server`" in err


def test_transfer_upload_sends_its_one_pair(tmp_path: Path, home: Path, root: Path) -> None:
    """bitsadmin /transfer NAME /upload REMOTE LOCAL."""
    source = tmp_path / "up.bin"
    source.write_bytes(os.urandom(300 * 1024))
    with serving("--root", str(root), "--port", "0") as (base, _):
        out = io.StringIO()
        argv = ["transfer", "push", "--upload", "-q", f"{base}/inbox/up.bin", str(source)]
        code = main(["--home", str(home), *argv], out)

    assert code == 0, out.getvalue()
    assert (root / "inbox" / "up.bin").read_bytes() == source.read_bytes()
    with TransferManager(home=home) as m:
        (job,) = m.jobs(include_final=True)
        assert (job.display_name, job.job_type) == ("push", JobType.UPLOAD)


def test_a_rerun_put_picks_up_the_upload_an_earlier_put_left(
    tmp_path: Path, home: Path, root: Path
) -> None:
    """A `put` whose process died leaves its job; the same `put` again runs that job (its
    session goes on from what the server holds) instead of a second upload beside it."""
    source = tmp_path / "up.bin"
    source.write_bytes(os.urandom(300 * 1024))
    with serving("--root", str(root), "--port", "0") as (base, _):
        url = f"{base}/inbox/up.bin"
        left_id = left_by("put", home, url, source, JobType.UPLOAD)
        code, out = put(home, str(source), url)

    assert code == 0, out
    assert (root / "inbox" / "up.bin").read_bytes() == source.read_bytes()
    job = the_only_job(home)
    assert (job.id, job.state) == (left_id, JobState.ACKNOWLEDGED)
