"""The usage CloudEvent: attributes, data fields, time format, and both content modes read back by the SDK."""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings import amqp
from cloudevents.core.formats.json import JSONFormat
from cloudevents.v1.http import from_http, from_json
from hypothesis import given
from hypothesis import strategies as st

from gate.accounting.usage import UsageRecord
from gate.events.envelope import (
    DATA_CONTENT_TYPE,
    OPTIONAL_DATA_FIELDS,
    STRUCTURED_CONTENT_TYPE,
    build_event,
    encode_event,
    new_event_ids,
    rfc3339_millis,
    to_binary,
)
from gate.events.pubsub import CONTENT_TYPE_ATTRIBUTE, PUBSUB_ATTRIBUTE_PREFIX
from gate.events.rabbitmq import AMQP_ATTRIBUTE_PREFIX
from gate.ops.bounds import MAX_FIELD_CHARS, TRUNCATION_MARK

TYPE = "io.github.samzhu.gate.usage.v1"
SOURCE = "/gate/messages"
TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
REQUIRED_DATA = {
    "model",
    "message_id",
    "input_tokens",
    "output_tokens",
    "cache_creation_tokens",
    "cache_read_tokens",
    "total_tokens",
    "latency_ms",
    "stream",
    "stop_reason",
    "status",
    "error_type",
    "key_alias",
    "trace_id",
    "anthropic_request_id",
}


def success(**changes: Any) -> UsageRecord:
    record = UsageRecord(
        subject="user-uuid-12345",
        model="claude-sonnet-4-5-20250929",
        message_id="msg_016pGU1jGmczbq7p4JTfAqmn",
        input_tokens=30,
        output_tokens=148,
        cache_creation_tokens=5,
        cache_read_tokens=7,
        latency_ms=7257,
        stream=True,
        stop_reason="end_turn",
        status="success",
        error_type=None,
        key_alias="primary",
        trace_id="4c71578c899ae6249e5b70d07900fc93",
        anthropic_request_id="req_018EeWyXxfu5pfWkrYcMdjWG",
        event_id="4c71578c899ae6249e5b70d07900fc93",
        time="2025-11-26T10:30:00.123Z",
    )
    return dataclasses.replace(record, **changes)


def error() -> UsageRecord:
    return success(
        input_tokens=0,
        output_tokens=0,
        cache_creation_tokens=0,
        cache_read_tokens=0,
        stop_reason=None,
        status="error",
        error_type="overloaded_error",
        http_status=529,
        message_id=None,
    )


def event_of(record: UsageRecord, **kwargs: Any) -> dict[str, Any]:
    return build_event(record, event_type=TYPE, source=SOURCE, **kwargs)


def test_success_event_has_every_attribute_and_data_field() -> None:
    event = event_of(success())
    assert {k: v for k, v in event.items() if k != "data"} == {
        "specversion": "1.0",
        "id": "4c71578c899ae6249e5b70d07900fc93",
        "type": TYPE,
        "source": SOURCE,
        "subject": "user-uuid-12345",
        "time": "2025-11-26T10:30:00.123Z",
        "datacontenttype": "application/json",
    }
    data = event["data"]
    assert set(data) == REQUIRED_DATA
    assert data["total_tokens"] == 30 + 148 + 5 + 7
    assert data["error_type"] is None
    assert data["stream"] is True
    assert data["model"] == "claude-sonnet-4-5-20250929"
    assert data["anthropic_request_id"] == "req_018EeWyXxfu5pfWkrYcMdjWG"
    assert data["latency_ms"] == 7257


def test_data_is_every_record_field_but_the_attributes() -> None:
    everything = {f.name: 1 for f in dataclasses.fields(UsageRecord) if f.name in OPTIONAL_DATA_FIELDS}
    data = event_of(success(**everything))["data"]
    record_fields = {f.name for f in dataclasses.fields(UsageRecord)} - {"subject", "event_id", "time"}
    assert set(data) == record_fields | {"total_tokens"}
    assert record_fields >= OPTIONAL_DATA_FIELDS


