"""bitsadmin's one-value verbs in the command: the progress and times getters, ``geterror``,
``gettemporaryname``, ``listfiles``, ``setaclflag``/``getaclflags``, ``getnotifycmdline``,
``addfileset``'s list file, and the upload-reply
verbs (``setreplyfilename``, ``getreplyfilename``, ``getreplyprogress``, ``getreplydata``),
against the engine tests' nginx and the project's BITS upload server."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime
from pathlib import Path

import pytest
from peers.nginx import NginxServer
from test_cli_limits import (  # the autouse fixture keeps BACKHAUL_* out
    _no_backhaul_environment,  # noqa: F401
    create,
    ok,
    run,
)
from test_engine_upload import backend, upload_server

from backhaul.adapters.engine import Engine
from backhaul.adapters.localfile import TEMP_SUFFIX
from backhaul.adapters.manager import TransferManager
from backhaul.adapters.upload_server import NotificationType
from backhaul.core import hresult


def value(home: Path, *argv: str) -> str:
    return ok(home, *argv).rstrip("\n")


def refused(home: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The error line of a verb that fails."""
    capsys.readouterr()
    code, _ = run(home, *argv)
    assert code != 0
    return capsys.readouterr().err


def test_the_progress_and_time_getters_follow_the_job(
    tmp_path: Path,
    home: Path,
    engine_nginx: tuple[NginxServer, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, docroot = engine_nginx
    job = value(home, "create", "getters")
    value(home, "addfile", job, f"{server.url}/one.bin", str(tmp_path / "one.bin"))
    value(home, "addfile", job, f"{server.url}/two.bin", str(tmp_path / "two.bin"))

    assert value(home, "getbytestotal", job) == "NULL"  # not known before the transfer
    assert value(home, "getfilestotal", job) == "2"
    assert value(home, "getfilestransferred", job) == "0"
    assert value(home, "getcompletiontime", job) == "NULL"
    created = datetime.fromisoformat(value(home, "getcreationtime", job))
    temp = Path(value(home, "gettemporaryname", job, "1"))
    assert temp.parent == tmp_path and temp.name.startswith(".two.bin.")
    assert temp.name.endswith(TEMP_SUFFIX)
    assert "BG_E_FILE_NOT_FOUND" in refused(home, capsys, "gettemporaryname", job, "2")
    assert "BG_E_ERROR_INFORMATION_UNAVAILABLE" in refused(home, capsys, "geterror", job)
    assert value(home, "listfiles", job) == value(home, "files", job)

    value(home, "resume", job)
    value(home, "serve", "--until-idle")

    sizes = sum((docroot / n).stat().st_size for n in ("one.bin", "two.bin"))
    assert value(home, "getbytestotal", job) == value(home, "getbytestransferred", job)
    assert value(home, "getbytestotal", job) == str(sizes)
    assert value(home, "getfilestransferred", job) == "2"
    completed = datetime.fromisoformat(value(home, "getcompletiontime", job))
    modified = datetime.fromisoformat(value(home, "getmodificationtime", job))
    assert created <= completed <= modified


def test_geterror_names_the_error_and_its_file(
    tmp_path: Path, home: Path, engine_nginx: tuple[NginxServer, Path]
) -> None:
    server, _ = engine_nginx
    job = value(home, "create", "broken")
    value(home, "addfile", job, f"{server.url}/one.bin", str(tmp_path / "one.bin"))
    value(home, "addfile", job, f"{server.url}/missing.bin", str(tmp_path / "missing.bin"))
    value(home, "resume", job)
    value(home, "serve", "--until-idle")

    line = value(home, "geterror", job)
    assert line.startswith("BG_E_HTTP_ERROR_404 (0x80190194) in REMOTE_FILE (file 1): ")
    assert "/missing.bin" in line


def test_setaclflag_takes_bitsadmins_letters_or_a_number(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = value(home, "create", "acl")
    value(home, "setaclflag", job, "og")
    assert value(home, "getaclflags", job) == "3"
    value(home, "setaclflag", job, "0x4")
    assert value(home, "getaclflags", job) == "4"
    assert hresult.format_hresult(hresult.E_INVALIDARG) in refused(
        home, capsys, "setaclflag", job, "OX"
    )
    assert value(home, "getaclflags", job) == "4"


def test_the_upload_reply_verbs(tmp_path: Path, home: Path) -> None:
    source = tmp_path / "query.json"
    source.write_bytes(b'{"q": 1}')
    reply = b'{"answer": "' + os.urandom(8).hex().encode() + b'"}'
    answer = tmp_path / "answer.json"

    async def body() -> None:
        async with (
            backend(reply) as notify_url,
            upload_server(
                tmp_path, notification=NotificationType.BY_VALUE, notification_url=notify_url
            ) as (url, _www),
        ):
            job = value(home, "create", "ask", "--type", "upload-reply")
            value(home, "addfile", job, f"{url}/query.json", str(source))
            value(home, "setreplyfilename", job, str(answer))
            assert value(home, "getreplyfilename", job) == str(answer)
            assert value(home, "getreplyprogress", job) == "0 of ? bytes"
            value(home, "resume", job)
            with TransferManager(home=home) as manager:
                await Engine(manager, poll_interval=0.05).run(until_idle=True)
            assert value(home, "getreplyprogress", job) == f"{len(reply)} of {len(reply)} bytes"
            assert value(home, "getreplydata", job) == reply.decode()
            value(home, "complete", job)

    asyncio.run(body())
    assert answer.read_bytes() == reply


def test_getnotifycmdline_prints_the_command_line_as_setnotifycmdline_takes_it(
    home: Path,
) -> None:
    """An argument vector, shell-quoted (the engine runs it without a shell); none: NULL."""
    job = value(home, "create", "notify")
    assert value(home, "getnotifycmdline", job) == "NULL"
    value(home, "setnotifycmdline", job, "/usr/bin/printf", "%s\\n", "two words")
    assert value(home, "getnotifycmdline", job) == "/usr/bin/printf '%s\\n' 'two words'"


def test_addfileset_reads_quoted_names_comments_and_urls_as_they_are(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pair a line; blank lines and # lines skipped; a name with spaces in quotes; a URL
    keeps its fragment and an apostrophe. A line that is not one pair (an unclosed quote
    too) refuses the whole list: nothing is added."""
    job = value(home, "create", "set")
    listing = tmp_path / "list"
    listing.write_text(
        "# remote local\n"
        "\n"
        f"http://127.0.0.1:1/a.bin   {tmp_path}/a.bin\n"
        f"\"http://127.0.0.1:1/it's.bin#part\" '{tmp_path}/with space.bin'\n"
        f'http://127.0.0.1:1/o\'clock.bin "{tmp_path}/b.bin"\n'
    )
    value(home, "addfileset", job, str(listing))
    files = json.loads(value(home, "files", job, "--json"))
    assert [(f["remote_name"], f["local_name"]) for f in files] == [
        ("http://127.0.0.1:1/a.bin", f"{tmp_path}/a.bin"),
        ("http://127.0.0.1:1/it's.bin#part", f"{tmp_path}/with space.bin"),
        ("http://127.0.0.1:1/o'clock.bin", f"{tmp_path}/b.bin"),
    ]
    listing.write_text(f'http://127.0.0.1:1/c.bin {tmp_path}/c.bin\n"http://127.0.0.1:1/d.bin\n')
    assert "list:2: want 'REMOTE LOCAL'" in refused(home, capsys, "addfileset", job, str(listing))
    assert len(json.loads(value(home, "files", job, "--json"))) == 3


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le-bom", "utf-16-be"])
def test_addfileset_reads_list_files_written_on_windows(
    tmp_path: Path, home: Path, encoding: str
) -> None:
    """Notepad writes UTF-8 with a byte-order mark, and Windows PowerShell's '>' writes
    UTF-16 with one, with CR LF line ends: found with such a list, refused as
    "'\\ufeffhttp://...' is neither a URL nor a UNC path"."""
    job = value(home, "create", "windows list")
    text = f"http://127.0.0.1:1/a.bin {tmp_path}/a.bin\r\nhttp://127.0.0.1:1/b.bin {tmp_path}/b.bin\r\n"
    data = {
        "utf-8-sig": text.encode("utf-8-sig"),
        "utf-16": text.encode("utf-16"),  # this machine's order, with its mark
        "utf-16-le-bom": b"\xff\xfe" + text.encode("utf-16-le"),
        "utf-16-be": b"\xfe\xff" + text.encode("utf-16-be"),
    }[encoding]
    (tmp_path / "list").write_bytes(data)
    value(home, "addfileset", job, str(tmp_path / "list"))
    files = json.loads(value(home, "files", job, "--json"))
    assert [(f["remote_name"], f["local_name"]) for f in files] == [
        ("http://127.0.0.1:1/a.bin", f"{tmp_path}/a.bin"),
        ("http://127.0.0.1:1/b.bin", f"{tmp_path}/b.bin"),
    ]


def test_bad_values_of_the_job_verbs_are_typed_errors_not_tracebacks(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each of these raised a Python exception to the terminal (found by running every verb
    with odd arguments): now a one-line BITS error, exit 1, nothing recorded."""
    job = value(home, "create", "odd")
    (tmp_path / "binary").write_bytes(bytes(range(256)))
    cases = [
        (
            ("addfileset", job, str(tmp_path / "missing")),
            "[HRESULT_FROM_WIN32(ERROR_FILE_NOT_FOUND)",
        ),
        (("addfileset", job, str(tmp_path / "binary")), "list file"),
        (("setminretrydelay", job, "9" * 20), "setminretrydelay: " + "9" * 20 + " is out of range"),
        (("setnoprogresstimeout", job, "1e309"), "[E_INVALIDARG 0x80070057]"),
        (("setnetworkcost", "bogus"), "unknown CostFlags name: 'bogus'"),
        (("setproperty", job, "bogus", "1"), "[BG_E_UNKNOWN_PROPERTY_ID 0x80200057]"),
        (("setproperty", job, "DYNAMIC_CONTENT", "maybe"), "'maybe' is not a number"),
    ]
    with TransferManager(home=home) as manager:
        before = len(list(manager.store.stream(job)))
    for argv, said in cases:
        err = refused(home, capsys, *argv)
        assert said in err and "Traceback" not in err, (argv, err)
        assert err.startswith(f"backhaul {argv[0]}: ") and err.count("\n") == 1, err
    with TransferManager(home=home) as manager:
        assert len(list(manager.store.stream(job))) == before
        assert manager.settings().network_cost is None


def test_a_jobs_control_characters_reach_no_terminal_but_json_keeps_them(tmp_path: Path) -> None:
    """Found creating a job named with an escape sequence and a newline: `list` (also an
    administrator's `list --all` of every user's jobs), `info`, `files`, `monitor` and
    `audit at` printed them raw, so a job's name could recolour or clear the terminal of
    whoever listed it and break one line per job. Now they show as Python escapes."""
    home = tmp_path / "home"
    name = "evil\x1b[2J\x1b[31mred\nsecond line\x9b"
    job_id = ok(home, "create", name).strip()
    ok(home, "setdescription", job_id, "bell\x07and\rreturn")
    ok(home, "addfile", job_id, "https://example.com/a.bin", str(tmp_path / "new\nline.bin"))
    shown = "evil\\x1b[2J\\x1b[31mred\\nsecond line\\x9b"
    for argv in (
        ["list"],
        ["info", job_id],
        ["files", job_id],
        ["monitor", "--count", "1"],
        ["audit", "at", job_id, "3"],
    ):
        out = ok(home, *argv)
        assert not any(c in out for c in "\x1b\x07\r\x9b"), (argv, out)
        if argv[0] != "files":
            assert shown in out, (argv, out)
    assert "new\\nline.bin" in ok(home, "files", job_id)
    assert "bell\\x07and\\rreturn" in ok(home, "info", job_id)
    assert len(ok(home, "list").splitlines()) == 2  # the job's line and the count
    assert json.loads(ok(home, "info", job_id, "--json"))["display_name"] == name


def test_geterrordescription_takes_a_name_or_a_number_and_opens_no_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "no-home"
    for spelling in ("BG_E_HTTP_ERROR_404", "0x80190194", "-2145844844", "bg_e_http_error_404"):
        assert value(home, "geterrordescription", spelling) == (
            "BG_E_HTTP_ERROR_404 (0x80190194): the server answered HTTP 404 Not Found"
        )
    assert value(home, "geterrordescription", "0x80070070") == (
        "HRESULT_FROM_WIN32(ERROR_DISK_FULL) (0x80070070): not enough space on the disk"
    )
    assert value(home, "geterrordescription", "0x12345678") == (
        "0x12345678: unregistered success code 0x12345678"
    )
    assert "E_INVALIDARG" in refused(home, capsys, "geterrordescription", "nonsense")
    assert not home.exists()
    assert TransferManager.get_error_description(hresult.BG_E_INVALID_STATE, 0x409) == (
        hresult.describe(hresult.BG_E_INVALID_STATE)
    )


def test_info_and_files_of_a_final_job_by_name_or_prefix(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--include-final`` found a cancelled job by its whole id only (not by its name or a
    prefix, not even a live one), and ``files`` had no such option."""
    live = create(home, "live one")
    gone = create(home, "gone one")
    ok(home, "addfile", gone, "http://127.0.0.1:9/f", str(tmp_path / "f"))
    ok(home, "cancel", gone)
    assert json.loads(ok(home, "info", "--include-final", "--json", "live one"))["id"] == live
    for ref in ("gone one", gone[:8]):
        assert json.loads(ok(home, "info", "--include-final", "--json", ref))["id"] == gone
        (row,) = json.loads(ok(home, "files", "--include-final", "--json", ref))
        assert row["local_name"] == str(tmp_path / "f")
    assert "no job named 'gone one'" in refused(home, capsys, "files", "gone one")


def test_a_file_the_audit_verbs_cannot_open_is_an_error_line_not_a_traceback(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "no" / "such")
    assert f"{missing}: No such file or directory" in refused(
        home, capsys, "audit", "export", missing
    )
    assert f"{missing}: No such file or directory" in refused(
        home, capsys, "audit", "import", missing
    )
