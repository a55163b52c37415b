"""Spend caps and rate limits as a client meets them (in-process Gate, embedded SQLite store), the counter stores'
atomicity (SQLite, PostgreSQL, Redis), the admin API and ``gate usage``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gate.identity.auth import Identity
from gate.policy.limits import Admission, Limits, Refusal
from gate.policy.periods import Windows
from gate.settings import (
    PostgresStoreSettings,
    RedisStoreSettings,
    SqliteStoreSettings,
    UsageLimitsSettings,
)
from gate.store.counters import Charge, CounterStore, Delta, StoreUnavailable
from tests.fake_anthropic import FakeAnthropic, Received, Reply
from tests.harness import RunningGate, read_events

PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
MODEL = "claude-sonnet-4-5"  # $3 / $15 per million input / output tokens in the packaged prices
# What every fake answer reports: 1,000 input and 200 output tokens = $0.003 + $0.003 = $0.006 exactly.
USAGE = {"input_tokens": 1000, "output_tokens": 200}
COST = Decimal("0.006")


def answer(_received: Received) -> Reply:
    message = {
        "id": "msg_limits",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "ok"}],
        "model": MODEL,
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": USAGE,
    }
    return Reply(body=json.dumps(message).encode(), stream=False)


def request_body(max_tokens: int = 200, size: int = 2400) -> dict[str, Any]:
    """About ``size`` bytes: with 3 bytes a token, the estimate is ~800 input tokens + ``max_tokens``."""
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "x" * max(size - 80, 1)}],
    }


def limits_section(tmp: Path, **extra: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "enabled": True,
        "store": {"type": "sqlite", "sqlite": {"path": str(tmp / "limits.sqlite3")}},
        "admin-group": "gate-admins",
    }
    section.update(extra)
    return section


def post(gate: RunningGate, token: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(
        gate.url + "/v1/messages", json=body, headers={"authorization": f"Bearer {token}", **headers}, timeout=30
    )


def token_for(settings: Any, sub: str, groups: list[str] | None = None) -> str:
    """A development token for ``sub`` carrying a groups claim (``mint_dev_token`` sets none)."""
    import time

    from gate.identity.devauth import load_or_create_key_pair, resolve_data_dir

    jwt = settings.security.jwt
    pair = load_or_create_key_pair(resolve_data_dir(jwt.dev.data_dir))
    now = int(time.time())
    claims = {"iss": jwt.dev.issuer, "sub": sub, "iat": now, "exp": now + 3600, "groups": groups or []}
    return pair.sign(claims)


# ---------------------------------------------------------------------------------------------- in-process Gate


@pytest.fixture
def priced(fake: FakeAnthropic) -> FakeAnthropic:
    fake.responder = answer
    return fake


def test_a_spend_cap_refuses_with_429_naming_the_cap_and_its_reset_and_no_upstream_call(
    start_gate: Callable[..., RunningGate], priced: FakeAnthropic, tmp_path: Path
) -> None:
    # Each call is estimated at ~800 input tokens ($0.0024) + 200 output ($0.003) and costs $0.006 exactly.
    # A daily cap of $0.02 takes three calls ($0.018 reconciled); the fourth's estimate would pass the cap.
    caps = [{"scope-type": "user", "scope-id": "*", "period": "daily", "amount-usd": "0.02"}]
    gate = start_gate(limits=limits_section(tmp_path, **{"spend-caps": caps}))
    token = token_for(gate.settings, "alice")
    for _ in range(3):
        response = post(gate, token, request_body())
        assert response.status_code == 200, response.text
    refused = post(gate, token, request_body())
    assert refused.status_code == 429
    error = refused.json()
    assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
    message = error["error"]["message"]
    assert "daily cap of $0.02 for user alice" in message and "resets at" in message
    assert int(refused.headers["retry-after"]) >= 1
    assert len(priced.received) == 3  # no upstream call for the refusal
    events = read_events(gate.settings.usage.file.path and Path(gate.settings.usage.file.path), 3)
    assert len(events) == 3  # and no usage event
    assert sum(Decimal(e["data"]["cost"]) for e in events) == 3 * COST
    # Another user has a cap of their own.
    assert post(gate, token_for(gate.settings, "bob"), request_body()).status_code == 200


def test_the_reservation_is_reconciled_to_the_exact_cost(
    start_gate: Callable[..., RunningGate], priced: FakeAnthropic, tmp_path: Path
) -> None:
    gate = start_gate(limits=limits_section(tmp_path))
    token = token_for(gate.settings, "carol", ["eng"])
    for _ in range(2):
        assert post(gate, token, request_body()).status_code == 200
    limits = gate.gate.limits if gate.gate else None
    assert limits is not None

    async def standing() -> list[Any]:
        for _ in range(200):
            rows = await limits.standing("carol", ["eng"])
            spend = [r for r in rows if r.kind == "spend"]
            if all(r.used == 2 * 6_000_000 for r in spend):  # $0.012 in nano-dollars
                return rows
            await asyncio.sleep(0.02)
        return rows

    rows = gate.bg.run(standing())
    spend = {(r.scope_type, r.period): r.used for r in rows if r.kind == "spend"}
    assert set(spend.values()) == {12_000_000}, spend
    assert {scope for scope, _ in spend} == {"user", "rbac_group", "organization"}


def test_requests_per_minute_per_group_and_concurrent_streams_per_user(
    start_gate: Callable[..., RunningGate], fake: FakeAnthropic, tmp_path: Path
) -> None:
    rate = {"user": {"concurrent-streams": 1}, "groups": {"interns": {"requests-per-minute": 2}}}
    gate = start_gate(limits=limits_section(tmp_path, rate=rate))
    intern_a, intern_b = token_for(gate.settings, "ann", ["interns"]), token_for(gate.settings, "ben", ["interns"])
    body = {"model": "claude-opus-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}
    assert post(gate, intern_a, body).status_code == 200
    assert post(gate, intern_b, body).status_code == 200
    refused = post(gate, intern_a, body)
    assert refused.status_code == 429
    assert "2 requests per minute for group interns" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60

    # One stream at a time for dave: a second one while the first is held open is refused.
    fake.enqueue(Reply(fixture="stream-basic.sse", cuts=[200], delay=1.0))
    token = token_for(gate.settings, "dave")
    stream = {**body, "stream": True}
    first_open = threading.Event()
    outcome: list[int] = []

    def first() -> None:
        with httpx.stream(
            "POST", gate.url + "/v1/messages", json=stream, headers={"authorization": f"Bearer {token}"}, timeout=30
        ) as response:
            first_open.set()
            response.read()
            outcome.append(response.status_code)

    thread = threading.Thread(target=first)
    thread.start()
    assert first_open.wait(30)
    second = post(gate, token, stream)
    assert second.status_code == 429
    assert "at most 1 streams at once for user dave" in second.json()["error"]["message"]
    thread.join(30)
    assert outcome == [200]
    for _ in range(100):  # the slot comes back when the first stream's record is settled
        if post(gate, token, stream).status_code == 200:
            break
        threading.Event().wait(0.05)
    else:
        raise AssertionError("the stream slot never came back")


def test_admin_api_sets_reads_and_resets_caps_with_an_audit_trail(
    start_gate: Callable[..., RunningGate], priced: FakeAnthropic, tmp_path: Path
) -> None:
    gate = start_gate(limits=limits_section(tmp_path))
    admin = {"authorization": f"Bearer {token_for(gate.settings, 'root', ['gate-admins'])}"}
    user = {"authorization": f"Bearer {token_for(gate.settings, 'erin', ['eng'])}"}
    base = gate.url + "/v1/organizations/spend_limits"
    assert httpx.get(base, headers=user).status_code == 403
    assert httpx.get(base).status_code == 401
    bad = httpx.post(base, headers=admin, json={"scope_type": "team", "period": "daily", "amount": 1})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"

    created = httpx.post(
        base,
        headers=admin,
        json={"scope_type": "rbac_group", "scope_id": "eng", "period": "daily", "amount": 1, "reason": "trial"},
    )
    assert created.status_code == 201, created.text
    cap = created.json()
    assert (cap["amount"], cap["amount_usd"], cap["source"]) == (1, "0.01", "api")
    assert post(gate, user["authorization"].split()[1], request_body()).status_code == 200
    refused = post(gate, user["authorization"].split()[1], request_body())
    assert refused.status_code == 429 and "daily cap of $0.01 for group eng" in refused.json()["error"]["message"]

    spend = httpx.get(gate.url + "/v1/organizations/spend?scope_type=rbac_group&scope_id=eng", headers=admin).json()
    assert {row["period"] for row in spend["data"]} == {"daily", "weekly", "monthly"}
    effective = httpx.get(base + "/effective?user_id=erin&groups=eng", headers=admin).json()
    assert any(row["scope_type"] == "rbac_group" and row["limit_usd"] == "0.01" for row in effective["data"])

    raised = httpx.put(f"{base}/{cap['id']}", headers=admin, json={"amount_usd": "5.00"})
    assert raised.status_code == 200 and raised.json()["amount"] == 500
    assert post(gate, user["authorization"].split()[1], request_body()).status_code == 200
    reset = httpx.post(
        gate.url + "/v1/organizations/spend/reset",
        headers=admin,
        json={"scope_type": "rbac_group", "scope_id": "eng", "period": "daily", "reason": "new budget"},
    )
    assert reset.status_code == 200
    assert httpx.delete(f"{base}/{cap['id']}", headers=admin).status_code == 200
    assert httpx.get(f"{base}/{cap['id']}", headers=admin).status_code == 404

    audit = httpx.get(base + "/audit", headers=admin).json()["data"]
    assert [row["action"] for row in audit] == [
        "spend_limit.delete",
        "spend.reset",
        "spend_limit.update",
        "spend_limit.create",
    ]
    assert audit[2]["before"]["amount"] == 1 and audit[2]["after"]["amount"] == 500
    assert audit[3]["reason"] == "trial" and audit[3]["actor"] == "root"


def test_gate_usage_shows_a_users_standing_against_every_limit(tmp_path: Path) -> None:
    config = tmp_path / "limits.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "limits": {
                    **limits_section(tmp_path),
                    "spend-caps": [{"scope-type": "user", "scope-id": "*", "period": "monthly", "amount-usd": "50"}],
                    "rate": {"user": {"requests-per-minute": 60}},
                }
            }
        )
    )
    gate = Path(sys.executable).parent / "gate"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    done = subprocess.run(
        [str(gate), "usage", "--config", str(config), "--user", "frank", "--group", "eng"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    assert "user frank" in done.stdout and "$0.00 of $50.00" in done.stdout
    assert "60 requests/min" in done.stdout or "of 60" in done.stdout
    assert "group eng" in done.stdout and "organisation" in done.stdout


# ---------------------------------------------------------------------------------------------- the stores


def _stores() -> list[str]:
    return ["sqlite", "postgresql", "redis"]


@pytest.fixture(params=_stores())
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CounterStore]:
    kind = request.param
    unique = f"gate_test_{uuid.uuid4().hex[:12]}"
    counters: CounterStore
    if kind == "sqlite":
        from gate.store.sqlite_counters import SqliteCounters

        counters = SqliteCounters(SqliteStoreSettings(path=str(tmp_path / "c.sqlite3")))
    elif kind == "postgresql":
        from gate.store.postgres_counters import PostgresCounters

        counters = PostgresCounters(PostgresStoreSettings(url=PG_URL, schema=unique), timeout=5.0)
    else:
        from gate.store.redis_counters import RedisCounters

        counters = RedisCounters(RedisStoreSettings(url=REDIS_URL, key_prefix=f"{unique}:"), timeout=5.0)
    await counters.start()
    yield counters
    await cleanup(counters, unique)
    await counters.close()


async def cleanup(counters: CounterStore, unique: str) -> None:
    if counters.kind == "postgresql":
        import asyncpg

        conn = await asyncpg.connect(PG_URL)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{unique}" CASCADE')
        await conn.close()
    elif counters.kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"{unique}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_concurrent_reservations_never_pass_a_limit(store: CounterStore) -> None:
    import time

    expires = time.time() + 600
    charges = [Charge("spend:a", 7, 100, expires), Charge("spend:org", 7, 1000, expires)]
    outcomes = await asyncio.gather(*(store.reserve(charges) for _ in range(40)))
    admitted = sum(1 for o in outcomes if o is None)
    assert admitted == 14  # 14 * 7 = 98 <= 100 < 105
    values = await store.read(["spend:a", "spend:org", "missing"])
    assert values == {"spend:a": 98, "spend:org": 98, "missing": 0}
    refused = next(o for o in outcomes if o is not None)
    assert refused.charge.key == "spend:a" and refused.current >= 91
    # All or nothing: a refusal on one counter adds to none.
    assert await store.reserve([Charge("spend:b", 5, None, expires), Charge("spend:a", 5, 100, expires)])
    assert (await store.read(["spend:b"]))["spend:b"] == 0
    # Deltas: reconcile, release; a decrement never creates a counter.
    await store.add([Delta("spend:a", -8, expires), Delta("spend:new", -3, expires), Delta("tpm:x", 4, expires)])
    assert await store.read(["spend:a", "spend:new", "tpm:x"]) == {"spend:a": 90, "spend:new": 0, "tpm:x": 4}
    await store.delete(["spend:a"])
    assert (await store.read(["spend:a"]))["spend:a"] == 0


async def test_an_expired_window_restarts_from_zero(store: CounterStore) -> None:
    import time

    past = time.time() - 1
    assert await store.reserve([Charge("streams:user:z", 3, 3, past)]) is None
    assert (await store.read(["streams:user:z"]))["streams:user:z"] == 0
    assert await store.reserve([Charge("streams:user:z", 1, 1, time.time() + 60)]) is None
    await store.sweep()
    assert (await store.read(["streams:user:z"]))["streams:user:z"] == 1


async def test_an_unreachable_store_raises_store_unavailable() -> None:
    from gate.store.postgres_counters import PostgresCounters
    from gate.store.redis_counters import RedisCounters

    with socket_closed() as port:
        pg = PostgresCounters(PostgresStoreSettings(url=f"postgresql://postgres@127.0.0.1:{port}/x"), timeout=0.5)
        rd = RedisCounters(RedisStoreSettings(url=f"redis://127.0.0.1:{port}/0"), timeout=0.5)
        for counters in (pg, rd):
            with pytest.raises(StoreUnavailable) as caught:
                await counters.reserve([Charge("k", 1, 2, 0.0)])
            assert "postgres@" not in str(caught.value)
            await counters.close()


class socket_closed:
    """A port nothing listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        pass


