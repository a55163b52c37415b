"""Gate's publishing AMQP client (``gate.events.amqp``): its frame reader under any split and any bytes, confirms
in every shape the spec allows, and brokers that misbehave (scripted over real sockets) or refuse (the real one).

The whole path through the real RabbitMQ (structured, binary, unroutable, outages, a connection closed over one
message) is in ``test_sinks.py``, ``test_chaos.py`` and ``test_oversized_e2e.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp import frame as amqp_frame
from pamqp import header as amqp_header
from pamqp.body import ContentBody
from pamqp.heartbeat import Heartbeat

from gate.events.amqp import ACK, NACK, RETURNED, AmqpClosed, AmqpPublisher, Outcome, _content_header
from tests.brokers import RABBITMQ_URL


class FakeTransport:
    """What the protocol writes, and whether it was closed."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.aborted = self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.aborted or self.closed

    def frames(self) -> list[object]:
        values: list[object] = []
        data = bytes(self.written)
        while data:
            used, _, value = amqp_frame.unmarshal(data)
            values.append(value)
            data = data[used:]
        return values


def method(value: object, channel: int = 1) -> bytes:
    return amqp_frame.marshal(value, channel)  # type: ignore[arg-type]


def returned(message_id: str, body: bytes) -> bytes:
    """A Basic.Return as RabbitMQ sends it: method, content header, body (here in two frames)."""
    properties = spec.Basic.Properties(message_id=message_id, delivery_mode=2)
    half = len(body) // 2
    return (
        method(spec.Basic.Return(312, "NO_ROUTE", "gate.usage", "usage"))
        + method(amqp_header.ContentHeader(0, len(body), properties))
        + method(ContentBody(body[:half]))
        + method(ContentBody(body[half:]))
    )


def ready_publisher() -> tuple[AmqpPublisher, FakeTransport]:
    """A publisher past its handshake (channel 1 in confirm mode), writing to a FakeTransport."""
    publisher = AmqpPublisher()
    transport = FakeTransport()
    publisher.connection_made(transport)  # type: ignore[arg-type]
    return publisher, transport


def messages(count: int) -> list[tuple[bytes, spec.Basic.Properties]]:
    return [
        (f"event {n}".encode() * 10, spec.Basic.Properties(message_id=f"id-{n}", delivery_mode=2)) for n in range(count)
    ]


async def publish_and_answer(count: int, answer: bytes, splits: list[int], within: float = 5.0) -> list[Outcome]:
    publisher, _ = ready_publisher()
    sending = asyncio.create_task(publisher.publish("gate.usage", "usage", messages(count), within=within))
    await asyncio.sleep(0)  # the batch is written and its tags taken
    cuts = sorted({min(cut, len(answer)) for cut in splits} | {0, len(answer)})
    for start, end in itertools.pairwise(cuts):
        publisher.data_received(answer[start:end])
    return await sending


# --------------------------------------------------------------------------------------------- the frame reader


@st.composite
def confirm_streams(draw: st.DrawFn) -> tuple[int, bytes, list[Outcome]]:
    """A batch's confirms as a broker may send them: in order, single or multiple, acks and nacks, with a return
    (which comes before its ack) for any message, and heartbeats between; with the outcome each must give."""
    count = draw(st.integers(1, 12))
    expected: list[Outcome] = []
    stream = b""
    tag = 0
    while tag < count:
        upto = draw(st.integers(tag + 1, count))
        kind = draw(st.sampled_from([ACK, ACK, NACK]))
        multiple = upto > tag + 1 or draw(st.booleans())
        for each in range(tag, upto if multiple else tag + 1):
            outcome: Outcome = kind
            if kind == ACK and draw(st.integers(0, 4)) == 0:
                stream += returned(f"id-{each}", f"event {each}".encode() * 10)
                outcome = RETURNED
            expected.append(outcome)
        last = upto if multiple else tag + 1
        if draw(st.booleans()):
            stream += amqp_frame.marshal(Heartbeat(), 0)
        reply = spec.Basic.Ack if kind == ACK else spec.Basic.Nack
        stream += method(reply(delivery_tag=last, multiple=multiple))
        tag = last
    return count, stream, expected


