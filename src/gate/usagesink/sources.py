"""Where the usage sink reads events: a RabbitMQ queue (aiormq) or a Pub/Sub subscription, reconnecting forever.

Each message becomes a ``Delivery`` that carries its own ``ack`` and ``reject``, bound to the channel (or the Pub/Sub
message) it came on: after a reconnect a stale delivery's ack fails instead of acknowledging a different message
that happens to have the same delivery tag on the new channel. The broker redelivers what was not acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiormq
import aiormq.abc
import pamqp.exceptions
from yarl import URL

from gate.ops.backoff import Backoff
from gate.settings import UsageSettings, UsageSinkSettings
from gate.usagesink.rows import from_amqp, from_pubsub

__all__ = ["Delivery", "PubSubSource", "RabbitMQSource", "Source", "make_source"]

log = logging.getLogger("gate.usagesink")


@dataclass(slots=True)
class Delivery:
    """One message as received: its CloudEvent (or why it is not one) and how to settle it with the broker."""

    event: Any  # cloudevents BaseCloudEvent, or None when it could not be decoded
    error: str | None
    ack: Callable[[], Awaitable[None]]
    reject: Callable[[], Awaitable[None]]  # not a usage event: never redelivered (dead-lettered if so configured)


Deliver = Callable[[Delivery], Awaitable[None]]


class Source(Protocol):
    name: str
    last_error: str | None

    @property
    def connected(self) -> bool: ...

    async def run(self, deliver: Deliver) -> None:
        """Consume until cancelled, reconnecting after every failure; ``deliver`` may wait (back-pressure)."""
        ...

    async def close(self) -> None: ...


def make_source(sink: UsageSinkSettings, usage: UsageSettings) -> Source:
    if sink.source == "pubsub":
        return PubSubSource(sink, usage)
    return RabbitMQSource(sink, usage)


_AMQP_ERRORS = (
    aiormq.exceptions.AMQPError,
    pamqp.exceptions.PAMQPException,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


class RabbitMQSource:
    """A durable queue bound to Gate's topic exchange (both declared as Gate declares the exchange)."""

    name = "rabbitmq"

    def __init__(self, sink: UsageSinkSettings, usage: UsageSettings) -> None:
        self._url = sink.rabbitmq.url.get_secret_value()
        self._password = URL(self._url).password or ""
        self._exchange = usage.destination
        self._queue = sink.rabbitmq.queue
        self._binding_key = sink.rabbitmq.binding_key
        self._prefetch = sink.rabbitmq.prefetch
        self._backoff = Backoff(sink.retry_initial, sink.retry_max)
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._consuming = False
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        """Consuming: connected, the queue declared and bound, the consumer registered."""
        return self._consuming and self._connection is not None and not self._connection.is_closed

    async def run(self, deliver: Deliver) -> None:
        while True:
            try:
                await self._consume(deliver)
            except _AMQP_ERRORS as exc:
                self._note(exc)
            finally:
                await self.close()
            await asyncio.sleep(self._backoff.next())

    async def _consume(self, deliver: Deliver) -> None:
        async with asyncio.timeout(30):
            connection = self._connection = await aiormq.connect(
                self._url, client_properties={"connection_name": "gate-usage-sink"}
            )
            channel = await connection.channel()
            await channel.basic_qos(prefetch_count=self._prefetch)
            await channel.exchange_declare(self._exchange, exchange_type="topic", durable=True)
            await channel.queue_declare(self._queue, durable=True)
            await channel.queue_bind(self._queue, self._exchange, routing_key=self._binding_key)

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            await deliver(self._delivery(message))

        await channel.basic_consume(self._queue, on_message, no_ack=False)
        self._consuming = True
        if self.last_error is not None:
            log.info("consuming usage events from RabbitMQ queue %s again", self._queue)
        self.last_error = None
        self._backoff.reset()
        # aiormq runs the consumer callbacks; this task only waits for the connection (or channel) to end.
        closing = [asyncio.ensure_future(connection.closing), asyncio.ensure_future(channel.closing)]
        try:
            await asyncio.wait(closing, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in closing:
                future.cancel()
        raise ConnectionError("the RabbitMQ connection closed")

    @staticmethod
    def _delivery(message: aiormq.abc.DeliveredMessage) -> Delivery:
        channel = message.channel  # the channel it came on: its tag means nothing on any other
        tag = getattr(message.delivery, "delivery_tag", None)
        assert isinstance(tag, int)
        properties = message.header.properties

        async def ack() -> None:
            await channel.basic_ack(tag)

        async def reject() -> None:
            await channel.basic_reject(tag, requeue=False)

        try:
            event = from_amqp(message.body, properties.content_type, properties.headers)
        except ValueError as exc:
            return Delivery(None, str(exc), ack, reject)
        return Delivery(event, None, ack, reject)

    async def close(self) -> None:
        self._consuming = False
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(*_AMQP_ERRORS):
                async with asyncio.timeout(5):
                    await connection.close()

    def _note(self, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self._password:
            text = text.replace(self._password, "******")
        error = f"RabbitMQ: {text[:300]}"
        if error != self.last_error:
            log.warning("usage sink: %s (reconnecting)", error)
        self.last_error = error


class PubSubSource:
    """A Pub/Sub subscription on Gate's topic (created if missing), read with streaming pull in the client's
    threads; messages reach the event loop through ``call_soon_threadsafe`` and are acknowledged after commit."""

    name = "pubsub"

    def __init__(self, sink: UsageSinkSettings, usage: UsageSettings) -> None:
        self._settings = sink.pubsub
        self._topic_name = usage.destination
        self._backoff = Backoff(sink.retry_initial, sink.retry_max)
        self._future: Any = None
        self._subscriber: Any = None
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._future is not None and not self._future.done()

    async def run(self, deliver: Deliver) -> None:
        async def hand_over(delivery: Delivery) -> None:
            await deliver(delivery)

        if self._settings.emulator_host:
            os.environ["PUBSUB_EMULATOR_HOST"] = self._settings.emulator_host
        from google.cloud import pubsub_v1

        loop = asyncio.get_running_loop()

        def callback(message: Any) -> None:  # in a client thread: hand over to the loop, wait for nothing
            def settle_later(method: Callable[[], Any]) -> Callable[[], Awaitable[None]]:
                async def settle() -> None:
                    await asyncio.to_thread(method)

                return settle

            try:
                event = from_pubsub(message.data, dict(message.attributes))
                delivery = Delivery(event, None, settle_later(message.ack), settle_later(message.nack))
            except ValueError as exc:
                # Not a usage event: acknowledged so that it is not redelivered forever (counted and logged).
                delivery = Delivery(None, str(exc), settle_later(message.ack), settle_later(message.ack))
            future = asyncio.run_coroutine_threadsafe(hand_over(delivery), loop)
            with contextlib.suppress(Exception):
                future.result()  # back-pressure: flow control holds the stream while the sink is full

        while True:
            try:
                await asyncio.to_thread(self._ensure_subscription, pubsub_v1)
                flow = pubsub_v1.types.FlowControl(max_messages=self._settings.max_messages)
                self._future = self._subscriber.subscribe(self._subscription, callback, flow_control=flow)
                self.last_error = None
                self._backoff.reset()
                await asyncio.wrap_future(self._future)
            except asyncio.CancelledError:
                await self.close()
                raise
            except Exception as exc:  # noqa: BLE001 - google's errors have no common base; any failure reconnects
                self._note(exc)
            await self.close()
            await asyncio.sleep(self._backoff.next())

    def _ensure_subscription(self, pubsub_v1: Any) -> None:
        from google.api_core.exceptions import AlreadyExists

        if self._subscriber is None:
            self._subscriber = pubsub_v1.SubscriberClient()
        project = self._settings.project_id
        topic = pubsub_v1.PublisherClient.topic_path(project, self._topic_name)
        self._subscription = self._subscriber.subscription_path(project, self._settings.subscription)
        with contextlib.suppress(AlreadyExists):
            self._subscriber.create_subscription(name=self._subscription, topic=topic)

    async def close(self) -> None:
        future, self._future = self._future, None
        if future is not None:
            future.cancel()
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            await asyncio.to_thread(subscriber.close)

    def _note(self, exc: BaseException) -> None:
        error = f"Pub/Sub: {type(exc).__name__}: {str(exc)[:300]}"
        if error != self.last_error:
            log.warning("usage sink: %s (reconnecting)", error)
        self.last_error = error
