"""The transport registry: which transport serves which URL scheme, and who supplied it.

Rules of this module (fsspec / pluggy style, specs/transport-sdk.md):

* Transports are found through the entry-point group ``backhaul.transports``: the entry name
  is the URL scheme (lowercase), the value ``module:factory``, where ``factory()`` (usually
  the transport class) returns a new transport whose ``schemes`` include that scheme.
  Uploaders (``core.port.Uploader``) the same way through ``backhaul.uploaders``; one class
  may serve both groups (``file``), or two classes one scheme (``http``: ``HttpTransport``
  downloads, ``BitsUploader`` uploads).
* Lazy: listing reads installed metadata only; a transport's module is imported the first
  time its scheme is needed, so a missing optional library only breaks its own scheme.
* backhaul's built-ins register the same way (its pyproject). ``BUILTINS`` is that table
  again, kept equal to pyproject by a test: it stands in for a scheme that backhaul's
  installed metadata does not declare (a source checkout, an install older than the table).
* ``EXTRAS`` names the extra that brings each built-in's library, for the error that says
  what to install (``pip install 'backhaul[smb]'``).
* One scheme, several entries: another distribution beats backhaul's own (a plugin may
  replace a built-in on purpose); two other distributions for one scheme are ambiguous and
  refused when that scheme is used, naming both. ``backhaul transports`` shows every entry.
* Errors: a scheme nobody serves, a transport that fails to import or to build, an ambiguous
  scheme: ``BitsError(E_INVALIDARG)`` from ``check`` (a refused call such as AddFile) and a
  fatal ``TransferError(E_INVALIDARG, GENERAL_TRANSPORT)`` when a transfer needs it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar, cast

import attrs

from backhaul.core import hresult
from backhaul.core.error import BitsError, TransferError
from backhaul.core.port import Transport, Uploader
from backhaul.core.vocabulary import ErrorContext

GROUP: Final = "backhaul.transports"
UPLOAD_GROUP: Final = "backhaul.uploaders"
GROUPS: Final = (GROUP, UPLOAD_GROUP)
DISTRIBUTION: Final = "backhaul"

BUILTINS: Final[Mapping[str, Mapping[str, str]]] = MappingProxyType(
    {
        GROUP: MappingProxyType(
            {
                "file": "backhaul.transports.file:FileTransport",
                "http": "backhaul.transports.http:HttpTransport",
                "https": "backhaul.transports.http:HttpTransport",
                "smb": "backhaul.transports.smb:SmbTransport",
            }
        ),
        UPLOAD_GROUP: MappingProxyType(
            {
                "file": "backhaul.transports.file:FileTransport",
                "http": "backhaul.transports.bits_upload:BitsUploader",
                "https": "backhaul.transports.bits_upload:BitsUploader",
                "smb": "backhaul.transports.smb:SmbTransport",
            }
        ),
    }
)
"""backhaul's own ``[project.entry-points.<group>]`` tables, by group."""

EXTRAS: Final[Mapping[str, str]] = MappingProxyType({"http": "http", "https": "http", "smb": "smb"})
"""The extra of backhaul that a built-in scheme needs (``pip install 'backhaul[EXTRA]'``)."""

ACTIVE, SHADOWED, AMBIGUOUS = "active", "shadowed", "ambiguous"
T = TypeVar("T")
P = TypeVar("P", Transport, Uploader)
_SCHEME: Final = re.compile(r"[a-z][a-z0-9+.-]*")

log = logging.getLogger("backhaul.engine")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@attrs.frozen
class TransportEntry:
    """One registration: ``scheme`` served by ``value`` (``module:factory``) from
    ``distribution`` at ``version``. ``declared`` is False for a ``BUILTINS`` stand-in."""

    scheme: str
    value: str
    distribution: str
    version: str | None
    declared: bool = True
    group: str = GROUP

    @property
    def builtin(self) -> bool:
        return _normalize(self.distribution) == DISTRIBUTION

    def row(self) -> tuple[str, str, str, str]:
        """(scheme, object path, distribution, version), as ``backhaul transports`` shows."""
        return (self.scheme, self.value, self.distribution, self.version or "?")

    def load(self) -> Callable[[], Any]:
        entry_point = importlib.metadata.EntryPoint(self.scheme, self.value, self.group)
        return cast(Callable[[], Any], entry_point.load())