@settings(max_examples=200, deadline=None)
@given(confirm_streams(), st.lists(st.integers(0, 4000), max_size=30))
def test_confirms_give_each_message_its_outcome_however_the_bytes_are_split(
    case: tuple[int, bytes, list[Outcome]], splits: list[int]
) -> None:
    count, stream, expected = case
    assert asyncio.run(publish_and_answer(count, stream, splits)) == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=10))
def test_any_bytes_from_the_broker_end_in_outcomes_or_a_closed_connection_never_an_exception(
    garbage: bytes, splits: list[int]
) -> None:
    async def run() -> None:
        outcomes = await publish_and_answer(3, garbage, splits, within=0.01)
        for outcome in outcomes:
            assert outcome in (ACK, NACK, RETURNED) or isinstance(outcome, AmqpClosed | TimeoutError)

    asyncio.run(run())


async def test_a_frame_over_frame_max_ends_the_connection_without_buffering_it() -> None:
    publisher, transport = ready_publisher()
    sending = asyncio.create_task(publisher.publish("gate.usage", "usage", messages(2), within=5))
    await asyncio.sleep(0)
    publisher.data_received(struct.pack(">BHI", 3, 1, 64 * 1024 * 1024) + b"x" * 100)  # claims 64 MB
    outcomes = await sending
    assert all(isinstance(outcome, AmqpClosed) and "over frame_max" in str(outcome) for outcome in outcomes)
    assert transport.aborted and publisher.is_closed
    assert len(publisher._buffer) < 200  # nothing kept waiting for the rest of the 64 MB


async def test_a_frame_without_its_end_byte_ends_the_connection() -> None:
    ack = bytearray(method(spec.Basic.Ack(delivery_tag=1)))
    ack[-1] = 0x00
    outcomes = await publish_and_answer(1, bytes(ack), [])
    assert isinstance(outcomes[0], AmqpClosed) and "no frame end" in str(outcomes[0])


async def test_a_broker_closing_the_connection_fails_every_unconfirmed_message_with_its_reply() -> None:
    publisher, transport = ready_publisher()
    sending = asyncio.create_task(publisher.publish("gate.usage", "usage", messages(3), within=5))
    await asyncio.sleep(0)
    publisher.data_received(method(spec.Basic.Ack(delivery_tag=1)))
    publisher.data_received(method(spec.Connection.Close(501, "FRAME_ERROR - frame_too_large", 60, 40), 0))
    outcomes = await sending
    assert outcomes[0] == ACK
    for outcome in outcomes[1:]:
        assert isinstance(outcome, AmqpClosed)
        assert (outcome.scope, outcome.code) == ("connection", 501) and "FRAME_ERROR" in outcome.reply
    assert isinstance(transport.frames()[-1], spec.Connection.CloseOk) and transport.closed


async def test_a_broker_closing_the_channel_fails_the_rest_and_close_still_closes_the_connection() -> None:
    publisher, transport = ready_publisher()
    sending = asyncio.create_task(publisher.publish("gate.usage", "usage", messages(2), within=5))
    await asyncio.sleep(0)
    publisher.data_received(
        method(spec.Channel.Close(406, "PRECONDITION_FAILED - larger than configured max size", 60, 40))
    )
    outcomes = await sending
    assert all(isinstance(o, AmqpClosed) and (o.scope, o.code) == ("channel", 406) for o in outcomes)
    assert isinstance(transport.frames()[-1], spec.Channel.CloseOk)
    assert publisher.is_closed
    closing = asyncio.create_task(publisher.close())
    await asyncio.sleep(0)
    assert isinstance(transport.frames()[-1], spec.Connection.Close)  # the connection under the channel
    publisher.data_received(method(spec.Connection.CloseOk(), 0))
    publisher.connection_lost(None)
    await closing


