"""Graceful shutdown of a real ``gate serve`` process: SIGTERM drains live streams, flushes usage events, exits 0;
and a restart with another number of workers delivers what the last run left in its outbox files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gate.events import Outbox
from gate.identity.auth import mint_dev_token
from gate.settings import load_settings
from tests.fake_anthropic import FakeAnthropic, Reply, fixture
from tests.harness import free_port, read_events

GATE = Path(sys.executable).parent / "gate"
STREAM = {"model": "claude-opus-4-6", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
WAIT = 30.0  # a safety net for blocking calls, never an assertion


@dataclass
class GateProcess:
    process: subprocess.Popen[bytes]
    port: int
    management_port: int
    token: str
    events_path: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def readiness(self) -> int:
        try:
            url = f"http://127.0.0.1:{self.management_port}/actuator/health/readiness"
            return httpx.get(url, timeout=5).status_code
        except httpx.TransportError:
            return 0

    def refuses_connections(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
        except ConnectionRefusedError:
            return True
        return False


@dataclass
class Streams:
    """``count`` streams read to the end in threads; bodies (or errors) kept in order of completion."""

    gate: GateProcess
    count: int
    bodies: list[bytes] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Streams:
        for _ in range(self.count):
            thread = threading.Thread(target=self._one)
            thread.start()
            self.threads.append(thread)
        return self

    def _one(self) -> None:
        try:
            with httpx.stream("POST", self.gate.url + "/v1/messages", content=json.dumps(STREAM).encode(), timeout=WAIT,
                              headers={"authorization": f"Bearer {self.gate.token}"}) as response:
                self.bodies.append(b"".join(response.iter_raw()))
        except httpx.HTTPError as exc:
            self.errors.append(exc)

    @property
    def finished(self) -> int:
        return len(self.bodies) + len(self.errors)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(WAIT)


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def gate_process(tmp_path: Path, fake: FakeAnthropic) -> Iterator[Any]:
    started: list[GateProcess] = []

    def start(drain_timeout: str = "20s", workers: int = 1) -> GateProcess:
        port, management_port = free_port(), free_port()
        config = {
            "server": {"host": "127.0.0.1", "port": port, "workers": workers,
                       "shutdown": {"drain-timeout": drain_timeout, "flush-timeout": "5s"}},
            "management": {"server": {"port": management_port}},
            "security": {"jwt": {"dev": {"data-dir": str(tmp_path / "dev-keys")}}},
            "anthropic": {"api": {"base-url": fake.url, "keys": [
                {"alias": "primary", "value": "sk-ant-test-primary-0000000000000000"},
                {"alias": "secondary", "value": "sk-ant-test-secondary-000000000000000"},
            ]}},
            "usage": {"publisher": "file", "file": {"path": str(tmp_path / "usage.jsonl")},
                      "outbox": {"path": str(tmp_path / "outbox.sqlite3")}},
            "observability": {"logging": {"format": "json"}},
        }
        config_path = tmp_path / "gate.yaml"
        config_path.write_text(yaml.safe_dump(config))
        settings = load_settings(config_files=[str(config_path)], profiles=["local"], env={})
        token = mint_dev_token(settings, "alice", 3600)  # also creates the dev key pair Gate will load
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "GATE_PROFILES": "local"}
        log_path = tmp_path / "gate.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen([str(GATE), "serve", "--config", str(config_path)], env=env,
                                       stdout=log, stderr=subprocess.STDOUT)
        gate = GateProcess(process, port, management_port, token, tmp_path / "usage.jsonl", log_path)
        started.append(gate)
        wait_for(lambda: gate.readiness() == 200 or process.poll() is not None, "Gate to be ready")
        assert process.poll() is None, log_path.read_text()
        return gate

    yield start
    for gate in started:
        if gate.process.poll() is None:
            gate.process.kill()
            gate.process.wait(WAIT)


def test_sigterm_drains_20_live_streams_then_exits_0(gate_process: Any, fake: FakeAnthropic) -> None:
    gate: GateProcess = gate_process()
    full = fixture("stream-basic.sse")
    fake.enqueue(*(Reply(fixture="stream-basic.sse", cuts=[50] * 20, delay=0.1) for _ in range(20)))  # ~2 s each
    streams = Streams(gate, 20).start()
    wait_for(lambda: len(fake.received) == 20, "20 streams in flight upstream")

    gate.process.send_signal(signal.SIGTERM)
    wait_for(gate.refuses_connections, "new connections to be refused")
    refused_while_streaming = streams.finished < 20
    wait_for(lambda: gate.readiness() != 200, "readiness to leave UP")
    readiness_while_draining = gate.readiness()

    streams.join()
    assert gate.process.wait(WAIT) == 0, gate.log_path.read_text()
    assert refused_while_streaming  # refused at once, while the streams still ran
    assert readiness_while_draining == 503  # DOWN on the management port while draining
    assert streams.errors == []
    assert streams.bodies == [full] * 20  # every stream complete, byte for byte
    assert fake.completed == 20 and fake.cancelled == 0
    events = read_events(gate.events_path, 20)
    assert len(events) == 20
    assert {(e["data"]["status"], e["data"]["output_tokens"]) for e in events} == {("success", 15)}
    log = gate.log_path.read_text()
    assert "sk-ant-test" not in log


def test_a_stream_longer_than_the_drain_timeout_is_cut_and_still_recorded(
    gate_process: Any, fake: FakeAnthropic
) -> None:
    gate: GateProcess = gate_process(drain_timeout="500ms")
    fake.enqueue(Reply(fixture="stream-basic.sse", cuts=[300] + [50] * 15, delay=1))  # ~15 s
    streams = Streams(gate, 1).start()
    wait_for(lambda: fake.received != [], "the stream in flight upstream")
    gate.process.send_signal(signal.SIGTERM)
    streams.join()
    assert gate.process.wait(WAIT) == 0, gate.log_path.read_text()
    assert len(streams.errors) == 1 or len(streams.bodies[0]) < len(fixture("stream-basic.sse"))
    wait_for(lambda: fake.cancelled == 1, "the upstream request to be cancelled")
    (event,) = read_events(gate.events_path, 1)
    assert event["data"]["status"] == "client_disconnected" and event["data"]["input_tokens"] == 25


def leave_events(path: Path, ids: list[str]) -> None:
    """Undelivered events in one outbox file, as a process that is gone left them."""
    outbox = Outbox(path)
    assert outbox.path == path, "a live process holds this file"
    outbox.append([(i, time.time(), json.dumps({"id": i, "data": {"status": "left"}}).encode()) for i in ids])
    outbox.close()


def test_changing_the_number_of_workers_strands_no_event(gate_process: Any, tmp_path: Path) -> None:
    # Two workers of an earlier release wrote outbox.sqlite3.0 and .1; one process starts now.
    left = {name: [f"{name}-{n}" for n in range(4)] for name in ("outbox.sqlite3.0", "outbox.sqlite3.1")}
    for name, ids in left.items():
        leave_events(tmp_path / name, ids)
    gate: GateProcess = gate_process(workers=1)
    events = read_events(gate.events_path, 8)
    assert sorted(e["id"] for e in events) == sorted(left["outbox.sqlite3.0"] + left["outbox.sqlite3.1"])
    gate.process.send_signal(signal.SIGTERM)
    assert gate.process.wait(WAIT) == 0, gate.log_path.read_text()

    # Three processes' slots left behind (outbox.sqlite3, outbox-1.sqlite3, outbox-2.sqlite3); two workers start now.
    gate.events_path.unlink()
    slots = {slot: [f"slot-{slot}-{n}" for n in range(slot + 2)] for slot in range(3)}  # 2 + 3 + 4 events
    for slot, ids in slots.items():
        lower = [Outbox(tmp_path / "outbox.sqlite3") for _ in range(slot)]  # held, so that this slot is the next
        leave_events(tmp_path / ("outbox.sqlite3" if slot == 0 else f"outbox-{slot}.sqlite3"), ids)
        for holder in lower:
            holder.close()
    gate = gate_process(workers=2)
    events = read_events(gate.events_path, 9)
    assert sorted(e["id"] for e in events) == sorted(i for ids in slots.values() for i in ids)
    gate.process.send_signal(signal.SIGTERM)
    assert gate.process.wait(WAIT) == 0, gate.log_path.read_text()
    assert len(read_events(gate.events_path, 9)) == 9  # nothing delivered twice
    assert "adopted" in gate.log_path.read_text()