def scheme_of(remote_name: str) -> str:
    """The lowercase scheme of a remote name; a UNC path (``\\\\server\\share``) is ``smb``."""
    if remote_name.startswith("\\\\"):
        return "smb"
    scheme, sep, _ = remote_name.partition("://")
    return scheme.lower() if sep else ""


def _own_version() -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def discover(group: str = GROUP) -> list[TransportEntry]:
    """Every installed entry of ``group``, then ``BUILTINS`` for the built-in schemes that
    backhaul's installed metadata does not declare."""
    found: list[TransportEntry] = []
    seen: set[tuple[str, str]] = set()
    for ep in importlib.metadata.entry_points(group=group):
        dist = ep.dist
        name = dist.name if dist is not None else "?"
        key = (ep.name.lower(), _normalize(name))
        if key in seen:  # the same distribution twice on sys.path: the first one counts
            continue
        seen.add(key)
        version = dist.version if dist is not None else None
        found.append(TransportEntry(ep.name.lower(), ep.value, name, version, group=group))
    declared = {e.scheme for e in found if e.builtin}
    own = _own_version()
    for scheme, value in BUILTINS.get(group, {}).items():
        if scheme not in declared:
            found.append(TransportEntry(scheme, value, DISTRIBUTION, own, False, group))
    return sorted(found, key=lambda e: (e.scheme, not e.builtin, _normalize(e.distribution)))


class TransportRegistry:
    """The transports (or, with ``group=UPLOAD_GROUP``, the uploaders) installed, by scheme.
    ``entries``: default ``discover(group)``."""

    def __init__(
        self, entries: Iterable[TransportEntry] | None = None, *, group: str = GROUP
    ) -> None:
        self.group = group
        self._entries = list(discover(group) if entries is None else entries)
        self._by_scheme: dict[str, list[TransportEntry]] = {}
        for entry in self._entries:
            self._by_scheme.setdefault(entry.scheme, []).append(entry)

    def __repr__(self) -> str:
        return f"<TransportRegistry {self.group} {sorted(self._by_scheme)}>"

    # -- listing ---------------------------------------------------------------------------------

    def entries(self) -> list[TransportEntry]:
        """Every entry, active or not, by scheme."""
        return list(self._entries)

    def schemes(self) -> frozenset[str]:
        return frozenset(self._by_scheme)

    def status(self, entry: TransportEntry) -> str:
        """ACTIVE (it serves its scheme), SHADOWED (another distribution's entry does) or
        AMBIGUOUS (several other distributions claim the scheme)."""
        others = [e for e in self._by_scheme[entry.scheme] if not e.builtin]
        if len(others) > 1:
            return AMBIGUOUS if not entry.builtin else SHADOWED
        winner = others[0] if others else self._by_scheme[entry.scheme][0]
        return ACTIVE if entry == winner else SHADOWED

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """(scheme, object path, distribution, version, status) for every entry."""
        return [(*e.row(), self.status(e)) for e in self._entries]

    # -- lookup ----------------------------------------------------------------------------------

    def entry(self, scheme: str) -> TransportEntry:
        """The entry that serves ``scheme``; ``TransferError(E_INVALIDARG)`` if none does."""
        scheme = scheme.lower()
        candidates = self._by_scheme.get(scheme)
        if not candidates:
            raise _transfer_error(missing_message(scheme, self.group))
        active = [e for e in candidates if self.status(e) == ACTIVE]
        if len(active) != 1:
            claimants = ", ".join(f"{e.distribution} ({e.value})" for e in candidates)
            raise _transfer_error(
                f"several distributions provide a transport for {scheme!r} URLs: {claimants}; "
                "uninstall all but one"
            )
        return active[0]

    def factory(self, scheme: str) -> Callable[[], Any]:
        """The factory of ``scheme``'s transport, imported now."""
        entry = self.entry(scheme)
        try:
            return entry.load()
        except Exception as exc:  # ImportError, AttributeError, or the module's own failure
            raise _transfer_error(_load_message(entry, exc)) from exc

    def create(self, scheme: str) -> Transport:
        """A new transport for ``scheme``, checked to serve it."""
        entry = self.entry(scheme)
        factory = self.factory(scheme)
        try:
            made = factory()
        except Exception as exc:
            raise _transfer_error(_load_message(entry, exc)) from exc
        served = getattr(made, "schemes", None)
        if not isinstance(served, frozenset | set) or entry.scheme not in served:
            raise _transfer_error(
                f"{entry.value} from {entry.distribution} is registered for {entry.scheme!r} "
                f"URLs but serves {sorted(served) if served else 'none'}"
            )
        return cast(Transport, made)

    def transports(self, schemes: Iterable[str] | None = None) -> dict[str, Transport]:
        """Transports for ``schemes`` (default: every installed one), built now; schemes served
        by the same object path share one instance (``http`` and ``https``)."""
        lazy: LazyTransports[Transport] = LazyTransports(self)
        return {s: lazy[s] for s in sorted(self.schemes() if schemes is None else schemes)}

    def lazy(self) -> LazyTransports[Transport]:
        """Its transports, each built the first time its scheme is looked up."""
        return LazyTransports(self)

    def check(self, remote_name: str) -> None:
        """Refuse (``BitsError E_INVALIDARG``) a remote name whose scheme nobody serves, or
        that several distributions claim (naming them). Nothing is imported."""
        try:
            self.entry(scheme_of(remote_name))
        except TransferError as exc:
            raise BitsError(hresult.E_INVALIDARG, f"{exc.message} ({remote_name})") from None