def test_error_event_carries_error_type_and_zero_tokens() -> None:
    data = event_of(error())["data"]
    assert data["status"] == "error"
    assert data["error_type"] == "overloaded_error"
    assert data["http_status"] == 529
    assert data["total_tokens"] == 0
    assert data["message_id"] is None  # required fields stay, as null
    assert set(data) == REQUIRED_DATA | {"http_status"}


def test_optional_fields_are_left_out_when_none_and_kept_when_set() -> None:
    assert not OPTIONAL_DATA_FIELDS & set(event_of(success())["data"])
    data = event_of(
        success(
            cache_creation_5m_tokens=3,
            cache_creation_1h_tokens=2,
            web_search_requests=1,
            web_fetch_requests=0,
            service_tier="standard",
            time_to_first_token_ms=412,
            claude_code_session_id="sess-1",
            http_status=200,
            groups=["eng", "admins"],
        )
    )["data"]
    assert {k: data[k] for k in OPTIONAL_DATA_FIELDS} == {
        "cache_creation_5m_tokens": 3,
        "cache_creation_1h_tokens": 2,
        "web_search_requests": 1,
        "web_fetch_requests": 0,  # zero is a value, not absence
        "service_tier": "standard",
        "time_to_first_token_ms": 412,
        "claude_code_session_id": "sess-1",
        "http_status": 200,
        "groups": ["eng", "admins"],
    }


def test_id_and_time_are_made_when_the_record_has_none() -> None:
    event = event_of(success(event_id="", time=""), event_id="given-id", at=1764153000.1239)
    assert event["id"] == "given-id"
    assert event["time"] == "2025-11-26T10:30:00.123Z"
    fresh = event_of(success(event_id="", time=""))
    assert re.fullmatch(r"[0-9a-f]{32}", fresh["id"])
    assert TIME.match(fresh["time"])
    assert fresh["id"] != event_of(success(event_id="", time=""))["id"]


def test_batched_ids_are_version_4_uuids() -> None:
    ids = new_event_ids(1000)
    assert len(set(ids)) == 1000
    for event_id in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", event_id)
        parsed = uuid.UUID(hex=event_id)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert parsed.hex == event_id
    assert new_event_ids(0) == []


def test_empty_subject_is_left_out() -> None:
    assert "subject" not in event_of(success(subject=""))


