"""Issue 4 end to end: every call Gate makes to Anthropic ends in exactly one usage CloudEvent with Anthropic's
exact counts, read back from the real RabbitMQ and the real Pub/Sub emulator.

The official anthropic SDK (or httpx, where the test needs to cut a stream) talks to an in-process Gate over real
sockets; the fake Anthropic answers with the documented wire examples. Each broker scenario runs against both
publishers (a module-scoped ``channel`` parametrised by broker). "No event" is proven without a timed wait alone:
after the refused requests a sentinel call is made, its event must be the next one, and the Gate's confirmed
count must have grown by exactly one.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import anthropic
import httpx
import orjson
import pytest
from cloudevents.core.bindings import amqp
from cloudevents.core.formats.json import JSONFormat
from cloudevents.v1.http import from_http

from tests.brokers import (
    RABBITMQ_URL,
    PubSubPuller,
    RabbitConsumer,
    delete_exchange,
    ensure_rabbitmq,
    pubsub_emulator_host,  # noqa: F401 - a fixture, requested by `channel` for the pubsub run
    rabbitmq,  # noqa: F401 - a fixture
    wait_until,
)
from tests.fake_anthropic import FakeAnthropic, Received, Reply, error_reply, fixture
from tests.harness import RunningGate, gate_settings

EVENT_TYPE = "io.github.samzhu.gate.usage.v1"
DEFAULT_SOURCE = "/gate/messages"
PUBSUB_SOURCE = "/gate/e2e-messages"  # the pubsub Gate proves the source is configurable
PROJECT = "gate-test"
ROUTING_KEY = "usage.e2e"
TIME_FORMAT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
HEX32 = re.compile(r"^[0-9a-f]{32}$")
ALIASES = {
    "sk-ant-test-primary-0000000000000000": "primary",
    "sk-ant-test-secondary-000000000000000": "secondary",
}
MESSAGE: dict[str, Any] = {
    "model": "claude-opus-4-6",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Hello"}],
}
ENVELOPE_KEYS = {"specversion", "id", "type", "source", "subject", "time", "datacontenttype", "data"}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def alias_of(received: Received) -> str:
    return ALIASES[received.headers["x-api-key"]]


# ------------------------------------------------------------------------------------------------ channels


@dataclass
class Channel:
    """One Gate publishing to one broker, and a reader of what that broker delivered."""

    broker: str
    gate: RunningGate
    source: str
    usage: dict[str, Any]  # the usage section, for further Gates publishing to the same place
    read: Callable[[int], Awaitable[list[dict[str, Any]]]]  # at least n more events, parsed
    backlog: list[dict[str, Any]] = field(default_factory=list)
    seen_ids: set[str] = field(default_factory=set)

    async def take(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` events; every id must be new (one event per upstream call)."""
        if len(self.backlog) < count:
            self.backlog.extend(await self.read(count - len(self.backlog)))
        events, self.backlog = self.backlog[:count], self.backlog[count:]
        for event in events:
            assert event["id"] not in self.seen_ids, f"event id {event['id']} delivered for two calls"
            self.seen_ids.add(event["id"])
        return events

    def sdk(self, **kwargs: Any) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.gate.url, api_key=self.gate.token(), max_retries=0, **kwargs)


def rabbit_reader(consumer: RabbitConsumer) -> Callable[[int], Awaitable[list[dict[str, Any]]]]:
    taken = 0

    async def read(count: int) -> list[dict[str, Any]]:
        nonlocal taken
        await consumer.wait_for(taken + count, timeout=30)
        messages = consumer.messages[taken : taken + count]
        taken += count
        events = []
        for message in messages:
            assert message.content_type == "application/cloudevents+json"
            assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            assert message.routing_key == ROUTING_KEY
            event = orjson.loads(message.body)
            assert message.message_id == event["id"]
            sdk_event = from_http({"content-type": message.content_type}, message.body)
            assert sdk_event["id"] == event["id"] and sdk_event.data == event["data"]
            events.append(event)
        return events

    return read