# ---------------------------------------------------------------------------------------------- units


def test_windows_follow_the_configured_zone() -> None:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    paris = Windows("Europe/Paris")
    # 23:30 on March 1st in Paris is 22:30 UTC: the same day in both zones, but its end differs.
    now = datetime(2026, 3, 1, 23, 30, tzinfo=ZoneInfo("Europe/Paris")).timestamp()
    assert paris.window("daily", now).label == "2026-03-01"
    assert paris.window("monthly", now).label == "2026-03"
    assert paris.window("weekly", now).label == "2026-W09"
    end = paris.window("daily", now).end
    paris_zone = ZoneInfo("Europe/Paris")
    assert datetime.fromtimestamp(end, paris_zone) == datetime(2026, 3, 2, tzinfo=paris_zone)
    utc = Windows("UTC")
    assert utc.window("daily", now).label == "2026-03-01"  # 22:30 UTC


def test_a_bad_time_zone_is_a_config_error() -> None:
    from gate.settings import ConfigError, load_settings

    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, overrides={"limits": {"time-zone": "Mars/Olympus"}})
    assert "limits.time-zone" in str(caught.value)


class _Prices:
    def cost(self, record: Any) -> Any:
        return None

    def estimate(self, model: str, *, input_tokens: int, output_tokens: int) -> Decimal | None:
        return Decimal("0.5")