async def test_a_confirm_that_never_comes_is_a_timeout_and_a_late_one_changes_nothing() -> None:
    publisher, _ = ready_publisher()
    outcomes = await publisher.publish("gate.usage", "usage", messages(2), within=0.05)
    assert all(isinstance(outcome, TimeoutError) for outcome in outcomes)
    publisher.data_received(method(spec.Basic.Ack(delivery_tag=2, multiple=True)))  # too late: forgotten
    assert not publisher._pending and not publisher._tags_by_id
    # The next message is tag 3: an ack for tag 1 or 2 (a broker's late word) cannot settle it.
    sending = asyncio.create_task(publisher.publish("gate.usage", "usage", messages(1), within=5))
    await asyncio.sleep(0)
    publisher.data_received(method(spec.Basic.Ack(delivery_tag=2)))
    publisher.data_received(method(spec.Basic.Nack(delivery_tag=3)))
    assert await sending == [NACK]


async def test_missed_heartbeats_abort_the_connection() -> None:
    publisher, transport = ready_publisher()
    publisher._heartbeat = 1
    publisher._last_read -= 3
    sending = asyncio.create_task(publisher.publish("gate.usage", "usage", messages(1), within=5))
    await asyncio.sleep(0)
    publisher._beat()
    (outcome,) = await sending
    assert isinstance(outcome, AmqpClosed) and "heartbeats missed" in str(outcome)
    assert transport.aborted


async def test_a_large_body_goes_in_frames_no_larger_than_frame_max() -> None:
    publisher, transport = ready_publisher()
    publisher._frame_max = 4096
    body = bytes(range(256)) * 100  # 25,600 bytes: 7 body frames of at most 4,088
    sending = asyncio.create_task(
        publisher.publish("gate.usage", "usage", [(body, spec.Basic.Properties(message_id="big"))], within=5)
    )
    await asyncio.sleep(0)
    frames = transport.frames()
    bodies = [frame for frame in frames if isinstance(frame, ContentBody)]
    assert b"".join(piece.value for piece in bodies) == body
    assert max(len(piece.value) for piece in bodies) <= 4096 - 8
    publisher.data_received(method(spec.Basic.Ack(delivery_tag=1)))
    assert await sending == [ACK]


_SHORT = st.one_of(st.none(), st.just(""), st.text(max_size=90), st.text(alphabet="é€", min_size=80, max_size=130))
_OCTET = st.one_of(st.none(), st.integers(0, 255), st.integers(256, 70000), st.integers(-5, -1))


@settings(max_examples=400, deadline=None)
@given(
    st.integers(0, 2**64 - 1),
    st.fixed_dictionaries(
        {},
        optional={
            "content_type": _SHORT,
            "content_encoding": _SHORT,
            "headers": st.dictionaries(st.text(max_size=8), st.integers(0, 9), max_size=2),
            "delivery_mode": st.sampled_from([1, 2]),
            "priority": _OCTET,
            "correlation_id": _SHORT,
            "reply_to": _SHORT,
            "expiration": _SHORT,
            "message_id": _SHORT,
            "timestamp": st.datetimes(),
            "message_type": _SHORT,
            "user_id": _SHORT,
            "app_id": _SHORT,
        },
    ),
)
def test_the_content_header_fast_path_writes_pamqps_bytes_or_fails_as_pamqp_does(
    body_size: int, fields: dict[str, object]
) -> None:
    """``_content_header`` writes string and octet properties itself: byte for byte pamqp's frame, and where pamqp
    refuses (a string over 255 bytes, an octet out of range) it refuses with pamqp's error, before sending."""
    try:
        properties = spec.Basic.Properties(**fields)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return  # pamqp refuses to build these at all
    try:
        expected: bytes | type[BaseException] = amqp_frame.marshal(
            amqp_header.ContentHeader(0, body_size, properties), 1
        )
    except Exception as exc:  # whatever pamqp raises, the fast path must raise too
        expected = type(exc)
    if isinstance(expected, bytes):
        assert _content_header(body_size, properties) == expected
    else:
        with pytest.raises(expected):
            _content_header(body_size, properties)


# ---------------------------------------------------------------------------------- brokers over real sockets


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted_broker(
    script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await script(reader, writer)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"amqp://gate:s3cr3t@127.0.0.1:{port}/"
    finally:
        server.close()


async def open_within(url: str, seconds: float) -> AmqpPublisher:
    async with asyncio.timeout(seconds):
        return await AmqpPublisher.open(url, connection_name="gate-test")


async def test_a_broker_that_never_answers_is_bounded_by_the_callers_deadline() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)  # the protocol header, then nothing
        await asyncio.sleep(30)

    async with scripted_broker(silent) as url:
        with pytest.raises(TimeoutError):
            await open_within(url, 0.3)


