"""Usage events to RabbitMQ: a durable topic exchange, persistent messages, publisher confirms.

Content modes follow the CloudEvents AMQP Protocol Binding (cloudevents/spec,
``cloudevents/bindings/amqp-protocol-binding.md``, 1.0.3-wip), mapped onto AMQP 0-9-1 as RabbitMQ speaks it:

- structured (3.2): the whole event as the body, ``content-type: application/cloudevents+json``;
- binary (3.1): ``data`` as the body, the ``content-type`` property = ``datacontenttype`` (3.1.1), every other
  attribute in the message headers (AMQP 1.0 application-properties) named ``cloudEvents_<attr>`` (3.1.3.1:
  ``cloudEvents_`` or ``cloudEvents:``, the ``_`` form preferred for JMS 2.0 compatibility), values in their
  canonical string form (3.1.3.2 allows it; an AMQP 0-9-1 timestamp would lose the milliseconds).

(The knative eventing-rabbitmq binding, which the Python SDK also ships, uses ``ce-`` headers instead; we
follow the CloudEvents spec's own AMQP binding, whose ``from_binary`` in the SDK reads these messages back.)
Every message carries ``message_id`` = the event id and ``delivery_mode`` 2. A message the broker cannot route
(no queue bound for the routing key) comes back and counts as undelivered, so it stays in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError, PublishError
from yarl import URL

from gate.events.envelope import STRUCTURED_CONTENT_TYPE, to_binary
from gate.events.outbox import PendingEvent
from gate.events.sink import SendResult, SinkUnavailable, describe_error
from gate.settings import UsageSettings

__all__ = ["AMQP_ATTRIBUTE_PREFIX", "RabbitMQSink"]

AMQP_ATTRIBUTE_PREFIX = "cloudEvents_"
_ERRORS = (*CONNECTION_EXCEPTIONS, TimeoutError)


class RabbitMQSink:
    """One connection and one confirming channel; on any failure both are dropped and rebuilt on next use."""

    name = "rabbitmq"

    def __init__(self, settings: UsageSettings) -> None:
        self._url = settings.rabbitmq.url.get_secret_value()
        self._secrets = (self._url, URL(self._url).password or "")
        self._exchange_name = settings.destination
        self._routing_key = settings.rabbitmq.routing_key
        self._timeout = settings.rabbitmq.confirm_timeout
        self._binary = settings.content_mode == "binary"
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._connecting = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def connect(self) -> None:
        async with self._connecting:
            if self.connected:
                return
            await self._drop()
            try:
                self._connection = await aio_pika.connect(
                    self._url, timeout=self._timeout, client_properties={"connection_name": "gate-usage"}
                )
                # on_return_raises: an unroutable message fails its publish instead of vanishing.
                self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
                self._exchange = await self._channel.declare_exchange(
                    self._exchange_name, aio_pika.ExchangeType.TOPIC, durable=True, timeout=self._timeout
                )
            except _ERRORS as exc:
                await self._drop()
                raise SinkUnavailable(f"RabbitMQ: {self._describe(exc)}") from None

    async def send(self, events: Sequence[PendingEvent]) -> SendResult:
        try:
            await self.connect()
        except SinkUnavailable as exc:
            return SendResult(error=str(exc))
        exchange = self._exchange
        assert exchange is not None
        outcomes = await asyncio.gather(
            *(
                exchange.publish(self._message(e), self._routing_key, mandatory=True, timeout=self._timeout)
                for e in events
            ),
            return_exceptions=True,
        )
        result = SendResult()
        for event, outcome in zip(events, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if result.error is None:
                    result.error = f"RabbitMQ: {self._describe(outcome)}"
            else:
                result.delivered.append(event.seq)
        if result.error is not None and not self.connected:
            await self._drop()
        return result

    async def close(self) -> None:
        await self._drop()

    def _message(self, event: PendingEvent) -> aio_pika.Message:
        if not self._binary:
            return aio_pika.Message(
                event.body,
                content_type=STRUCTURED_CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=event.event_id,
            )
        binary = to_binary(event.body)
        return aio_pika.Message(
            binary.data,
            headers={f"{AMQP_ATTRIBUTE_PREFIX}{name}": value for name, value in binary.attributes.items()},
            content_type=binary.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event.event_id,
        )

    async def _drop(self) -> None:
        connection, self._connection, self._channel, self._exchange = self._connection, None, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(*_ERRORS):  # the broker is gone already; the socket closes either way
                async with asyncio.timeout(self._timeout):
                    await connection.close()

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"no answer within {self._timeout:g}s"
        if isinstance(exc, PublishError):  # its own text carries the whole message
            return (
                f"message returned unroutable: no queue is bound to exchange {self._exchange_name!r} "
                f"for routing key {self._routing_key!r}"
            )
        if isinstance(exc, DeliveryError):
            return "the broker refused the message (nack)"
        return describe_error(exc, *self._secrets)