async def test_fail_closed_refuses_with_503_and_fail_open_admits_unchecked() -> None:
    class Down:
        kind = "down"

        async def start(self) -> None:
            raise StoreUnavailable("down")

        async def reserve(self, charges: Any) -> Any:
            raise StoreUnavailable("down")

        async def add(self, deltas: Any) -> None:
            raise StoreUnavailable("down")

        async def spend_limits(self) -> list[Any]:
            raise StoreUnavailable("down")

        async def close(self) -> None:
            pass

    identity = Identity(sub="u", expires_at=None)
    failures: list[str] = []
    for mode in ("closed", "open"):
        settings = UsageLimitsSettings(enabled=True, store={"on-failure": mode})  # type: ignore[arg-type]
        limits = Limits(settings, Down(), _Prices(), on_store_failure=failures.append)  # type: ignore[arg-type]
        verdict = await limits.admit(identity, MODEL, 100, 10, False)
        assert limits.health()["status"] == "DOWN"
        if mode == "closed":
            assert isinstance(verdict, Refusal) and verdict.status == 503
            assert verdict.response().status == 503
        else:
            assert isinstance(verdict, Admission)
    assert failures == ["closed", "open"]


def test_admin_api_answers_bad_input_in_anthropics_error_shape(
    start_gate: Callable[..., RunningGate], priced: FakeAnthropic, tmp_path: Path
) -> None:
    gate = start_gate(limits=limits_section(tmp_path))
    admin = {"authorization": f"Bearer {token_for(gate.settings, 'root', ['gate-admins'])}"}
    base = gate.url + "/v1/organizations/spend_limits"
    cases = [
        httpx.post(base, headers=admin, content=b"\xff\xfe not json"),
        httpx.post(base, headers=admin, json=["a", "list"]),
        httpx.post(base, headers=admin, json={"scope_type": "user", "scope_id": "", "period": "daily", "amount": 1}),
        httpx.post(base, headers=admin, json={"scope_type": "user", "scope_id": "u", "period": "hourly", "amount": 1}),
        httpx.post(base, headers=admin, json={"scope_type": "user", "scope_id": "u", "period": "daily", "amount": -1}),
        httpx.post(
            base, headers=admin, json={"scope_type": "user", "scope_id": "u", "period": "daily", "amount_usd": "1.001"}
        ),
        httpx.post(
            base, headers=admin, json={"scope_type": "user", "scope_id": "u", "period": "daily", "amount": True}
        ),
        httpx.post(base, headers=admin, content=b"{" * 70_000),
        httpx.get(base + "/effective", headers=admin),
        httpx.get(base + "/audit?limit=abc", headers=admin),
        httpx.get(gate.url + "/v1/organizations/spend?scope_type=nobody", headers=admin),
    ]
    for response in cases:
        assert response.status_code == 400, response.text
        error = response.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert httpx.put(base + "/sl_missing", headers=admin, json={"amount": 1}).status_code == 404
    assert httpx.get(base + "/audit", headers=admin).json()["data"] == []  # nothing bad was recorded


