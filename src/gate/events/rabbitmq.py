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

The client is ``events/amqp.py``, a publishing-only AMQP 0-9-1 client on pamqp's codec: it writes a batch in
one write and settles confirms as a range (its docstring says why aiormq, which cost ~120 us per message on the
request loop, is not used here).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import pamqp.exceptions
from pamqp import commands as spec
from pamqp import frame as amqp_frame
from pamqp import header as amqp_header
from yarl import URL

from gate.events.amqp import ACK, NACK, RETURNED, AmqpClosed, AmqpPublisher
from gate.events.envelope import STRUCTURED_CONTENT_TYPE, to_binary
from gate.events.outbox import PendingEvent
from gate.events.sink import SendResult, SinkUnavailable, describe_error
from gate.settings import ConfigError, UsageSettings, amqp_url_problem

__all__ = ["AMQP_ATTRIBUTE_PREFIX", "RabbitMQSink"]

AMQP_ATTRIBUTE_PREFIX = "cloudEvents_"
# What a lost or refusing broker raises (OSError covers refused connections and TLS), and a confirm that never came.
_ERRORS = (AmqpClosed, OSError, pamqp.exceptions.PAMQPException, TimeoutError)
_PERSISTENT = 2
_FRAME_OVERHEAD = 1024  # a header frame is at most this much bigger than the attributes it carries
_TOO_LARGE = "larger than configured max size"  # RabbitMQ's 406 text for a message over max_message_size
_FRAME_ERROR = 501  # the connection close a frame the broker cannot take earns
_PRECONDITION_FAILED = 406


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
        self._client: AmqpPublisher | None = None
        self._connecting = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._client is not None and not self._client.is_closed

    async def connect(self) -> None:
        async with self._connecting:
            if self.connected:
                return
            await self._drop()
            try:
                async with asyncio.timeout(self._timeout):
                    self._client = await AmqpPublisher.open(self._url, connection_name="gate-usage")
                    await self._client.declare_exchange(self._exchange_name, "topic", durable=True)
            except _ERRORS as exc:
                await self._drop()
                raise SinkUnavailable(f"RabbitMQ: {self._describe(exc)}") from None

    async def send(self, events: Sequence[PendingEvent]) -> SendResult:
        try:
            await self.connect()
        except SinkUnavailable as exc:
            return SendResult(error=str(exc))
        client = self._client
        assert client is not None
        result = SendResult()
        sending: list[PendingEvent] = []
        messages: list[tuple[bytes, spec.Basic.Properties]] = []
        for event in events:
            try:
                messages.append(self._message(event))
            except (ValueError, TypeError, pamqp.exceptions.PAMQPException) as exc:
                result.refuse(event.seq, f"RabbitMQ: cannot encode the message: {describe_error(exc)}")
                continue
            sending.append(event)
        try:
            # mandatory: an unroutable message comes back instead of vanishing. One deadline for the whole batch.
            outcomes = await client.publish(self._exchange_name, self._routing_key, messages, within=self._timeout)
        except (ValueError, TypeError, pamqp.exceptions.PAMQPException) as exc:  # nothing was sent
            for event in sending:
                result.refuse(event.seq, f"RabbitMQ: cannot encode the message: {describe_error(exc)}")
            return result
        except _ERRORS as exc:  # the connection ended before the batch went
            outcomes = [exc] * len(sending)
        for event, outcome in zip(sending, outcomes, strict=True):
            if outcome == ACK:
                result.delivered.append(event.seq)
                continue
            if isinstance(outcome, BaseException) and _is_refusal(outcome):
                result.refuse(event.seq, f"RabbitMQ: {self._describe(outcome)}")
                continue
            if result.error is None:
                result.error = f"RabbitMQ: {self._outcome(outcome)}"
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
        return 0 if self._client is None else self._client.frame_max

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*_ERRORS):  # the broker is gone already; the socket closes either way
                async with asyncio.timeout(self._timeout):
                    await client.close()  # aborts the connection at the end, in time or not

    def _outcome(self, outcome: object) -> str:
        if outcome == RETURNED:
            return (
                f"message returned unroutable: no queue is bound to exchange {self._exchange_name!r} "
                f"for routing key {self._routing_key!r}"
            )
        if outcome == NACK:
            return "the broker refused the message (nack)"
        assert isinstance(outcome, BaseException)
        return self._describe(outcome)

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            blocked = self._client.blocked if self._client is not None else None
            return f"no answer within {self._timeout:g}s" + (
                f" (the broker blocks publishers: {blocked})" if blocked else ""
            )
        return describe_error(exc, *self._secrets)


def _is_refusal(exc: BaseException) -> bool:
    """The broker closed the connection or channel over a message itself (a frame it cannot take, a message
    over its max size), so retrying the same batch would fail the same way."""
    if not isinstance(exc, AmqpClosed):
        return False
    if exc.scope == "connection":
        return exc.code == _FRAME_ERROR
    return exc.code == _PRECONDITION_FAILED and _TOO_LARGE in exc.reply
