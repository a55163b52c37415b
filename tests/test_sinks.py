"""The sinks against the real things: RabbitMQ (including an outage, through a fault proxy), the Pub/Sub emulator,
a JSON Lines file; and events those destinations refuse for good."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from cloudevents.core.bindings import amqp
from cloudevents.core.formats.json import JSONFormat
from cloudevents.v1.http import from_http, from_json
from pydantic import SecretStr

from gate.accounting.usage import UsageRecord
from gate.events import Outbox, UsageEvents, build_event, encode_event
from gate.events.rabbitmq import RabbitMQSink
from gate.events.sink import describe_error
from gate.settings import UsageSettings
from tests.brokers import (
    RABBITMQ_URL,
    PubSubPuller,
    RabbitConsumer,
    delete_exchange,
    exchange_info,
    proxied_url,
    pubsub_emulator_host,  # noqa: F401 - a fixture
    rabbit_proxy,  # noqa: F401 - a fixture
    rabbitmq,  # noqa: F401 - a fixture
    wait_until,
)
from tests.faultproxy import FaultProxy

TYPE = "io.github.samzhu.gate.usage.v1"
SOURCE = "/gate/messages"
ROUTING_KEY = "usage.test"


def record(n: int, **changes: Any) -> UsageRecord:
    base = UsageRecord(
        subject="alice",
        model="claude-sonnet-4-5",
        message_id=f"msg_{n}",
        input_tokens=30,
        output_tokens=148,
        cache_creation_tokens=0,
        cache_read_tokens=2,
        latency_ms=7257,
        stream=True,
        stop_reason="end_turn",
        status="success",
        error_type=None,
        key_alias="primary",
        trace_id="4c71578c899ae6249e5b70d07900fc93",
        anthropic_request_id=f"req_{n}",
        time_to_first_token_ms=300,
    )
    return dataclasses.replace(base, **changes)


def failed(n: int) -> UsageRecord:
    return record(
        n,
        input_tokens=0,
        output_tokens=0,
        cache_read_tokens=0,
        status="error",
        error_type="overloaded_error",
        http_status=529,
        stop_reason=None,
    )


def usage_settings(tmp_path: Path, **sections: Any) -> UsageSettings:
    outbox = {"path": str(tmp_path / "outbox.sqlite3"), "retry-initial": "50ms", "retry-max": "500ms"}
    return UsageSettings.model_validate({"outbox": outbox} | sections)


def rabbit_settings(
    tmp_path: Path, exchange: str, mode: str = "structured", url: str = RABBITMQ_URL, **outbox: Any
) -> UsageSettings:
    settings = usage_settings(
        tmp_path,
        publisher="rabbitmq",
        destination=exchange,
        **{"content-mode": mode},
        rabbitmq={"url": url, "routing-key": ROUTING_KEY, "confirm-timeout": "5s"},
    )
    return settings.model_copy(update={"outbox": settings.outbox.model_copy(update=outbox)})


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def check_data(data: dict[str, Any], source: UsageRecord) -> None:
    assert data["message_id"] == source.message_id
    assert data["status"] == source.status
    assert data["error_type"] == source.error_type
    assert data["total_tokens"] == source.total_tokens
    assert data["time_to_first_token_ms"] == 300
    assert ("http_status" in data) == (source.http_status is not None)
    assert "web_search_requests" not in data


# --------------------------------------------------------------------------------------------- RabbitMQ


async def test_rabbitmq_structured_mode(tmp_path: Path, rabbitmq: str) -> None:  # noqa: F811
    exchange = unique("gate-test-usage")
    sent = [record(0), failed(1)]
    try:
        async with RabbitConsumer(exchange, "usage.#") as consumer:
            events = UsageEvents(rabbit_settings(tmp_path, exchange))
            await events.start()
            for r in sent:
                events.publish(r)
            await consumer.wait_for(2)
            assert events.health()["details"]["connected"] is True  # type: ignore[index]
            await events.close(timeout=5)
        info = await asyncio.to_thread(exchange_info, exchange)
    finally:
        await delete_exchange(exchange)
    assert info == {"name": exchange, "type": "topic", "durable": True}

    for message, source in zip(consumer.messages, sent, strict=True):
        assert message.content_type == "application/cloudevents+json"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.routing_key == ROUTING_KEY
        assert message.exchange == exchange
        assert not message.headers
        event = from_http({"content-type": message.content_type}, message.body)
        assert event["id"] == message.message_id
        assert event["specversion"] == "1.0"
        assert event["type"] == TYPE and event["source"] == SOURCE
        assert event["subject"] == "alice"
        assert event["datacontenttype"] == "application/json"
        check_data(event.data, source)
    assert len({m.message_id for m in consumer.messages}) == 2


async def test_rabbitmq_binary_mode(tmp_path: Path, rabbitmq: str) -> None:  # noqa: F811
    exchange = unique("gate-test-usage")
    sent = [record(0), failed(1)]
    try:
        async with RabbitConsumer(exchange, ROUTING_KEY) as consumer:
            events = UsageEvents(rabbit_settings(tmp_path, exchange, mode="binary"))
            await events.start()
            for r in sent:
                events.publish(r)
            await consumer.wait_for(2)
            await events.close(timeout=5)
    finally:
        await delete_exchange(exchange)

    for message, source in zip(consumer.messages, sent, strict=True):
        assert message.content_type == "application/json"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        headers = dict(message.headers)
        assert set(headers) == {
            "cloudEvents_specversion",
            "cloudEvents_id",
            "cloudEvents_type",
            "cloudEvents_source",
            "cloudEvents_subject",
            "cloudEvents_time",
        }
        assert headers["cloudEvents_specversion"] == "1.0"
        assert headers["cloudEvents_id"] == message.message_id
        assert headers["cloudEvents_type"] == TYPE
        assert headers["cloudEvents_source"] == SOURCE
        assert headers["cloudEvents_subject"] == "alice"
        event = amqp.from_binary(
            amqp.AMQPMessage(
                properties={"content-type": message.content_type},
                application_properties=headers,
                application_data=message.body,
            ),
            JSONFormat(),
        )
        assert event.get_attributes()["id"] == message.message_id
        assert event.get_attributes()["datacontenttype"] == "application/json"
        data = event.get_data()
        assert isinstance(data, dict)
        check_data(data, source)
        assert orjson.loads(message.body) == data


async def test_rabbitmq_unroutable_events_wait_for_a_queue(tmp_path: Path, rabbitmq: str) -> None:  # noqa: F811
    exchange = unique("gate-test-usage")
    events = UsageEvents(rabbit_settings(tmp_path, exchange))
    await events.start()
    try:
        for n in range(3):
            events.publish(record(n))
        await wait_until(lambda: events.publish_failures_total >= 3, what="returned messages")

        def held_back() -> bool:  # the three may come in separate commits: wait for the state, not a moment
            details: Any = events.health()["details"]
            return details["outboxDepth"] == 3 and "unroutable" in str(details["lastError"])

        await wait_until(held_back, what="three unroutable events held in the outbox")
        details: Any = events.health()["details"]
        assert exchange in details["lastError"]
        assert details["connected"] is True and details["outboxDepth"] == 3
        async with RabbitConsumer(exchange, "#") as consumer:
            await consumer.wait_for(3)
        await wait_until(lambda: events.depth == 0, what="an empty outbox")
        assert events.health()["details"]["lastError"] is None  # type: ignore[index]
    finally:
        await events.close(timeout=5)
        await delete_exchange(exchange)


async def test_a_broker_down_at_start_does_not_stop_gate(tmp_path: Path) -> None:
    settings = rabbit_settings(tmp_path, unique("gate-test-usage"))
    settings = settings.model_copy(
        update={"rabbitmq": settings.rabbitmq.model_copy(update={"url": SecretStr("amqp://gate:s3cr3t@127.0.0.1:1/")})}
    )
    events = UsageEvents(settings)
    await events.start()  # returns although nothing listens on port 1
    events.publish(record(0))
    await wait_until(lambda: events.health()["details"]["lastError"] is not None, what="a connection error")  # type: ignore[index]
    details: Any = events.health()["details"]
    assert details["connected"] is False and details["outboxDepth"] == 1
    assert details["lastError"].startswith("RabbitMQ: ")
    assert "s3cr3t" not in str(events.health())
    await events.close(timeout=0.5)


def test_error_text_never_carries_credentials() -> None:
    text = describe_error(OSError("cannot reach amqp://gate:s3cr3t@broker:5672/ (s3cr3t)"), "s3cr3t")
    assert "s3cr3t" not in text
    assert text == "OSError: cannot reach amqp://***@broker:5672/ (***)"  # gate.ops.redact's rule


async def test_rabbitmq_outage_loses_nothing(tmp_path: Path, rabbit_proxy: FaultProxy) -> None:  # noqa: F811
    exchange = unique("gate-test-usage")
    queue = f"{exchange}-durable"
    before = RabbitConsumer(exchange, "#", queue=queue)  # a durable queue: it collects across the outage
    await before.__aenter__()
    events = UsageEvents(rabbit_settings(tmp_path, exchange, url=proxied_url(rabbit_proxy)))
    await events.start()
    try:
        for n in range(100):
            events.publish(record(n))
        await before.wait_for(100)
        # The consumer can see a batch before its confirms reach Gate: until they do, it is still in the outbox.
        await wait_until(lambda: events.depth == 0, what="the first 100 events to be confirmed")
        assert events.health()["details"]["connected"] is True  # type: ignore[index]
        await before.close()

        with rabbit_proxy.outage():  # RabbitMQ gone for Gate: connections reset, the port closed
            for n in range(100, 600):
                events.publish(record(n))
            await wait_until(lambda: events.publish_failures_total > 0, what="a failed attempt")
            details: Any = events.health()["details"]
            assert details["connected"] is False
            assert details["lastError"].startswith("RabbitMQ: ")
            assert "guest:guest" not in details["lastError"]
            # All 500 reach the outbox during the outage. Not asserted at the first failure: the writer may have
            # taken the records in two commits (it takes what the buffer holds when it wakes, and the loop above
            # can lose the GIL to it midway), and the first commit's failed delivery can come before the second.
            await wait_until(lambda: events.depth == 500, what="all 500 events committed during the outage")

        await wait_until(lambda: events.depth == 0, timeout=60, what="the outbox to drain after the restart")
        details = events.health()["details"]
        assert details["connected"] is True and details["lastError"] is None
        async with RabbitConsumer(exchange, "#", queue=queue) as after:
            await after.wait_for(500, unique=True)
            await asyncio.sleep(0.2)  # any duplicate still in flight
        numbers = {orjson.loads(m.body)["data"]["message_id"] for m in after.messages}
        assert numbers == {f"msg_{n}" for n in range(100, 600)}
        ids = after.ids()
        print(
            f"\noutage: 500 events published while RabbitMQ was unreachable, {len(set(ids))} arrived, "
            f"{len(ids) - len(set(ids))} duplicates, {events.publish_failures_total} failed attempts"
        )
    finally:
        await events.close(timeout=5)
        await delete_exchange(exchange)


async def test_rabbitmq_closing_the_connection_over_one_message_sets_only_that_one_aside(
    tmp_path: Path,
    rabbitmq: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without Gate's own frame check, the broker answers a header frame over frame_max by closing the whole
    # connection (FRAME_ERROR): every message awaiting its confirm fails with it, and only the one at fault may go.
    monkeypatch.setattr(RabbitMQSink, "_frame_max", lambda self: 0)
    exchange = unique("gate-test-usage")
    event = build_event(record(99), event_type=TYPE, source=SOURCE)
    event["subject"] = "s" * 200_000  # as a release before the bounds could write it
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    outbox.append([(event["id"], 0.0, encode_event(event))])
    outbox.close()
    async with RabbitConsumer(exchange, "#") as consumer:
        events = UsageEvents(rabbit_settings(tmp_path, exchange, "binary", batch_size=4))
        await events.start()
        try:
            for n in range(10):
                events.publish(record(n))
            await consumer.wait_for(10, unique=True)
            await wait_until(lambda: events.dead_letters == 1, what="the refused event set aside")
            # Messages routed before the close but never confirmed are sent again: at least once, same ids.
            await wait_until(lambda: events.depth == 0, what="an empty outbox")
            assert event["id"] not in consumer.ids()
            assert "FRAME_ERROR" in str(events.health()["details"]["lastDeadLetter"])  # type: ignore[index]
        finally:
            await events.close(timeout=5)
            await delete_exchange(exchange)


# ------------------------------------------------------------------------------------------------ Pub/Sub


def pubsub_settings(tmp_path: Path, host: str, topic: str, mode: str) -> UsageSettings:
    return usage_settings(
        tmp_path,
        publisher="pubsub",
        destination=topic,
        **{"content-mode": mode},
        pubsub={"project-id": "gate-test", "emulator-host": host, "create-topic": True, "publish-timeout": "5s"},
    )


@pytest.mark.parametrize("mode", ["structured", "binary"])
async def test_pubsub_modes_reach_a_pull_subscriber(
    tmp_path: Path,
    pubsub_emulator_host: str,  # noqa: F811
    mode: str,
) -> None:
    topic = unique(f"gate-usage-{mode}")
    puller = PubSubPuller("gate-test", topic, f"{topic}-sub")
    await asyncio.to_thread(puller.create)  # the subscription must exist before anything is published
    sent = [record(0), failed(1)]
    events = UsageEvents(pubsub_settings(tmp_path, pubsub_emulator_host, topic, mode))
    await events.start()
    try:
        for r in sent:
            events.publish(r)
        received = await asyncio.to_thread(puller.pull, 2)
        await wait_until(lambda: events.published_total == 2, what="both confirmations")
        assert events.health()["details"]["connected"] is True  # type: ignore[index]
    finally:
        await events.close(timeout=5)
        await asyncio.to_thread(puller.close)

    by_message = {}
    for item in received:
        attributes = dict(item.message.attributes)
        data = bytes(item.message.data)
        if mode == "structured":
            assert attributes == {"Content-Type": "application/cloudevents+json"}
            event = from_http(attributes, data)
        else:
            event_data = orjson.loads(data)
            assert set(attributes) == {
                "ce-specversion",
                "ce-id",
                "ce-type",
                "ce-source",
                "ce-subject",
                "ce-time",
                "Content-Type",
            }
            assert attributes["ce-specversion"] == "1.0"
            assert attributes["ce-type"] == TYPE and attributes["ce-source"] == SOURCE
            assert attributes["ce-subject"] == "alice"
            assert attributes["Content-Type"] == "application/json"
            event = from_http(attributes, data)
            assert event.data == event_data
        assert event["type"] == TYPE and event["subject"] == "alice"
        by_message[event.data["message_id"]] = event
    assert len({e["id"] for e in by_message.values()}) == 2
    for source in sent:
        check_data(by_message[source.message_id].data, source)


async def test_pubsub_sink_creates_its_topic(tmp_path: Path, pubsub_emulator_host: str) -> None:  # noqa: F811
    from google.cloud import pubsub_v1

    topic = unique("gate-usage-new")
    events = UsageEvents(pubsub_settings(tmp_path, pubsub_emulator_host, topic, "structured"))
    await events.start()
    try:
        events.publish(record(0))
        await wait_until(lambda: events.published_total == 1, what="the confirmation")
    finally:
        await events.close(timeout=5)
    client = pubsub_v1.PublisherClient()
    found = await asyncio.to_thread(client.get_topic, topic=client.topic_path("gate-test", topic))
    assert found.name.endswith(f"/topics/{topic}")


# --------------------------------------------------------------------------------------------------- file


async def test_file_sink_writes_json_lines_that_parse_as_cloudevents(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "usage.jsonl"
    sent = [record(n) for n in range(5)] + [failed(5)]
    events = UsageEvents(usage_settings(tmp_path, publisher="file", file={"path": str(path)}))
    await events.start()
    for r in sent:
        events.publish(r)
    await wait_until(lambda: events.published_total == 6, what="six lines")
    await events.close(timeout=1)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 6
    parsed = [from_json(line) for line in lines]
    for event, source in zip(parsed, sent, strict=True):
        assert event["type"] == TYPE and event["source"] == SOURCE and event["subject"] == "alice"
        check_data(event.data, source)
    assert len({e["id"] for e in parsed}) == 6
