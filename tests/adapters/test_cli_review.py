"""Defects a user review of the ``backhaul`` command found, each pinned: exit codes the
README promises, arguments refused at parsing instead of a traceback, messages that say what
they mean (a negative bit mask, an open-ended range, an HRESULT on every refusal), one word
for "no value" in text output, and priorities by name in ``getbandwidth --json``. Everything
runs in this process; the one transfer is from a server on loopback."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from test_cli_limits import (  # the autouse fixture keeps BACKHAUL_* out
    _no_backhaul_environment,  # noqa: F401
    ok,
    run,
)
from test_engine import FaultServer, Served

from backhaul.adapters.cli import LOCK_FILE, build_parser, main, serve_lock
from backhaul.adapters.store import DB_FILE
from backhaul.adapters.upload_server import DEFAULT_CLAIM_TIMEOUT
from backhaul.core import hresult

ALREADY_RUNNING = "[HRESULT_FROM_WIN32(ERROR_SERVICE_ALREADY_RUNNING) 0x80070420]"
FILE_NOT_FOUND = "[HRESULT_FROM_WIN32(ERROR_FILE_NOT_FOUND) 0x80070002]"


def refused(home: Path, capsys: pytest.CaptureFixture[str], *argv: str, code: int = 1) -> str:
    """Run a verb that must be refused with ``code``: its stderr (stdout stays empty)."""
    capsys.readouterr()
    assert run(home, *argv) == (code, "")
    return capsys.readouterr().err


def jobs_in(home: Path) -> str:
    return ok(home, "list", "--include-final", "--json")


# -- 1. get's destination, refused before any job is made: exit 2 ----------------------------


def test_get_refuses_a_destination_that_is_no_directory_as_bad_usage(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: exit 2 for a command line found wrong before any job is made; these were 1."""
    afile = tmp_path / "notadir"
    afile.write_bytes(b"x")
    urls = ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]
    err = refused(home, capsys, "get", "-q", *urls, str(afile), code=2)
    assert err == (
        f"backhaul get: {afile} must be a directory for several URLs [E_INVALIDARG 0x80070057]\n"
    )
    missing = tmp_path / "x" / "nodir"
    err = refused(home, capsys, "get", "-q", urls[0], f"{missing}/", code=2)
    assert err == f"backhaul get: {missing}/ is not a directory [E_INVALIDARG 0x80070057]\n"
    assert json.loads(jobs_in(home)) == []  # no job was made, none left behind
    assert afile.read_bytes() == b"x"


# -- 2. upload-server's port and seconds, refused at parsing ---------------------------------


@pytest.mark.parametrize("port", ["99999", "-1", "65536", "http"])
def test_upload_server_refuses_a_port_outside_0_to_65535_at_parsing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], port: str
) -> None:
    """bind() raised OverflowError, a traceback, for 99999 and -1."""
    assert main(["upload-server", "--root", str(tmp_path), "--port", port], io.StringIO()) == 2
    err = capsys.readouterr().err
    assert f"argument --port: {port!r} is not a port (0 to 65535; 0: a free one)" in err
    assert "Traceback" not in err


def test_upload_server_takes_the_ports_at_the_ends_of_the_range() -> None:
    parse = build_parser().parse_args
    for port in ("0", "65535"):
        assert parse(["upload-server", "--root", "/", "--port", port]).port == int(port)


