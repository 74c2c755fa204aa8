"""The one cattrs converter, configured in one place, the event mapper and the hash chain.

Stored form of an event (specs/event-log.md is the full reference):
- topic = the event class name, a persisted name: see ``TOPIC_ALIASES`` before renaming
  a class;
- state = UTF-8 JSON of ``{**fields, "v": the topic's schema version}`` with sorted keys
  and no spaces (the *canonical body*), followed by ``"h"``, the event's link in its
  stream's hash chain (see ``chain_hash``). Datetimes are ISO 8601 strings in UTC; enums
  are their BITS numbers; ``Sealed`` secrets are their opaque token (never plain text).

Schema versions are per topic (``SCHEMA_VERSION``). Changing the stored form of a topic
means: bump its version, add an upcaster from the previous version to ``UPCASTERS``, keep a
stored fixture of the old form (tests/fixtures/) replaying. Readers upcast old states on
the fly; stored states are never rewritten (their hashes cover the stored form).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final

import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from backhaul.core import event as ev
from backhaul.core.job import FileList, FileState, Job
from backhaul.core.value import FileSpec, Sealed

HASH_KEY: Final = "h"
VERSION_KEY: Final = "v"

converter = cattrs.Converter()
converter.register_unstructure_hook(datetime, lambda d: d.isoformat())
converter.register_structure_hook(datetime, lambda s, _: datetime.fromisoformat(s))
converter.register_unstructure_hook(Sealed, lambda s: {"sealed": s.token})
converter.register_structure_hook(Sealed, lambda d, _: Sealed(d["sealed"]))


def _text_or_sealed(value: Any, _: Any) -> str | Sealed | None:
    """A value that is plain text unless it holds a secret (the response headers)."""
    if value is None or isinstance(value, str):
        return value
    return Sealed(value["sealed"])


converter.register_structure_hook(str | Sealed | None, _text_or_sealed)
# A file's URL secrets (FilesAdded v3): each member is left out when there is none, so a
# file without them is stored as it was in v2, and so is a Job document.
converter.register_unstructure_hook(
    FileSpec,
    make_dict_unstructure_fn(
        FileSpec,
        converter,
        password=override(omit_if_default=True),
        query=override(omit_if_default=True),
    ),
)
# A job's files: stored as the list they always were.
converter.register_unstructure_hook(
    FileList, lambda files: [converter.unstructure(f, FileState) for f in files]
)
converter.register_structure_hook(
    FileList, lambda data, _: FileList(converter.structure(f, FileState) for f in data)
)

EVENT_CLASSES: Mapping[str, type[ev.Event]] = MappingProxyType(
    {cls.__name__: cls for cls in ev.EVENT_TYPES}
)

# -- FilesAdded v2: byte ranges as [offset, length] pairs --------------------------------
# v1 stored each range as {"length": L, "offset": O}; an AddFileWithRanges call may carry
# hundreds of ranges per file, and the pair form is about half the size. The Job documents
# of the read models keep the object form (only the FilesAdded event changed).

_files_added_unstructure = make_dict_unstructure_fn(ev.FilesAdded, converter)
_files_added_structure = make_dict_structure_fn(ev.FilesAdded, converter)


def _ranges_as_pairs(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**f, "ranges": [[r["offset"], r["length"]] for r in f.get("ranges", ())]} for f in files
    ]


def _ranges_as_objects(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**f, "ranges": [{"offset": o, "length": n} for o, n in f.get("ranges", ())]} for f in files
    ]


def _unstructure_files_added(event: ev.FilesAdded) -> dict[str, Any]:
    data: dict[str, Any] = _files_added_unstructure(event)
    data["files"] = _ranges_as_pairs(data["files"])
    return data


def _structure_files_added(data: Mapping[str, Any], cls: type[Any]) -> ev.FilesAdded:
    plain = {**data, "files": _ranges_as_objects(data["files"])}
    event: ev.FilesAdded = _files_added_structure(plain, cls)
    return event


converter.register_unstructure_hook(ev.FilesAdded, _unstructure_files_added)
converter.register_structure_hook(ev.FilesAdded, _structure_files_added)


def _files_added_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "files": _ranges_as_pairs(data["files"])}


def _unchanged(data: dict[str, Any]) -> dict[str, Any]:
    """FilesAdded v2 -> v3, RemoteNameChanged and ReplyLocated v1 -> v2: those versions added
    a URL's sealed secrets (``password``, ``query``), absent (None) in every older state.
    CommandLineNotified v1 -> v2: v2 added ``since_version``, absent (0) before. SliceEnded
    v1 -> v2: v2 added ``active_until``, absent (None) before. FileTransferred v1 -> v2: v2
    added ``inode``, absent (None) before."""
    return data


# -- versions, aliases, upcasters ----------------------------------------------------------

# The current schema version of each topic's stored form. Bump one (and add an upcaster)
# whenever that topic's stored form changes; see specs/event-log.md for the history.
SCHEMA_VERSION: Mapping[str, int] = MappingProxyType(
    dict.fromkeys(EVENT_CLASSES, 1)
    | {
        "FilesAdded": 3,
        "RemoteNameChanged": 2,
        "ReplyLocated": 2,
        "CommandLineNotified": 2,
        "SliceEnded": 2,
        "FileTransferred": 2,
    }
)
# Old topic -> current class name. Add a row (and a test) whenever an event is renamed.
# Upcasters are keyed by the CURRENT name: an aliased state is upcast like the class's own.
TOPIC_ALIASES: Mapping[str, str] = MappingProxyType({})
# (topic, from_version) -> function upgrading the stored dict by one version.
UPCASTERS: Mapping[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = MappingProxyType(
    {
        ("FilesAdded", 1): _files_added_v1_to_v2,
        ("FilesAdded", 2): _unchanged,
        ("RemoteNameChanged", 1): _unchanged,
        ("ReplyLocated", 1): _unchanged,
        ("CommandLineNotified", 1): _unchanged,
        ("SliceEnded", 1): _unchanged,
        ("FileTransferred", 1): _unchanged,
    }
)


def event_topic(event: ev.Event) -> str:
    return type(event).__name__


def current_topic(topic: str) -> str:
    """The class name a stored topic reads as (following ``TOPIC_ALIASES``)."""
    return TOPIC_ALIASES.get(topic, topic)


def utf8(text: str) -> bytes:
    """UTF-8 of JSON text. A Python str may hold a lone surrogate (a broken UTF-16 name),
    which UTF-8 cannot: it is written as its JSON escape (``\\ud800``), which reads back
    as the same str."""
    return text.encode("utf-8", "backslashreplace")


def canonical_json(data: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the byte form the hash chain is computed over."""
    return utf8(json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def event_to_bytes(event: ev.Event) -> bytes:
    """The canonical body of ``event``: its fields plus ``"v"``, without the hash."""
    data = converter.unstructure(event)
    data[VERSION_KEY] = SCHEMA_VERSION[event_topic(event)]
    return canonical_json(data)


def upcast(topic: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(current class name, the state as the current schema version), without "v"/"h"."""
    topic = current_topic(topic)
    if topic not in EVENT_CLASSES:
        raise ValueError(f"unknown event topic {topic!r}")
    data = dict(data)
    data.pop(HASH_KEY, None)
    version = data.pop(VERSION_KEY, 1)
    current = SCHEMA_VERSION[topic]
    if not isinstance(version, int) or not 1 <= version <= current:
        raise ValueError(f"{topic} has no schema version {version!r} (current: {current})")
    while version < current:
        step = UPCASTERS.get((topic, version))
        if step is None:
            raise ValueError(f"no upcaster for {topic} from version {version}")
        data = step(data)
        version += 1
    return topic, data


def event_from_bytes(topic: str, state: bytes) -> ev.Event:
    topic, data = upcast(topic, json.loads(state))
    return converter.structure(data, EVENT_CLASSES[topic])


# -- the hash chain ------------------------------------------------------------------------


def chain_hash(previous: str, stream: str, topic: str, version: int, body: bytes) -> str:
    """SHA-256 (hex) over the previous event's hash in the stream ("" for version 1), the
    stream id (canonical UUID text), the stored topic, the version and the canonical body,
    the four text parts each followed by a newline."""
    digest = hashlib.sha256(f"{previous}\n{stream}\n{topic}\n{version}\n".encode())
    digest.update(body)
    return digest.hexdigest()


def with_hash(body: bytes, link: str) -> bytes:
    """The stored state: the canonical body with ``"h"`` appended as its last member."""
    return b'%s,"h":"%s"}' % (body[:-1], link.encode("ascii"))


def split_state(state: bytes) -> tuple[dict[str, Any], bytes, str | None]:
    """(the stored document, its canonical body, its hash or None); ValueError when the
    state is not a JSON object."""
    data = json.loads(state)
    if not isinstance(data, dict):
        raise ValueError("the state is not a JSON object")
    link = data.get(HASH_KEY)
    body = canonical_json({k: v for k, v in data.items() if k != HASH_KEY})
    return data, body, link if isinstance(link, str) else None


def stored_hash(state: bytes) -> str:
    """The ``"h"`` of a stored state ("" for a state without one)."""
    link = json.loads(state).get(HASH_KEY)
    return link if isinstance(link, str) else ""


# -- jobs ----------------------------------------------------------------------------------


def job_to_dict(job: Job) -> dict[str, Any]:
    data: dict[str, Any] = converter.unstructure(job)
    return data


def job_from_dict(data: Mapping[str, Any]) -> Job:
    return converter.structure(data, Job)
