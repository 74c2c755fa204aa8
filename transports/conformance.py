"""The transport conformance kit: abstract pytest classes that every transport passes.

A plugin author (and every built-in transport) subclasses the kit in a test module, names the
subclass ``Test...`` so that pytest collects it, and overrides a few factory methods; every
``test_*`` method of the kit then runs against the real transport and a real server. The kit's
own classes are not named ``Test...``: importing them into a test module collects nothing.

    import pytest
    from backhaul.transports.conformance import TransportConformance, UploadConformance

    class TestMyConformance(TransportConformance, UploadConformance):
        not_found_hresult = hresult.hresult_from_win32(hresult.ERROR_FILE_NOT_FOUND)

        @pytest.fixture(autouse=True)
        def _server(self, my_server):          # pytest makes one instance per test
            self.server = my_server

        def make_transport(self): return MyTransport()
        def url_for(self, name): return f"my://{self.server.address}/{name}"
        def publish(self, name, data): self.server.put(name, data); return self.url_for(name)
        def replace(self, name, data): self.server.put(name, data)   # the validator must change
        # UploadConformance, only for a transport that declares "upload":
        def make_uploader(self): return MyTransport()
        def fetch(self, name): return self.server.get(name)          # None while absent

Rules of this module:

* ``TransportConformance`` is the contract of specs/transport-sdk.md for downloads; the kit
  asserts what every transport must do and, where a capability changes the answer (a
  transport without ``"ranges"`` gives the whole file from 0 instead of a resume), it asserts
  the answer that the declared capabilities promise, never skips.
* ``UploadConformance`` exists only for transports that can upload: the upload tests are in
  that class alone, so a download-only transport does not inherit them (no skips).
* Every test runs its body in a fresh event loop (``asyncio.run``) with a fresh transport from
  ``make_transport()``, closed at the end, under ``timeout`` seconds. No pytest plugin is
  needed.
* Names are unique per test (``unique()``), so one server and one docroot may serve a whole
  session.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import ClassVar, Final, Protocol, TypeVar

import pytest

from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.port import (
    KNOWN_CAPABILITIES,
    RANGES,
    UPLOAD,
    UPLOAD_REPLY,
    VALIDATORS,
    Download,
    RemoteFile,
    RequestOptions,
    Transport,
    Uploader,
)
from backhaul.core.vocabulary import ErrorContext

__all__ = [
    "ASSUMED_CAPABILITIES",
    "KNOWN_CAPABILITIES",
    "RANGES",
    "UPLOAD",
    "UPLOAD_REPLY",
    "VALIDATORS",
    "TransportConformance",
    "UploadConformance",
    "capabilities_of",
    "read_all",
]

MiB: Final = 1024 * 1024

ASSUMED_CAPABILITIES: Final = frozenset({RANGES, VALIDATORS})
"""What a transport that declares no ``capabilities`` attribute is taken to support."""


class _Closable(Protocol):
    async def close(self) -> None: ...


T = TypeVar("T")
R = TypeVar("R", bound=_Closable)


def capabilities_of(
    transport: object, assumed: frozenset[str] = ASSUMED_CAPABILITIES
) -> frozenset[str]:
    """The transport's declared ``capabilities``, else ``assumed``."""
    declared = getattr(transport, "capabilities", None)
    return assumed if declared is None else frozenset(declared)


async def read_all(download: Download) -> bytes:
    """Every chunk of ``download``, then ``aclose``."""
    try:
        return b"".join([chunk async for chunk in download])
    finally:
        await download.aclose()