@pytest.mark.parametrize(
    ("option", "value", "rule"),
    [
        ("--session-timeout", "nan", "more than 0"),
        ("--session-timeout", "inf", "more than 0"),
        ("--session-timeout", "0", "more than 0"),
        ("--cleanup-interval", "nan", "more than 0"),
        ("--cleanup-interval", "inf", "more than 0"),
        ("--claim-timeout", "nan", "0 or more"),
        ("--claim-timeout", "inf", "0 or more"),
        ("--claim-timeout", "-1", "0 or more"),
    ],
)
def test_upload_server_refuses_seconds_that_are_not_finite_at_parsing(
    capsys: pytest.CaptureFixture[str], option: str, value: str, rule: str
) -> None:
    """nan and inf were taken: a NaN session timeout never expires a session, and an
    infinite cleanup interval never cleans."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["upload-server", "--root", "/", option, value])
    assert exit_.value.code == 2
    assert f"argument {option}: {value!r} is not a number of seconds ({rule})" in (
        capsys.readouterr().err
    )


def test_upload_server_still_takes_finite_seconds() -> None:
    args = build_parser().parse_args(
        ["upload-server", "--root", "/", "--session-timeout", "1.5", "--claim-timeout", "0"]
    )
    assert (args.session_timeout, args.claim_timeout) == (1.5, 0.0)
    assert DEFAULT_CLAIM_TIMEOUT > 0  # 0 is a choice (no claim), not the default


# -- 3. setsecretparams none, getsecretparams of an empty list -------------------------------


@pytest.mark.parametrize("word", ["none", "NONE", "None"])
def test_setsecretparams_none_clears_the_list_as_its_help_says(home: Path, word: str) -> None:
    ok(home, "setsecretparams", "sig", "token")
    assert ok(home, "getsecretparams") == "sig\ntoken\n"

    ok(home, "setsecretparams", word)

    assert json.loads(ok(home, "getsecretparams", "--json")) == {"secret_parameters": []}
    assert ok(home, "getsecretparams") == "no secret parameters\n"


def test_getsecretparams_tells_an_empty_list_from_a_parameter_named_none(home: Path) -> None:
    """Both printed ``none``; the empty list is said in words (as ``getcustomheaders`` says
    "no custom headers"), which no parameter name can be: names hold no space."""
    empty = ok(home, "getsecretparams")
    ok(home, "setsecretparams", "none", "sig")  # none among others is a name
    assert json.loads(ok(home, "getsecretparams", "--json")) == {
        "secret_parameters": ["none", "sig"]
    }
    assert ok(home, "getsecretparams") == "none\nsig\n"
    assert empty == "no secret parameters\n"
    ok(home, "setsecretparams")  # no name at all clears it too
    assert ok(home, "getsecretparams") == empty


# -- 4. messages -----------------------------------------------------------------------------


def test_a_negative_bit_mask_is_shown_in_decimal_not_as_0x_minus(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = ok(home, "create", "flags").strip()
    err = refused(home, capsys, "setnotifyflags", job, "-5")
    assert err == (
        "backhaul setnotifyflags: the notify flags must be a bit mask within 0x3F, not -5 "
        "[E_NOTIMPL 0x80004001]\n"
    )
    err = refused(home, capsys, "setproperty", job, "COST_FLAGS", "-1")
    assert err == (
        "backhaul setproperty: the cost flags must be a bit mask within 0x800000FF, not -1 "
        "[E_INVALIDARG 0x80070057]\n"
    )
    assert "0x-" not in err
    # A positive one outside the mask keeps its hex message.
    err = refused(home, capsys, "setnotifyflags", job, "0x40")
    assert "the notify flags 0x40 has bits outside 0x3F" in err


def test_a_range_from_past_the_end_of_the_file_reads_as_curls_open_range(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said ``range 99999999+None``."""
    with FaultServer({"/f.bin": Served(os.urandom(100_000))}).threaded() as srv:
        dest = tmp_path / "x"
        err = refused(home, capsys, "get", "-q", "-r", "99999999-", srv.url("/f.bin"), str(dest))
    assert "range 99999999- lies outside the 100000-byte file" in err
    assert "BG_E_INVALID_RANGE (0x8020002B) in REMOTE_FILE" in err
    assert "None" not in err
    assert not dest.exists()


