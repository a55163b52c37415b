"""A publishing-only AMQP 0-9-1 client: one connection, one channel in confirm mode, batches in, outcomes out.

Why not a library here (aiormq still reads the usage sink's queue, ``usagesink/sources.py``): on the request
loop the cost per message is the tail a user feels. Measured on one core, per confirmed persistent message
(``benchmarks/micro/amqp_publish.py``): aiormq about 120 us, of which pamqp's marshalling is about 20; the rest
is a task, a lock, a timeout scope, a queue hand-off and a future per message, all run in one loop iteration,
so a batch of 50 events held the request loop for about 6 ms (the c=1 p99 of ``make bench``). pika's asyncio
adapter measured 76 us per message; aio-pika is aiormq plus wrappers. This client writes a whole batch in one
``transport.write`` and settles confirms as a range of delivery tags, with one future per batch.

It writes only what publishing needs, and leaves the codec to pamqp (aiormq's own): every frame is marshalled
and parsed by pamqp except the three that come by the thousand: ``Basic.Publish`` (built once per destination),
the content header of a message whose properties are all strings and octets (``_content_header``: pamqp's
general marshaller took 3.6 of the ~5 us a message costs the loop; it writes pamqp's bytes, which a test
checks for any properties) and ``Basic.Ack`` (a fixed 13-byte layout read in place). Supported: ``amqp://``
and ``amqps://`` URLs (user, password, host, port, vhost; query ``heartbeat`` in seconds), PLAIN
authentication, heartbeats, publisher confirms (ack, nack, multiple), ``mandatory`` returns,
``connection.blocked``, and a broker closing the channel or the connection (every message still unconfirmed
fails with the broker's reply code and text).

Limits, as everywhere in Gate's own protocol code: a frame from the broker over the negotiated ``frame_max``
(or a malformed one) ends the connection; a connection silent for two heartbeat intervals is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import ssl
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar, cast
from urllib.parse import parse_qs, unquote, urlsplit

from pamqp import commands as spec
from pamqp import frame as amqp_frame
from pamqp import header as amqp_header
from pamqp import heartbeat as amqp_heartbeat
from pamqp.body import ContentBody
from pamqp.exceptions import PAMQPException

__all__ = ["ACK", "NACK", "RETURNED", "AmqpClosed", "AmqpPublisher", "Outcome"]

ACK = "ack"
NACK = "nack"
RETURNED = "returned"  # mandatory and unroutable: the broker gave it back (then acked it)
Outcome = str | BaseException  # ACK, NACK, RETURNED, or why it is unknown (the connection ended, no answer)

_CHANNEL = 1
_FRAME_END = 0xCE
_HEADER = struct.Struct(">BHI")  # frame type, channel, payload size
_ACK_PREFIX = b"\x01\x00\x01\x00\x00\x00\x0d\x00\x3c\x00\x50"  # method frame, channel 1, 13 bytes, Basic.Ack
_ACK = struct.Struct(">QB")  # delivery tag, flags (bit 0: multiple)
_FRAME_MIN = 4096  # the spec's lower bound for frame_max: every broker must accept frames this large
_FRAME_MAX = 131072  # what Gate asks for (RabbitMQ's default); a broker may offer less
_HEARTBEAT_FRAME = amqp_frame.marshal(amqp_heartbeat.Heartbeat(), 0)
_CONTENT_HEADER = struct.Struct(">BHIHHQH")  # frame header, class 60, weight 0, body size, property flags
# Basic.Properties in wire order with their flag bits; the encodings a content header fast path can write.
_SHORTSTR, _OCTET = 1, 2
_PROPERTY_LAYOUT = tuple(
    (flag, {"shortstr": _SHORTSTR, "octet": _OCTET}.get(spec.Basic.Properties.amqp_type(name), 0))
    for name, flag in spec.Basic.Properties.flags.items()
)
_PROPERTY_VALUES = operator.attrgetter(*spec.Basic.Properties.flags)
_R = TypeVar("_R")


def _content_header(body_size: int, properties: spec.Basic.Properties) -> bytes:
    """The content header frame on ``_CHANNEL``: pamqp's bytes, written here when every property set is a short
    string or an octet that fits (Gate's messages: content type, delivery mode, message id), else by pamqp."""
    flags = 0
    parts: list[bytes] = []
    for (flag, kind), value in zip(_PROPERTY_LAYOUT, _PROPERTY_VALUES(properties), strict=True):
        if value is None or value == "":  # pamqp leaves both out
            continue
        if kind == _SHORTSTR and type(value) is str:
            encoded = value.encode()
            if len(encoded) > 255:
                break
            parts.append(bytes((len(encoded),)))
            parts.append(encoded)
        elif kind == _OCTET and type(value) is int and 0 <= value <= 255:
            parts.append(bytes((value,)))
        else:
            break
        flags |= flag
    else:
        payload = b"".join(parts)
        return (
            _CONTENT_HEADER.pack(2, _CHANNEL, 14 + len(payload), spec.Basic.frame_id, 0, body_size, flags)
            + payload
            + b"\xce"
        )
    return amqp_frame.marshal(amqp_header.ContentHeader(0, body_size, properties), _CHANNEL)


class AmqpClosed(Exception):
    """The broker closed the channel or the connection (``code``, ``reply``), or the connection ended."""

    def __init__(self, message: str, *, scope: str = "connection", code: int | None = None, reply: str = "") -> None:
        super().__init__(message)
        self.scope, self.code, self.reply = scope, code, reply


@dataclass(slots=True)
class _Batch:
    outcomes: list[Outcome | None]
    remaining: int
    done: asyncio.Future[None]

    def settle(self, index: int, outcome: Outcome) -> None:
        if self.outcomes[index] is None:
            self.outcomes[index] = outcome
            self.remaining -= 1
            if not self.remaining and not self.done.done():
                self.done.set_result(None)


@dataclass(slots=True)
class _Pending:
    batch: _Batch
    index: int
    message_id: str | None
    returned: bool = False


@dataclass(slots=True)
class _Return:
    """A ``Basic.Return`` being read: its content header names the message, then its body is skipped."""

    message_id: str | None = None
    header_seen: bool = False
    body_left: int = 0


@dataclass
class _Target:
    user: str
    password: str
    host: str
    port: int
    vhost: str
    tls: bool
    heartbeat: int | None = None


def _target(url: str) -> _Target:
    parts = urlsplit(url)
    tls = parts.scheme == "amqps"
    heartbeat = parse_qs(parts.query).get("heartbeat", [""])[-1]
    path = parts.path
    return _Target(
        user=unquote(parts.username or "guest"),
        password=unquote(parts.password or "guest"),
        host=parts.hostname or "localhost",
        port=parts.port or (5671 if tls else 5672),
        vhost=unquote(path[1:]) if len(path) > 1 else "/",
        tls=tls,
        heartbeat=int(heartbeat) if heartbeat.isdigit() else None,
    )


class AmqpPublisher(asyncio.Protocol):
    """Open with :meth:`open`; :meth:`publish` a batch and read each message's outcome; :meth:`close`."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._frame_max = _FRAME_MAX  # until Tune says otherwise, frames this large are accepted
        self._waiter: asyncio.Future[object] | None = None  # the reply to the RPC in flight (setup and close)
        self._closed_by: AmqpClosed | None = None  # why publishing stopped (first reason wins)
        self._closing = False  # Connection.Close sent or received
        self._lost = self._loop.create_future()  # done when the connection has ended, one way or another
        self._next_tag = 1
        self._low = 1  # every tag below this is settled
        self._pending: dict[int, _Pending] = {}
        self._tags_by_id: dict[str, int] = {}
        self._return: _Return | None = None
        self._publish_frames: dict[tuple[str, str, bool], bytes] = {}
        self._heartbeat = 0
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._last_read = time.monotonic()
        self.blocked: str | None = None  # the broker's reason while it blocks publishers (low on memory or disk)

    # ---------------------------------------------------------------------------------------------- opening

    @classmethod
    async def open(cls, url: str, *, connection_name: str) -> AmqpPublisher:
        """Connect, authenticate, open channel 1 in confirm mode. The caller bounds the time (asyncio.timeout)."""
        target = _target(url)
        loop = asyncio.get_running_loop()
        context = ssl.create_default_context() if target.tls else None
        _, self = await loop.create_connection(
            cls, target.host, target.port, ssl=context, server_hostname=target.host if context else None
        )
        try:
            await self._handshake(target, connection_name)
        except BaseException:
            self.abort()
            raise
        return self

    async def _handshake(self, target: _Target, connection_name: str) -> None:
        assert self._transport is not None
        start = await self._expect(spec.Connection.Start, amqp_frame.marshal(amqp_header.ProtocolHeader(), 0))
        mechanisms = start.mechanisms.split() if isinstance(start.mechanisms, str) else []
        if "PLAIN" not in mechanisms:
            raise AmqpClosed(f"the broker does not offer PLAIN authentication (it offers {start.mechanisms!r})")
        tune = await self._expect(
            spec.Connection.Tune,
            self._method(
                0,
                spec.Connection.StartOk(
                    client_properties={
                        "product": "gate",
                        "connection_name": connection_name,
                        "capabilities": {
                            "publisher_confirms": True,
                            "basic.nack": True,
                            "connection.blocked": True,
                            "authentication_failure_close": True,
                        },
                    },
                    mechanism="PLAIN",
                    response=f"\0{target.user}\0{target.password}",
                    locale="en_US",
                ),
            ),
        )
        self._frame_max = min(tune.frame_max or _FRAME_MAX, _FRAME_MAX)
        if self._frame_max < _FRAME_MIN:
            raise AmqpClosed(f"the broker offers frame_max {tune.frame_max}, below AMQP's minimum {_FRAME_MIN}")
        self._heartbeat = tune.heartbeat if target.heartbeat is None else target.heartbeat
        tune_ok = self._method(
            0,
            spec.Connection.TuneOk(channel_max=tune.channel_max, frame_max=self._frame_max, heartbeat=self._heartbeat),
        )
        await self._expect(spec.Connection.OpenOk, tune_ok + self._method(0, spec.Connection.Open(target.vhost)))
        if self._heartbeat:
            self._heartbeat_timer = self._loop.call_later(self._heartbeat / 2, self._beat)
        await self._expect(spec.Channel.OpenOk, self._method(_CHANNEL, spec.Channel.Open()))
        await self._expect(spec.Confirm.SelectOk, self._method(_CHANNEL, spec.Confirm.Select()))

    async def declare_exchange(self, name: str, exchange_type: str, *, durable: bool) -> None:
        await self._expect(
            spec.Exchange.DeclareOk,
            self._method(_CHANNEL, spec.Exchange.Declare(exchange=name, exchange_type=exchange_type, durable=durable)),
        )

    async def _expect(self, reply: type[_R], request: bytes) -> _R:
        """Write ``request`` and wait for the next synchronous method: ``reply``, or the connection's end."""
        self._check_open()
        assert self._transport is not None and self._waiter is None
        waiter = self._waiter = self._loop.create_future()
        self._transport.write(request)
        try:
            await asyncio.wait({waiter, self._lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiter = None
        value = waiter.result() if waiter.done() else None
        if isinstance(value, reply):
            return value
        waiter.cancel()
        self._check_open()  # the broker closed the connection or channel instead (bad credentials, no such vhost)
        self.abort()
        raise AmqpClosed(f"the broker answered {type(value).__name__} where {reply.__name__} was due")

    # ------------------------------------------------------------------------------------------- publishing

    @property
    def is_closed(self) -> bool:
        """Nothing more can be published here (the connection, or only the channel, is closed)."""
        return self._lost.done() or self._closed_by is not None

    @property
    def frame_max(self) -> int:
        return self._frame_max

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        messages: Sequence[tuple[bytes, spec.Basic.Properties]],
        *,
        mandatory: bool = True,
        within: float,
    ) -> list[Outcome]:
        """Send every message (one write) and wait up to ``within`` seconds for the broker's word on each.

        Raises ValueError before anything is sent when a message cannot be encoded; a message whose outcome is
        unknown at the end gets the reason (AmqpClosed, or TimeoutError when the broker said nothing in time).
        """
        self._check_open()
        assert self._transport is not None
        key = (exchange, routing_key, mandatory)
        method = self._publish_frames.get(key)
        if method is None:
            method = self._method(
                _CHANNEL, spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
            )
            self._publish_frames[key] = method
        chunks: list[bytes] = []
        for body, properties in messages:
            chunks.append(method)
            chunks.append(_content_header(len(body), properties))
            step = self._frame_max - 8
            for offset in range(0, len(body), step):
                piece = body[offset : offset + step]
                chunks.append(_HEADER.pack(3, _CHANNEL, len(piece)))
                chunks.append(piece)
                chunks.append(b"\xce")
        if not messages:
            return []
        batch = _Batch([None] * len(messages), len(messages), self._loop.create_future())
        for index, (_, properties) in enumerate(messages):
            tag = self._next_tag
            self._next_tag += 1
            message_id = properties.message_id
            self._pending[tag] = _Pending(batch, index, message_id)
            if message_id:
                self._tags_by_id[message_id] = tag
        self._transport.write(b"".join(chunks))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await batch.done
        outcomes: list[Outcome] = []
        for outcome in batch.outcomes:
            outcomes.append(TimeoutError() if outcome is None else outcome)
        if batch.remaining:
            self._forget(batch)
        return outcomes

    def _forget(self, batch: _Batch) -> None:
        """Stop tracking a batch whose wait is over: a confirm that comes later changes nothing."""
        for tag in [tag for tag, pending in self._pending.items() if pending.batch is batch]:
            self._drop_pending(tag)

    # -------------------------------------------------------------------------------------------- closing

    async def close(self) -> None:
        """Close politely (Connection.Close, then wait for the broker's CloseOk); the caller bounds the time.

        Also after the broker closed the channel: the connection under it is still open until this."""
        try:
            if not self._lost.done() and not self._closing:
                self._end(AmqpClosed("the connection was closed"))
                self._closing = True
                self._write(self._method(0, spec.Connection.Close(200, "Normal shutdown", 0, 0)))
                await asyncio.wait({self._lost})  # CloseOk closes the transport; asyncio.wait never cancels it
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the connection now; every unconfirmed message fails."""
        if self._transport is not None:
            self._transport.abort()
        self._gone(AmqpClosed("the connection was closed"))

    def _gone(self, reason: AmqpClosed) -> None:
        """The connection has ended (aborted here, or lost): fail what is unconfirmed, stop the heartbeats."""
        self._end(reason)
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
            self._heartbeat_timer = None
        if not self._lost.done():
            self._lost.set_result(None)

    def _check_open(self) -> None:
        if self._closed_by is not None:
            raise self._closed_by
        if self._lost.done():
            raise AmqpClosed("the connection was lost")

    def _end(self, reason: AmqpClosed) -> None:
        """Fail every unconfirmed message with ``reason``; nothing is published on this connection after this."""
        if self._closed_by is None:
            self._closed_by = reason
        for tag in list(self._pending):
            pending = self._pending[tag]
            self._drop_pending(tag)
            pending.batch.settle(pending.index, self._closed_by)

    # -------------------------------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone(AmqpClosed(f"the connection was lost ({exc or 'closed by the broker'})"))

    def data_received(self, data: bytes) -> None:
        self._last_read = time.monotonic()
        buffer = self._buffer
        buffer += data
        size = len(buffer)
        position = 0
        try:
            while size - position >= 8:
                if buffer[position : position + 11] == _ACK_PREFIX and size - position >= 21:
                    if buffer[position + 20] != _FRAME_END:
                        raise AmqpClosed("a malformed frame from the broker (no frame end)")
                    tag, flags = _ACK.unpack_from(buffer, position + 11)
                    self._on_ack(tag, bool(flags & 1), ACK)
                    position += 21
                    continue
                if buffer[position : position + 4] == b"AMQP":
                    raise AmqpClosed("the broker does not speak AMQP 0-9-1 (it answered with its protocol header)")
                _, _, length = _HEADER.unpack_from(buffer, position)
                if length > self._frame_max - 8:
                    raise AmqpClosed(f"a {length}-byte frame from the broker, over frame_max {self._frame_max}")
                end = position + 8 + length
                if size < end:
                    break
                if buffer[end - 1] != _FRAME_END:
                    raise AmqpClosed("a malformed frame from the broker (no frame end)")
                _, _, value = amqp_frame.unmarshal(bytes(buffer[position:end]))
                position = end
                self._on_frame(value)
        except (AmqpClosed, PAMQPException, ValueError, struct.error) as exc:
            self._end(exc if isinstance(exc, AmqpClosed) else AmqpClosed(f"a malformed frame from the broker ({exc})"))
            self.abort()
            return
        del buffer[:position]

    def _on_frame(self, value: object) -> None:
        if isinstance(value, amqp_heartbeat.Heartbeat):
            return
        if isinstance(value, spec.Basic.Ack | spec.Basic.Nack):
            self._on_ack(value.delivery_tag, value.multiple, ACK if isinstance(value, spec.Basic.Ack) else NACK)
        elif isinstance(value, spec.Basic.Return):
            self._return = _Return()
        elif isinstance(value, amqp_header.ContentHeader):
            if self._return is not None and not self._return.header_seen:
                self._return.header_seen = True
                self._return.message_id = value.properties.message_id
                self._return.body_left = value.body_size
                self._returned()
        elif isinstance(value, ContentBody):
            if self._return is not None:
                self._return.body_left -= len(value.value)
                self._returned()
        elif isinstance(value, spec.Channel.Close):
            self._write(self._method(_CHANNEL, spec.Channel.CloseOk()))
            self._end(self._closed("channel", value.reply_code, value.reply_text))
            self._reply(value)
        elif isinstance(value, spec.Connection.Close):
            self._write(self._method(0, spec.Connection.CloseOk()))
            self._closing = True
            self._end(self._closed("connection", value.reply_code, value.reply_text))
            self._reply(value)
            if self._transport is not None:
                self._transport.close()
        elif isinstance(value, spec.Connection.Blocked):
            self.blocked = value.reason or "blocked"
        elif isinstance(value, spec.Connection.Unblocked):
            self.blocked = None
        elif isinstance(value, spec.Connection.CloseOk):
            self._end(AmqpClosed("the connection was closed"))
            if self._transport is not None:
                self._transport.close()
        else:
            self._reply(value)

    def _returned(self) -> None:
        returned = self._return
        assert returned is not None
        if returned.header_seen and returned.body_left <= 0:
            self._return = None
            tag = self._tags_by_id.get(returned.message_id or "")
            if tag is not None and tag in self._pending:
                self._pending[tag].returned = True

    def _on_ack(self, tag: int, multiple: bool, outcome: str) -> None:
        if multiple:
            for each in range(self._low, min(tag, self._next_tag - 1) + 1):
                self._settle(each, outcome)
            self._low = max(self._low, tag + 1)
        else:
            self._settle(tag, outcome)
            while self._low < self._next_tag and self._low not in self._pending:
                self._low += 1

    def _settle(self, tag: int, outcome: str) -> None:
        pending = self._drop_pending(tag)
        if pending is not None:
            pending.batch.settle(pending.index, RETURNED if pending.returned and outcome == ACK else outcome)

    def _drop_pending(self, tag: int) -> _Pending | None:
        pending = self._pending.pop(tag, None)
        if pending is not None and pending.message_id and self._tags_by_id.get(pending.message_id) == tag:
            del self._tags_by_id[pending.message_id]
        return pending

    def _reply(self, value: object) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    @staticmethod
    def _closed(scope: str, code: int | None, reply: str) -> AmqpClosed:
        return AmqpClosed(f"the broker closed the {scope}: {code} {reply}", scope=scope, code=code, reply=reply)

    # ------------------------------------------------------------------------------------------------ wire

    def _beat(self) -> None:
        """Every half heartbeat interval: send one; abort a connection silent for two intervals."""
        if self._lost.done():
            return
        if time.monotonic() - self._last_read > 2 * self._heartbeat:
            self._end(AmqpClosed(f"the broker sent nothing for {2 * self._heartbeat} s (heartbeats missed)"))
            self.abort()
            return
        self._write(_HEARTBEAT_FRAME)
        self._heartbeat_timer = self._loop.call_later(self._heartbeat / 2, self._beat)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    @staticmethod
    def _method(channel: int, method: object) -> bytes:
        return amqp_frame.marshal(method, channel)  # type: ignore[arg-type]
