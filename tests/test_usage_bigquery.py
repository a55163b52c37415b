"""The BigQuery side of the usage sink. BigQuery cannot run here: the loader is tested against the requests the
real google-cloud-bigquery client sends (its HTTP session replaced by a recorder), the schema against the events."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

from gate.accounting.prices import PriceTable
from gate.accounting.usage import UsageRecord
from gate.events.envelope import OPTIONAL_DATA_FIELDS, build_event
from gate.usagesink.bigquery import (
    CLUSTERING_FIELDS,
    PARTITION_FIELD,
    SCHEMA,
    BigQueryLoader,
    BigQueryUnavailable,
    json_row,
    table_resource,
)
from gate.usagesink.rows import COLUMNS, from_amqp, row_from_event
from tests.sinksupport import event_bytes, record, sink_settings


class RecordingSession(requests.Session):
    """Stands in for the client's HTTP transport: records each request, answers with ``reply(method, url, body)``."""

    def __init__(self, reply: Any = None) -> None:
        super().__init__()
        self.is_mtls = False  # google-auth's AuthorizedSession attribute, read to pick the endpoint
        self.calls: list[tuple[str, str, Any]] = []
        self._reply = reply or (lambda method, url, body: {})

    def request(self, method: str, url: str, data: Any = None, headers: Any = None, **_: Any) -> requests.Response:  # type: ignore[override]
        body = json.loads(data) if data else None
        self.calls.append((method, url.partition("?")[0], body))
        response = requests.Response()
        response.status_code = 200
        response.headers["content-type"] = "application/json"
        response._content = json.dumps(self._reply(method, url, body)).encode()
        response.url = url
        return response


def client(session: RecordingSession) -> bigquery.Client:
    return bigquery.Client(project="acme-analytics", credentials=AnonymousCredentials(), _http=session)


def settings(tmp: Path, **bigquery_settings: Any) -> Any:
    return sink_settings(
        tmp, database="d", schema="s", exchange="e", queue="q", **{"usage-sink": {"bigquery": bigquery_settings}}
    ).usage_sink.bigquery


def rows_of(*records: UsageRecord) -> list[Any]:
    prices = PriceTable.from_settings(sink_settings(Path("/x"), database="d", schema="s", exchange="e", queue="q"))
    return [
        row_from_event(from_amqp(event_bytes(r, prices), "application/cloudevents+json", None), prices) for r in records
    ]


def test_the_schema_has_a_column_for_every_field_of_the_event() -> None:
    everything = {f.name: 1 for f in dataclasses.fields(UsageRecord) if f.name in OPTIONAL_DATA_FIELDS}
    everything["groups"] = ["eng"]
    everything["claude_code_session_id"] = "s"
    everything["service_tier"] = "standard"
    prices = PriceTable.from_settings(sink_settings(Path("/x"), database="d", schema="s", exchange="e", queue="q"))
    data = build_event(record(**everything), event_type="t", source="/s", prices=prices)["data"]
    names = [name for name, *_ in SCHEMA]
    assert names == list(COLUMNS)  # the PostgreSQL row and the BigQuery row are the same columns, same order
    assert set(data) <= set(names), set(data) - set(names)
    assert "cost" in data and "price_version" in data
    kinds = {name: kind for name, kind, *_ in SCHEMA}
    assert kinds["cost"] == "BIGNUMERIC" and kinds["event_time"] == "TIMESTAMP" and kinds["data"] == "JSON"
    assert PARTITION_FIELD == "event_time" and CLUSTERING_FIELDS == ("subject", "model")


def test_the_table_is_partitioned_by_day_and_clustered_by_subject_and_model(tmp_path: Path) -> None:
    session = RecordingSession(reply=lambda method, url, body: body or {})
    loader = BigQueryLoader(settings(tmp_path, **{"create-table": True}), client=client(session))
    loader._ready()
    method, url, body = session.calls[0]
    assert method == "POST" and url.endswith("/projects/acme-analytics/datasets/gate/tables")
    assert body["tableReference"] == {"projectId": "acme-analytics", "datasetId": "gate", "tableId": "usage_events"}
    assert body["timePartitioning"] == {"type": "DAY", "field": "event_time"}
    assert body["clustering"] == {"fields": ["subject", "model"]}
    fields = {f["name"]: f for f in body["schema"]["fields"]}
    assert fields["event_id"]["mode"] == "REQUIRED" and fields["groups"]["mode"] == "REPEATED"
    assert fields["cost"]["type"] == "BIGNUMERIC"
    assert table_resource(settings(tmp_path), "p").to_api_repr()["timePartitioning"]["field"] == "event_time"


async def test_rows_are_streamed_with_the_event_id_as_insert_id(tmp_path: Path) -> None:
    session = RecordingSession()
    loader = BigQueryLoader(settings(tmp_path), client=client(session))
    batch = rows_of(record(subject="alice", cache_read_tokens=1000), record(subject="bob", groups=None))
    await loader.write(batch)
    [(method, url, body)] = session.calls
    assert method == "POST"
    assert url.endswith("/projects/acme-analytics/datasets/gate/tables/usage_events/insertAll")
    assert [r["insertId"] for r in body["rows"]] == [row.event_id for row in batch]
    first = body["rows"][0]["json"]
    assert set(first) == set(COLUMNS)
    assert first["subject"] == "alice" and first["groups"] == ["eng"]
    assert first["cost"] == "0.00135"  # 100 x 3 + 50 x 15 + 1000 x 0.30 per million: a string, never a float
    assert first["event_time"] == "2026-06-01T12:00:00+00:00"
    assert first["data"]["input_tokens"] == 100
    assert body["rows"][1]["json"]["groups"] == []


async def test_rows_bigquery_refuses_make_the_batch_fail_to_be_sent_again(tmp_path: Path) -> None:
    session = RecordingSession(
        reply=lambda method, url, body: {"insertErrors": [{"index": 0, "errors": [{"reason": "invalid"}]}]}
    )
    loader = BigQueryLoader(settings(tmp_path), client=client(session))
    with pytest.raises(BigQueryUnavailable, match="refused 1 of 1"):
        await loader.write(rows_of(record()))
    assert loader.last_error is not None


def test_cost_is_sent_exactly() -> None:
    [row] = rows_of(record())
    assert json_row(dataclasses.replace(row, cost=Decimal("0.00000000015")))["cost"] == "0.00000000015"
    assert json_row(dataclasses.replace(row, cost=None))["cost"] is None


def test_the_documented_schema_is_the_code() -> None:
    page = (Path(__file__).parent.parent / "docs" / "usage-bigquery.md").read_text(encoding="utf-8")
    documented = [
        tuple(cell.strip().strip("`") for cell in line.strip("|").split("|"))
        for line in page.splitlines()
        if line.startswith("| `")
    ]
    assert documented == [tuple(column) for column in SCHEMA]
    ddl = page.partition("CREATE TABLE")[2].partition("PARTITION BY")[0]
    for name, kind, mode, _ in SCHEMA:
        expected = {"REPEATED": f"ARRAY<{kind}>", "REQUIRED": f"{kind} NOT NULL"}.get(mode, kind)
        assert f"{name if name != 'groups' else '`groups`'} {expected}" in ddl, name
