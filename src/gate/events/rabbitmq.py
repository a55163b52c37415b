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

Refused, not an outage (retrying would fail the same way): a message whose properties cannot be encoded or do
not fit one frame (``frame_max``, 128 KB by default: in binary mode every attribute is a header; checked here
before sending, since the broker answers it by closing the whole connection with ``FRAME_ERROR``), and a
message the broker closes the channel or connection over for its own sake (``FRAME_ERROR``; 406 "message size
... larger than configured max size"). Such a close fails every message still waiting for its confirm: the
publisher tries each alone to find the one at fault.

The client is aiormq, the protocol layer under aio-pika (same maintainers): measured per confirmed message on
one core (``benchmarks/micro/amqp_publish.py``), aio-pika's Exchange/Message wrappers added about half again to
aiormq's own cost, and nothing here needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import cast

import aiormq
import pamqp.exceptions
from aiormq.abc import AbstractChannel, AbstractConnection, ConfirmationFrameType
from aiormq.exceptions import AMQPError, ChannelPreconditionFailed, ConnectionFrameError, DeliveryError, PublishError
from pamqp import commands as spec
from pamqp import frame as amqp_frame
from pamqp import header as amqp_header
from yarl import URL

from gate.events.envelope import STRUCTURED_CONTENT_TYPE, to_binary
from gate.events.outbox import PendingEvent
from gate.events.sink import SendResult, SinkUnavailable, describe_error
from gate.settings import ConfigError, UsageSettings, amqp_url_problem

__all__ = ["AMQP_ATTRIBUTE_PREFIX", "RabbitMQSink"]

AMQP_ATTRIBUTE_PREFIX = "cloudEvents_"
# What a lost or refusing broker raises (aio-pika's CONNECTION_EXCEPTIONS), and a confirm that never came.
_ERRORS = (
    AMQPError,
    ConnectionError,
    OSError,
    RuntimeError,
    StopAsyncIteration,
    pamqp.exceptions.PAMQPException,
    TimeoutError,
)
_PERSISTENT = 2
_FRAME_OVERHEAD = 1024  # a header frame is at most this much bigger than the attributes it carries
_TOO_LARGE = "larger than configured max size"  # RabbitMQ's 406 text for a message over max_message_size


class RabbitMQSink:
    """One connection and one confirming channel; on any failure both are dropped and rebuilt on next use."""

    name = "rabbitmq"

    def __init__(self, settings: UsageSettings) -> None:
        self._url = settings.rabbitmq.url.get_secret_value()
        problem = amqp_url_problem(self._url)
        if problem:  # aiormq would raise ValueError on every reconnect, a traceback per retry
            raise ConfigError(f"usage.rabbitmq.url: {problem}")
        self._secrets = (self._url, URL(self._url).password or "")
        self._exchange_name = settings.destination
        self._routing_key = settings.rabbitmq.routing_key
        self._timeout = settings.rabbitmq.confirm_timeout
        self._binary = settings.content_mode == "binary"
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
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
                async with asyncio.timeout(self._timeout):
                    self._connection = await aiormq.connect(
                        self._url, client_properties={"connection_name": "gate-usage"}
                    )
                    # on_return_raises: an unroutable message fails its publish instead of vanishing.
                    self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
                    await self._channel.exchange_declare(self._exchange_name, exchange_type="topic", durable=True)
            except _ERRORS as exc:
                await self._drop()
                raise SinkUnavailable(f"RabbitMQ: {self._describe(exc)}") from None

    async def send(self, events: Sequence[PendingEvent]) -> SendResult:
        try:
            await self.connect()
        except SinkUnavailable as exc:
            return SendResult(error=str(exc))
        channel = cast(aiormq.Channel, self._channel)  # basic_publish(wait=...) is on the concrete class
        assert channel is not None
        result = SendResult()
        publishes: list[tuple[PendingEvent, asyncio.Future[ConfirmationFrameType | None]]] = []
        for event in events:
            try:
                body, properties = self._message(event)
            except (ValueError, TypeError, pamqp.exceptions.PAMQPException) as exc:
                result.refuse(event.seq, f"RabbitMQ: cannot encode the message: {describe_error(exc)}")
                continue
            confirm = channel.basic_publish(
                body,
                exchange=self._exchange_name,
                routing_key=self._routing_key,
                properties=properties,
                mandatory=True,
                wait=False,  # the confirm is what counts; waiting for each frame's drain adds nothing
            )
            publishes.append((event, asyncio.ensure_future(confirm)))
        if publishes:
            # One deadline for the whole batch's confirms (not a timer per message).
            _, late = await asyncio.wait([publish for _, publish in publishes], timeout=self._timeout)
            for publish in late:
                publish.cancel()
            if late:
                await asyncio.wait(late)  # let the cancellations land before reading outcomes
        for event, publish in publishes:
            if publish.cancelled():
                error: str | None = self._describe(TimeoutError())
            elif (failure := publish.exception()) is not None:
                if _is_refusal(failure):
                    result.refuse(event.seq, f"RabbitMQ: {self._describe(failure)}")
                    continue
                error = self._describe(failure)
            elif not isinstance(publish.result(), spec.Basic.Ack):
                error = "the broker refused the message (nack)"
            else:
                result.delivered.append(event.seq)
                continue
            if result.error is None:
                result.error = f"RabbitMQ: {error}"
        if (result.error is not None or result.refused) and not self.connected:
            await self._drop()
        return result

    async def close(self) -> None:
        await self._drop()

    def _message(self, event: PendingEvent) -> tuple[bytes, spec.Basic.Properties]:
        """The body and properties, or ValueError/TypeError when they cannot be sent (nothing was sent)."""
        if not self._binary:
            return event.body, spec.Basic.Properties(
                content_type=STRUCTURED_CONTENT_TYPE, delivery_mode=_PERSISTENT, message_id=event.event_id
            )
        binary = to_binary(event.body)
        properties = spec.Basic.Properties(
            headers={f"{AMQP_ATTRIBUTE_PREFIX}{name}": value for name, value in binary.attributes.items()},
            content_type=binary.content_type,
            delivery_mode=_PERSISTENT,
            message_id=event.event_id,
        )
        # The headers come from the event, so only an event near frame_max can make a header frame over it;
        # the broker would close the connection (every unconfirmed message with it) rather than refuse one.
        frame_max = self._frame_max()
        if frame_max and len(event.body) + _FRAME_OVERHEAD > frame_max:
            size = len(amqp_frame.marshal(amqp_header.ContentHeader(0, len(binary.data), properties), 1))
            if size > frame_max:
                raise ValueError(
                    f"its attributes make a {size}-byte AMQP header frame, over the broker's frame_max {frame_max}"
                )
        return binary.data, properties

    def _frame_max(self) -> int:
        tune = getattr(self._connection, "connection_tune", None)
        return int(getattr(tune, "frame_max", 0) or 0)

    async def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(*_ERRORS):  # the broker is gone already; the socket closes either way
                async with asyncio.timeout(self._timeout):
                    await connection.close()

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, ConnectionFrameError | ChannelPreconditionFailed):
            return f"the broker closed the {'connection' if isinstance(exc, ConnectionFrameError) else 'channel'}: " + (
                describe_error(exc, *self._secrets)
            )
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


def _is_refusal(exc: BaseException) -> bool:
    """The broker closed the connection or channel over a message itself, or it could not be encoded."""
    if isinstance(exc, ConnectionFrameError):  # a frame the broker cannot take: frame_too_large, for one
        return True
    if isinstance(exc, ChannelPreconditionFailed):
        return _TOO_LARGE in str(exc)
    return isinstance(exc, ValueError | TypeError)  # pamqp could not encode it