class LazyTransports(Mapping[str, P], Generic[P]):
    """A ``Mapping`` scheme -> transport over a registry that builds each transport the first
    time its scheme is looked up (one instance per object path). Iterating lists the installed
    schemes without building anything; ``loaded()`` gives the instances built so far. A lookup
    of a scheme nobody serves raises ``KeyError``; one whose transport cannot be built raises
    ``TransferError``."""

    def __init__(self, registry: TransportRegistry | None = None) -> None:
        self.registry = registry if registry is not None else default_registry()
        self._made: dict[str, P] = {}  # by object path
        self._by_scheme: dict[str, P] = {}  # by scheme as asked (the registry never changes)

    def __getitem__(self, scheme: str) -> P:
        made = self._by_scheme.get(scheme)
        if made is not None:
            return made
        made = self._by_scheme[scheme] = self._build(scheme)
        return made

    def _build(self, scheme: str) -> P:
        scheme = scheme.lower()
        if scheme not in self.registry.schemes():
            raise KeyError(scheme)
        entry = self.registry.entry(scheme)
        made = self._made.get(entry.value)
        if made is None:
            built: Any = self.registry.create(scheme)  # a Transport, or an Uploader by group
            made = self._made[entry.value] = built
        return made

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.registry.schemes()))

    def __len__(self) -> int:
        return len(self.registry.schemes())

    def loaded(self) -> list[P]:
        return list(self._made.values())


def opened(transports: Mapping[str, T]) -> list[T]:
    """The distinct transport instances of ``transports`` that exist (for closing): only the
    ones already built when it is a ``LazyTransports``."""
    if isinstance(transports, LazyTransports):
        return transports.loaded()
    return list({id(t): t for t in transports.values()}.values())