def test_monitor_interval_messages_state_the_rule_that_refuses_them(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """-1 was refused as "(0 or more)", and 0 then refused as "must be more than 0"."""
    for value in ("-1", "0", "nan"):
        err = refused(home, capsys, "monitor", "--count", "1", "--interval", value, code=2)
        assert f"argument --interval: {value!r} is not a number of seconds (more than 0)" in err
        assert "0 or more" not in err
    # The options that take 0 still say so.
    err = refused(home, capsys, "get", "--retry-delay", "-1", "http://127.0.0.1:9/f", "d", code=2)
    assert "argument --retry-delay: '-1' is not a number of seconds (0 or more)" in err


def test_getters_print_NULL_for_no_value_as_getproxysettings_does(
    tmp_path: Path, home: Path
) -> None:
    """getnotifycmdline, getcompletiontime and getreplyfilename printed Python's None."""
    job = ok(home, "create", "nothing set").strip()
    assert ok(home, "getnotifycmdline", job) == "NULL\n"
    assert ok(home, "getcompletiontime", job) == "NULL\n"
    assert ok(home, "getreplyfilename", job) == "NULL\n"  # a download has no reply file
    assert "proxy list: NULL\n" in ok(home, "getproxysettings", job)
    info = ok(home, "info", job)
    assert " transfer_completion_time: NULL\n" in info and "None" not in info
    assert json.loads(ok(home, "info", "--json", job))["transfer_completion_time"] is None
    # NULL is also what setnotifycmdline takes for none: the output reads back.
    ok(home, "setnotifycmdline", job, "/bin/true", "x")
    ok(home, "setnotifycmdline", job, "NULL")
    assert ok(home, "getnotifycmdline", job) == "NULL\n"


# -- 5. errors with their HRESULT ------------------------------------------------------------


def test_a_second_serve_is_refused_with_the_engines_hresult_and_the_stores_path(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It printed ``another engine already runs on EventStore(sqlite: ...)``, no HRESULT."""
    with serve_lock(home / LOCK_FILE) as held:
        assert held
        err = refused(home, capsys, "serve", "--until-idle")
    assert err == (
        f"backhaul serve: another engine already runs on the store {home / DB_FILE} "
        f"(pid {os.getpid()}): one engine per SQLite store; stop it, or leave the jobs to it "
        f"{ALREADY_RUNNING}\n"
    )
    assert (
        hresult.format_hresult(hresult.hresult_from_win32(hresult.ERROR_SERVICE_ALREADY_RUNNING))
        in ALREADY_RUNNING
    )


def test_a_file_a_verb_cannot_open_is_printed_with_its_hresult(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As ``addfileset`` prints a list file it cannot read."""
    missing = tmp_path / "nonexistent"
    err = refused(home, capsys, "audit", "import", str(missing))
    assert err == f"backhaul audit: {missing}: No such file or directory {FILE_NOT_FOUND}\n"
    job = ok(home, "create", "set").strip()
    err = refused(home, capsys, "addfileset", job, str(missing))
    assert err.endswith(f"No such file or directory {FILE_NOT_FOUND}\n")


# -- 6. getbandwidth --json names the priorities ---------------------------------------------


def test_getbandwidth_json_names_priorities_as_the_text_does(home: Path) -> None:
    ok(home, "setbandwidth", "--priority", "high", "1MiB")
    ok(home, "setbandwidth", "--priority", "low", "0@mon-fri 09:00-17:00", "64k")
    data = json.loads(ok(home, "getbandwidth", "--json"))
    assert list(data["priority"]) == ["HIGH", "LOW"]
    assert data["priority"]["HIGH"] == [{"rate": 1024 * 1024, "window": None}]
    text = ok(home, "getbandwidth")
    assert "    HIGH: 1.0 MiB/s\n" in text and "     LOW: " in text
    # The stored policy (which setbandwidth reads back and an export carries) is unchanged.
    from backhaul.adapters.manager import TransferManager

    with TransferManager(home=home) as manager:
        assert set(manager.settings().bandwidth.priority_limits) == {1, 3}
