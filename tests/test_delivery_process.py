"""Issue 16: usage events are built, committed and delivered by a process of their own (``usage.delivery: process``).

A real ``gate serve`` with the real RabbitMQ, driven by the official SDK: events arrive from the delivery process,
a delivery process killed under load is replaced without losing an event, a SIGKILLed Gate leaves no process
behind and its events in the outbox, and Ctrl-C (SIGINT to the whole process group) still flushes every event.
The link between the two processes is checked with arbitrary splits and a hostile frame.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gate.events import DeliveryProcess, Outbox
from gate.events.delivery import _HEADER, _MAX_FRAME, _frame, _Frames
from gate.identity.auth import mint_dev_token
from gate.settings import UsageSettings, load_settings
from tests.brokers import (
    RABBITMQ_URL,
    RabbitConsumer,
    delete_exchange,
    rabbitmq,  # noqa: F401 - a fixture
)
from tests.fake_anthropic import FakeAnthropic
from tests.harness import free_port

GATE = Path(sys.executable).parent / "gate"
WAIT = 30.0  # a safety net for blocking calls, never an assertion
MESSAGE: dict[str, Any] = {
    "model": "claude-opus-4-6",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Hi"}],
}


@dataclass
class GateProcess:
    process: subprocess.Popen[bytes]
    port: int
    management_port: int
    token: str
    outbox: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict[str, Any]:
        response = httpx.get(f"http://127.0.0.1:{self.management_port}/actuator/health", timeout=5)
        return dict(response.json()["components"]["pubsub"]["details"])

    def delivery_pid(self) -> int:
        pid = self.health()["deliveryProcess"]
        assert isinstance(pid, int)
        return pid

    def client(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=self.token, max_retries=0, timeout=WAIT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_for(condition: Any, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): read its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def gate_process(tmp_path: Path, fake: FakeAnthropic) -> Iterator[Any]:
    started: list[GateProcess] = []

    def start(exchange: str, amqp_url: str = RABBITMQ_URL, *, new_session: bool = False) -> GateProcess:
        port, management_port = free_port(), free_port()
        config = {
            "server": {"host": "127.0.0.1", "port": port, "shutdown": {"drain-timeout": "10s", "flush-timeout": "10s"}},
            "management": {"server": {"port": management_port}},
            "security": {"jwt": {"dev": {"data-dir": str(tmp_path / "dev-keys")}}},
            "anthropic": {"api": {"base-url": fake.url, "keys": [
                {"alias": "primary", "value": "sk-ant-test-primary-0000000000000000"},
            ]}},
            "usage": {"publisher": "rabbitmq", "destination": exchange, "delivery": "process",
                      "rabbitmq": {"url": amqp_url, "routing-key": "usage.delivery", "confirm-timeout": "5s"},
                      "outbox": {"path": str(tmp_path / "outbox.sqlite3"), "retry-max": "1s"}},
            "observability": {"logging": {"format": "json"}},
        }
        config_path = tmp_path / "gate.yaml"
        config_path.write_text(yaml.safe_dump(config))
        settings_ = load_settings(config_files=[str(config_path)], profiles=["local"], env={})
        token = mint_dev_token(settings_, "alice", 3600)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "GATE_PROFILES": "local"}
        log_path = tmp_path / f"gate-{len(started)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen([str(GATE), "serve", "--config", str(config_path)], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=new_session)
        gate = GateProcess(process, port, management_port, token, tmp_path / "outbox.sqlite3", log_path)
        started.append(gate)

        def ready() -> bool:
            if process.poll() is not None:
                return True
            try:
                return httpx.get(f"http://127.0.0.1:{management_port}/actuator/health/readiness", timeout=5).is_success
            except httpx.TransportError:
                return False

        wait_for(ready, "Gate to be ready")
        assert process.poll() is None, gate.log()
        return gate

    yield start
    for gate in started:
        if gate.process.poll() is None:
            gate.process.kill()
            gate.process.wait(WAIT)


def consume(exchange: str, count: int, work: Any) -> list[str]:
    """Bind a queue to ``exchange``, run ``work`` in a thread, and return the ids of the first ``count`` distinct
    events (duplicates, which at-least-once delivery allows, carry the same id)."""

    async def main() -> list[str]:
        async with RabbitConsumer(exchange) as consumer:
            thread = threading.Thread(target=work)
            thread.start()
            try:
                await consumer.wait_for(count, timeout=60, unique=True)
            finally:
                await asyncio.to_thread(thread.join, WAIT)
            await asyncio.sleep(0.5)  # anything beyond the count would be a surplus
            return consumer.ids()

    try:
        return asyncio.run(main())
    finally:
        asyncio.run(delete_exchange(exchange))


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.usefixtures("rabbitmq")
def test_events_are_delivered_by_a_child_of_gate(gate_process: Any) -> None:
    exchange = f"gate-delivery-{uuid.uuid4().hex[:8]}"
    gate = gate_process(exchange)
    pid = gate.delivery_pid()
    assert pid != gate.process.pid and parent_of(pid) == gate.process.pid

    def calls() -> None:
        client = gate.client()
        for _ in range(40):
            client.messages.create(**MESSAGE)

    ids = consume(exchange, 40, calls)
    assert len(ids) == len(set(ids)) == 40  # exactly one event per call, none twice
    wait_for(lambda: gate.health()["outboxDepth"] == 0, "the outbox to empty")
    assert gate.delivery_pid() == pid


@pytest.mark.usefixtures("rabbitmq")
def test_a_killed_delivery_process_is_replaced_and_no_event_is_lost(gate_process: Any) -> None:
    exchange = f"gate-delivery-{uuid.uuid4().hex[:8]}"
    gate = gate_process(exchange)
    first = gate.delivery_pid()
    calls = 300

    def load() -> None:
        client = gate.client()
        for i in range(calls):
            if i == calls // 3:
                os.kill(first, signal.SIGKILL)  # mid-load: records sent to it and not committed go to the next
            client.messages.create(**MESSAGE)

    ids = consume(exchange, calls, load)
    assert len(set(ids)) == calls  # every call's event arrived; a resent one keeps its id
    wait_for(lambda: gate.health()["deliveryProcess"] not in (None, first), "a new delivery process")
    assert parent_of(gate.delivery_pid()) == gate.process.pid
    assert "the usage delivery process exited with code -9; restarting it" in gate.log()
    wait_for(lambda: gate.health()["lastError"] is None, "health to recover")
    print(f"\n{calls} calls, {len(ids)} deliveries ({len(ids) - calls} redelivered with the same id)")


def test_sigkill_of_gate_leaves_no_delivery_process_and_keeps_its_events(
    gate_process: Any, tmp_path: Path
) -> None:
    # The broker is unreachable, so every event waits in the outbox.
    gate = gate_process("gate-delivery-unreached", f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    child = gate.delivery_pid()
    client = gate.client()
    message_ids = [client.messages.create(**MESSAGE).id for _ in range(25)]
    wait_for(lambda: gate.health()["outboxDepth"] == 25, "25 events in the outbox")
    time.sleep(0.2)  # several commit intervals: the last call is committed, not only in hand
    gate.process.kill()
    gate.process.wait(WAIT)
    wait_for(lambda: not alive(child), "the delivery process to exit after its parent", timeout=10)

    outbox = Outbox(gate.outbox)
    try:
        pending = outbox.pending(1000)
    finally:
        outbox.close()
    assert sorted(orjson.loads(e.body)["data"]["message_id"] for e in pending) == sorted(message_ids)


@pytest.mark.usefixtures("rabbitmq")
def test_ctrl_c_reaches_the_process_group_and_every_event_is_still_flushed(gate_process: Any) -> None:
    exchange = f"gate-delivery-{uuid.uuid4().hex[:8]}"
    gate = gate_process(exchange, new_session=True)
    child = gate.delivery_pid()
    done: list[int] = []

    def calls_then_ctrl_c() -> None:
        client = gate.client()
        for _ in range(30):
            client.messages.create(**MESSAGE)
        os.killpg(gate.process.pid, signal.SIGINT)  # as a terminal does: Gate and its delivery process alike
        done.append(gate.process.wait(WAIT))

    ids = consume(exchange, 30, calls_then_ctrl_c)
    assert len(set(ids)) == 30
    assert done == [0], gate.log()
    assert not alive(child)
    assert "usage events lost" not in gate.log()


# --------------------------------------------------------------------------------------------- in process


async def test_max_events_is_enforced_in_the_request_process(tmp_path: Path) -> None:
    from tests.sinksupport import record as make_record

    usage = UsageSettings.model_validate({
        "publisher": "rabbitmq",
        "rabbitmq": {"url": f"amqp://guest:guest@127.0.0.1:{free_port()}/"},  # unreachable: events stay
        "outbox": {"path": str(tmp_path / "outbox.sqlite3"), "max-events": 5},
    })
    events = DeliveryProcess(usage)
    await events.start()
    try:
        for i in range(8):
            events.publish(make_record(message_id=f"msg_{i}"))
        assert events.dropped_total == 3 and events.depth == 5
    finally:
        await events.close(0.5)
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    try:
        assert [orjson.loads(e.body)["data"]["message_id"] for e in outbox.pending(100)] == [
            f"msg_{i}" for i in range(5)
        ]
    finally:
        outbox.close()


async def test_an_outbox_that_cannot_be_opened_stops_the_start(tmp_path: Path) -> None:
    from gate.events import OutboxError

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    usage = UsageSettings.model_validate({"publisher": "log", "outbox": {"path": str(blocker / "outbox.sqlite3")}})
    events = DeliveryProcess(usage)
    with pytest.raises(OutboxError, match="not-a-directory"):
        await events.start()


# --------------------------------------------------------------------------------------------------- link


class _Collect:
    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.closed = False
        self.aborted = False


def _reader() -> tuple[_Frames, _Collect]:
    seen = _Collect()

    class Transport:
        def abort(self) -> None:
            seen.aborted = True

    frames = _Frames(seen.messages.append, lambda: setattr(seen, "closed", True))
    frames.connection_made(Transport())  # type: ignore[arg-type]
    return frames, seen


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.text(max_size=40), st.binary(max_size=300)), min_size=1, max_size=8),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_frames_arrive_whole_however_the_bytes_are_split(messages: list[Any], cuts: list[int]) -> None:
    wire = b"".join(_frame(m) for m in messages)
    frames, seen = _reader()
    start = 0
    for cut in [*sorted({min(c, len(wire)) for c in cuts}), len(wire)]:
        frames.data_received(wire[start:cut])
        start = cut
    assert seen.messages == messages and not seen.aborted


def test_a_frame_larger_than_the_limit_ends_the_link_without_reading_it() -> None:
    frames, seen = _reader()
    frames.data_received(_frame(("status", {})) + _HEADER.pack(_MAX_FRAME + 1) + b"x" * 64)
    assert seen.messages == [("status", {})] and seen.aborted
