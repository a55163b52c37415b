"""The usage sink against the real RabbitMQ and PostgreSQL: both content modes, exactly one row per event through
redeliveries, database and broker outages (a TCP fault proxy in front of each: the shared services keep running),
an acknowledgement lost after the commit, poison messages, health and metrics; the migrations; pricing of events
that carry no cost."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from gate.accounting.prices import PriceTable
from gate.events.envelope import to_binary
from gate.usagesink.postgres import PostgresStore, migrate
from gate.usagesink.rows import BadEvent, from_amqp, from_pubsub, row_from_event
from gate.usagesink.service import UsageSink
from gate.usagesink.sources import Delivery
from tests.brokers import pubsub_emulator_host, rabbitmq  # noqa: F401 - fixtures
from tests.faultproxy import FaultProxy
from tests.sinksupport import (
    AMQP_PORT,
    PG_PORT,
    delete_broker_objects,
    event_bytes,
    pg_database,  # noqa: F401 - a fixture
    publish,
    queue_depth,
    record,
    rows,
    sink_settings,
    unique,
    until,
)

pytestmark = pytest.mark.usefixtures("rabbitmq")


@dataclasses.dataclass
class Rig:
    tmp: Path
    database: str
    schema: str
    exchange: str
    queue: str
    broker: FaultProxy
    db: FaultProxy
    sinks: list[UsageSink]

    def settings(self, **sections: Any) -> Any:
        return sink_settings(
            self.tmp,
            database=self.database,
            schema=self.schema,
            exchange=self.exchange,
            queue=self.queue,
            pg_port=self.db.port,
            amqp_port=self.broker.port,
            **sections,
        )

    async def start_sink(self, **sections: Any) -> UsageSink:
        sink = UsageSink(self.settings(**sections))
        await sink.start()
        self.sinks.append(sink)
        await until(lambda: sink.source.connected, "the sink to consume (its queue bound before anything is sent)")
        return sink

    def count(self) -> int:
        return len(rows(self.database, self.schema))


@pytest.fixture
async def rig(tmp_path: Path, pg_database: str) -> AsyncIterator[Rig]:  # noqa: F811
    broker, db = FaultProxy("127.0.0.1", AMQP_PORT), FaultProxy("127.0.0.1", PG_PORT)
    broker.start()
    db.start()
    r = Rig(tmp_path, pg_database, unique("s"), unique("usage-x"), unique("usage-q"), broker, db, [])
    yield r
    for sink in r.sinks:
        await sink.stop(grace=1.0)
    broker.close()
    db.close()
    await delete_broker_objects(r.queue, r.exchange)


def prices() -> PriceTable:
    return PriceTable.from_settings(
        sink_settings(Path("/nonexistent"), database="d", schema="s", exchange="e", queue="q")
    )


# --------------------------------------------------------------------------------------------- decoding


def test_both_amqp_modes_and_both_pubsub_modes_decode_to_the_same_row() -> None:
    body = event_bytes(record(cache_read_tokens=7, claude_code_session_id="sess-1"), prices())
    binary = to_binary(body)
    amqp_headers = {f"cloudEvents_{k}": v for k, v in binary.attributes.items()}
    pubsub_attributes = {f"ce-{k}": v for k, v in binary.attributes.items()} | {"Content-Type": binary.content_type}
    decoded = [
        from_amqp(body, "application/cloudevents+json", None),
        from_amqp(binary.data, binary.content_type, amqp_headers),
        from_pubsub(binary.data, pubsub_attributes),
        from_pubsub(body, {"Content-Type": "application/cloudevents+json"}),
    ]
    rows_ = [row_from_event(event) for event in decoded]
    assert all(row == rows_[0] for row in rows_)
    row = rows_[0]
    assert row.subject == "alice" and row.groups == ["eng"] and row.claude_code_session_id == "sess-1"
    assert row.cost == (100 * Decimal(3) + 50 * Decimal(15) + 7 * Decimal("0.30")) / 1_000_000
    assert row.price_version == "claude-sonnet-4*@2025-05-22"
    assert row.event_time.isoformat() == "2026-06-01T12:00:00+00:00"


def test_an_event_without_cost_is_priced_by_the_sink_and_an_unpriced_one_stays_null() -> None:
    event = from_amqp(event_bytes(record()), "application/cloudevents+json", None)  # built without prices
    assert row_from_event(event).cost is None
    row = row_from_event(event, prices())
    assert row.cost == Decimal("0.00105") and row.price_version == "claude-sonnet-4*@2025-05-22"
    unknown = from_amqp(event_bytes(record(model="gpt-9")), "application/cloudevents+json", None)
    assert row_from_event(unknown, prices()).cost is None


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"not json", "application/cloudevents+json"),
        (b'{"specversion":"1.0","type":"t","source":"/s"}', "application/cloudevents+json"),  # no id
        (b"[]", "application/cloudevents+json"),
        (b'{"id":"x","specversion":"1.0","type":"t","source":"/s","data":"text"}', "application/cloudevents+json"),
        (b"{}", "application/json"),  # binary mode without attributes
    ],
)
def test_what_is_no_usage_event_is_refused(body: bytes, content_type: str) -> None:
    with pytest.raises(BadEvent):
        row_from_event(from_amqp(body, content_type, {}))


# --------------------------------------------------------------------------------------------- schema


def test_migrations_create_the_table_once_in_the_configured_schema(tmp_path: Path, pg_database: str) -> None:  # noqa: F811
    schema = unique("m")
    settings = sink_settings(tmp_path, database=pg_database, schema=schema, exchange="e", queue="q")
    migrate(settings.usage_sink.database)
    migrate(settings.usage_sink.database)  # at head: nothing to do
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{PG_PORT}/{pg_database}") as connection:
        assert connection.execute(f'SELECT version_num FROM "{schema}".alembic_version').fetchall() == [("0002",)]
        columns = {
            name: kind
            for name, kind in connection.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s "
                "AND table_name = 'usage_events'",
                (schema,),
            )
        }
        primary = connection.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary",
            (f'"{schema}".usage_events',),
        ).fetchall()
    assert primary == [("event_id",)]
    assert columns["cost"] == "numeric" and columns["groups"] == "ARRAY" and columns["data"] == "jsonb"
    assert columns["event_time"] == "timestamp with time zone"


async def test_the_store_writes_a_batch_once_and_sets_refused_rows_apart(tmp_path: Path, pg_database: str) -> None:  # noqa: F811
    settings = sink_settings(tmp_path, database=pg_database, schema=unique("w"), exchange="e", queue="q")
    migrate(settings.usage_sink.database)
    store = PostgresStore(settings.usage_sink.database)
    table = prices()
    good = [
        row_from_event(from_amqp(event_bytes(record(subject=f"u{i}")), "application/cloudevents+json", None), table)
        for i in range(3)
    ]
    first = await store.write(good)
    again = await store.write(good)
    assert (first.inserted, first.duplicates, again.inserted, again.duplicates) == (3, 0, 0, 3)
    nul = row_from_event(from_amqp(event_bytes(record(subject="a\x00b")), "application/cloudevents+json", None))
    fresh = row_from_event(from_amqp(event_bytes(record(subject="v")), "application/cloudevents+json", None))
    mixed = await store.write([good[0], nul, fresh])
    assert (mixed.inserted, mixed.duplicates, [r.event_id for r, _ in mixed.refused]) == (1, 1, [nul.event_id])
    await store.close()
    assert len(rows(pg_database, settings.usage_sink.database.schema_name)) == 4


# --------------------------------------------------------------------------------------------- the sink


async def test_structured_and_binary_events_each_make_one_row_and_redeliveries_none(rig: Rig) -> None:
    sink = await rig.start_sink()
    table = prices()
    structured = [event_bytes(record(subject="alice"), table) for _ in range(5)]
    binary = [event_bytes(record(subject="bob", groups=None), table) for _ in range(5)]
    await publish(rig.exchange, structured)
    await publish(rig.exchange, binary, binary=True)
    await until(lambda: rig.count() == 10, "10 rows")
    await publish(rig.exchange, structured[:3])  # the broker redelivers, a publisher retries: same ids
    await publish(rig.exchange, binary[:2], binary=True)
    await until(lambda: sink.metrics.duplicates._value.get() == 5, "5 duplicates")
    assert rig.count() == 10
    stored = {row[0]: row for row in rows(rig.database, rig.schema)}
    assert {r[1] for r in stored.values()} == {"alice", "bob"}
    assert all(r[2] == Decimal("0.00105") for r in stored.values())
    assert sorted({tuple(r[3]) if r[3] else () for r in stored.values()}) == [(), ("eng",)]
    await until(lambda: sink.metrics.acked._value.get() == 15, "every message acknowledged")
    assert await queue_depth(rig.queue) == 0


async def test_a_database_outage_keeps_messages_unacknowledged_until_the_commit(rig: Rig) -> None:
    sink = await rig.start_sink()
    await publish(rig.exchange, [event_bytes(record()) for _ in range(3)])
    await until(lambda: rig.count() == 3, "3 rows")
    rig.db.refuse()
    rig.db.cut()
    events = [event_bytes(record(subject="during-outage")) for _ in range(20)]
    await publish(rig.exchange, events)
    await until(lambda: sink.metrics.write_failures.labels("postgresql")._value.get() >= 2, "failed writes")
    async with httpx.AsyncClient() as client:
        health = await client.get(f"http://127.0.0.1:{sink.port}/actuator/health")
        assert health.status_code == 503
        assert health.json()["components"]["database"]["status"] == "DOWN"
        assert health.json()["components"]["broker"]["status"] == "UP"
    assert sink.metrics.acked._value.get() == 3  # nothing acknowledged that is not committed
    rig.db.accept()
    await until(lambda: rig.count() == 23, "23 rows after the outage")
    await until(lambda: sink.metrics.acked._value.get() == 23, "acknowledged after commit")
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"http://127.0.0.1:{sink.port}/actuator/health")).status_code == 200


async def test_a_broker_outage_loses_nothing(rig: Rig) -> None:
    sink = await rig.start_sink()
    await publish(rig.exchange, [event_bytes(record()) for _ in range(2)])
    await until(lambda: rig.count() == 2, "2 rows")
    rig.broker.refuse()
    rig.broker.cut()
    await until(lambda: not sink.source.connected, "the sink to notice the broker is gone")
    await publish(rig.exchange, [event_bytes(record(subject="queued")) for _ in range(15)])  # queued meanwhile
    rig.broker.accept()
    await until(lambda: rig.count() == 17, "17 rows after the broker came back")
    assert sink.source.connected


async def test_an_acknowledgement_lost_after_the_commit_is_redelivered_and_not_counted_twice(rig: Rig) -> None:
    sink = await rig.start_sink()
    rig.db.refuse()
    rig.db.cut()
    await publish(rig.exchange, [event_bytes(record(subject="in-hand")) for _ in range(4)])
    await until(lambda: sink.metrics.write_failures.labels("postgresql")._value.get() >= 1, "a failed write")
    rig.broker.refuse()
    rig.broker.cut()  # the channel the messages came on is gone: their acks cannot reach the broker
    await until(lambda: not sink.source.connected, "the broker connection to drop")
    rig.db.accept()
    await until(lambda: rig.count() == 4, "the batch in hand committed")
    rig.broker.accept()  # the broker redelivers the 4 unacknowledged messages
    await until(lambda: sink.metrics.duplicates._value.get() >= 4, "the redelivered batch seen as duplicates")
    assert rig.count() == 4
    await until(lambda: sink.metrics.acked._value.get() >= 4, "the redelivered messages acknowledged")
    assert await queue_depth(rig.queue) == 0


async def test_a_restarted_sink_goes_on_where_the_first_stopped(rig: Rig) -> None:
    first = await rig.start_sink()
    await publish(rig.exchange, [event_bytes(record(subject="one")) for _ in range(5)])
    await until(lambda: rig.count() == 5, "5 rows")
    await first.abort()  # a crash: nothing in hand is acknowledged
    rig.sinks.remove(first)
    await publish(rig.exchange, [event_bytes(record(subject="two")) for _ in range(5)])
    await rig.start_sink()
    await until(lambda: rig.count() == 10, "10 rows after the restart")


async def test_poison_messages_are_rejected_counted_and_never_redelivered(rig: Rig) -> None:
    sink = await rig.start_sink()
    await publish(rig.exchange, [b"{not json", event_bytes(record())])
    await until(lambda: rig.count() == 1, "the good event stored")
    await until(lambda: sink.metrics.rejected.labels("undecodable")._value.get() == 1, "the poison message rejected")
    await until(lambda: sink._in_flight == 0, "nothing in hand")
    assert await queue_depth(rig.queue) == 0
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"http://127.0.0.1:{sink.port}/metrics")).text
    assert 'gate_usage_sink_events_rejected_total{reason="undecodable"} 1.0' in metrics
    assert "gate_usage_sink_rows_inserted_total 1.0" in metrics
    assert "gate_usage_sink_broker_connected 1.0" in metrics


async def test_the_sink_starts_while_the_database_is_down_and_migrates_when_it_comes(rig: Rig) -> None:
    rig.db.refuse()
    rig.db.cut()
    await publish(rig.exchange, [])  # the exchange exists before the sink binds
    started = rig.start_sink()
    task = asyncio.ensure_future(started)
    await asyncio.sleep(0.3)
    assert not task.done()
    rig.db.accept()
    sink = await task
    await publish(rig.exchange, [event_bytes(record())])
    await until(lambda: rig.count() == 1, "the row")
    assert sink.health()["status"] == "UP", sink.health()


async def test_a_settle_cut_off_by_the_broker_going_away_does_not_end_the_writer(rig: Rig) -> None:
    """aiormq cancels an acknowledgement in flight when the connection closes: a CancelledError the writer did not
    ask for. It ended the writer task, so the sink consumed and never wrote again."""
    sink = await rig.start_sink()

    async def cut_off() -> None:
        raise asyncio.CancelledError  # what aiormq's drain future gives when its connection closes

    await sink._settle([Delivery(None, "not a CloudEvent", cut_off, cut_off)])  # rejected: the reject is cut off
    await publish(rig.exchange, [event_bytes(record())])
    await until(lambda: rig.count() == 1, "the next event written")


# --------------------------------------------------------------------------------------------- Pub/Sub


async def test_pubsub_binary_and_structured_events_each_make_one_row(
    tmp_path: Path,
    pg_database: str,  # noqa: F811
    pubsub_emulator_host: str,  # noqa: F811
) -> None:
    from google.cloud import pubsub_v1

    project, topic_name, schema = "gate-sink-test", unique("usage-t"), unique("ps")
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(project, topic_name)
    publisher.create_topic(name=topic)
    settings = sink_settings(
        tmp_path,
        database=pg_database,
        schema=schema,
        exchange=topic_name,
        queue="unused",
        **{
            "usage-sink": {
                "source": "pubsub",
                "pubsub": {
                    "project-id": project,
                    "subscription": unique("usage-s"),
                    "emulator-host": pubsub_emulator_host,
                },
            }
        },
    )
    sink = UsageSink(settings)
    await sink.start()
    try:
        await until(lambda: sink.source.connected, "the subscription")
        table = prices()
        bodies = [event_bytes(record(subject=f"p{i}"), table) for i in range(6)]
        for i, body in enumerate(bodies):
            if i % 2:
                parts = to_binary(body)
                attributes = {f"ce-{k}": v for k, v in parts.attributes.items()} | {"Content-Type": parts.content_type}
                publisher.publish(topic, parts.data, **attributes).result(timeout=30)
            else:
                publisher.publish(topic, body, **{"Content-Type": "application/cloudevents+json"}).result(timeout=30)
        publisher.publish(topic, bodies[0], **{"Content-Type": "application/cloudevents+json"}).result(timeout=30)
        await until(lambda: len(rows(pg_database, schema)) == 6, "6 rows from Pub/Sub")
        await until(lambda: sink.metrics.duplicates._value.get() == 1, "the republished event seen as a duplicate")
        assert {r[1] for r in rows(pg_database, schema)} == {f"p{i}" for i in range(6)}
        await until(lambda: sink.metrics.acked._value.get() == 7, "every message acknowledged")
    finally:
        await sink.stop(grace=1.0)
        publisher.stop()


def test_gate_usage_sink_migrate_only_from_the_command_line(tmp_path: Path, pg_database: str) -> None:  # noqa: F811
    from gate.cli import main

    schema = unique("cli")
    config = tmp_path / "sink.yaml"
    config.write_text(
        "usage-sink:\n"
        "  database:\n"
        f"    url: postgresql://postgres@127.0.0.1:{PG_PORT}/{pg_database}\n"
        f"    schema-name: {schema}\n"
        "security:\n  jwt:\n    dev:\n"
        f"      data-dir: {tmp_path / 'dev'}\n",
        encoding="utf-8",
    )
    assert main(["usage-sink", "--migrate-only", "--config", str(config)]) == 0
    assert rows(pg_database, schema) == []  # the table exists, empty
