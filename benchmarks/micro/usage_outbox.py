"""Usage-events figures: publish() cost, outbox commit rate, RabbitMQ delivery rate with confirms."""

# Run: .venv/bin/python benchmarks/micro/usage_outbox.py  (needs RabbitMQ on 127.0.0.1:5672)

import asyncio
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from gate.accounting.usage import UsageRecord
from gate.events import Outbox, SendResult, SinkUnavailable, UsageEvents, build_event, encode_event
from gate.settings import UsageSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.brokers import RABBITMQ_URL, RabbitConsumer, delete_exchange

REC = UsageRecord(
    subject="alice",
    model="claude-sonnet-4-5",
    message_id="msg_1",
    input_tokens=30,
    output_tokens=148,
    cache_creation_tokens=0,
    cache_read_tokens=0,
    latency_ms=7257,
    stream=True,
    stop_reason="end_turn",
    status="success",
    error_type=None,
    key_alias="primary",
    trace_id="4c71578c899ae6249e5b70d07900fc93",
    anthropic_request_id="req_1",
)


class Down:
    name = "down"
    connected = False

    async def connect(self):
        raise SinkUnavailable("down")

    async def send(self, events):
        return SendResult(error="down")

    async def close(self):
        return None


def settings(d, **kw):
    return UsageSettings.model_validate(
        {
            "publisher": "rabbitmq",
            "outbox": {
                "path": str(Path(d) / "o.sqlite3"),
                "max-events": 10_000_000,
                "retry-initial": "10s",
                "retry-max": "10s",
            },
        }
        | kw
    )


async def publish_cost(d):
    ev = UsageEvents(settings(d), sink=Down())  # not started: the bare cost, no writer competing
    n = 200_000
    t = time.perf_counter_ns()
    for _ in range(n):
        ev.publish(REC)
    bare = (time.perf_counter_ns() - t) / n
    ev2 = UsageEvents(settings(Path(d) / "b"), sink=Down())
    await ev2.start()
    t = time.perf_counter_ns()
    t0 = time.perf_counter()
    for i in range(n):
        ev2.publish(REC)
        if i % 100 == 0:
            await asyncio.sleep(0)  # let the loop breathe, as a server would
    live = (time.perf_counter_ns() - t) / n
    while ev2.outbox_commits_total == 0 or ev2._outbox.depth < n:
        await asyncio.sleep(0.005)
    committed_s = time.perf_counter() - t0
    print(f"publish(): {bare:.0f} ns/call bare, {live:.0f} ns/call with the writer thread running")
    print(
        f"writer: {n} events built, encoded and committed in {committed_s:.2f}s from first publish = {n / committed_s:,.0f} events/s ({ev2.outbox_commits_total} transactions)"
    )
    await ev2.close(0)


def raw_outbox(d):
    ob = Outbox(Path(d) / "raw.sqlite3")
    body = encode_event(build_event(REC, event_type="t", source="/s"))
    rows = [("x" * 32, time.time(), body)] * 1000
    t = time.perf_counter()
    for _ in range(100):
        ob.append(rows)
    s = time.perf_counter() - t
    print(
        f"Outbox.append: 100 transactions x 1000 rows in {s:.2f}s = {100_000 / s:,.0f} rows/s ({s / 100 * 1000:.1f} ms per fsynced transaction)"
    )
    t = time.perf_counter()
    e = None
    for _ in range(2000):
        e = build_event(REC, event_type="t", source="/s")
        encode_event(e)
    print(f"build_event+encode_event: {(time.perf_counter() - t) / 2000 * 1e6:.2f} us/event")
    ob.close()


async def rabbit_rate(d, n, batch):
    exchange = f"gate-bench-{time.time_ns()}"
    pre = UsageEvents(settings(Path(d) / f"r{batch}"), sink=Down())
    await pre.start()
    for i in range(n):
        pre.publish(dataclasses.replace(REC, message_id=str(i)))
    await pre.close(0)
    async with RabbitConsumer(exchange, "#") as consumer:
        s = settings(Path(d) / f"r{batch}", destination=exchange, rabbitmq={"url": RABBITMQ_URL})
        s = s.model_copy(update={"outbox": s.outbox.model_copy(update={"batch_size": batch})})
        ev = UsageEvents(s)
        t = time.perf_counter()
        await ev.start()
        while ev.depth:
            await asyncio.sleep(0.005)
        secs = time.perf_counter() - t
        await consumer.wait_for(n, unique=True)
        print(
            f"RabbitMQ delivery with confirms, batch {batch}: {n} events in {secs:.2f}s = {n / secs:,.0f} events/s (consumer got {len(set(consumer.ids()))})"
        )
        await ev.close(5)
    await delete_exchange(exchange)


async def main():
    with tempfile.TemporaryDirectory() as d:
        raw_outbox(d)
        await publish_cost(d)
        for batch in (100, 500, 2000):
            await rabbit_rate(d, 20_000, batch)


asyncio.run(main())