def _open_fds() -> int | None:
    """How many file descriptors this process holds (Linux), else None."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _fatal(exc: TransferError, code: int, context: ErrorContext) -> None:
    assert (hr.name_of(exc.hresult), exc.context, exc.transient) == (
        hr.name_of(code),
        context,
        False,
    ), f"expected a fatal {hr.name_of(code)} in {context.name}, got {exc!r} ({exc.context.name})"


class _Kit:
    """What both kits share: the event loop, unique names and the request options."""

    options: RequestOptions = RequestOptions()
    """The options every request of the kit carries (credentials, headers...); a class
    attribute, or set per test in a fixture (``self.options = ...``)."""
    timeout: ClassVar[float] = 60.0
    """Seconds one test body may take."""
    declared_capabilities: ClassVar[frozenset[str] | None] = None
    """The capabilities of an implementation that does not declare ``capabilities`` itself
    (code older than the attribute); None: read the attribute."""

    def capabilities_of(self, subject: object, assumed: frozenset[str]) -> frozenset[str]:
        if self.declared_capabilities is not None:
            return self.declared_capabilities
        return capabilities_of(subject, assumed)

    @staticmethod
    def unique(label: str) -> str:
        """A file name no other test uses."""
        return f"conf-{secrets.token_hex(6)}-{label}.bin"

    def _run(
        self, make: Callable[[], R], body: Callable[[R], Awaitable[T]], close: bool = True
    ) -> T:
        async def main() -> T:
            subject = make()
            try:
                async with asyncio.timeout(self.timeout):
                    return await body(subject)
            finally:
                if close:
                    await subject.close()

        return asyncio.run(main())


class TransportConformance(_Kit):
    """The download contract. Override the four methods below (and ``not_found_hresult``)."""

    not_found_hresult: ClassVar[int] = hr.hresult_from_win32(hr.ERROR_FILE_NOT_FOUND)
    """The HRESULT the transport raises for a missing remote file (HTTP: BG_E_HTTP_ERROR_404)."""
    large_file_size: ClassVar[int] = 64 * MiB
    memory_limit: ClassVar[int] = 16 * MiB
    """Peak Python allocations (tracemalloc) allowed while streaming the large file."""
    cancel_rounds: ClassVar[int] = 20
    """Cancelled reads in a row; more than a connection pool's per-host limit (16 for HTTP)."""
    close_timeout: ClassVar[float] = 5.0
    """Seconds ``aclose`` may take after a cancellation."""

    # -- to override ---------------------------------------------------------------------------

    def make_transport(self) -> Transport:
        """A new transport instance (the kit closes it)."""
        raise NotImplementedError

    def url_for(self, name: str) -> str:
        """The URL of ``name`` on the test server, whether or not it exists."""
        raise NotImplementedError

    def publish(self, name: str, data: bytes) -> str:
        """Store ``data`` as ``name`` on the test server; return its URL."""
        raise NotImplementedError

    def replace(self, name: str, data: bytes) -> None:
        """Give ``name`` new contents so that its validator changes, even when ``data`` has
        the old size (bump the mtime when the validator is made of mtime and size)."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------------

    def run(self, body: Callable[[Transport], Awaitable[T]]) -> T:
        """``body(transport)`` in a fresh event loop with a fresh transport, closed after."""
        return self._run(self.make_transport, body)

    def fails(self, body: Callable[[Transport], Awaitable[object]]) -> TransferError:
        """The TransferError ``body`` raises (any other outcome fails the test)."""
        with pytest.raises(TransferError) as info:
            self.run(body)
        return info.value

    def capabilities(self) -> frozenset[str]:
        return self.capabilities_of(self.make_transport(), ASSUMED_CAPABILITIES)

    def _published(self, label: str, size: int) -> tuple[str, str, bytes]:
        name = self.unique(label)
        data = os.urandom(size)
        return name, self.publish(name, data), data

    # -- declarations ----------------------------------------------------------------------------

    def test_declares_lowercase_schemes_and_known_capabilities(self) -> None:
        transport = self.make_transport()
        assert isinstance(transport.schemes, frozenset)
        assert transport.schemes
        for scheme in transport.schemes:
            assert scheme == scheme.lower()
            assert scheme.isascii()
            assert "://" not in scheme
        unknown = self.capabilities() - KNOWN_CAPABILITIES
        assert not unknown, f"unknown capabilities {sorted(unknown)}"

    # -- stat and whole reads --------------------------------------------------------------------

    def test_stat_reports_the_size_and_the_validator(self) -> None:
        _, url, data = self._published("stat", 300_001)
        remote = self.run(lambda t: t.stat(url, self.options))
        assert isinstance(remote, RemoteFile)
        assert remote.url == url
        assert remote.size == len(data)
        if VALIDATORS in self.capabilities():
            assert remote.validator
        if RANGES in self.capabilities():
            assert remote.accepts_ranges
        if remote.last_modified is not None:
            assert isinstance(remote.last_modified, datetime)
            assert remote.last_modified.tzinfo is not None

    def test_full_read_returns_every_byte_and_the_stat_validator(self) -> None:
        _, url, data = self._published("full", 2 * MiB + 12_345)

        async def body(t: Transport) -> tuple[RemoteFile, RemoteFile, int, bytes]:
            stat = await t.stat(url, self.options)
            download = await t.open(url, self.options)
            return stat, download.remote, download.offset, await read_all(download)

        stat, remote, offset, got = self.run(body)
        assert offset == 0
        assert remote.size == len(data)
        assert remote.validator == stat.validator
        assert got == data

    def test_empty_file_reads_as_no_bytes(self) -> None:
        _, url, _ = self._published("empty", 0)

        async def body(t: Transport) -> tuple[int | None, bytes]:
            size = (await t.stat(url, self.options)).size
            return size, await read_all(await t.open(url, self.options))

        assert self.run(body) == (0, b"")

    def test_two_downloads_interleave_on_one_transport(self) -> None:
        _, first_url, first = self._published("first", 3 * MiB + 1)
        _, second_url, second = self._published("second", 3 * MiB + 2)

        async def body(t: Transport) -> tuple[bytes, bytes]:
            a = await t.open(first_url, self.options)
            b = await t.open(second_url, self.options)
            got: dict[int, list[bytes]] = {0: [], 1: []}
            iterators: list[AsyncIterator[bytes] | None] = [aiter(a), aiter(b)]
            try:
                while any(iterators):
                    for i, it in enumerate(iterators):
                        if it is None:
                            continue
                        try:
                            got[i].append(await anext(it))
                        except StopAsyncIteration:
                            iterators[i] = None
            finally:
                await a.aclose()
                await b.aclose()
            return b"".join(got[0]), b"".join(got[1])

        assert self.run(body) == (first, second)

    def test_a_transport_serves_a_second_event_loop_after_close(self) -> None:
        _, url, data = self._published("loops", 100_000)
        transport = self.make_transport()

        async def once() -> bytes:
            try:
                return await read_all(await transport.open(url, self.options))
            finally:
                await transport.close()

        assert asyncio.run(once()) == data
        assert asyncio.run(once()) == data

    # -- ranges and resume -----------------------------------------------------------------------

    def test_ranged_read_returns_exactly_the_range(self) -> None:
        _, url, data = self._published("range", 1 * MiB + 999)
        start, length = 123_457, 400_000

        async def body(t: Transport) -> tuple[int, bytes]:
            validator = (await t.stat(url, self.options)).validator
            download = await t.open(
                url, self.options, offset=start, length=length, validator=validator
            )
            return download.offset, await read_all(download)

        if RANGES in self.capabilities():
            assert self.run(body) == (start, data[start : start + length])
        else:
            error = self.fails(body)
            _fatal(error, hr.BG_E_INSUFFICIENT_RANGE_SUPPORT, ErrorContext.REMOTE_FILE)

    def test_range_running_past_the_end_stops_at_the_end(self) -> None:
        if RANGES not in self.capabilities():
            return  # the range test above covers the refusal
        _, url, data = self._published("tail", 50_000)

        async def body(t: Transport) -> tuple[int, bytes]:
            download = await t.open(url, self.options, offset=len(data) - 10, length=100)
            return download.offset, await read_all(download)

        assert self.run(body) == (len(data) - 10, data[-10:])

    def test_range_starting_past_the_end_is_bg_e_invalid_range(self) -> None:
        if RANGES not in self.capabilities():
            return  # the range test above covers the refusal
        _, url, data = self._published("outside", 10_000)
        error = self.fails(lambda t: t.open(url, self.options, offset=len(data) + 10, length=5))
        _fatal(error, hr.BG_E_INVALID_RANGE, ErrorContext.REMOTE_FILE)

    def test_resume_at_an_offset_with_the_validator_returns_the_tail(self) -> None:
        _, url, data = self._published("resume", 2 * MiB + 7)
        offset = 1_000_003

        async def body(t: Transport) -> tuple[int, str | None, str | None, bytes]:
            validator = (await t.stat(url, self.options)).validator
            download = await t.open(url, self.options, offset=offset, validator=validator)
            return download.offset, validator, download.remote.validator, await read_all(download)

        got_offset, validator, after, got = self.run(body)
        assert after == validator
        if RANGES in self.capabilities():
            assert (got_offset, got) == (offset, data[offset:])
        else:
            assert (got_offset, got) == (0, data)

    def test_resume_at_the_end_gives_no_bytes_or_restarts(self) -> None:
        """A checkpoint may claim the whole file before the file is finished: the resume
        then asks for ``offset == size``. That is not an error."""
        _, url, data = self._published("at-end", 70_000)

        async def body(t: Transport) -> tuple[int, bytes]:
            validator = (await t.stat(url, self.options)).validator
            download = await t.open(url, self.options, offset=len(data), validator=validator)
            return download.offset, await read_all(download)

        assert self.run(body) in ((len(data), b""), (0, data))

    def test_stale_validator_restarts_from_zero_with_the_new_version(self) -> None:
        if VALIDATORS not in self.capabilities():
            return  # without validators a change cannot be seen; nothing to promise
        name, url, _ = self._published("changed", 1 * MiB)
        stale = self.run(lambda t: t.stat(url, self.options)).validator
        new = os.urandom(1 * MiB)  # the same size: only the validator tells
        self.replace(name, new)

        async def body(t: Transport) -> tuple[int, RemoteFile, bytes]:
            download = await t.open(url, self.options, offset=500_000, validator=stale)
            return download.offset, download.remote, await read_all(download)

        offset, remote, got = self.run(body)
        assert offset == 0
        assert remote.validator is not None
        assert remote.validator != stale
        assert remote.size == len(new)
        assert got == new

    def test_stale_validator_on_a_range_gives_the_new_version_from_zero(self) -> None:
        if VALIDATORS not in self.capabilities() or RANGES not in self.capabilities():
            return  # the tests above cover these transports
        name, url, _ = self._published("changed-range", 300_000)
        stale = self.run(lambda t: t.stat(url, self.options)).validator
        new = os.urandom(300_000)
        self.replace(name, new)

        async def body(t: Transport) -> tuple[int, str | None, bytes]:
            download = await t.open(url, self.options, offset=1000, length=500, validator=stale)
            return download.offset, download.remote.validator, await read_all(download)

        offset, validator, got = self.run(body)
        assert (offset, got) == (0, new)
        assert validator not in (None, stale)

    # -- errors ----------------------------------------------------------------------------------

    def test_stat_of_a_missing_file_is_a_fatal_remote_file_error(self) -> None:
        url = self.url_for(self.unique("missing"))
        error = self.fails(lambda t: t.stat(url, self.options))
        _fatal(error, self.not_found_hresult, ErrorContext.REMOTE_FILE)

    def test_open_of_a_missing_file_is_a_fatal_remote_file_error(self) -> None:
        url = self.url_for(self.unique("missing"))
        error = self.fails(lambda t: t.open(url, self.options))
        _fatal(error, self.not_found_hresult, ErrorContext.REMOTE_FILE)
        error = self.fails(lambda t: t.open(url, self.options, offset=10, validator='"v"'))
        _fatal(error, self.not_found_hresult, ErrorContext.REMOTE_FILE)

    def test_bad_offsets_and_lengths_are_e_invalidarg(self) -> None:
        _, url, _ = self._published("bad-args", 1000)
        for offset, length in ((-1, None), (0, 0), (10, -5)):

            async def body(t: Transport, o: int = offset, n: int | None = length) -> Download:
                return await t.open(url, self.options, offset=o, length=n)

            _fatal(self.fails(body), hr.E_INVALIDARG, ErrorContext.REMOTE_FILE)

    def test_a_url_of_another_scheme_is_e_invalidarg(self) -> None:
        url = f"no-such-scheme://127.0.0.1/{self.unique('scheme')}"
        for call in (
            lambda t: t.stat(url, self.options),
            lambda t: t.open(url, self.options),
        ):
            error = self.fails(call)
            _fatal(error, hr.E_INVALIDARG, ErrorContext.REMOTE_FILE)

    # -- closing and cancellation ----------------------------------------------------------------

    def test_aclose_before_iterating_and_twice_is_harmless(self) -> None:
        _, url, data = self._published("aclose", 2 * MiB)

        async def body(t: Transport) -> bytes:
            for _ in range(self.cancel_rounds):
                download = await t.open(url, self.options)
                await download.aclose()
                await download.aclose()
            await t.close()
            await t.close()
            return await read_all(await t.open(url, self.options))

        assert self.run(body) == data

    def test_cancelling_the_reader_mid_transfer_leaks_nothing(self) -> None:
        """Cancel the consuming task while it holds a chunk, while it waits inside the
        transport, and while ``open`` runs; ``aclose`` must not hang, and after all that a
        whole read still works and, once the transport is closed, no descriptor is left."""
        _, url, data = self._published("cancel", 16 * MiB)
        fds_before = _open_fds()

        async def one_round(t: Transport, mode: int) -> None:
            started = asyncio.Event()

            async def reader() -> None:
                download = await t.open(url, self.options)
                try:
                    async for _chunk in download:
                        started.set()
                        if mode == 0:
                            await asyncio.Event().wait()  # parked, holding a chunk
                finally:
                    await download.aclose()

            task = asyncio.create_task(reader())
            if mode == 2:
                await asyncio.sleep(0)  # inside open
            else:
                await started.wait()
                await asyncio.sleep(0)  # mode 1: back inside the transport's read
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=self.close_timeout)
            assert done, f"the cancelled reader (mode {mode}) did not end: aclose hangs"
            assert task.cancelled(), f"mode {mode}: the reader ended with {task.exception()!r}"

        async def body(t: Transport) -> bytes:
            for i in range(self.cancel_rounds):
                await one_round(t, i % 3)
            try:
                async with asyncio.timeout(self.close_timeout * 4):
                    return await read_all(await t.open(url, self.options))
            except TimeoutError:
                pytest.fail(f"a read after {self.cancel_rounds} cancelled reads hangs: a leak")

        assert self.run(body) == data
        if fds_before is not None:
            leaked = _open_fds() or 0
            for _ in range(40):  # a server thread or a socket may close a moment late
                if leaked <= fds_before:
                    break
                time.sleep(0.05)
                leaked = _open_fds() or 0
            assert leaked <= fds_before, f"{leaked - fds_before} file descriptors leaked"

    # -- memory ----------------------------------------------------------------------------------

    def test_large_file_streams_in_bounded_memory(self) -> None:
        name = self.unique("large")
        data = os.urandom(self.large_file_size)
        expected = hashlib.sha256(data).hexdigest()
        url = self.publish(name, data)
        del data

        async def body(t: Transport) -> tuple[int, int, str]:
            digest, count, largest = hashlib.sha256(), 0, 0
            download = await t.open(url, self.options)
            try:
                async for chunk in download:
                    digest.update(chunk)
                    count += len(chunk)
                    largest = max(largest, len(chunk))
            finally:
                await download.aclose()
            return count, largest, digest.hexdigest()

        tracemalloc.start()
        try:
            count, largest, got = self.run(body)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert (count, got) == (self.large_file_size, expected)
        assert largest <= self.memory_limit // 4, f"a {largest}-byte chunk is too large"
        assert peak < self.memory_limit, (
            f"streaming {self.large_file_size} bytes peaked at {peak} bytes of Python memory"
        )


class UploadConformance(_Kit):
    """The upload contract, for transports that declare ``"upload"`` (they implement
    ``core.port.Uploader``). Override the three methods below."""

    fragment_size: ClassVar[int] = 256 * 1024

    # -- to override ---------------------------------------------------------------------------

    def make_uploader(self) -> Uploader:
        """A new uploader (often the transport object itself; the kit closes it)."""
        raise NotImplementedError

    def upload_url(self, name: str) -> str:
        """Where the kit uploads ``name`` on the test server."""
        raise NotImplementedError

    def fetch(self, name: str) -> bytes | None:
        """What the test server holds as ``name`` (read on the server side), None if absent."""
        raise NotImplementedError

    def reply_upload_url(self, name: str) -> str:
        """Only for ``upload-reply``: where an upload of ``name`` gets a reply."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------------

    def upload_capabilities(self) -> frozenset[str]:
        return self.capabilities_of(self.make_uploader(), frozenset({UPLOAD}))

    def upload(self, body: Callable[[Uploader], Awaitable[T]]) -> T:
        return self._run(self.make_uploader, body)

    def upload_fails(self, body: Callable[[Uploader], Awaitable[object]]) -> TransferError:
        with pytest.raises(TransferError) as info:
            self.upload(body)
        return info.value

    def _fragments(self, data: bytes, start: int = 0) -> list[tuple[int, bytes]]:
        step = self.fragment_size
        return [(o, data[o : o + step]) for o in range(start, len(data), step)]

    # -- the contract ----------------------------------------------------------------------------

    def test_declares_the_upload_capability(self) -> None:
        uploader = self.make_uploader()
        assert UPLOAD in self.upload_capabilities()
        assert uploader.schemes

    def test_upload_in_fragments_is_never_visible_partly(self) -> None:
        """Nothing appears under the target name while bytes are missing; the whole file is
        there after ``finish`` (a BITS server publishes it on the last byte already)."""
        name = self.unique("up")
        data = os.urandom(3 * self.fragment_size + 17)
        url = self.upload_url(name)

        async def body(u: Uploader) -> tuple[list[int], bytes | None, str | None]:
            session = await u.begin(url, self.options, size=len(data))
            assert session.offset == 0
            assert isinstance(session.token, str)
            assert session.token
            *head, last = self._fragments(data)
            offsets = [await session.send(chunk, o) for o, chunk in head]
            before = self.fetch(name)
            offsets.append(await session.send(last[1], last[0]))
            reply = await session.finish()
            await session.close()  # releases the remote session; harmless for plain uploads
            await session.close()
            return offsets, before, reply

        offsets, before, reply = self.upload(body)
        assert offsets == [min(o + self.fragment_size, len(data)) for o, _ in self._fragments(data)]
        assert before is None, "a partial upload was visible under the target name"
        assert reply is None
        assert self.fetch(name) == data

    def test_begin_with_the_token_resumes_at_the_remote_offset(self) -> None:
        name = self.unique("up-resume")
        data = os.urandom(4 * self.fragment_size)
        url = self.upload_url(name)
        half = 2 * self.fragment_size

        async def first(u: Uploader) -> str:
            session = await u.begin(url, self.options, size=len(data))
            for o, chunk in self._fragments(data[:half]):
                await session.send(chunk, o)
            return session.token  # then the process "crashes": no finish, no abort

        token = self.upload(first)

        async def second(u: Uploader) -> int:
            session = await u.begin(url, self.options, size=len(data), token=token)
            resumed = session.offset
            for o, chunk in self._fragments(data, resumed):
                await session.send(chunk, o)
            await session.finish()
            return resumed

        assert self.upload(second) == half
        assert self.fetch(name) == data

    def test_a_fragment_past_the_remote_offset_leaves_no_hole(self) -> None:
        name = self.unique("up-hole")
        data = os.urandom(3 * self.fragment_size)
        url = self.upload_url(name)
        step = self.fragment_size

        async def body(u: Uploader) -> int:
            session = await u.begin(url, self.options, size=len(data))
            await session.send(data[:step], 0)
            try:
                held = await session.send(data[2 * step :], 2 * step)  # skips a fragment
            except TransferError:
                held = step
            for o, chunk in self._fragments(data, held):
                await session.send(chunk, o)
            await session.finish()
            return held

        assert self.upload(body) == step
        assert self.fetch(name) == data

    def test_finish_before_every_byte_is_refused_and_publishes_nothing(self) -> None:
        name = self.unique("up-short")
        data = os.urandom(2 * self.fragment_size)
        url = self.upload_url(name)

        async def body(u: Uploader) -> TransferError:
            session = await u.begin(url, self.options, size=len(data))
            await session.send(data[: self.fragment_size], 0)
            with pytest.raises(TransferError) as info:
                await session.finish()
            assert self.fetch(name) is None, "a partial upload was published"
            await session.send(data[self.fragment_size :], self.fragment_size)
            await session.finish()
            return info.value

        error = self.upload(body)
        assert not error.transient
        assert self.fetch(name) == data

    def test_a_fragment_past_the_declared_size_is_refused(self) -> None:
        url = self.upload_url(self.unique("up-big"))

        async def body(u: Uploader) -> None:
            session = await u.begin(url, self.options, size=10)
            await session.send(b"x" * 11, 0)

        assert not self.upload_fails(body).transient

    def test_abort_discards_the_upload(self) -> None:
        """After ``abort`` the token is dead: ``begin`` with it starts afresh at offset 0 or
        raises ``BG_E_SESSION_NOT_FOUND``."""
        name = self.unique("up-abort")
        data = os.urandom(2 * self.fragment_size)
        url = self.upload_url(name)

        async def body(u: Uploader) -> tuple[bytes | None, int | TransferError]:
            session = await u.begin(url, self.options, size=len(data))
            await session.send(data[: self.fragment_size], 0)
            await session.abort()
            after_abort = self.fetch(name)
            try:
                again = await u.begin(url, self.options, size=len(data), token=session.token)
            except TransferError as exc:
                return after_abort, exc
            await again.abort()
            return after_abort, again.offset

        after_abort, again = self.upload(body)
        assert after_abort is None
        if isinstance(again, TransferError):
            assert again.hresult == hr.BG_E_SESSION_NOT_FOUND, again
        else:
            assert again == 0
        assert self.fetch(name) is None

    def test_an_empty_upload_publishes_an_empty_file(self) -> None:
        name = self.unique("up-empty")
        url = self.upload_url(name)

        async def body(u: Uploader) -> None:
            session = await u.begin(url, self.options, size=0)
            await session.finish()

        self.upload(body)
        assert self.fetch(name) == b""

    def test_upload_reply_matches_the_declared_capability(self) -> None:
        """With ``upload-reply``, ``finish`` gives the reply URL and ``close`` then releases
        the session; without it, ``reply=True`` is a fatal error."""
        name = self.unique("up-reply")
        replies = UPLOAD_REPLY in self.upload_capabilities()
        url = self.reply_upload_url(name) if replies else self.upload_url(name)

        async def body(u: Uploader) -> str | None:
            session = await u.begin(url, self.options, size=1, reply=True)
            await session.send(b"x", 0)
            reply = await session.finish()
            await session.close()
            return reply

        if replies:
            reply = self.upload(body)
            assert isinstance(reply, str)
            assert reply
        else:
            assert not self.upload_fails(body).transient
