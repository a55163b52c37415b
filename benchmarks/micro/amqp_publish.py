"""CPU per confirmed, persistent, mandatory message: aio-pika's Exchange.publish against aiormq's basic_publish.

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


async def main() -> None:
    for batch in (100, 500):
        pika, rmq = await via_aio_pika(batch), await via_aiormq(batch)
        print(f"batch {batch}: aio-pika {pika:.1f} us/message, aiormq {rmq:.1f} us/message ({rmq / pika:.2f}x)")


if __name__ == "__main__":
    uvloop.run(main())
