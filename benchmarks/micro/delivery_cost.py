"""CPU per usage event delivered to RabbitMQ by ``UsageEvents`` (all its threads): build, commit, publish, confirm.

Records are published at about 2,500 a second in bursts of 50 (a busy Gate's rate), and the clock stops when the
outbox is empty again. ``time.process_time`` counts every thread of this process (the writer thread that builds
and commits, the loop that publishes and waits for confirms), not the broker's own work. Compare with
``amqp_publish.py`` (aiormq alone per confirmed message) to see what the outbox adds.

Run (RabbitMQ on 127.0.0.1:5672): ``taskset -c 0 .venv/bin/python benchmarks/micro/delivery_cost.py [--events N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from delivery_stall import BROKER, record

from gate.events import UsageEvents
from gate.settings import UsageSettings
from gate_rig import BENCH_EXCHANGE, bind_usage_queue


async def one_round(events_count: int) -> float:
    folder = tempfile.mkdtemp(prefix="gate-delivery-cost-")
    settings = UsageSettings.model_validate(
        {
            "publisher": "rabbitmq",
            "destination": BENCH_EXCHANGE,
            "rabbitmq": {"url": BROKER},
            "outbox": {"path": f"{folder}/outbox.sqlite3"},
        }
    )
    events = UsageEvents(settings)
    await events.start()
    for n in range(200):  # warm: connection, channel, first batches
        events.publish(record(n))
    while events.depth:
        await asyncio.sleep(0.01)
    started = time.process_time()
    n = 0
    while n < events_count:
        for _ in range(50):
            events.publish(record(n))
            n += 1
        await asyncio.sleep(0.02)
    while events.depth:
        await asyncio.sleep(0.005)
    spent = time.process_time() - started
    await events.close(5)
    return spent / events_count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    bind_usage_queue()
    for i in range(args.rounds):
        print(f"round {i + 1}: {uvloop.run(one_round(args.events)):.1f} us of CPU per delivered event")


if __name__ == "__main__":
    main()