def pubsub_reader(puller: PubSubPuller) -> Callable[[int], Awaitable[list[dict[str, Any]]]]:
    async def read(count: int) -> list[dict[str, Any]]:
        received = await asyncio.to_thread(puller.pull, count, 30.0)
        events = []
        for item in received:
            # Pub/Sub's default is binary mode: ce-* attributes, the data as the message body.
            attributes = dict(item.message.attributes)
            assert attributes["Content-Type"] == "application/json"
            assert attributes["ce-specversion"] == "1.0"
            data = bytes(item.message.data)
            event: dict[str, Any] = {name[3:]: value for name, value in attributes.items() if name.startswith("ce-")}
            event["datacontenttype"] = attributes["Content-Type"]
            event["data"] = orjson.loads(data)
            sdk_event = from_http({name.lower(): value for name, value in attributes.items()}, data)
            assert sdk_event["id"] == event["id"] and sdk_event.data == event["data"]
            events.append(event)
        return events

    return read


def rabbit_usage(exchange: str, mode: str = "structured") -> dict[str, Any]:
    return {
        "publisher": "rabbitmq",
        "destination": exchange,
        "content-mode": mode,
        "rabbitmq": {"url": RABBITMQ_URL, "routing-key": ROUTING_KEY, "confirm-timeout": "5s"},
        "outbox": {"retry-initial": "50ms", "retry-max": "500ms"},
    }


# The shared Gate: both keys, a small body limit (413 without a huge body), no breaker (errors are scripted here;
# the circuit-open case has its own Gate).
SHARED: dict[str, Any] = {
    "server": {"limits": {"max-body-size": "64KB"}},
    "resilience": {"circuit-breaker": {"enabled": False}},
}


@pytest.fixture(scope="module", params=["rabbitmq", "pubsub"])
async def channel(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, fake_session: FakeAnthropic
) -> AsyncIterator[Channel]:
    tmp = tmp_path_factory.mktemp(f"usage-{request.param}")
    if request.param == "rabbitmq":
        await asyncio.to_thread(ensure_rabbitmq)
        exchange = unique("gate-e2e-usage")
        usage = rabbit_usage(exchange)
        try:
            # Bound before any call: the sink keeps unroutable events, so nothing would arrive otherwise.
            async with RabbitConsumer(exchange, "usage.#") as consumer:
                gate = RunningGate(gate_settings(tmp, fake_session.url, usage=usage, **SHARED)).start()
                try:
                    yield Channel("rabbitmq", gate, DEFAULT_SOURCE, usage, rabbit_reader(consumer))
                finally:
                    await asyncio.to_thread(gate.stop)
        finally:
            await delete_exchange(exchange)
        return

    host = request.getfixturevalue("pubsub_emulator_host")
    topic = unique("gate-e2e-usage")
    usage = {
        "publisher": "pubsub",
        "destination": topic,
        "event-source": PUBSUB_SOURCE,
        "pubsub": {"project-id": PROJECT, "emulator-host": host, "create-topic": True, "publish-timeout": "5s"},
        "outbox": {"retry-initial": "50ms", "retry-max": "500ms"},
    }
    gate = RunningGate(gate_settings(tmp, fake_session.url, usage=usage, **SHARED)).start()
    puller = PubSubPuller(PROJECT, topic, f"{topic}-sub")
    try:
        assert gate.gate is not None
        events = gate.gate.events
        # Gate creates the topic itself (usage.pubsub.create-topic); only then is the subscription added.
        await wait_until(lambda: events.health()["details"]["connected"] is True, what="the Pub/Sub sink")  # type: ignore[index]
        from google.cloud import pubsub_v1

        topic_path = pubsub_v1.PublisherClient.topic_path(PROJECT, topic)
        assert (await asyncio.to_thread(puller._publisher.get_topic, topic=topic_path)).name == topic_path
        await asyncio.to_thread(puller.create)
        yield Channel("pubsub", gate, PUBSUB_SOURCE, usage, pubsub_reader(puller))
    finally:
        await asyncio.to_thread(gate.stop)
        await asyncio.to_thread(puller.close)


@pytest.fixture
def side_gate(tmp_path: Path, fake_session: FakeAnthropic) -> Iterator[Callable[..., RunningGate]]:
    """Further Gates (own settings) publishing to the channel's destination; stopped at the end of the test."""
    started: list[RunningGate] = []

    def start(usage: dict[str, Any], **sections: Any) -> RunningGate:
        settings = gate_settings(tmp_path / f"side{len(started)}", fake_session.url, usage=usage, **sections)
        running = RunningGate(settings).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


# ------------------------------------------------------------------------------------------------ checking


