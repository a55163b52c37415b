"""Issue 17 end to end: traffic through Gate (company JWTs with groups, the fake Anthropic's documented answers)
reaches PostgreSQL through the real RabbitMQ and the usage sink with exactly one row per upstream call, through a
sink crash mid-stream and redelivered events; then headless Chromium opens the report as an admin, applies a
filter, finds the totals a hand computation gives, and keeps a screenshot (tests/artifacts/usage-report*.png);
anonymous and non-admin callers get 401 and 403.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import anthropic
import httpx
import pytest

from gate.accounting.prices import format_usd
from gate.usagesink.service import UsageSink
from tests.brokers import RABBITMQ_URL, RabbitConsumer, rabbitmq  # noqa: F401 - rabbitmq is a fixture
from tests.fake_anthropic import FakeAnthropic, Reply, error_reply
from tests.faultproxy import FaultProxy
from tests.harness import BackgroundLoop, RunningGate, gate_settings
from tests.jwks import JwksServer
from tests.sinksupport import (
    AMQP_PORT,
    PG_PORT,
    delete_broker_objects,
    pg_database,  # noqa: F401 - a fixture
    publish,
    rows,
    sink_settings,
    unique,
    until,
)

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
ADMIN_GROUP = "gate-admins"
HELLO = [{"role": "user", "content": "Hello"}]

# Hand computations from the fixtures and the packaged list prices (USD per million tokens):
CACHED_JSON = Decimal("0.0161178")  # Sonnet 4.5: 21 x 3 + 393 x 15 + 1500 x 3.75 + 551 x 6 + 4096 x 0.30
WEB_SEARCH = Decimal("0.20848")  # Opus 4.1: 10682 x 15 + 510 x 75, plus 1 search at 10 per 1,000
TOOL_USE = Decimal("0.00022925")  # 3 Haiku: 472 x 0.25 + 89 x 1.25
BASIC_STREAM = Decimal("0.0005")  # Opus 4.6: 25 x 5 + 15 x 25


@pytest.fixture
async def idp(fake_loop: BackgroundLoop) -> AsyncIterator[JwksServer]:
    server = JwksServer()
    fake_loop.run(server.start())
    server.add_key("EC", "ES256")
    yield server
    fake_loop.run(server.stop())


async def test_usage_from_gate_to_the_report(
    tmp_path: Path,
    fake: FakeAnthropic,
    idp: JwksServer,
    pg_database: str,  # noqa: F811
    rabbitmq: str,  # noqa: F811
) -> None:
    exchange, queue, schema = unique("usage-e2e-x"), unique("usage-e2e-q"), unique("report")
    jwt = {"jwt": {"jwk-set-uri": idp.url}}
    broker, db = FaultProxy("127.0.0.1", AMQP_PORT), FaultProxy("127.0.0.1", PG_PORT)
    broker.start()
    db.start()
    settings = sink_settings(
        tmp_path / "sink",
        database=pg_database,
        schema=schema,
        exchange=exchange,
        queue=queue,
        pg_port=db.port,
        amqp_port=broker.port,
        profiles=("prod",),
        security=jwt,
        **{"usage-sink": {"report": {"admin-group": ADMIN_GROUP}}},
    )
    witness = RabbitConsumer(exchange)  # every event Gate published, to compare the table with
    await witness.__aenter__()
    sinks: list[UsageSink] = []

    async def start_sink() -> UsageSink:
        sink = UsageSink(settings)
        await sink.start()
        sinks.append(sink)
        await until(lambda: sink.source.connected, "the sink consuming (its queue bound)")
        return sink

    sink = await start_sink()
    gate = await asyncio.to_thread(
        RunningGate(
            gate_settings(
                tmp_path / "gate",
                fake.url,
                profiles=("prod",),
                security=jwt,
                usage={"publisher": "rabbitmq", "destination": exchange, "rabbitmq": {"url": RABBITMQ_URL}},
            )
        ).start
    )
    tokens = {
        "alice": idp.mint("alice", ttl=3600, claims={"groups": ["eng"]}),
        "bob": idp.mint("bob", ttl=3600, claims={"groups": ["sales"]}),
        "carol": idp.mint("carol", ttl=3600, claims={"groups": [ADMIN_GROUP, "finance"]}),
    }

    def client(user: str) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=gate.url, api_key=tokens[user], max_retries=0)

    async def cached_json(session: str) -> None:
        fake.enqueue(Reply(fixture="message-prompt-caching.json"))
        await client("alice").messages.create(
            model="claude-haiku-4-5",
            max_tokens=64,
            messages=HELLO,
            extra_headers={"x-claude-code-session-id": session},
        )

    async def stream(user: str, fixture: str, session: str | None = None) -> None:
        fake.enqueue(Reply(fixture=fixture))
        headers = {"x-claude-code-session-id": session} if session else {}
        async with client(user).messages.stream(
            model="claude-opus-4-6", max_tokens=64, messages=HELLO, extra_headers=headers
        ) as s:
            await s.until_done()

    try:
        # Phase 1, the sink running: alice 2 cached JSON answers, bob 2 plain streams.
        for _ in range(2):
            await cached_json("sess-alice-1")
        for _ in range(2):
            await stream("bob", "stream-basic.sse")
        await until(lambda: len(rows(pg_database, schema)) == 4, "the first 4 rows")

        # Phase 2: the sink crashes (nothing in hand acknowledged) in the middle of the traffic; Gate's events
        # wait in the sink's durable queue until a new sink process starts.
        await stream("alice", "stream-web-search-usage.sse")
        fake.enqueue(error_reply(529, "overloaded_error", "Overloaded"))
        with pytest.raises(anthropic.APIStatusError):
            await client("bob").messages.create(model="claude-opus-4-6", max_tokens=64, messages=HELLO)
        await sink.abort()
        sinks.remove(sink)
        for _ in range(6):
            await stream("alice", "stream-tool-use.sse", session="sess-alice-2")
        await witness.wait_for(12, unique=True)
        gate_ids = [m.message_id for m in witness.messages]
        assert len(gate_ids) == 12 == len(set(gate_ids))  # one event per upstream call
        sink = await start_sink()
        await until(lambda: len(rows(pg_database, schema)) == 12, "all 12 rows after the restart")

        # Redelivered events (the broker's, or a publisher's retry) add nothing.
        await publish(exchange, [m.body for m in witness.messages[:3]])
        await until(lambda: sink.metrics.duplicates._value.get() >= 3, "the redelivered events seen as duplicates")
        stored = rows(pg_database, schema)
        assert len(stored) == 12
        assert {r[0] for r in stored} == set(gate_ids)
        by_user: dict[str, Decimal] = {}
        for _, subject, cost, _groups in stored:
            by_user[subject] = by_user.get(subject, Decimal(0)) + (cost or Decimal(0))
        alice_total = 2 * CACHED_JSON + WEB_SEARCH + 6 * TOOL_USE
        bob_total = 2 * BASIC_STREAM
        assert by_user == {"alice": alice_total, "bob": bob_total}
        assert {tuple(r[3]) for r in stored} == {("eng",), ("sales",)}

        base = f"http://127.0.0.1:{sink.port}"
        await check_access(base, tokens)
        await check_csv(base, tokens["carol"], alice_total)
        await check_page(base, tokens["carol"], total=alice_total + bob_total, alice=alice_total)
    finally:
        await asyncio.to_thread(gate.stop)
        for running in sinks:
            await running.stop(grace=1.0)
        await witness.close()
        broker.close()
        db.close()
        await delete_broker_objects(queue, exchange)


async def check_access(base: str, tokens: dict[str, str]) -> None:
    async with httpx.AsyncClient() as http:
        for path in ("/report", "/report/usage.csv", "/report/assets/plotly.min.js"):
            anonymous = await http.get(base + path)
            assert anonymous.status_code == 401, path
            assert anonymous.json()["type"] == "error" and anonymous.headers["www-authenticate"].startswith("Bearer")
            bad = await http.get(base + path, headers={"Authorization": "Bearer not.a.token"})
            assert bad.status_code == 401, path
            non_admin = await http.get(base + path, headers={"Authorization": f"Bearer {tokens['bob']}"})
            assert non_admin.status_code == 403, path
            assert non_admin.json()["error"]["type"] == "permission_error"
        admin = {"Authorization": f"Bearer {tokens['carol']}"}
        bad_filter = await http.get(base + "/report?from=yesterday", headers=admin)
        assert bad_filter.status_code == 400 and "from" in bad_filter.json()["error"]["message"]
        assert (await http.get(base + "/actuator/health")).json()["status"] == "UP"


async def check_csv(base: str, admin: str, alice_total: Decimal) -> None:
    async with httpx.AsyncClient() as http:
        answer = await http.get(base + "/report/usage.csv?user=alice", headers={"Authorization": f"Bearer {admin}"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(answer.text)))
    assert {row["user"] for row in table} == {"alice"}
    assert sum(Decimal(row["cost_usd"]) for row in table) == alice_total
    assert sum(int(row["requests"]) for row in table) == 9


async def check_page(base: str, admin: str, *, total: Decimal, alice: Decimal) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium); the browser part of the report test needs it")
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            anonymous = await browser.new_page()
            refused = await anonymous.goto(base + "/report")
            assert refused is not None and refused.status == 401

            context = await browser.new_context(
                extra_http_headers={"Authorization": f"Bearer {admin}"}, viewport={"width": 1400, "height": 1000}
            )
            page = await context.new_page()
            shown = await page.goto(base + "/report")
            assert shown is not None and shown.status == 200
            await page.wait_for_function("document.body.dataset.chartsReady === 'true'")
            assert await page.inner_text("#total-cost") == f"${format_usd(total)}"
            assert await page.inner_text("#total-requests") == "12"
            assert await page.inner_text("#total-errors") == "1"
            assert "overloaded_error" in await page.inner_text("#errors")
            await page.screenshot(path=str(ARTIFACTS / "usage-report.png"), full_page=True)

            await page.select_option("#user", "alice")
            async with page.expect_navigation():
                await page.click("#apply")
            await page.wait_for_function("document.body.dataset.chartsReady === 'true'")
            assert "user=alice" in page.url
            assert await page.inner_text("#total-cost") == f"${format_usd(alice)}"
            assert await page.inner_text("#total-requests") == "9"
            # cache reads over all input: 2 x 4096 / (2 x (21 + 2051 + 4096) + 10682 + 6 x 472)
            assert await page.inner_text("#cache-hit-share") == "31.7 %"
            models = await page.inner_text("#by-model")
            assert "claude-3-haiku-20240307" in models and "claude-sonnet-4-5-20250929" in models
            assert "sess-alice-2" in await page.inner_text("#sessions")
            assert await page.locator("#chart-cost .main-svg").count() > 0  # drawn by plotly.js
            await page.screenshot(path=str(ARTIFACTS / "usage-report-alice.png"), full_page=True)
            await context.close()
        finally:
            await browser.close()