def test_time_format_is_rfc3339_utc_with_milliseconds() -> None:
    assert rfc3339_millis(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339_millis(1764153000.9999) == "2025-11-26T10:30:00.999Z"  # truncated, never the next second
    assert rfc3339_millis(1764153000.5) == "2025-11-26T10:30:00.500Z"
    for t in (0.0, 1.0005, 1764153000.123, 4102444799.999):
        assert TIME.match(rfc3339_millis(t))


def test_structured_form_parses_with_the_sdk() -> None:
    event = event_of(success())
    body = encode_event(event)
    assert b"\n" not in body  # one JSON Lines line
    parsed = from_http({"content-type": STRUCTURED_CONTENT_TYPE}, body)
    assert parsed["id"] == event["id"]
    assert parsed["type"] == TYPE
    assert parsed["source"] == SOURCE
    assert parsed["subject"] == "user-uuid-12345"
    assert parsed["time"] == "2025-11-26T10:30:00.123Z"
    assert parsed["datacontenttype"] == DATA_CONTENT_TYPE
    assert parsed["specversion"] == "1.0"
    assert parsed.data == event["data"]
    assert from_json(body).data == event["data"]


def test_binary_form_parses_with_the_sdk_amqp_and_http_bindings() -> None:
    event = event_of(error())
    binary = to_binary(encode_event(event))
    assert binary.content_type == DATA_CONTENT_TYPE
    assert orjson.loads(binary.data) == event["data"]
    assert "data" not in binary.attributes and "datacontenttype" not in binary.attributes

    message = amqp.AMQPMessage(
        properties={"content-type": binary.content_type},
        application_properties={f"{AMQP_ATTRIBUTE_PREFIX}{k}": v for k, v in binary.attributes.items()},
        application_data=binary.data,
    )
    parsed = amqp.from_binary(message, JSONFormat())
    attributes = parsed.get_attributes()
    assert attributes["id"] == event["id"]
    assert attributes["subject"] == event["subject"]
    assert attributes["datacontenttype"] == DATA_CONTENT_TYPE
    assert attributes["time"].isoformat(timespec="milliseconds").replace("+00:00", "Z") == event["time"]
    assert parsed.get_data() == event["data"]

    # Pub/Sub's binary attributes are HTTP's ce- headers by another name.
    headers = {f"{PUBSUB_ATTRIBUTE_PREFIX}{k}": v for k, v in binary.attributes.items()}
    headers[CONTENT_TYPE_ATTRIBUTE] = binary.content_type
    over_http = from_http(headers, binary.data)
    assert over_http["id"] == event["id"] and over_http["time"] == event["time"]
    assert over_http.data == event["data"]


_text = st.text(max_size=40)
_count = st.integers(min_value=0, max_value=2**53)


@given(
    subject=_text,
    model=st.none() | _text,
    stop_reason=st.none() | _text,
    key_alias=st.none() | _text,
    tokens=st.tuples(_count, _count, _count, _count),
    stream=st.booleans(),
    service_tier=st.none() | _text,
    web_search=st.none() | _count,
)
def test_any_record_round_trips_through_the_sdk(
    subject: str,
    model: str | None,
    stop_reason: str | None,
    key_alias: str | None,
    tokens: tuple[int, int, int, int],
    stream: bool,
    service_tier: str | None,
    web_search: int | None,
) -> None:
    record = success(
        subject=subject,
        model=model,
        stop_reason=stop_reason,
        key_alias=key_alias,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cache_creation_tokens=tokens[2],
        cache_read_tokens=tokens[3],
        stream=stream,
        service_tier=service_tier,
        web_search_requests=web_search,
    )
    event = event_of(record)
    parsed = from_json(encode_event(event))
    assert parsed.data == event["data"]
    assert parsed.data["total_tokens"] == sum(tokens)
    assert parsed.get("subject") == (subject or None)
    binary = to_binary(encode_event(event))
    back = amqp.from_binary(
        amqp.AMQPMessage(
            properties={"content-type": binary.content_type},
            application_properties={f"{AMQP_ATTRIBUTE_PREFIX}{k}": v for k, v in binary.attributes.items()},
            application_data=binary.data,
        ),
        JSONFormat(),
    )
    assert back.get_data() == event["data"]
    assert back.get_attributes().get("subject") == (subject or None)


# ------------------------------------------------------------------------------------------------- bounds

HUGE = "m" * (11 * 1024 * 1024)  # the 11 MB model name of issue 11


def test_every_string_field_is_cut_to_the_documented_maximum() -> None:
    record = success(
        subject="s" * 5000,
        model=HUGE,
        message_id="i" * 300,
        stop_reason="r" * 300,
        error_type="e" * 300,
        anthropic_request_id="q" * 300,
        claude_code_session_id="c" * 300,
        service_tier="t" * 300,
    )
    event = event_of(record)
    data = event["data"]
    for name in ("model", "message_id", "stop_reason", "error_type", "anthropic_request_id", "claude_code_session_id"):
        assert len(data[name]) == MAX_FIELD_CHARS and data[name].endswith(TRUNCATION_MARK), name
    assert data["model"] == "m" * (MAX_FIELD_CHARS - 1) + "…"
    assert len(event["subject"]) == MAX_FIELD_CHARS and event["subject"].endswith("…")
    assert len(encode_event(event)) < 8 * 1024  # the whole event stays small
    # A binary-mode attribute stays under Pub/Sub's 1,024-byte limit whatever the characters.
    wide = event_of(success(subject="\U0001f600" * 1000))
    assert len(to_binary(encode_event(wide)).attributes["subject"].encode()) <= 1024


def test_strings_within_the_maximum_are_untouched() -> None:
    fits = "x" * MAX_FIELD_CHARS
    event = event_of(success(model=fits, subject=fits))
    assert event["data"]["model"] == fits and event["subject"] == fits


def test_a_damaged_stored_event_is_a_value_error_for_the_binary_form() -> None:
    for body in (b"", b"[]", b'{"id": "x"}', b"\xff"):
        with pytest.raises(ValueError):
            to_binary(body)
