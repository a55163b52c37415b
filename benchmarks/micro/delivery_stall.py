"""How long usage-event delivery holds the request loop: the loop's lateness while events flow to RabbitMQ.

A request waiting for the loop waits as long as the longest step the loop runs before reaching it. This measures
exactly that, without a proxy in between: a probe on the loop asks to run every millisecond and records how late
it runs, while ``UsageEvents`` takes records at a request-like rate, commits them to its outbox (writer thread)
and delivers them to the real broker (RabbitMQ on 127.0.0.1:5672). The same probe with ``publisher: none`` is the
baseline: the loop's own jitter on this machine at this moment. Report lateness percentiles as differences.

Run, pinned as the proxies are: ``taskset -c 0 .venv/bin/python benchmarks/micro/delivery_stall.py``
(``--rate`` records per second, ``--seconds`` per round, ``--rounds`` interleaved rounds of each publisher).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiormq
import uvloop

from gate.accounting.usage import UsageRecord
from gate.events import UsageEvents
from gate.settings import UsageSettings

PERIOD = 0.001  # the probe asks to run this often
EXCHANGE = "gate-bench-delivery-stall"
BROKER = "amqp://guest:guest@127.0.0.1:5672/"


def record(n: int) -> UsageRecord:
    return UsageRecord(
        subject=f"user-{n % 50}",
        model="claude-sonnet-4-5",
        message_id=f"msg_{n:024d}",
        input_tokens=1200,
        output_tokens=340,
        cache_creation_tokens=0,
        cache_read_tokens=5000,
        latency_ms=812,
        stream=True,
        stop_reason="end_turn",
        status="success",
        error_type=None,
        key_alias="key-1",
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        anthropic_request_id="req_011CQ2x8yrpM3j3dNkPbXq7z",
        http_status=200,
    )


async def one_round(publisher: str, rate: float, seconds: float, folder: Path) -> list[float]:
    settings = UsageSettings.model_validate(
        {
            "publisher": publisher,
            "destination": EXCHANGE,
            "outbox": {"path": str(folder / f"outbox-{publisher}-{time.monotonic_ns()}.db")},
            "file": {"path": str(folder / "usage.jsonl")},
        }
    )
    events = UsageEvents(settings)
    await events.start()
    loop = asyncio.get_running_loop()
    late: list[float] = []
    stop = loop.time() + seconds

    async def probe() -> None:
        while loop.time() < stop:
            asked = time.perf_counter() + PERIOD  # uvloop's clock has millisecond steps
            await asyncio.sleep(PERIOD)
            late.append((time.perf_counter() - asked) * 1000)

    async def produce() -> None:
        n = 0
        started = loop.time()
        while loop.time() < stop:
            due = started + n / rate
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            events.publish(record(n))
            n += 1

    await asyncio.gather(probe(), produce())
    await events.close(10.0)
    if publisher != "none" and events.published_total == 0:
        raise SystemExit(f"{publisher}: nothing was delivered; is RabbitMQ up?")
    return late


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=800.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--publishers", default="none,rabbitmq", help="comma-separated: none, file, log, rabbitmq")
    args = parser.parse_args()
    results: dict[str, list[list[float]]] = {name: [] for name in args.publishers.split(",")}
    # A queue of this benchmark's own, bound and capped, so that messages are routable and do not pile up.
    connection = await aiormq.connect(BROKER)
    channel = await connection.channel()
    await channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    await channel.queue_declare(EXCHANGE, arguments={"x-max-length": 1000})
    await channel.queue_bind(EXCHANGE, EXCHANGE, routing_key="usage")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.rounds):
                for publisher in results:
                    results[publisher].append(await one_round(publisher, args.rate, args.seconds, Path(tmp)))
    finally:
        await channel.queue_delete(EXCHANGE)
        await channel.exchange_delete(EXCHANGE)
        await connection.close()
    print(f"probe lateness in ms ({args.rate:g} records/s, {args.rounds} x {args.seconds:g} s; median over rounds)")
    print(f"{'publisher':<10} {'p50':>7} {'p99':>7} {'p99.9':>7} {'max':>7}")
    for publisher, rounds in results.items():
        row = [statistics.median(pct(r, q) for r in rounds) for q in (50, 99, 99.9)]
        row.append(statistics.median(max(r) for r in rounds))
        print(f"{publisher:<10} " + " ".join(f"{v:7.3f}" for v in row))


if __name__ == "__main__":
    uvloop.run(main())