async def test_a_client_that_leaves_during_the_reservation_gets_nothing_kept(tmp_path: Path) -> None:
    from gate.store.sqlite_counters import SqliteCounters

    class Slow(SqliteCounters):
        gate = asyncio.Event()

        landed = False

        async def reserve(self, charges: Any) -> Any:
            await self.gate.wait()
            result = await super().reserve(charges)
            Slow.landed = result is None
            return result

    store = Slow(SqliteStoreSettings(path=str(tmp_path / "slow.sqlite3")))
    rate = {"user": {"concurrent-streams": 1}}
    settings = UsageLimitsSettings(enabled=True, rate=rate)  # type: ignore[arg-type]
    limits = Limits(settings, store, _Prices())
    await limits.start()
    identity = Identity(sub="gone", expires_at=None)
    admitting = asyncio.create_task(limits.admit(identity, MODEL, 100, 10, True))
    await asyncio.sleep(0.01)
    admitting.cancel()
    Slow.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await admitting
    for _ in range(100):  # the reservation lands, then is given back
        await asyncio.sleep(0.01)
        if not Slow.landed:
            continue
        standing = {r.kind: r.used for r in await limits.standing("gone", []) if r.scope_type == "user"}
        if standing["streams"] == 0 and standing["spend"] == 0:
            break
    assert Slow.landed and standing["streams"] == 0 and standing["spend"] == 0
    assert isinstance(await limits.admit(identity, MODEL, 100, 10, True), Admission)  # the slot is free
    await limits.close()


@pytest.mark.parametrize("kind", ["postgresql", "redis"])
def test_gate_starts_with_its_store_down_and_fails_closed_with_503(
    kind: str, start_gate: Callable[..., RunningGate], priced: FakeAnthropic, tmp_path: Path
) -> None:
    with socket_closed() as port:
        url = (
            f"postgresql://postgres:pg-secret@127.0.0.1:{port}/x"
            if kind == "postgresql"
            else f"redis://:rd-secret@127.0.0.1:{port}/0"
        )
        store = {"type": kind, "on-failure": "closed", kind: {"url": url}}
        gate = start_gate(limits=limits_section(tmp_path, store=store))
        refused = post(gate, token_for(gate.settings, "gus"), request_body())
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "overloaded_error"
        assert "limits store is unavailable" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"] == "5"
        assert priced.received == []
        health = httpx.get(gate.url + "/actuator/health", timeout=10)
        assert health.status_code == 503
        component = health.json()["components"]["limitsStore"]
        assert component["status"] == "DOWN" and component["details"]["onFailure"] == "closed"
        assert "secret" not in health.text
