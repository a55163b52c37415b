"""What the usage-sink tests share: a unique PostgreSQL database per run, sink settings, events as Gate sends them."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import psycopg
import pytest

from gate.accounting.prices import PriceTable
from gate.accounting.usage import UsageRecord
from gate.events.envelope import STRUCTURED_CONTENT_TYPE, build_event, encode_event, to_binary
from gate.events.rabbitmq import AMQP_ATTRIBUTE_PREFIX
from gate.settings import GateSettings, load_settings
from tests.brokers import RABBITMQ_URL, port_open

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_PORT = 5432
AMQP_PORT = 5672


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A database of this test run's own, dropped at the end (tests use a schema each inside it)."""
    if not port_open("127.0.0.1", PG_PORT):
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    name = unique("gate_sink_test")
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sink_settings(
    tmp: Path,
    *,
    database: str,
    schema: str,
    exchange: str,
    queue: str,
    pg_port: int = PG_PORT,
    amqp_port: int = AMQP_PORT,
    profiles: tuple[str, ...] = ("local",),
    **sections: Any,
) -> GateSettings:
    sink: dict[str, Any] = {
        "rabbitmq": {"url": f"amqp://guest:guest@127.0.0.1:{amqp_port}/", "queue": queue, "prefetch": 100},
        "database": {
            "url": f"postgresql://postgres@127.0.0.1:{pg_port}/{database}",
            "schema-name": schema,
            "connect-timeout": "3s",
        },
        "server": {"host": "127.0.0.1", "port": 0},
        "batch-linger": "20ms",
        "retry-initial": "50ms",
        "retry-max": "500ms",
        **sections.pop("usage-sink", {}),
    }
    overrides: dict[str, Any] = {
        "usage-sink": sink,
        "usage": {"destination": exchange},
        "security": {"jwt": {"dev": {"data-dir": str(tmp / "dev-keys")}}},
        **sections,
    }
    return load_settings(profiles=list(profiles), env={}, config_dir=tmp / "no-config", overrides=overrides)


def record(**changes: Any) -> UsageRecord:
    base = UsageRecord(
        subject="alice",
        model="claude-sonnet-4-5-20250929",
        message_id="msg_1",
        input_tokens=100,
        output_tokens=50,
        cache_creation_tokens=0,
        cache_read_tokens=0,
        latency_ms=10,
        stream=False,
        stop_reason="end_turn",
        status="success",
        error_type=None,
        key_alias="primary",
        trace_id="0" * 31 + "1",
        anthropic_request_id="req_1",
        groups=["eng"],
        event_id="",
        time="2026-06-01T12:00:00.000Z",
    )
    return dataclasses.replace(base, **changes)


def event_bytes(rec: UsageRecord, prices: PriceTable | None = None) -> bytes:
    """The structured event exactly as Gate's outbox stores and sends it."""
    event = build_event(rec, event_type="io.github.samzhu.gate.usage.v1", source="/gate/messages", prices=prices)
    return encode_event(event)


async def publish(exchange: str, bodies: list[bytes], *, binary: bool = False, routing_key: str = "usage") -> None:
    """Publish events to the exchange as Gate's RabbitMQ sink does (straight to the broker, never via a proxy)."""
    connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
    try:
        channel = await connection.channel()
        target = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        for body in bodies:
            if binary:
                parts = to_binary(body)
                message = aio_pika.Message(
                    parts.data,
                    content_type=parts.content_type,
                    headers={f"{AMQP_ATTRIBUTE_PREFIX}{k}": v for k, v in parts.attributes.items()},
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=parts.attributes["id"],
                )
            else:
                message = aio_pika.Message(
                    body, content_type=STRUCTURED_CONTENT_TYPE, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                )
            await target.publish(message, routing_key=routing_key)
    finally:
        await connection.close()


async def delete_broker_objects(queue: str, exchange: str) -> None:
    connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
    try:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(exchange)
    finally:
        await connection.close()


async def queue_depth(name: str) -> int:
    connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, durable=True, passive=True)
        count = queue.declaration_result.message_count
        return int(count or 0)
    finally:
        await connection.close()


def rows(database: str, schema: str, where: str = "TRUE") -> list[tuple[Any, ...]]:
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{PG_PORT}/{database}") as connection:
        return list(
            connection.execute(f'SELECT event_id, subject, cost, groups FROM "{schema}".usage_events WHERE {where}')
        )


async def until(condition: Any, what: str, timeout: float = 60.0) -> None:
    """Poll until ``condition()`` (a bounded wait, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"gave up after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)
