"""The usage report over HTTP with hostile input: filters that try SQL, values that try HTML or spreadsheet
formulas, bad dates and periods, and who may see it (company JWTs from a real JWKS, the admin group claim)."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gate.usagesink.service import UsageSink
from tests.brokers import rabbitmq  # noqa: F401 - a fixture
from tests.harness import BackgroundLoop
from tests.jwks import JwksServer
from tests.sinksupport import (
    delete_broker_objects,
    event_bytes,
    pg_database,  # noqa: F401 - a fixture
    publish,
    record,
    rows,
    sink_settings,
    unique,
    until,
)

pytestmark = pytest.mark.usefixtures("rabbitmq")

HOSTILE_SUBJECT = "<script>alert('x')</script>"
FORMULA_SUBJECT = '=HYPERLINK("http://evil.test","click")'


class ReportRig:
    def __init__(self, sink: UsageSink, idp: JwksServer) -> None:
        self.base = f"http://127.0.0.1:{sink.port}"
        self.admin = {"Authorization": f"Bearer {idp.mint('root', ttl=600, claims={'groups': ['ops', 'admins']})}"}
        self.user = {"Authorization": f"Bearer {idp.mint('eve', ttl=600, claims={'groups': ['ops']})}"}


@pytest.fixture
async def report(tmp_path: Path, pg_database: str, fake_loop: BackgroundLoop) -> AsyncIterator[ReportRig]:  # noqa: F811
    idp = JwksServer()
    fake_loop.run(idp.start())
    idp.add_key("RSA", "RS256")
    exchange, queue, schema = unique("report-x"), unique("report-q"), unique("rep")
    settings = sink_settings(
        tmp_path,
        database=pg_database,
        schema=schema,
        exchange=exchange,
        queue=queue,
        profiles=("prod",),
        security={"jwt": {"jwk-set-uri": idp.url}},
        **{"usage-sink": {"report": {"admin-group": "admins"}}},
    )
    sink = UsageSink(settings)
    await sink.start()
    try:
        await until(lambda: sink.source.connected, "the sink consuming")
        events = [
            record(subject="alice", groups=["eng"]),
            record(subject=HOSTILE_SUBJECT, groups=["<b>grp</b>"]),
            record(subject=FORMULA_SUBJECT, groups=None, model="claude-haiku-4-5"),
        ]
        await publish(exchange, [event_bytes(e) for e in events])
        await until(lambda: len(rows(pg_database, schema)) == 3, "3 rows")
        yield ReportRig(sink, idp)
    finally:
        await sink.stop(grace=1.0)
        fake_loop.run(idp.stop())
        await delete_broker_objects(queue, exchange)


PERIOD = "from=2026-06-01&to=2026-06-01"


async def test_values_are_escaped_in_the_page(report: ReportRig) -> None:
    async with httpx.AsyncClient() as http:
        page = await http.get(f"{report.base}/report?{PERIOD}", headers=report.admin)
    assert page.status_code == 200
    assert "<script>alert(" not in page.text and "&lt;script&gt;alert(" in page.text
    assert "<b>grp</b>" not in page.text and "&lt;b&gt;grp&lt;/b&gt;" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert 'id="total-requests">3<' in page.text


@pytest.mark.parametrize(
    "query",
    [
        "user=%27%20OR%201%3D1%20--",
        "model=x%27%3B%20DROP%20TABLE%20usage_events%3B%20--",
        "group=%7D%27%29%20OR%20TRUE%20--",
        "user=%ff%fe",
    ],
)
async def test_filters_are_parameters_never_sql(report: ReportRig, query: str) -> None:
    async with httpx.AsyncClient() as http:
        page = await http.get(f"{report.base}/report?{PERIOD}&{query}", headers=report.admin)
        assert page.status_code == 200
        assert 'id="total-requests">0<' in page.text
        everything = await http.get(f"{report.base}/report?{PERIOD}", headers=report.admin)
        assert 'id="total-requests">3<' in everything.text  # the table is still there


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ("from=2026-13-01", "`from` is not a date"),
        ("to=yesterday", "`to` is not a date"),
        ("from=2026-06-02&to=2026-06-01", "after"),
        ("from=1990-01-01&to=2026-06-01", "longer than"),
        ("user=a%00b", "control characters"),
        ("model=" + "m" * 600, "longer than 512"),
    ],
)
async def test_bad_periods_are_a_clear_400(report: ReportRig, query: str, complaint: str) -> None:
    async with httpx.AsyncClient() as http:
        for path in ("/report", "/report/usage.csv"):
            answer = await http.get(f"{report.base}{path}?{query}", headers=report.admin)
            assert answer.status_code == 400
            assert answer.json()["error"]["type"] == "invalid_request_error"
            assert complaint in answer.json()["error"]["message"]


async def test_filters_by_group_and_model(report: ReportRig) -> None:
    async with httpx.AsyncClient() as http:
        eng = await http.get(f"{report.base}/report?{PERIOD}&group=eng", headers=report.admin)
        haiku = await http.get(f"{report.base}/report?{PERIOD}&model=claude-haiku-4-5", headers=report.admin)
    assert 'id="total-requests">1<' in eng.text and 'id="total-cost">$0.00105<' in eng.text
    assert 'id="total-requests">1<' in haiku.text and 'id="total-cost">$0.00035<' in haiku.text  # 100 x 1 + 50 x 5


async def test_csv_cells_cannot_run_as_formulas(report: ReportRig) -> None:
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"{report.base}/report/usage.csv?{PERIOD}", headers=report.admin)
    assert answer.status_code == 200
    assert answer.headers["content-disposition"] == 'attachment; filename="gate-usage-2026-06-01-2026-06-01.csv"'
    users = {row["user"] for row in csv.DictReader(io.StringIO(answer.text))}
    assert users == {"alice", HOSTILE_SUBJECT, "'" + FORMULA_SUBJECT}


async def test_only_the_admin_group_gets_in(report: ReportRig) -> None:
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{report.base}/report", headers=report.user)).status_code == 403
        assert (await http.get(f"{report.base}/report")).status_code == 401
        basic = await http.get(f"{report.base}/report", headers={"Authorization": "Basic cm9vdDpyb290"})
        assert basic.status_code == 401
        assert (await http.post(f"{report.base}/report", headers=report.admin)).status_code == 404
        assert (await http.get(f"{report.base}/metrics")).status_code == 200  # metrics are for scrapers: no token
