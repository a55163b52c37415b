"""Chaos: thousands of calls through a real ``gate serve`` process while RabbitMQ goes away and Gate restarts.

RabbitMQ "goes away" for Gate alone: Gate reaches it through a fault proxy (``tests/faultproxy.py``) that closes
its port and resets every connection; the broker itself, perhaps shared, keeps running.

The fake Anthropic answers each request with its own message id (``msg_chaos_<attempt>``) and its own counts, so
every event can be matched to the upstream call it stands for. A client retries, under a new attempt number,
only a request that got no answer at all (Gate was down); what counts is what reached the fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
import yaml

from tests.brokers import (
    RabbitConsumer,
    delete_exchange,
    free_port,
    proxied_url,
    rabbit_proxy,  # noqa: F401 - a fixture
    rabbitmq,  # noqa: F401 - a fixture
    wait_until,
)
from tests.fake_anthropic import FakeAnthropic, Received, Reply
from tests.faultproxy import FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

GATE = Path(sys.executable).with_name("gate")
SUBJECT = "chaos-user"
ROUTING_KEY = "usage.chaos"
CONCURRENCY = 50
TARGET = 2_000  # at least this many calls answered 200 by Gate per run


def counts_for(attempt: int) -> tuple[int, int, int]:
    """(input, output, cache read) tokens the fake reports for one attempt: distinct enough to catch a mix-up."""
    return 100 + attempt % 997, 1 + attempt % 301, attempt % 5


# ------------------------------------------------------------------------------------------------ the fake


def chaos_reply(received: Received) -> Reply:
    request = orjson.loads(received.body)
    attempt = int(request["metadata"]["user_id"])
    input_tokens, output_tokens, cache_read = counts_for(attempt)
    message_id = f"msg_chaos_{attempt}"
    usage = {"input_tokens": input_tokens, "cache_read_input_tokens": cache_read, "output_tokens": 1}
    headers = {"request-id": f"req_chaos_{attempt}"}
    if not request.get("stream"):
        usage["output_tokens"] = output_tokens
        message = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": "ok"}],
            "model": "claude-chaos",
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        return Reply(body=orjson.dumps(message), stream=False, headers=headers)
    start = {
        "type": "message_start",
        "message": {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-chaos",
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        },
    }
    events = [
        ("message_start", start),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    body = b"".join(b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(data)) for name, data in events)
    return Reply(body=body, stream=True, headers=headers)


def upstream_attempts(fake: FakeAnthropic) -> list[int]:
    """The attempt number of every call that reached the fake, in arrival order."""
    return [int(orjson.loads(r.body)["metadata"]["user_id"]) for r in fake.received if r.path_qs == "/v1/messages"]


# ------------------------------------------------------------------------------------------------ Gate process


class GateProcess:
    """``gate serve`` in a subprocess, on a fixed port so that it can be restarted where clients look for it."""

    def __init__(self, tmp: Path, upstream: str, exchange: str, rabbitmq_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "gate.yaml"
        self.log = tmp / "gate.log"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "server": {
                        "host": "127.0.0.1",
                        "port": self.port,
                        "shutdown": {"drain-timeout": "10s", "flush-timeout": "2s"},
                    },
                    "security": {"jwt": {"dev": {"data-dir": str(tmp / "dev-keys")}}},
                    "anthropic": {
                        "api": {
                            "base-url": upstream,
                            "keys": [{"alias": "chaos", "value": "sk-ant-test-chaos-000000000000000000"}],
                        }
                    },
                    "usage": {
                        "publisher": "rabbitmq",
                        "destination": exchange,
                        "rabbitmq": {"url": rabbitmq_url, "routing-key": ROUTING_KEY, "confirm-timeout": "2s"},
                        "outbox": {"path": str(tmp / "outbox.sqlite3"), "retry-initial": "100ms", "retry-max": "1s"},
                    },
                    "observability": {"logging": {"format": "json", "level": "WARNING", "access-log": False}},
                }
            )
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        # Nothing of the developer's environment leaks in (keys, profiles, OTLP endpoints, an emulator).
        self.env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("ANTHROPIC_", "GATE_", "OTEL_", "PUBSUB_", "USAGE_"))
        }

    def command(self, *args: str) -> list[str]:
        return [str(GATE), *args, "--config", str(self.config), "--profile", "local"]

    def token(self) -> str:
        done = subprocess.run(
            self.command("token", "--sub", SUBJECT, "--ttl", "1h"),
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return done.stdout.strip()

    def start(self) -> None:
        """Start and wait until it answers (bounded: a Gate that cannot start fails the test)."""
        self.starts += 1
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command("serve"), env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"gate exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/", timeout=1).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("gate did not start within 60s")
            time.sleep(0.05)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(sig)
        try:
            return process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            raise

    def outbox_depth(self) -> int:
        health = httpx.get(self.url + "/actuator/health", timeout=5).json()
        return int(health["components"]["pubsub"]["details"]["outboxDepth"])


# ------------------------------------------------------------------------------------------------ load


@dataclass
class Load:
    """``CONCURRENCY`` clients sending alternately streamed and plain messages until told to finish."""

    url: str
    token: str
    attempts: itertools.count[int] = field(default_factory=itertools.count)
    answered: dict[int, bytes] = field(default_factory=dict)  # attempt -> body, for every 200 from Gate
    broken: list[int] = field(default_factory=list)  # a 200 whose body did not arrive whole (never expected)
    statuses: Counter[int] = field(default_factory=Counter)
    unanswered: int = 0  # attempts that got no answer at all (Gate down): retried as new attempts
    finishing: bool = False
    target: int = TARGET
    started: float = field(default_factory=time.monotonic)
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ok(self) -> int:
        return len(self.answered)

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._client(session) for _ in range(CONCURRENCY)))

    async def _client(self, session: aiohttp.ClientSession) -> None:
        headers = {"authorization": f"Bearer {self.token}", "content-type": "application/json"}
        while not (self.finishing and self.ok >= self.target):
            attempt = next(self.attempts)
            body = orjson.dumps(
                {
                    "model": "claude-chaos",
                    "max_tokens": 16,
                    "stream": attempt % 2 == 0,
                    "metadata": {"user_id": str(attempt)},
                    "messages": [{"role": "user", "content": "ping"}],
                }
            )
            try:
                response = await session.post(self.url + "/v1/messages", data=body, headers=headers)
            except aiohttp.ClientError:
                self.unanswered += 1  # refused or dropped before any answer: Gate is down or going down
                await asyncio.sleep(0.02)
                continue
            async with response:
                self.statuses[response.status] += 1
                try:
                    payload = await response.read()
                except aiohttp.ClientError:
                    self.broken.append(attempt)
                    continue
            if response.status == 200:
                self.answered[attempt] = payload
                self.progress.set()

    async def reached(self, count: int, timeout: float = 120) -> None:
        async with asyncio.timeout(timeout):
            while self.ok < count:
                self.progress.clear()
                await self.progress.wait()

    def rate(self) -> float:
        return self.ok / max(time.monotonic() - self.started, 1e-9)


@contextlib.asynccontextmanager
async def chaos_setup(
    tmp_path: Path, fake: FakeAnthropic, proxy: FaultProxy
) -> AsyncIterator[tuple[GateProcess, Load, str, str]]:
    """A bound durable queue, a started Gate process (reaching RabbitMQ through ``proxy``) and a load (not yet
    running); all cleaned up after."""
    exchange = f"gate-chaos-{uuid.uuid4().hex[:10]}"
    queue = f"{exchange}-q"
    fake.responder = chaos_reply
    # Declared and bound before Gate publishes anything; it keeps messages until ``drain``.
    declare = RabbitConsumer(exchange, "usage.#", queue=queue)
    await declare.__aenter__()
    await declare.close()  # not consuming: the queue keeps everything until ``drain``
    gate = GateProcess(tmp_path, fake.url, exchange, proxied_url(proxy))
    try:
        token = await asyncio.to_thread(gate.token)
        await asyncio.to_thread(gate.start)
        yield gate, Load(gate.url, token), exchange, queue
    finally:
        await asyncio.to_thread(gate.stop, signal.SIGKILL)
        with contextlib.suppress(Exception):
            consumer = RabbitConsumer(exchange, "usage.#", queue=queue)
            await consumer.__aenter__()
            await consumer.close(delete=True)
        await delete_exchange(exchange)
        fake.responder = None


async def drain(exchange: str, queue: str, expected: int, *, timeout: float) -> list[dict[str, Any]]:
    """Every message in the durable queue once ``expected`` distinct ids arrived (or the timeout ran out)."""
    consumer = RabbitConsumer(exchange, "usage.#", queue=queue)
    await consumer.__aenter__()
    try:
        with contextlib.suppress(TimeoutError):
            await consumer.wait_for(expected, timeout=timeout, unique=True)
        await asyncio.sleep(1.0)  # late duplicates, if any, are part of the figures
        return [orjson.loads(m.body) | {"_message_id": m.message_id} for m in consumer.messages]
    finally:
        await consumer.close()


@dataclass
class Tally:
    upstream: list[int]
    events: list[dict[str, Any]]
    distinct: dict[str, dict[str, Any]]
    by_attempt: dict[int, list[dict[str, Any]]]

    @property
    def duplicates(self) -> int:
        return len(self.events) - len(self.distinct)


def tally(fake: FakeAnthropic, events: list[dict[str, Any]]) -> Tally:
    distinct: dict[str, dict[str, Any]] = {}
    for event in events:
        assert event["_message_id"] == event["id"]
        previous = distinct.setdefault(event["id"], event)
        assert previous == event, "a redelivered event must be identical"
    by_attempt: dict[int, list[dict[str, Any]]] = {}
    for event in distinct.values():
        attempt = int(event["data"]["message_id"].removeprefix("msg_chaos_"))
        by_attempt.setdefault(attempt, []).append(event)
    return Tally(upstream_attempts(fake), events, distinct, by_attempt)


def check_answered_events(load: Load, result: Tally) -> None:
    """Each 200 from Gate: its body was the fake's, and its one event carries exactly the fake's counts."""
    for attempt, payload in load.answered.items():
        assert f"msg_chaos_{attempt}".encode() in payload
        (event,) = result.by_attempt[attempt]
        data = event["data"]
        input_tokens, output_tokens, cache_read = counts_for(attempt)
        assert event["subject"] == SUBJECT
        assert data["status"] == "success" and data["error_type"] is None
        assert data["stream"] is (attempt % 2 == 0)
        assert (data["input_tokens"], data["output_tokens"], data["cache_read_tokens"]) == (
            input_tokens,
            output_tokens,
            cache_read,
        )
        assert data["total_tokens"] == input_tokens + output_tokens + cache_read
        assert data["anthropic_request_id"] == f"req_chaos_{attempt}"
        assert data["stop_reason"] == "end_turn" and data["model"] == "claude-chaos"


# ------------------------------------------------------------------------------------------------ tests


async def test_broker_outage_and_gate_restart_lose_and_double_nothing(
    tmp_path: Path,
    fake: FakeAnthropic,
    rabbit_proxy: FaultProxy,  # noqa: F811 - the fixture
) -> None:
    async with chaos_setup(tmp_path, fake, rabbit_proxy) as (gate, load, exchange, queue):
        runner = asyncio.create_task(load.run())
        try:
            await load.reached(300)
            outage_started = time.monotonic()
            with rabbit_proxy.outage():  # RabbitMQ unreachable for Gate: connections reset, the port closed
                await load.reached(load.ok + 400)
                # SIGTERM while the broker is away: what it could not deliver stays in the outbox for the next start.
                down_from = time.monotonic()
                assert await asyncio.to_thread(gate.stop, signal.SIGTERM) == 0
                restarted_at = load.ok
                await asyncio.to_thread(gate.start)
                downtime = time.monotonic() - down_from
                await load.reached(restarted_at + 300)
            outage = time.monotonic() - outage_started
            await load.reached(load.ok + 300)
            load.finishing = True
            await runner
        finally:
            load.finishing, load.target = True, 0
            await asyncio.wait({runner}, timeout=60)
        elapsed = time.monotonic() - load.started
        upstream = upstream_attempts(fake)
        events = await drain(exchange, queue, len(upstream), timeout=60)
        await wait_until(lambda: gate.outbox_depth() == 0, timeout=30, what="Gate's outbox to empty")

    result = tally(fake, events)
    print(
        f"\nchaos (SIGTERM): {load.ok} answered 200 of {len(result.upstream)} upstream calls in {elapsed:.1f}s "
        f"({load.rate():.0f}/s), broker outage {outage:.1f}s, Gate down {downtime:.1f}s (SIGTERM to ready), "
        f"{load.unanswered} unanswered attempts retried, "
        f"{len(result.events)} messages, {len(result.distinct)} distinct events, {result.duplicates} duplicates"
    )
    assert load.ok >= TARGET
    # The SIGTERM came while the broker was away: the first Gate left events in the outbox, the second sent them.
    assert "to be delivered after the next start" in gate.log.read_text()
    assert load.broken == [] and set(load.statuses) == {200}, (load.broken, load.statuses)
    assert len(set(result.upstream)) == len(result.upstream), "Gate sent one request upstream twice"
    # Exactly one event per upstream call, and one upstream call per event.
    assert sorted(result.by_attempt) == sorted(result.upstream)
    assert all(len(events) == 1 for events in result.by_attempt.values())
    assert len(result.distinct) == len(result.upstream)
    check_answered_events(load, result)


async def test_sigkill_under_load_loses_at_most_a_moment_of_events(
    tmp_path: Path,
    fake: FakeAnthropic,
    rabbit_proxy: FaultProxy,  # noqa: F811 - the fixture
) -> None:
    async with chaos_setup(tmp_path, fake, rabbit_proxy) as (gate, load, exchange, queue):
        runner = asyncio.create_task(load.run())
        try:
            await load.reached(500)
            window_start, window_ok = time.monotonic(), load.ok
            await load.reached(load.ok + 500)
            rate = (load.ok - window_ok) / (time.monotonic() - window_start)  # calls per second under load
            await asyncio.to_thread(gate.stop, signal.SIGKILL)
            killed_at = load.ok
            await asyncio.to_thread(gate.start)
            await load.reached(killed_at + 500)
            load.finishing, load.target = True, 0
            await runner
        finally:
            load.finishing, load.target = True, 0
            await asyncio.wait({runner}, timeout=60)
        upstream = upstream_attempts(fake)
        await wait_until(lambda: gate.outbox_depth() == 0, timeout=60, what="Gate's outbox to empty")
        events = await drain(exchange, queue, len(upstream), timeout=5)

    result = tally(fake, events)
    lost = set(result.upstream) - set(result.by_attempt)
    # Two kinds: calls Gate had answered whose events were still in memory (the commit interval's worth), and calls
    # in flight when the process died (no answer reached the client; at most one per open request).
    lost_answered = lost & set(load.answered)
    lost_in_flight = lost - lost_answered
    allowed = math.ceil(rate * 0.1)
    print(
        f"\nchaos (SIGKILL): {len(result.upstream)} upstream calls at {rate:.0f}/s; {len(lost)} events lost = "
        f"{len(lost_answered)} answered but uncommitted + {len(lost_in_flight)} in flight at the kill "
        f"(100 ms of traffic = {allowed} calls, {CONCURRENCY} requests open); {result.duplicates} duplicates "
        f"delivered before de-duplication; {load.unanswered} unanswered attempts retried, "
        f"{len(load.broken)} answers cut by the kill"
    )
    assert set(result.by_attempt) <= set(result.upstream)
    assert all(len(events) == 1 for events in result.by_attempt.values())
    # The promise: SIGKILL loses at most the events of the last ~100 ms (the outbox commits every 50 ms). Calls
    # still in flight had no event yet: they die with the process, one per open request at most.
    assert len(lost_answered) <= allowed, sorted(lost_answered)
    assert len(lost_in_flight) <= CONCURRENCY, sorted(lost_in_flight)
    # Every other call that Gate answered has its one event, with the exact counts.
    for attempt in lost_answered:
        del load.answered[attempt]
    check_answered_events(load, result)