def usage_data(
    *,
    model: str | None,
    message_id: str | None,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cache_creation_tokens: int = 0,
    cache_read_tokens: int = 0,
    stream: bool,
    stop_reason: str | None,
    status: str = "success",
    error_type: str | None = None,
    key_alias: str | None,
    anthropic_request_id: str | None,
    **reported: Any,
) -> dict[str, Any]:
    """The ``data`` Gate must publish, minus latency_ms, trace_id and time_to_first_token_ms (checked apart)."""
    return {
        "model": model,
        "message_id": message_id,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_tokens": cache_creation_tokens,
        "cache_read_tokens": cache_read_tokens,
        "total_tokens": input_tokens + output_tokens + cache_creation_tokens + cache_read_tokens,
        "stream": stream,
        "stop_reason": stop_reason,
        "status": status,
        "error_type": error_type,
        "key_alias": key_alias,
        "anthropic_request_id": anthropic_request_id,
        **reported,
    }


def check_event(
    channel: Channel,
    event: dict[str, Any],
    expected: dict[str, Any],
    *,
    ttft: bool,
    trace_id: str | None = None,
    subject: str = "alice",
) -> None:
    """Every attribute and every data field of one event (exact where Anthropic or the client decided it)."""
    assert set(event) == ENVELOPE_KEYS
    assert event["specversion"] == "1.0"
    assert event["type"] == EVENT_TYPE
    assert event["source"] == channel.source
    assert event["subject"] == subject
    assert event["datacontenttype"] == "application/json"
    assert isinstance(event["id"], str) and event["id"]
    assert TIME_FORMAT.match(event["time"]), event["time"]
    data = dict(event["data"])
    latency = data.pop("latency_ms")
    assert type(latency) is int and latency >= 0
    trace = data.pop("trace_id")
    assert HEX32.match(trace) and trace != "0" * 32
    if trace_id is not None:
        assert trace == trace_id
    if ttft:
        first = data.pop("time_to_first_token_ms")
        assert type(first) is int and 0 <= first <= latency
    # The price table's figures are checked by hand in test_prices.py; here: both or neither, an exact decimal.
    cost, price_version = data.pop("cost", None), data.pop("price_version", None)
    assert (cost is None) == (price_version is None)
    assert cost is None or re.fullmatch(r"\d+(\.\d+)?", cost), cost
    assert data == expected


async def assert_no_event(channel: Channel, fake: FakeAnthropic, refused: Callable[[], Awaitable[None]]) -> None:
    """``refused`` leads to no event: a sentinel call made after it is the very next event, and the only one."""
    assert channel.gate.gate is not None
    events = channel.gate.gate.events
    await wait_until(lambda: events.depth == 0, what="an empty outbox")
    confirmed = events.published_total
    await refused()
    request_id = unique("req_sentinel")
    fake.enqueue(Reply(fixture="message-basic.json", headers={"request-id": request_id}))
    await channel.sdk().messages.create(**MESSAGE)
    (event,) = await channel.take(1)
    assert event["data"]["anthropic_request_id"] == request_id
    await wait_until(lambda: events.depth == 0, what="an empty outbox")
    await asyncio.sleep(0.3)  # room for a stray event to show up, should there be one
    assert events.published_total == confirmed + 1
    assert events.depth == 0
    assert channel.backlog == []


async def sse_events(response: httpx.Response) -> AsyncIterator[bytes]:
    """The raw bytes of a streamed answer, piece by piece as they arrive."""
    async for piece in response.aiter_raw():
        yield piece


def offset_after(body: bytes, needle: bytes, occurrence: int) -> int:
    """The offset just past the blank line ending the ``occurrence``-th SSE event containing ``needle``."""
    at = -1
    for _ in range(occurrence):
        at = body.index(needle, at + 1)
    return body.index(b"\n\n", at) + 2


# ------------------------------------------------------------------------------------------------ successes