async def close_all(transports: Mapping[str, Any]) -> None:
    """Close every transport (or uploader) of ``transports`` that exists, once each. One
    whose ``close`` fails (a plugin's) is logged and the others are closed all the same:
    an engine that stops must not leave connections open, nor fail, for one plugin."""
    for transport in opened(transports):
        try:
            await transport.close()
        except Exception:
            log.exception("closing %r failed; the other transports are closed", transport)


def transport_for(transports: Mapping[str, T], remote_name: str) -> T:
    """``remote_name``'s transport (or uploader) from ``transports``, else a fatal
    ``TransferError`` that names the scheme and what to install."""
    scheme = scheme_of(remote_name)
    try:
        return transports[scheme]
    except KeyError:
        group = transports.registry.group if isinstance(transports, LazyTransports) else GROUP
        raise _transfer_error(missing_message(scheme, group)) from None


@functools.cache
def default_registry(group: str = GROUP) -> TransportRegistry:
    """The registry of ``group`` in this interpreter's installed distributions (read once)."""
    return TransportRegistry(group=group)


def uploaders() -> LazyTransports[Uploader]:
    """Every installed uploader, each built the first time its scheme is needed."""
    return LazyTransports(default_registry(UPLOAD_GROUP))


def installed_rows() -> list[tuple[str, str, str, str, str, str]]:
    """What ``backhaul transports`` shows: (role, scheme, object path, distribution, version,
    status) for every entry of both groups; role is "download" or "upload"."""
    roles = {GROUP: "download", UPLOAD_GROUP: "upload"}
    return [
        (roles[group], *row) for group in GROUPS for row in TransportRegistry(group=group).rows()
    ]


def missing_message(scheme: str, group: str = GROUP) -> str:
    """Why nothing serves ``scheme``, and what to install."""
    if not scheme:
        return "the remote name has no URL scheme (scheme://...)"
    if not _SCHEME.fullmatch(scheme):
        return f"{scheme!r} is not a URL scheme"
    what = "uploader" if group == UPLOAD_GROUP else "transport"
    extra = EXTRAS.get(scheme)
    if extra is not None:
        return f"no {what} for {scheme!r} URLs is installed: pip install 'backhaul[{extra}]'"
    return (
        f"no {what} for {scheme!r} URLs is installed (a plugin registers one under the "
        f"{group!r} entry-point group; `backhaul transports` lists them)"
    )


def _load_message(entry: TransportEntry, exc: BaseException) -> str:
    where = f"{entry.value} from {entry.distribution} {entry.version or ''}".rstrip()
    message = f"the {entry.scheme!r} transport ({where}) cannot be loaded: {exc}"
    extra = EXTRAS.get(entry.scheme)
    if entry.builtin and extra is not None and isinstance(exc, ImportError):
        return f"{message}; pip install 'backhaul[{extra}]'"
    if not entry.builtin:
        return f"{message}; reinstall {entry.distribution}"
    return message


def _transfer_error(message: str) -> TransferError:
    return TransferError(
        hresult.E_INVALIDARG,
        message,
        context=ErrorContext.GENERAL_TRANSPORT,
        transient=False,
    )


HEADER: Final = ("ROLE", "SCHEME", "OBJECT", "DISTRIBUTION", "VERSION", "STATUS")


def format_table(rows: Iterable[Sequence[str]]) -> str:
    """``installed_rows()`` as the aligned text table ``backhaul transports`` prints."""
    header = HEADER
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() + "\n"
        for r in table
    )


__all__ = [
    "ACTIVE",
    "AMBIGUOUS",
    "BUILTINS",
    "EXTRAS",
    "GROUP",
    "GROUPS",
    "HEADER",
    "SHADOWED",
    "UPLOAD_GROUP",
    "LazyTransports",
    "TransportEntry",
    "TransportRegistry",
    "close_all",
    "default_registry",
    "discover",
    "format_table",
    "installed_rows",
    "missing_message",
    "opened",
    "scheme_of",
    "transport_for",
    "uploaders",
]
