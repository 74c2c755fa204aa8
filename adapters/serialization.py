"""The one cattrs converter, configured in one place, and the event mapper.

Stored form of an event: topic = the event class name (a persisted name: see
``TOPIC_ALIASES`` before renaming a class), state = UTF-8 JSON of
``{"v": schema version, **fields}``. Datetimes are ISO 8601 strings in UTC; enums are
their BITS numbers; ``Sealed`` secrets are their opaque token (never plain text).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

import cattrs

from backhaul.core import event as ev
from backhaul.core.job import Job
from backhaul.core.value import Sealed

SCHEMA_VERSION = 1

converter = cattrs.Converter()
converter.register_unstructure_hook(datetime, lambda d: d.isoformat())
converter.register_structure_hook(datetime, lambda s, _: datetime.fromisoformat(s))
converter.register_unstructure_hook(Sealed, lambda s: {"sealed": s.token})
converter.register_structure_hook(Sealed, lambda d, _: Sealed(d["sealed"]))

EVENT_CLASSES: Mapping[str, type[ev.Event]] = MappingProxyType(
    {cls.__name__: cls for cls in ev.EVENT_TYPES}
)
# Old topic -> current class name. Add a row (and a test) whenever an event is renamed.
TOPIC_ALIASES: Mapping[str, str] = MappingProxyType({})
# (topic, from_version) -> function upgrading the stored dict by one version.
UPCASTERS: Mapping[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = MappingProxyType(
    {}
)


def event_topic(event: ev.Event) -> str:
    return type(event).__name__


def event_to_bytes(event: ev.Event) -> bytes:
    data = converter.unstructure(event)
    data["v"] = SCHEMA_VERSION
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def event_from_bytes(topic: str, state: bytes) -> ev.Event:
    topic = TOPIC_ALIASES.get(topic, topic)
    cls = EVENT_CLASSES.get(topic)
    if cls is None:
        raise ValueError(f"unknown event topic {topic!r}")
    data = json.loads(state)
    version = data.pop("v", 1)
    while version < SCHEMA_VERSION:
        data = UPCASTERS[(topic, version)](data)
        version += 1
    return converter.structure(data, cls)


def job_to_dict(job: Job) -> dict[str, Any]:
    data: dict[str, Any] = converter.unstructure(job)
    return data


def job_from_dict(data: Mapping[str, Any]) -> Job:
    return converter.structure(data, Job)