async def test_non_streaming_message(channel: Channel, fake: FakeAnthropic) -> None:
    trace_id = uuid.uuid4().hex
    fake.enqueue(Reply(fixture="message-basic.json", headers={"request-id": "req_e2e_basic"}))
    message = await channel.sdk().messages.create(
        **MESSAGE,
        extra_headers={
            "x-claude-code-session-id": "cc-session-7d1f",
            "traceparent": f"00-{trace_id}-{'ab' * 8}-01",
        },
    )
    assert message.usage.input_tokens == 12 and message.usage.output_tokens == 6
    (event,) = await channel.take(1)
    check_event(
        channel,
        event,
        usage_data(
            model="claude-opus-5",
            message_id="msg_01XFDUDYJgAACzvnptvVoYEL",
            input_tokens=12,
            output_tokens=6,
            stream=False,
            stop_reason="end_turn",
            key_alias=alias_of(fake.received[-1]),
            anthropic_request_id="req_e2e_basic",
            http_status=200,
            claude_code_session_id="cc-session-7d1f",
        ),
        ttft=False,
        trace_id=trace_id,
    )


async def test_streaming_text(channel: Channel, fake: FakeAnthropic) -> None:
    fake.enqueue(Reply(fixture="stream-basic.sse", cuts=[1] * 50, headers={"request-id": "req_e2e_text"}))
    async with channel.sdk().messages.stream(
        **MESSAGE, extra_headers={"x-claude-code-session-id": "cc-session-stream"}
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
    assert text == "Hello!"
    (event,) = await channel.take(1)
    check_event(
        channel,
        event,
        usage_data(
            model="claude-opus-4-6",
            message_id="msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
            input_tokens=25,
            output_tokens=15,
            stream=True,
            stop_reason="end_turn",
            key_alias=alias_of(fake.received[-1]),
            anthropic_request_id="req_e2e_text",
            http_status=200,
            claude_code_session_id="cc-session-stream",
        ),
        ttft=True,
    )


async def test_streaming_tool_use(channel: Channel, fake: FakeAnthropic) -> None:
    fake.enqueue(
        Reply(fixture="stream-tool-use.sse", cuts=[7, 1, 300, 2, 2, 50], headers={"request-id": "req_e2e_tool"})
    )
    stream = await channel.sdk().messages.create(**MESSAGE, stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    (event,) = await channel.take(1)
    check_event(
        channel,
        event,
        usage_data(
            model="claude-3-haiku-20240307",
            message_id="msg_014p7gG3wDgGV9EUtLvnow3U",
            input_tokens=472,
            output_tokens=89,
            stream=True,
            stop_reason="tool_use",
            key_alias=alias_of(fake.received[-1]),
            anthropic_request_id="req_e2e_tool",
            http_status=200,
        ),
        ttft=True,
    )


CACHE_COUNTS: dict[str, Any] = {
    "model": "claude-sonnet-4-5-20250929",
    "input_tokens": 21,
    "output_tokens": 393,
    "cache_creation_tokens": 2051,
    "cache_read_tokens": 4096,
    "stop_reason": "end_turn",
    "cache_creation_5m_tokens": 1500,
    "cache_creation_1h_tokens": 551,
    "http_status": 200,
}


async def test_cache_tokens_streamed(channel: Channel, fake: FakeAnthropic) -> None:
    fake.enqueue(Reply(fixture="stream-prompt-caching-usage.sse", cuts=[13] * 100, headers={"request-id": "req_c1"}))
    async with channel.sdk().messages.stream(**MESSAGE) as stream:
        final = await stream.get_final_message()
    assert final.usage.cache_read_input_tokens == 4096
    (event,) = await channel.take(1)
    check_event(
        channel,
        event,
        usage_data(
            message_id="msg_01Ck4ChUsAgeFiXtUrE5tReAm",
            stream=True,
            key_alias=alias_of(fake.received[-1]),
            anthropic_request_id="req_c1",
            service_tier="standard",
            **CACHE_COUNTS,
        ),
        ttft=True,
    )


async def test_cache_tokens_json(channel: Channel, fake: FakeAnthropic) -> None:
    fake.enqueue(Reply(fixture="message-prompt-caching.json", headers={"request-id": "req_c2"}))
    message = await channel.sdk().messages.create(**MESSAGE)
    assert message.usage.cache_creation_input_tokens == 2051
    (event,) = await channel.take(1)
    check_event(
        channel,
        event,
        usage_data(
            message_id="msg_01JsonCacheUsage7hQ2mZp",
            stream=False,
            key_alias=alias_of(fake.received[-1]),
            anthropic_request_id="req_c2",
            service_tier="priority",
            **CACHE_COUNTS,
        ),
        ttft=False,
    )


async def test_web_search_stream(channel: Channel, fake: FakeAnthropic) -> None:
    fake.enqueue(Reply(fixture="stream-web-search-usage.sse", cuts=[11] * 100, headers={"request-id": "req_ws"}))
    stream = await channel.sdk().messages.create(**MESSAGE, stream=True)
    async for _ in stream:
        pass
    (event,) = await channel.take(1)
    check_event(
        channel,
        event,
        usage_data(
            model="claude-opus-4-1-20250805",
            message_id="msg_01G1c7ZqAnyHfNCyAo3VMsoJ",
            input_tokens=10682,
            output_tokens=510,
            stream=True,
            stop_reason="end_turn",
            key_alias=alias_of(fake.received[-1]),
            anthropic_request_id="req_ws",
            http_status=200,
            web_search_requests=1,
            service_tier="standard",
        ),
        ttft=False,  # the documented usage-only stream has no content block: no first token to time
    )


# ------------------------------------------------------------------------------------------------ upstream errors


def rate_limited(request_id: str) -> Reply:
    reply = error_reply(
        429, "rate_limit_error", "Number of requests has exceeded your rate limit", {"retry-after": "30"}
    )
    reply.headers["request-id"] = request_id
    return reply


async def test_429_on_every_key_is_one_event_per_upstream_call(
    channel: Channel, fake: FakeAnthropic, side_gate: Callable[..., RunningGate]
) -> None:
    # Its own Gate: the two 429s rest both keys, which would starve the shared Gate's later tests.
    gate = side_gate(channel.usage)
    fake.enqueue(rate_limited("req_429_a"), rate_limited("req_429_b"))
    sdk = anthropic.AsyncAnthropic(base_url=gate.url, api_key=gate.token(), max_retries=0)
    with pytest.raises(anthropic.RateLimitError):
        await sdk.messages.create(**MESSAGE)
    assert len(fake.received) == 2  # Gate tried the other key once
    events = sorted(await channel.take(2), key=lambda e: e["data"]["anthropic_request_id"])
    for event, received, request_id in zip(events, fake.received, ["req_429_a", "req_429_b"], strict=True):
        check_event(
            channel,
            event,
            usage_data(
                model="claude-opus-4-6",  # the request's model: an error answer names none
                message_id=None,
                stream=False,
                stop_reason=None,
                status="error",
                error_type="rate_limit_error",
                key_alias=alias_of(received),
                anthropic_request_id=request_id,
                http_status=429,
            ),
            ttft=False,
        )
    assert {e["data"]["key_alias"] for e in events} == {"primary", "secondary"}


async def test_529_is_one_event_and_not_retried(channel: Channel, fake: FakeAnthropic) -> None:
    reply = error_reply(529, "overloaded_error", "Overloaded")
    reply.headers["request-id"] = "req_529"
    fake.enqueue(reply)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await channel.sdk().messages.create(**MESSAGE, stream=True)
    assert caught.value.status_code == 529
    assert len(fake.received) == 1
    (event,) = await channel.take(1)
    check_event(
        channel,
        event,
        usage_data(
            model="claude-opus-4-6",
            message_id=None,
            stream=True,
            stop_reason=None,
            status="error",
            error_type="overloaded_error",
            key_alias=alias_of(fake.received[-1]),
            anthropic_request_id="req_529",
            http_status=529,
        ),
        ttft=False,
    )


async def test_error_event_mid_stream_keeps_the_counts_so_far(channel: Channel, fake: FakeAnthropic) -> None:
    fake.enqueue(Reply(fixture="stream-overloaded-mid-stream.sse", cuts=[40] * 40, headers={"request-id": "req_mid"}))
    stream = await channel.sdk().messages.create(**MESSAGE, stream=True)
    with pytest.raises(anthropic.APIStatusError) as caught:
        async for _ in stream:
            pass
    assert "Overloaded" in str(caught.value)
    (event,) = await channel.take(1)
    check_event(
        channel,
        event,
        usage_data(
            model="claude-sonnet-4-5-20250929",
            message_id="msg_01MidStreamOverloadQx7Rf",
            input_tokens=41,
            output_tokens=1,
            stream=True,
            stop_reason=None,
            status="error",
            error_type="overloaded_error",
            key_alias=alias_of(fake.received[-1]),
            anthropic_request_id="req_mid",
            http_status=200,
            service_tier="standard",
        ),
        ttft=True,
    )


def stream_request(gate: RunningGate) -> dict[str, Any]:
    return {
        "content": json.dumps({**MESSAGE, "stream": True}).encode(),
        "headers": {"authorization": f"Bearer {gate.token()}", "content-type": "application/json"},
    }


async def test_upstream_dropping_mid_stream_is_an_error_with_the_counts_so_far(
    channel: Channel, fake: FakeAnthropic
) -> None:
    body = fixture("stream-tool-use.sse")
    cut = offset_after(body, b"content_block_delta", 3)
    fake.enqueue(
        Reply(fixture="stream-tool-use.sse", cuts=[cut, 100], drop_after=cut + 30, headers={"request-id": "req_drop"})
    )
    received = b""
    async with httpx.AsyncClient(timeout=10) as http:
        with pytest.raises(httpx.TransportError):
            async with http.stream(
                "POST", channel.gate.url + "/v1/messages", **stream_request(channel.gate)
            ) as response:
                assert response.status_code == 200
                async for piece in sse_events(response):
                    received += piece
    assert received == body[: len(received)] and len(received) >= cut  # what came, came intact; then it broke
    (event,) = await channel.take(1)
    check_event(
        channel,
        event,
        usage_data(
            model="claude-3-haiku-20240307",
            message_id="msg_014p7gG3wDgGV9EUtLvnow3U",
            input_tokens=472,
            output_tokens=2,
            stream=True,
            stop_reason=None,
            status="error",
            error_type="api_error",
            key_alias=alias_of(fake.received[-1]),
            anthropic_request_id="req_drop",
            http_status=200,
        ),
        ttft=True,
    )


async def test_client_leaving_mid_stream_cancels_upstream(channel: Channel, fake: FakeAnthropic) -> None:
    body = fixture("stream-tool-use.sse")
    first = offset_after(body, b"content_block_delta", 1)
    # Paced: the whole answer would take ~30 s, so seeing the cancel before completion means Gate cancelled.
    fake.enqueue(
        Reply(fixture="stream-tool-use.sse", cuts=[first] + [60] * 60, delay=0.5, headers={"request-id": "req_gone"})
    )
    received = b""
    async with (
        httpx.AsyncClient(timeout=10) as http,
        http.stream("POST", channel.gate.url + "/v1/messages", **stream_request(channel.gate)) as response,
    ):
        assert response.status_code == 200
        async for piece in sse_events(response):
            received += piece
            if b"content_block_delta" in received:
                break  # leaving the block closes the connection half way through the answer
    await wait_until(lambda: fake.cancelled == 1, timeout=15, what="the upstream call to be cancelled")
    assert fake.completed == 0
    (event,) = await channel.take(1)
    check_event(
        channel,
        event,
        usage_data(
            model="claude-3-haiku-20240307",
            message_id="msg_014p7gG3wDgGV9EUtLvnow3U",
            input_tokens=472,
            output_tokens=2,
            stream=True,
            stop_reason=None,
            status="client_disconnected",
            key_alias=alias_of(fake.received[-1]),
            anthropic_request_id="req_gone",
            http_status=200,
        ),
        ttft=True,
    )


# ------------------------------------------------------------------------------------------------ no event


async def test_refused_requests_count_tokens_and_models_make_no_event(channel: Channel, fake: FakeAnthropic) -> None:
    gate = channel.gate

    async def refused() -> None:
        async with httpx.AsyncClient(base_url=gate.url, timeout=10) as http:
            body = json.dumps(MESSAGE).encode()
            for authorization in (None, "Bearer not-a-jwt"):
                headers = {"content-type": "application/json"}
                if authorization:
                    headers["authorization"] = authorization
                assert (await http.post("/v1/messages", content=body, headers=headers)).status_code == 401
            big = json.dumps({**MESSAGE, "pad": "x" * 100_000}).encode()
            headers = {"authorization": f"Bearer {gate.token()}", "content-type": "application/json"}
            assert (await http.post("/v1/messages", content=big, headers=headers)).status_code == 413
            assert (await http.post("/v1/messages", content=b"{not json", headers=headers)).status_code == 400
        assert fake.received == []
        sdk = channel.sdk()
        count = await sdk.messages.count_tokens(model="claude-opus-4-6", messages=[{"role": "user", "content": "Hi"}])
        assert count.input_tokens == 14
        assert len((await sdk.models.list()).data) == 2
        assert (await sdk.models.retrieve("claude-haiku-4-5")).id == "claude-haiku-4-5"
        assert len(fake.received) == 3  # those three did reach upstream, and still make no event

    await assert_no_event(channel, fake, refused)


async def test_circuit_open_makes_no_event(
    channel: Channel, fake: FakeAnthropic, side_gate: Callable[..., RunningGate]
) -> None:
    breaker = {
        "sliding-window-size": 2,
        "minimum-number-of-calls": 2,
        "failure-rate-threshold": 50,
        "wait-duration-in-open-state": "60s",
    }
    gate = side_gate(channel.usage, resilience={"circuit-breaker": breaker})
    sdk = anthropic.AsyncAnthropic(base_url=gate.url, api_key=gate.token(), max_retries=0)
    for n in range(2):
        reply = error_reply(500, "api_error", "Internal server error")
        reply.headers["request-id"] = f"req_500_{n}"
        fake.enqueue(reply)
        with pytest.raises(anthropic.InternalServerError):
            await sdk.messages.create(**MESSAGE)
    events = await channel.take(2)  # the two real calls have theirs
    assert sorted(e["data"]["anthropic_request_id"] for e in events) == ["req_500_0", "req_500_1"]
    assert all(e["data"]["error_type"] == "api_error" and e["data"]["http_status"] == 500 for e in events)
    assert gate.gate is not None
    side_events = gate.gate.events
    await wait_until(lambda: side_events.depth == 0, what="the side Gate's outbox to empty")
    confirmed = side_events.published_total

    async def refused() -> None:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await sdk.messages.create(**MESSAGE)
        assert caught.value.status_code == 503
        assert len(fake.received) == 2  # the open breaker kept it from upstream

    await assert_no_event(channel, fake, refused)
    assert side_events.published_total == confirmed and side_events.depth == 0


# ------------------------------------------------------------------------------------------------ binary mode


async def test_rabbitmq_binary_content_mode(
    rabbitmq: str,  # noqa: F811 - the fixture
    fake: FakeAnthropic,
    side_gate: Callable[..., RunningGate],
) -> None:
    exchange = unique("gate-e2e-binary")
    try:
        async with RabbitConsumer(exchange, "usage.#") as consumer:
            gate = side_gate(rabbit_usage(exchange, mode="binary"))
            fake.enqueue(Reply(fixture="stream-tool-use.sse", headers={"request-id": "req_binary"}))
            sdk = anthropic.AsyncAnthropic(base_url=gate.url, api_key=gate.token(), max_retries=0)
            async for _ in await sdk.messages.create(**MESSAGE, stream=True):
                pass
            await consumer.wait_for(1)
            await asyncio.sleep(0.3)
            assert len(consumer.messages) == 1
    finally:
        await delete_exchange(exchange)
    (message,) = consumer.messages
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    headers = {name: str(value) for name, value in dict(message.headers).items()}
    assert set(headers) == {
        f"cloudEvents_{name}" for name in ("specversion", "id", "type", "source", "subject", "time")
    }
    assert headers["cloudEvents_id"] == message.message_id
    sdk_event = amqp.from_binary(
        amqp.AMQPMessage(
            properties={"content-type": message.content_type},
            application_properties=dict(message.headers),
            application_data=message.body,
        ),
        JSONFormat(),
    )
    attributes = sdk_event.get_attributes()
    assert attributes["datacontenttype"] == "application/json"
    event = {
        "specversion": headers["cloudEvents_specversion"],
        "id": headers["cloudEvents_id"],
        "type": headers["cloudEvents_type"],
        "source": headers["cloudEvents_source"],
        "subject": headers["cloudEvents_subject"],
        "time": headers["cloudEvents_time"],
        "datacontenttype": message.content_type,
        "data": orjson.loads(message.body),
    }
    assert sdk_event.get_data() == event["data"]
    check_event(
        Channel("rabbitmq", gate, DEFAULT_SOURCE, {}, rabbit_reader(consumer)),
        event,
        usage_data(
            model="claude-3-haiku-20240307",
            message_id="msg_014p7gG3wDgGV9EUtLvnow3U",
            input_tokens=472,
            output_tokens=89,
            stream=True,
            stop_reason="tool_use",
            key_alias=alias_of(fake.received[-1]),
            anthropic_request_id="req_binary",
            http_status=200,
        ),
        ttft=True,
    )
