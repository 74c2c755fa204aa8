"""``backhaul upload-server``: the BITS upload server (adapters/upload_server.py) from the
command line.

``add_upload_verbs(sub, verb)`` adds the verb to the parser of ``adapters/cli.py``; ``verb`` is
the helper of its ``build_parser``. Until it is wired there, ``python -m
backhaul.adapters.cli_upload upload-server ...`` runs the same verb (``main`` below)::

    backhaul upload-server --root DIR [--host 127.0.0.1] [--port 8080] [--prefix /]
        [--session-dir DIR/BITS-Sessions] [--max-upload-size SIZE] [--max-fragment-size SIZE]
        [--session-timeout SECONDS] [--cleanup-interval SECONDS] [--allow-overwrite]
        [--notification none|by-reference|by-value --notification-url URL]
        [--host-id HOST [--host-id-fallback-timeout SECONDS]]
        [--auth-file FILE [--realm REALM]] [--max-sessions N] [--max-header-bytes N]
        [--claim-timeout SECONDS] [--no-fsync] [--certfile PEM --keyfile PEM]

The URL path ``PREFIX/X`` is stored as ``DIR/X`` (default prefix ``/``). Sessions live in
``--session-dir``, by default ``DIR/BITS-Sessions`` as on IIS (§5.3): the same file system as
the uploads, so the commit is a rename, and a name the server never accepts uploads into nor
serves. SIZE takes k/M/G/T suffixes (powers of 1024; ``KiB`` etc. too). ``--auth-file``: one
``user:password`` per line, the password in plain text or ``{SHA}`` form (``htpasswd -s``); it
turns on HTTP Basic for every request. ``--max-sessions``: live sessions at most (503 beyond).

Once listening, the command prints the upload base URL (``http://HOST:PORT/PREFIX``) on a line
of its own on stdout (``--port 0`` picks a free port) and runs until SIGINT or SIGTERM, then
exits 0. Exit 2 for bad options (missing root, unreadable password file, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from backhaul.adapters.cli_args import interval_arg, seconds_arg

__all__ = ["add_upload_verbs", "build_config", "main", "parse_size"]

Verb = Callable[..., argparse.ArgumentParser]
EXIT_OK, EXIT_USAGE = 0, 2
_SIZE = re.compile(r"\s*(\d+)\s*([kmgt]?)(i?b?)\s*", re.IGNORECASE)
_NOTIFICATIONS = {"none": 0, "by-reference": 1, "by-value": 2}


def parse_size(text: str) -> int:
    """'1048576', '64k', '30M', '1GiB', '2T' -> bytes (powers of 1024)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 64k or 1GiB")
    number, prefix, _ = match.groups()
    scale: int = 1024 ** " kmgt".index(prefix.lower() or " ")
    return int(number) * scale


