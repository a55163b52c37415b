"""From a broker message to a table row: CloudEvents decoding (both content modes) and the row's columns.

Decoding is the official SDK's: its AMQP binding reads RabbitMQ messages (structured when the content type is
``application/cloudevents+json``, else binary with ``cloudEvents_*`` headers), and its HTTP binding reads Pub/Sub
messages, whose binary mode is the same shape (``ce-*`` attributes, the data as the body). ``UsageRow`` holds the
columns both tables share (PostgreSQL and BigQuery).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import amqp, http
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat

from gate.accounting.prices import PriceTable
from gate.accounting.usage import UsageRecord

__all__ = ["COLUMNS", "BadEvent", "UsageRow", "from_amqp", "from_pubsub", "row_from_event"]

_FORMAT = JSONFormat()


class BadEvent(ValueError):
    """The message is not a usage CloudEvent Gate could have sent: it is rejected, never stored."""


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One usage event as a row; field order is the column order of ``usage_events``."""

    event_id: str
    event_time: datetime.datetime
    subject: str | None
    groups: list[str] | None
    model: str | None
    message_id: str | None
    status: str | None
    error_type: str | None
    http_status: int | None
    stream: bool | None
    stop_reason: str | None
    input_tokens: int
    output_tokens: int
    cache_creation_tokens: int
    cache_creation_5m_tokens: int | None
    cache_creation_1h_tokens: int | None
    cache_read_tokens: int
    total_tokens: int
    web_search_requests: int | None
    web_fetch_requests: int | None
    cost: Decimal | None
    price_version: str | None
    latency_ms: int | None
    time_to_first_token_ms: int | None
    key_alias: str | None
    trace_id: str | None
    anthropic_request_id: str | None
    service_tier: str | None
    claude_code_session_id: str | None
    event_type: str
    event_source: str
    data: dict[str, Any]

    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in COLUMNS)


COLUMNS = tuple(f.name for f in dataclasses.fields(UsageRow))


def from_amqp(body: bytes, content_type: str | None, headers: Mapping[str, Any] | None) -> BaseCloudEvent:
    """A RabbitMQ message (AMQP 0-9-1 properties and headers) as a CloudEvent, either content mode."""
    message = amqp.AMQPMessage(
        properties={"content-type": content_type or ""},
        application_properties={k: _header_text(v) for k, v in (headers or {}).items()},
        application_data=body,
    )
    return _decode(amqp.from_amqp, message)


def from_pubsub(body: bytes, attributes: Mapping[str, str]) -> BaseCloudEvent:
    """A Pub/Sub message as a CloudEvent: binary (``ce-*`` attributes) or structured (the event as the body)."""
    headers = {k.lower(): v for k, v in attributes.items()}
    if not any(k.startswith("ce-") for k in headers):
        headers.setdefault("content-type", "application/cloudevents+json")
    return _decode(http.from_http, http.HTTPMessage(headers=headers, body=body))


def _decode(parse: Any, message: Any) -> BaseCloudEvent:
    try:
        event: BaseCloudEvent = parse(message, _FORMAT)
    except (BaseCloudEventException, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BadEvent(f"not a CloudEvent: {type(exc).__name__}: {str(exc)[:200]}") from None
    return event


def _header_text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def row_from_event(event: BaseCloudEvent, prices: PriceTable | None = None) -> UsageRow:
    """The row of a usage event; an event without ``cost`` (an older Gate, or a model priced since) is priced
    here with the sink's own price table, at the event's time."""
    attributes = event.get_attributes()
    data = event.get_data()
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except ValueError:
            raise BadEvent("the event's data is not JSON") from None
    if not isinstance(data, dict):
        raise BadEvent("the event's data is not a JSON object")
    event_id = attributes.get("id")
    if not isinstance(event_id, str) or not event_id:
        raise BadEvent("the event has no id")
    when = attributes.get("time")
    if not isinstance(when, datetime.datetime):
        raise BadEvent("the event has no time")
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    subject = attributes.get("subject")
    cost = _decimal(data.get("cost"))
    price_version = _text(data.get("price_version")) if cost is not None else None
    if cost is None and prices is not None:
        priced = prices.cost(_record(data, subject), at=when)
        if priced is not None:
            cost, price_version = priced.usd, priced.version
    groups = data.get("groups")
    return UsageRow(
        event_id=event_id,
        event_time=when,
        subject=subject if isinstance(subject, str) else None,
        groups=[g for g in groups if isinstance(g, str)] if isinstance(groups, list) else None,
        model=_text(data.get("model")),
        message_id=_text(data.get("message_id")),
        status=_text(data.get("status")),
        error_type=_text(data.get("error_type")),
        http_status=_int(data.get("http_status")),
        stream=data.get("stream") if isinstance(data.get("stream"), bool) else None,
        stop_reason=_text(data.get("stop_reason")),
        input_tokens=_int(data.get("input_tokens")) or 0,
        output_tokens=_int(data.get("output_tokens")) or 0,
        cache_creation_tokens=_int(data.get("cache_creation_tokens")) or 0,
        cache_creation_5m_tokens=_int(data.get("cache_creation_5m_tokens")),
        cache_creation_1h_tokens=_int(data.get("cache_creation_1h_tokens")),
        cache_read_tokens=_int(data.get("cache_read_tokens")) or 0,
        total_tokens=_int(data.get("total_tokens")) or 0,
        web_search_requests=_int(data.get("web_search_requests")),
        web_fetch_requests=_int(data.get("web_fetch_requests")),
        cost=cost,
        price_version=price_version,
        latency_ms=_int(data.get("latency_ms")),
        time_to_first_token_ms=_int(data.get("time_to_first_token_ms")),
        key_alias=_text(data.get("key_alias")),
        trace_id=_text(data.get("trace_id")),
        anthropic_request_id=_text(data.get("anthropic_request_id")),
        service_tier=_text(data.get("service_tier")),
        claude_code_session_id=_text(data.get("claude_code_session_id")),
        event_type=str(attributes.get("type", "")),
        event_source=str(attributes.get("source", "")),
        data=data,
    )


def _record(data: Mapping[str, Any], subject: Any) -> UsageRecord:
    return UsageRecord(
        subject=subject if isinstance(subject, str) else "",
        model=_text(data.get("model")),
        message_id=None,
        input_tokens=_int(data.get("input_tokens")) or 0,
        output_tokens=_int(data.get("output_tokens")) or 0,
        cache_creation_tokens=_int(data.get("cache_creation_tokens")) or 0,
        cache_read_tokens=_int(data.get("cache_read_tokens")) or 0,
        latency_ms=0,
        stream=False,
        stop_reason=None,
        status="",
        error_type=None,
        key_alias=None,
        trace_id=None,
        anthropic_request_id=None,
        cache_creation_5m_tokens=_int(data.get("cache_creation_5m_tokens")),
        cache_creation_1h_tokens=_int(data.get("cache_creation_1h_tokens")),
        web_search_requests=_int(data.get("web_search_requests")),
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    # Token counts fit PostgreSQL's bigint; anything else is not a count Gate reported.
    return value if type(value) is int and -(2**63) <= value < 2**63 else None


def _decimal(value: Any) -> Decimal | None:
    if not isinstance(value, str):
        return None
    try:
        amount = Decimal(value)
    except InvalidOperation:
        return None
    return amount if amount.is_finite() else None
