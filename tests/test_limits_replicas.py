"""Three ``gate serve`` processes share one cap through PostgreSQL or Redis: concurrent traffic from several users
stays within one request's estimate of the cap, also when the store goes away mid-run (through a TCP fault proxy;
the shared services themselves are never touched), in both failure modes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gate.settings import load_settings
from tests.fake_anthropic import FakeAnthropic, Received, Reply
from tests.faultproxy import FaultProxy
from tests.harness import BackgroundLoop, read_events
from tests.test_limits import PG_URL, REDIS_URL, cleanup, token_for

GATE = Path(sys.executable).parent / "gate"
MODEL = "claude-sonnet-4-5"  # $3 / $15 per million input / output tokens
BODY_SIZE = 2400  # bytes: Gate estimates 800 input tokens (3 bytes a token); the fake bills 600 (4 bytes a token)
MAX_TOKENS = 200
COST = Decimal(600 * 3 + 200 * 15) / 1_000_000  # $0.0048 per call
ESTIMATE = Decimal(800 * 3 + 200 * 15) / 1_000_000  # $0.0054 reserved per call
CAP = Decimal("0.20")  # the organisation's daily cap: 41 calls fit
USERS = ["ana", "bo", "cy", "di"]
CONCURRENCY = 8


def billed(received: Received) -> Reply:
    """Usage as Anthropic would bill this request: a quarter of its bytes as input, all of max_tokens as output."""
    body = json.loads(received.body)
    usage = {"input_tokens": len(received.body) // 4, "output_tokens": body["max_tokens"]}
    message = {
        "id": "msg_replicas",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "ok"}],
        "model": MODEL,
        "stop_reason": "max_tokens",
        "stop_sequence": None,
        "usage": usage,
    }
    return Reply(body=json.dumps(message).encode(), stream=False)


def request_body() -> bytes:
    envelope = {"model": MODEL, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": ""}]}
    filler = BODY_SIZE - len(json.dumps(envelope).encode())
    envelope["messages"][0]["content"] = "x" * filler
    body = json.dumps(envelope).encode()
    assert len(body) == BODY_SIZE
    return body


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    port: int
    events: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_replica(directory: Path, limits: dict[str, Any], upstream: str, dev_keys: Path) -> Replica:
    directory.mkdir(parents=True)
    config = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown": {"drain-timeout": "2s", "flush-timeout": "3s"}},
        "security": {"jwt": {"dev": {"data-dir": str(dev_keys)}}},
        "anthropic": {
            "api": {"base-url": upstream, "keys": [{"alias": "primary", "value": "sk-ant-test-primary-000000000000"}]}
        },
        "usage": {
            "publisher": "file",
            "file": {"path": str(directory / "usage.jsonl")},
            "outbox": {"path": str(directory / "outbox.sqlite3")},
        },
        "observability": {"logging": {"format": "json"}},
        "limits": limits,
    }
    path = directory / "gate.yaml"
    path.write_text(yaml.safe_dump(config))
    log = directory / "gate.log"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(directory), "GATE_PROFILES": "local"}
    with log.open("wb") as out:
        process = subprocess.Popen([str(GATE), "serve", "--config", str(path)], env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 60  # a safety net for a process that never starts, not an assertion
    while time.monotonic() < deadline:
        found = re.search(rb"listening on http://127\.0\.0\.1:(\d+)", log.read_bytes())
        if found:
            return Replica(process, int(found.group(1)), directory / "usage.jsonl", log)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"gate serve did not start:\n{log.read_text()}")


@pytest.fixture
def upstream(fake: FakeAnthropic) -> FakeAnthropic:
    fake.responder = billed
    return fake


@pytest.fixture(params=["postgresql", "redis"])
def shared_store(request: pytest.FixtureRequest) -> Iterator[tuple[str, FaultProxy, dict[str, Any], str]]:
    kind = request.param
    unique = f"gate_test_{uuid.uuid4().hex[:12]}"
    proxy = FaultProxy("127.0.0.1", 5432 if kind == "postgresql" else 6379).start()
    if kind == "postgresql":
        store = {"postgresql": {"url": f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres", "schema": unique}}
    else:
        store = {"redis": {"url": f"redis://127.0.0.1:{proxy.port}/0", "key-prefix": f"{unique}:"}}
    yield kind, proxy, store, unique
    proxy.close()
    loop = BackgroundLoop()

    class _Kind:
        def __init__(self, name: str) -> None:
            self.kind = name

    loop.run(cleanup(_Kind(kind), unique))  # type: ignore[arg-type]
    loop.close()
    assert PG_URL and REDIS_URL


def send(replicas: list[Replica], tokens: list[str], count: int, offset: int) -> list[int]:
    """``count`` calls, ``CONCURRENCY`` at a time, spread over the users and the replicas; their statuses."""
    body = request_body()

    def one(i: int) -> int:
        replica = replicas[(offset + i) % len(replicas)]
        token = tokens[(offset + i) % len(tokens)]
        response = httpx.post(
            replica.url + "/v1/messages",
            content=body,
            headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
            timeout=30,
        )
        if response.status_code not in (200, 429, 503):
            raise AssertionError(f"unexpected {response.status_code}: {response.text}")
        if response.status_code != 200:
            error = response.json()["error"]
            assert error["type"] in ("rate_limit_error", "overloaded_error") and "retry-after" in response.headers
        return response.status_code

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(one, range(count)))


def until_refused(replicas: list[Replica], tokens: list[str], offset: int) -> list[int]:
    """Batches until a whole batch is refused: the cap is reached."""
    statuses: list[int] = []
    for batch in range(20):
        got = send(replicas, tokens, CONCURRENCY, offset + batch * CONCURRENCY)
        statuses += got
        if 200 not in got:
            return statuses
    raise AssertionError("the cap never refused a whole batch")


@pytest.mark.slow
@pytest.mark.parametrize("outage", [None, "closed", "open"], ids=["store-up", "outage-fail-closed", "outage-fail-open"])
def test_three_replicas_hold_a_shared_cap(
    shared_store: tuple[str, FaultProxy, dict[str, Any], str],
    outage: str | None,
    upstream: FakeAnthropic,
    tmp_path: Path,
) -> None:
    kind, proxy, store, _unique = shared_store
    limits = {
        "enabled": True,
        "store": {"type": kind, "on-failure": outage or "closed", **store},
        "caps-refresh": "1s",
        "spend-caps": [{"scope-type": "organization", "period": "daily", "amount-usd": str(CAP)}],
    }
    dev_keys = tmp_path / "dev-keys"
    replicas = [start_replica(tmp_path / f"gate{i}", limits, upstream.url, dev_keys) for i in range(3)]
    try:
        settings = load_settings(
            env={}, overrides={"security": {"jwt": {"dev": {"data-dir": str(dev_keys)}}}}, config_dir=tmp_path
        )
        tokens = [token_for(settings, user, ["staff"]) for user in USERS]
        before = send(replicas, tokens, 24, 0)  # $0.1152 of the $0.20
        assert before == [200] * 24
        during: list[int] = []
        if outage is not None:
            proxy.refuse()
            proxy.cut()
            during = send(replicas, tokens, 16, 24)
            health = httpx.get(replicas[0].url + "/actuator/health", timeout=10).json()
            metrics = httpx.get(replicas[0].url + "/actuator/prometheus", timeout=10).text
            proxy.accept()
            assert health["components"]["limitsStore"]["status"] == "DOWN"
            assert f'gate_limits_store_failures_total{{mode="{outage}",' in metrics
            assert "gate_limits_store_up" in metrics
            assert during == ([503] * 16 if outage == "closed" else [200] * 16)
        after = until_refused(replicas, tokens, 40)
        admitted = before.count(200) + during.count(200) + after.count(200)

        events = [e for r in replicas for e in read_events(r.events, 0)]
        deadline = time.monotonic() + 20  # outboxes commit every 25 ms; a safety net, not an assertion
        while len(events) < admitted and time.monotonic() < deadline:
            time.sleep(0.1)
            events = [e for r in replicas for e in read_events(r.events, 0)]
        assert len(events) == admitted  # exactly one event per admitted call, none for a refused one
        assert len(upstream.received) == admitted  # and no upstream call for a refused one
        spent = sum(Decimal(e["data"]["cost"]) for e in events)
        assert {Decimal(e["data"]["cost"]) for e in events} == {COST}
        overshoot = spent - CAP
        unchecked = during.count(200) * COST  # fail-open: spent while nobody could count
        print(
            f"\n{kind} {outage or 'no outage'}: {admitted} calls admitted across 3 replicas, spent ${spent} "
            f"against a cap of ${CAP}: overshoot ${overshoot} (one request's estimate: ${ESTIMATE}; "
            f"spent unchecked during the outage: ${unchecked}); then {after.count(200)} admitted and "
            f"{len(after) - after.count(200)} refused"
        )
        if os.environ.get("GATE_DEBUG_REPLICAS"):
            for replica in replicas:
                lines = [x for x in replica.log.read_text().splitlines() if "gate.limits" in x or '"status"' in x]
                print(replica.port, *[x[:260] for x in lines[-30:]], sep="\n  ")
        if outage == "open":
            # Each replica kept what its unchecked calls cost and added it at its next call (or within caps-refresh)
            # once the store was back. Until the last replica has done so, the others see an incomplete count: the
            # first batch after the outage can pass; from then on the cap holds.
            assert overshoot <= unchecked + CONCURRENCY * ESTIMATE
            assert after.count(200) <= CONCURRENCY
            assert after[-CONCURRENCY:] == [429] * CONCURRENCY
        else:
            assert overshoot <= ESTIMATE
            assert spent > CAP - CONCURRENCY * ESTIMATE  # the cap was reached, not merely approached
    finally:
        for replica in replicas:
            replica.process.terminate()
        for replica in replicas:
            try:
                replica.process.wait(30)
            except subprocess.TimeoutExpired:
                replica.process.kill()
        for replica in replicas:
            assert b"sk-ant-test" not in replica.log.read_bytes()