def _port(text: str) -> int:
    """A TCP port, 0 to 65535 (0: a free one); bind() raised OverflowError beyond."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535; 0: a free one)")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def add_upload_verbs(sub: Any, verb: Verb) -> None:
    """Add ``upload-server`` (see the module docstring)."""
    p = verb(
        "upload-server",
        cmd_upload_server,
        "serve BITS uploads (BITS_POST) into a directory until SIGINT/SIGTERM",
        job=False,
    )
    p.set_defaults(needs_store=False)  # the server opens no job store
    p.add_argument("--root", required=True, help="the directory uploads are stored in")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=_port, default=8080, help="port (8080; 0: a free one)")
    p.add_argument("--prefix", default="/", help="URL path mapped to --root (/)")
    p.add_argument("--session-dir", help="where sessions live (default ROOT/BITS-Sessions)")
    p.add_argument(
        "--max-upload-size", type=parse_size, metavar="SIZE", help="BITSMaximumUploadSize, bytes"
    )
    p.add_argument(
        "--max-fragment-size",
        type=parse_size,
        metavar="SIZE",
        help="largest fragment body (30000000); 413 above",
    )
    # More than 0: VirtualDirectory and UploadServerConfig refuse 0 for these two.
    p.add_argument(
        "--session-timeout",
        type=interval_arg,
        metavar="SECONDS",
        help="BITSSessionTimeout in seconds (1209600)",
    )
    p.add_argument(
        "--cleanup-interval",
        type=interval_arg,
        metavar="SECONDS",
        help="seconds between cleanups (43200)",
    )
    p.add_argument(
        "--allow-overwrite", action="store_true", help="BITSAllowOverwrites: replace files"
    )
    p.add_argument(
        "--notification",
        choices=sorted(_NOTIFICATIONS),
        default="none",
        help="BITSServerNotificationType (upload-reply)",
    )
    p.add_argument("--notification-url", help="BITSServerNotificationURL")
    p.add_argument("--host-id", help="BITSHostId: sent as BITS-Host-Id")
    p.add_argument(
        "--host-id-fallback-timeout",
        type=_positive,
        metavar="SECONDS",
        help="BITSHostIdFallbackTimeout (86400)",
    )
    p.add_argument("--auth-file", help="HTTP Basic: a file of user:password lines (plain or {SHA})")
    p.add_argument("--realm", default="BITS uploads", help="the Basic realm")
    p.add_argument(
        "--max-sessions", type=_positive, metavar="N", help="live sessions at most (no limit)"
    )
    p.add_argument(
        "--max-header-bytes",
        type=_positive,
        metavar="N",
        help="largest request head in bytes (16384)",
    )
    p.add_argument(
        "--claim-timeout",
        type=seconds_arg,
        metavar="SECONDS",
        help="seconds a session keeps its destination from a new one after its last request (30)",
    )
    p.add_argument("--no-fsync", action="store_true", help="do not fsync fragments (faster)")
    p.add_argument("--certfile", help="PEM certificate chain: serve HTTPS")
    p.add_argument("--keyfile", help="PEM private key of --certfile")


def build_config(args: argparse.Namespace) -> Any:
    """The ``UploadServerConfig`` the options describe; ValueError for a bad combination."""
    from backhaul.adapters.upload_server import (
        BasicAuth,
        NotificationType,
        UploadServerConfig,
        VirtualDirectory,
    )

    root = Path(args.root).expanduser()
    if not os.path.isdir(root):
        raise ValueError(f"--root {args.root}: not a directory")
    vdir: dict[str, Any] = {
        "allow_overwrite": args.allow_overwrite,
        "notification": NotificationType(_NOTIFICATIONS[args.notification]),
        "notification_url": args.notification_url,
        "host_id": args.host_id,
    }
    for option, key in (
        ("max_upload_size", "max_upload_size"),
        ("session_timeout", "session_timeout"),
        ("host_id_fallback_timeout", "host_id_fallback_timeout"),
    ):
        if getattr(args, option) is not None:
            vdir[key] = getattr(args, option)
    server: dict[str, Any] = {"fsync": not args.no_fsync}
    for option in (
        "max_fragment_size",
        "cleanup_interval",
        "max_sessions",
        "max_header_bytes",
        "claim_timeout",
    ):
        if getattr(args, option) is not None:
            server[option] = getattr(args, option)
    if args.auth_file:
        try:
            server["auth"] = BasicAuth.from_file(args.auth_file, args.realm)
        except OSError as exc:
            raise ValueError(f"--auth-file: {exc.strerror or exc}: {args.auth_file}") from None
        except ValueError as exc:
            raise ValueError(f"--auth-file {args.auth_file}: {exc}") from None
    session_dir = (
        Path(args.session_dir).expanduser() if args.session_dir else root / "BITS-Sessions"
    )
    return UploadServerConfig(
        session_dir=session_dir,
        vdirs=(VirtualDirectory(args.prefix, root, **vdir),),
        **server,
    )


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.certfile and not args.keyfile:
        return None
    if not args.certfile:
        raise ValueError("--keyfile needs --certfile")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.certfile, args.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--certfile/--keyfile: {exc}") from None
    return context


async def _serve(
    config: Any, host: str, port: int, context: ssl.SSLContext | None, out: TextIO
) -> None:
    from backhaul.adapters.upload_server import serve_uploads

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        extra = {"ssl_context": context} if context is not None else {}
        async with serve_uploads(config, host, port, **extra) as base:
            prefix = config.vdirs[0].prefix
            url = base + ("" if prefix == "/" else prefix)
            out.write(url + "\n")
            out.flush()
            sys.stderr.write(
                f"backhaul upload-server: {url}/ -> {config.vdirs[0].directory} "
                f"(sessions in {config.session_dir}); SIGINT or SIGTERM stops it\n"
            )
            await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    sys.stderr.write("backhaul upload-server: stopped\n")


def cmd_upload_server(args: argparse.Namespace, manager: Any, out: TextIO) -> int:
    try:
        config = build_config(args)
        context = _ssl_context(args)
    except ValueError as exc:
        sys.stderr.write(f"backhaul upload-server: {exc}\n")
        return EXIT_USAGE
    try:
        asyncio.run(_serve(config, args.host, args.port, context, out))
    except OSError as exc:  # the address is taken, no permission for the port, ...
        sys.stderr.write(
            f"backhaul upload-server: cannot listen on {args.host}:{args.port}: {exc}\n"
        )
        return 1
    return EXIT_OK


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """The verb without the rest of the ``backhaul`` command (``python -m`` this module)."""
    parser = argparse.ArgumentParser(prog="backhaul")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(
        name: str, func: Callable[..., int], help_: str, job: bool = True
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        if job:
            sp.add_argument("job", help="job id, id prefix or display name")
        sp.set_defaults(func=func)
        return sp

    add_upload_verbs(sub, verb)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    return int(args.func(args, None, out or sys.stdout))


if __name__ == "__main__":
    sys.exit(main())