async def test_a_broker_of_another_amqp_version_is_named() -> None:
    async def other(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)
        writer.write(b"AMQP\x01\x01\x00\x0a")  # AMQP 1.0's header: what a 1.0-only broker answers
        await writer.drain()

    async with scripted_broker(other) as url:
        with pytest.raises(AmqpClosed, match="does not speak AMQP 0-9-1"):
            await open_within(url, 2)


async def test_a_broker_announcing_a_huge_frame_in_the_handshake_is_cut_off() -> None:
    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)
        writer.write(struct.pack(">BHI", 1, 0, 2**31) + b"\0" * 1000)
        await writer.drain()
        await asyncio.sleep(5)

    async with scripted_broker(huge) as url:
        with pytest.raises(AmqpClosed, match="over frame_max"):
            await open_within(url, 2)


async def test_a_broker_without_plain_authentication_is_refused_before_credentials_are_sent() -> None:
    sent: list[bytes] = []

    async def no_plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)
        writer.write(method(spec.Connection.Start(mechanisms="AMQPLAIN EXTERNAL"), 0))
        await writer.drain()
        sent.append(await reader.read(65536))

    async with scripted_broker(no_plain) as url:
        with pytest.raises(AmqpClosed, match="PLAIN"):
            await open_within(url, 2)
    assert b"s3cr3t" not in b"".join(sent)


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/", "ACCESS_REFUSED"), ("/no-such-vhost", "NOT_ALLOWED")],
)
async def test_the_real_broker_refusing_says_why_without_the_password(path: str, expected: str) -> None:
    url = RABBITMQ_URL.rstrip("/") + path
    if expected == "ACCESS_REFUSED":
        url = url.replace("guest:guest@", "guest:n0t-the-password@")
    with pytest.raises(AmqpClosed) as caught:
        await open_within(url, 10)
    assert expected in str(caught.value) and "n0t-the-password" not in str(caught.value)


async def test_the_real_broker_confirms_a_batch_and_returns_the_unroutable() -> None:
    client = await open_within(RABBITMQ_URL, 10)
    try:
        await client.declare_exchange("gate-test-amqp-client", "topic", durable=False)
        outcomes = await client.publish("gate-test-amqp-client", "nobody.listens", messages(5), within=10)
        assert outcomes == [RETURNED] * 5  # mandatory, and no queue is bound
        # Not mandatory: the broker drops what no queue takes and confirms it all the same.
        dropped = await client.publish("gate-test-amqp-client", "x", messages(3), mandatory=False, within=10)
        assert dropped == [ACK] * 3
    finally:
        async with asyncio.timeout(10):
            await client.close()
    assert client.is_closed


async def test_the_real_broker_keeps_an_idle_connection_whose_heartbeats_are_kept() -> None:
    # RabbitMQ closes a connection that misses two heartbeats: at heartbeat=1, 3.5 s idle is enough to be dropped.
    client = await open_within(RABBITMQ_URL.rstrip("/") + "/?heartbeat=1", 10)
    try:
        await client.declare_exchange("gate-test-amqp-client", "topic", durable=False)
        await asyncio.sleep(3.5)
        assert not client.is_closed
        assert await client.publish("gate-test-amqp-client", "x", messages(1), mandatory=False, within=10) == [ACK]
    finally:
        async with asyncio.timeout(10):
            await client.close()


async def test_the_real_broker_takes_a_body_split_over_several_frames() -> None:
    client = await open_within(RABBITMQ_URL, 10)
    try:
        await client.declare_exchange("gate-test-amqp-client", "topic", durable=False)
        body = bytes(range(256)) * 1200  # 307,200 bytes: three body frames at RabbitMQ's frame_max of 131,072
        big = [(body, spec.Basic.Properties(message_id="big", delivery_mode=2))]
        assert await client.publish("gate-test-amqp-client", "x", big, mandatory=False, within=10) == [ACK]
        assert not client.is_closed
    finally:
        async with asyncio.timeout(10):
            await client.close()
