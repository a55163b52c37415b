"""CPU per confirmed, persistent message: aio-pika's Exchange.publish, aiormq's basic_publish and Gate's own
publishing client (``gate.events.amqp``, what the RabbitMQ sink uses), with batches as the outbox sends them.

Run (RabbitMQ on 127.0.0.1:5672): ``taskset -c 0 .venv/bin/python benchmarks/micro/amqp_publish.py``.
This process's CPU time only (the broker's is not counted); batches of 100 and 500 as the outbox sends them.
"""

import asyncio
import os
import time

import aio_pika
import aiormq
import uvloop
from pamqp import commands as spec

from gate.events.amqp import ACK, AmqpPublisher

BODY = os.urandom(450).hex().encode()  # ~900 bytes, the size of a structured usage event
MESSAGES = 5000
EXCHANGE = "gate-micro-amqp"


async def via_aio_pika(batch: int) -> float:
    connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/")
    channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, auto_delete=True)
    started = time.process_time()
    for _ in range(0, MESSAGES, batch):
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=os.urandom(16).hex()),
                    "usage",
                    timeout=10,
                )
                for _ in range(batch)
            )
        )
    cpu = time.process_time() - started
    await connection.close()
    return cpu / MESSAGES * 1e6


async def via_aiormq(batch: int) -> float:
    connection = await aiormq.connect("amqp://guest:guest@127.0.0.1:5672/")
    channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
    await channel.exchange_declare(EXCHANGE, exchange_type="topic", auto_delete=True)
    started = time.process_time()
    for _ in range(0, MESSAGES, batch):
        publishes = [
            channel.basic_publish(
                BODY,
                exchange=EXCHANGE,
                routing_key="usage",
                properties=spec.Basic.Properties(delivery_mode=2, message_id=os.urandom(16).hex()),
                wait=False,
            )
            for _ in range(batch)
        ]
        async with asyncio.timeout(10):
            await asyncio.gather(*publishes)
    cpu = time.process_time() - started
    await connection.close()
    return cpu / MESSAGES * 1e6


async def via_gate(batch: int) -> float:
    client = await AmqpPublisher.open("amqp://guest:guest@127.0.0.1:5672/", connection_name="gate-micro")
    await client.declare_exchange(EXCHANGE + "-gate", "topic", durable=False)
    started = time.process_time()
    for _ in range(0, MESSAGES, batch):
        messages = [
            (BODY, spec.Basic.Properties(delivery_mode=2, message_id=os.urandom(16).hex())) for _ in range(batch)
        ]
        outcomes = await client.publish(EXCHANGE + "-gate", "usage", messages, mandatory=False, within=10)
        assert all(outcome == ACK for outcome in outcomes), outcomes[:3]
    cpu = time.process_time() - started
    await client.close()
    return cpu / MESSAGES * 1e6


async def main() -> None:
    for batch in (1, 10, 100, 500):
        pika, rmq, gate = await via_aio_pika(batch), await via_aiormq(batch), await via_gate(batch)
        print(
            f"batch {batch}: aio-pika {pika:.1f} us/message, aiormq {rmq:.1f} ({rmq / pika:.2f}x), "
            f"gate.events.amqp {gate:.1f} ({gate / rmq:.2f}x aiormq's)"
        )


if __name__ == "__main__":
    uvloop.run(main())
