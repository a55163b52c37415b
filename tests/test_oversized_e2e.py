"""One hostile string must not block usage delivery nor flood the logs (issue 11, item 8), through a real Gate.

A client sends an 11 MB model name and the upstream answers 400: the event and the access line carry the name cut
to ``MAX_FIELD_CHARS``. An event a broker refuses for good (here: one an earlier release left in the outbox, too
large for Pub/Sub, or with attributes over RabbitMQ's frame size) is set aside, and the events behind it, with a
batch size of 2, reach the real Pub/Sub emulator and RabbitMQ; ``/actuator/health`` and the metrics show it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from gate.accounting.usage import UsageRecord
from gate.events import Outbox, build_event, encode_event
from gate.ops.bounds import MAX_FIELD_CHARS
from tests.brokers import (
    RABBITMQ_URL,
    PubSubPuller,
    RabbitConsumer,
    delete_exchange,
    pubsub_emulator_host,  # noqa: F401 - a fixture
    rabbitmq,  # noqa: F401 - a fixture
    wait_until,
)
from tests.fake_anthropic import FakeAnthropic, error_reply
from tests.harness import RunningGate, read_events

HUGE_MODEL = "claude-" + "x" * (11 * 1024 * 1024)
NORMAL = {"model": "claude-opus-4-6", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]}
TYPE = "io.github.samzhu.gate.usage.v1"
SOURCE = "/gate/messages"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def health(gate: RunningGate) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(gate.url + "/actuator/health", timeout=10).json()
    return body["components"]["pubsub"]


def dead_letter_gauge(gate: RunningGate) -> float | None:
    text = httpx.get(gate.url + "/actuator/prometheus", timeout=10).text
    found = re.search(r"^gate_usage_outbox_dead_letters(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    return None if found is None else float(found.group(1))


def leave_in_outbox(path: Path, **changes: Any) -> str:
    """An unbounded event in the outbox, as a release before the bounds wrote it; its id."""
    record = UsageRecord(
        subject="mallory",
        model="claude-opus-4-6",
        message_id=None,
        input_tokens=0,
        output_tokens=0,
        cache_creation_tokens=0,
        cache_read_tokens=0,
        latency_ms=3,
        stream=False,
        stop_reason=None,
        status="error",
        error_type="invalid_request_error",
        key_alias="primary",
        trace_id=None,
        anthropic_request_id=None,
        http_status=400,
    )
    event = build_event(dataclasses.replace(record), event_type=TYPE, source=SOURCE)
    for name, value in changes.items():
        if name == "subject":
            event["subject"] = value
        else:
            event["data"][name] = value
    outbox = Outbox(path)
    outbox.append([(event["id"], 0.0, encode_event(event))])
    outbox.close()
    return str(event["id"])


def dead_letters(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as db:
        return [tuple(row) for row in db.execute("SELECT event_id, sink, reason FROM usage_dead_letter")]


def call_normally(gate: RunningGate, count: int) -> None:
    sdk = anthropic.Anthropic(base_url=gate.url, api_key=gate.token(), max_retries=0)
    for _ in range(count):
        sdk.messages.create(**NORMAL)  # type: ignore[call-overload]


# --------------------------------------------------------------------------------------------- bounds


def test_an_11_mb_model_name_is_refused_with_a_small_answer_and_a_small_access_line(
    start_gate: Callable[..., RunningGate], fake: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    gate = start_gate()
    body = orjson.dumps({**NORMAL, "model": HUGE_MODEL})
    with caplog.at_level(logging.INFO, logger="gate.access"):
        answer = httpx.post(
            gate.url + "/v1/messages",
            content=body,
            headers={"authorization": f"Bearer {gate.token()}", "content-type": "application/json"},
            timeout=60,
        )
    assert answer.status_code == 400 and len(answer.content) < 1024  # no model has such a name: no upstream call
    assert fake.received == []
    (access,) = [r for r in caplog.records if r.name == "gate.access"]
    assert sum(len(str(value)) for value in access.__dict__.values()) < 16 * 1024


def test_a_60_kb_session_id_makes_a_small_event_and_a_small_access_line(
    start_gate: Callable[..., RunningGate], fake: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    gate = start_gate()
    session = "s" * 60_000  # within the header limit, so it reaches the relay, the event and the log
    fake.enqueue(error_reply(400, "invalid_request_error", "bad request"))
    with caplog.at_level(logging.INFO, logger="gate.access"):
        answer = httpx.post(
            gate.url + "/v1/messages",
            content=orjson.dumps(NORMAL),
            headers={
                "authorization": f"Bearer {gate.token()}",
                "content-type": "application/json",
                "x-claude-code-session-id": session,
            },
            timeout=60,
        )
        assert answer.status_code == 400
        (event,) = read_events(Path(gate.settings.usage.file.path), 1)
    assert event["data"]["claude_code_session_id"] == session[: MAX_FIELD_CHARS - 1] + "…"
    assert event["data"]["http_status"] == 400 and event["data"]["error_type"] == "invalid_request_error"
    assert len(orjson.dumps(event)) < 4096
    (access,) = [r for r in caplog.records if r.name == "gate.access"]
    assert sum(len(str(value)) for value in access.__dict__.values()) < 16 * 1024


# ----------------------------------------------------------------------------------- refused for good


def test_an_event_too_large_for_pubsub_is_set_aside_and_the_rest_arrive(
    start_gate: Callable[..., RunningGate],
    fake: FakeAnthropic,
    pubsub_emulator_host: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    topic = unique("gate-usage-oversized")
    puller = PubSubPuller("gate-test", topic, f"{topic}-sub")
    puller.create()
    outbox = tmp_path / "left" / "outbox.sqlite3"
    outbox.parent.mkdir()
    poison = leave_in_outbox(outbox, model=HUGE_MODEL)  # an 11 MB message: over Pub/Sub's 10 MB request limit
    gate = start_gate(
        usage={
            "publisher": "pubsub",
            "destination": topic,
            "pubsub": {"project-id": "gate-test", "emulator-host": pubsub_emulator_host, "publish-timeout": "5s"},
            "outbox": {"path": str(outbox), "batch-size": 2, "retry-initial": "50ms", "retry-max": "500ms"},
        }
    )
    try:
        call_normally(gate, 5)
        received = puller.pull(5)
        assert len({m.message.attributes["ce-id"] for m in received}) == 5
        assert poison not in {m.message.attributes["ce-id"] for m in received}
        asyncio.run(wait_until(lambda: health(gate)["details"]["deadLetters"] == 1, what="the dead letter in health"))
        asyncio.run(wait_until(lambda: health(gate)["details"]["outboxDepth"] == 0, what="the delivered ones removed"))
        details = health(gate)["details"]
        assert health(gate)["status"] == "UP" and details["outboxDepth"] == 0
        assert details["lastDeadLetter"].startswith(f"{poison}: Pub/Sub: MessageTooLargeError")
        assert dead_letter_gauge(gate) == 1
    finally:
        gate.stop()
        puller.close()
    ((event_id, sink, reason),) = dead_letters(outbox)
    assert (event_id, sink) == (poison, "pubsub") and "too large" in reason


def test_an_event_over_rabbitmqs_frame_size_is_set_aside_and_the_rest_arrive(
    start_gate: Callable[..., RunningGate],
    fake: FakeAnthropic,
    rabbitmq: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    exchange = unique("gate-e2e-oversized")
    outbox = tmp_path / "left" / "outbox.sqlite3"
    outbox.parent.mkdir()
    # In binary mode the subject is an AMQP header: 200 KB of it cannot fit RabbitMQ's 128 KB frame.
    poison = leave_in_outbox(outbox, subject="s" * 200_000)
    try:
        with_consumer = RabbitConsumer(exchange, "#")
        asyncio.run(_deliver_through_rabbitmq(start_gate, with_consumer, exchange, outbox, poison))
    finally:
        asyncio.run(delete_exchange(exchange))
    ((event_id, sink, reason),) = dead_letters(outbox)
    assert (event_id, sink) == (poison, "rabbitmq") and "frame_max" in reason


async def _deliver_through_rabbitmq(
    start_gate: Callable[..., RunningGate], consumer: RabbitConsumer, exchange: str, outbox: Path, poison: str
) -> None:
    async with consumer:
        gate = await asyncio.to_thread(
            start_gate,
            usage={
                "publisher": "rabbitmq",
                "destination": exchange,
                "content-mode": "binary",
                "rabbitmq": {"url": RABBITMQ_URL, "routing-key": "usage", "confirm-timeout": "5s"},
                "outbox": {"path": str(outbox), "batch-size": 2, "retry-initial": "50ms", "retry-max": "500ms"},
            },
        )
        try:
            await asyncio.to_thread(call_normally, gate, 5)
            await consumer.wait_for(5, unique=True)
            assert poison not in consumer.ids()
            await wait_until(lambda: health(gate)["details"]["deadLetters"] == 1, what="the dead letter in health")
            await wait_until(lambda: health(gate)["details"]["outboxDepth"] == 0, what="the delivered ones removed")
            details = health(gate)["details"]
            assert details["connected"] is True and details["outboxDepth"] == 0
            assert "frame_max" in details["lastDeadLetter"]
            assert dead_letter_gauge(gate) == 1
        finally:
            await asyncio.to_thread(gate.stop)
