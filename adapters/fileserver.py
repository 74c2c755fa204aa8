"""A small static file server (aiohttp) with ranges, ETag and Last-Modified.

For demos and local experiments only: ``python -m backhaul.adapters.fileserver DIR``
serves DIR on 127.0.0.1 (or ``--host``; a free port unless ``--port``), writing the port to
``--port-file`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

from aiohttp import web


def make_app(root: Path) -> web.Application:
    app = web.Application()
    app.router.add_static("/", root, show_index=False, follow_symlinks=False)
    return app


async def serve(root: Path, port: int, port_file: Path | None, host: str = "127.0.0.1") -> None:
    runner = web.AppRunner(make_app(root.resolve()))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    if port_file is not None:
        sockets = site._server.sockets if site._server is not None else ()  # type: ignore[union-attr]
        port_file.write_text(str(sockets[0].getsockname()[1]))
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.root, args.port, args.port_file, args.host))


if __name__ == "__main__":
    main()
