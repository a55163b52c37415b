"""The usage CloudEvent (v1.0): one per ``UsageRecord``, serialised once as JSON, and its binary form.

Each event is built as the official SDK's ``cloudevents.core.v1.event.CloudEvent``, which validates every
attribute against the v1.0 spec (about 3.5 us), and then written by orjson: the SDK's own JSON writer costs
about 18 us and renders ``time`` with microseconds where consumers of the original service expect
milliseconds. The tests parse every wire form back with the SDK to keep the two in agreement.

Every string of the record (``model``, ``subject``, ``anthropic_request_id``, ``claude_code_session_id``, ...) is
cut to ``gate.ops.bounds.MAX_FIELD_CHARS`` here, where records become events: a client or an upstream chooses
them, and an unbounded one once made an event no broker would take.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import operator
import os
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from cloudevents.core.exceptions import CloudEventValidationError
from cloudevents.core.v1.event import CloudEvent

from gate.accounting.usage import UsageRecord
from gate.ops.bounds import MAX_FIELD_CHARS, bounded

if TYPE_CHECKING:
    from gate.accounting.prices import PriceTable

__all__ = [
    "DATA_CONTENT_TYPE",
    "OPTIONAL_DATA_FIELDS",
    "SPECVERSION",
    "STRUCTURED_CONTENT_TYPE",
    "BinaryEvent",
    "build_event",
    "encode_event",
    "new_event_id",
    "new_event_ids",
    "rfc3339_millis",
    "to_binary",
]

log = logging.getLogger("gate.events")

SPECVERSION = "1.0"
DATA_CONTENT_TYPE = "application/json"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"  # the JSON event format's media type

# Left out of ``data`` when None; every other field is always present (``error_type`` is null on success).
OPTIONAL_DATA_FIELDS = frozenset(
    {
        "http_status",
        "time_to_first_token_ms",
        "cache_creation_5m_tokens",
        "cache_creation_1h_tokens",
        "web_search_requests",
        "web_fetch_requests",
        "service_tier",
        "claude_code_session_id",
        "groups",
    }
)
_ATTRIBUTE_FIELDS = frozenset({"subject", "event_id", "time"})  # record fields that become attributes


def _data_fields() -> tuple[str, ...]:
    """Record field order, with the derived ``total_tokens`` right after the token counts (as in the seed)."""
    names: list[str] = []
    for field in dataclasses.fields(UsageRecord):
        if field.name in _ATTRIBUTE_FIELDS:
            continue
        names.append(field.name)
        if field.name == "cache_read_tokens":
            names.append("total_tokens")
    return tuple(names)


_DATA_FIELDS = _data_fields()
_read_data = operator.attrgetter(*_DATA_FIELDS)  # one C call for every value, total_tokens included
_OPTIONAL_IN_ORDER = tuple(name for name in _DATA_FIELDS if name in OPTIONAL_DATA_FIELDS)


def new_event_id() -> str:
    """A fresh CloudEvent id: ``uuid4().hex``, 32 hex digits as in the seed's example event."""
    return uuid.uuid4().hex


def new_event_ids(count: int) -> list[str]:
    """``count`` ids in ``uuid4().hex`` form from one ``urandom`` call (~0.3 us each instead of ~2 us)."""
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = bytes((b & 0x0F) | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])  # RFC 4122 variant
    digits = raw.hex()
    return [digits[i : i + 32] for i in range(0, 32 * count, 32)]


@functools.lru_cache(maxsize=8)
def _utc_second(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def rfc3339_millis(epoch_seconds: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2025-11-26T10:30:00.123Z`` (truncated, never rounded up)."""
    whole = int(epoch_seconds)
    millis = int((epoch_seconds - whole) * 1000)
    return f"{_utc_second(whole)}.{millis:03d}Z"


def build_event(
    record: UsageRecord,
    *,
    event_type: str,
    source: str,
    event_id: str | None = None,
    at: float | None = None,
    prices: PriceTable | None = None,
) -> dict[str, Any]:
    """The event as a dict: ``id`` and ``time`` come from the record, else from ``event_id``/``at``/now.

    With ``prices``, ``data`` gains ``cost`` (exact decimal USD as a string) and ``price_version``, priced at the
    event's time; both are left out when the model has no price.
    """
    data: dict[str, Any] = dict(zip(_DATA_FIELDS, _read_data(record), strict=True))
    for name in _OPTIONAL_IN_ORDER:
        if data[name] is None:
            del data[name]
    for name, value in data.items():
        if type(value) is str and len(value) > MAX_FIELD_CHARS:
            data[name] = bounded(value)
    stamp = record.time or rfc3339_millis(time.time() if at is None else at)
    if prices is not None:
        _add_cost(data, record, prices, stamp)
    attributes: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": record.event_id or event_id or new_event_id(),
        "type": event_type,
        "source": source,
    }
    if record.subject:  # the spec forbids an empty subject; a JWT always has one
        attributes["subject"] = bounded(record.subject)
    try:
        attributes["time"] = datetime.datetime.fromisoformat(stamp)
    except ValueError:
        stamp = rfc3339_millis(time.time() if at is None else at)
        attributes["time"] = datetime.datetime.fromisoformat(stamp)
    attributes["datacontenttype"] = DATA_CONTENT_TYPE
    try:
        validated = CloudEvent(attributes, data)
    except CloudEventValidationError:
        # Never lose a usage event to a malformed attribute: log it and keep the event as built.
        log.exception("usage event %s does not validate as a CloudEvent; publishing it as built", attributes["id"])
        return {**attributes, "time": stamp, "data": data}
    event: dict[str, Any] = validated.get_attributes()
    event["time"] = stamp  # RFC 3339 with milliseconds, as the original service wrote it
    event["data"] = validated.get_data()
    return event


def _add_cost(data: dict[str, Any], record: UsageRecord, prices: PriceTable, stamp: str) -> None:
    from gate.accounting.prices import format_usd

    try:
        when = datetime.datetime.fromisoformat(stamp)
    except ValueError:
        when = None
    cost = prices.cost(record, at=when)
    if cost is not None:
        data["cost"] = format_usd(cost.usd)
        data["price_version"] = cost.version


def encode_event(event: dict[str, Any]) -> bytes:
    """The structured-mode JSON (one line, UTF-8): what the outbox stores and the sinks send."""
    return orjson.dumps(event)


@dataclass(frozen=True, slots=True)
class BinaryEvent:
    """Binary content mode: every attribute but ``datacontenttype`` as metadata, ``data`` as the body."""

    attributes: dict[str, str]
    content_type: str
    data: bytes


def to_binary(event_json: bytes) -> BinaryEvent:
    """Split a stored structured event into binary-mode parts (attribute values in canonical string form).

    ValueError when ``event_json`` is not a structured event (a damaged row: no retry can send it).
    """
    event = orjson.loads(event_json)
    if not isinstance(event, dict) or "data" not in event:
        raise ValueError("the stored usage event is not a structured CloudEvent")
    data = event.pop("data")
    content_type = event.pop("datacontenttype", DATA_CONTENT_TYPE)
    return BinaryEvent(
        attributes={name: str(value) for name, value in event.items()},
        content_type=content_type,
        data=orjson.dumps(data),
    )
