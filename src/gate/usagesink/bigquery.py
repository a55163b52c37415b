"""BigQuery for the usage sink (the ``gcp`` profile): the table's schema and a streaming loader.

The table is partitioned by day on ``event_time`` and clustered by ``subject`` and ``model``, the filters every
usage query starts with. Rows go in through ``tabledata.insertAll`` (google-cloud-bigquery's
``insert_rows_json``) with the event id as ``insertId``, so BigQuery drops a redelivered event it saw within
about a minute; for exactly one row per event beyond that window, query through the view in ``DEDUP_VIEW_SQL``
(one row per ``event_id``) or run it as a scheduled ``MERGE``. ``cost`` is ``NUMERIC`` (exact, 9 decimal places),
sent as a string so that no float ever carries it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from gate.accounting.prices import format_usd
from gate.settings import SinkBigQuerySettings
from gate.usagesink.rows import UsageRow

__all__ = ["DEDUP_VIEW_SQL", "SCHEMA", "BigQueryLoader", "BigQueryUnavailable", "json_row", "table_resource"]

log = logging.getLogger("gate.usagesink")

# (name, type, mode, description): the source of truth for the table; docs/usage-bigquery.md shows it.
SCHEMA: tuple[tuple[str, str, str, str], ...] = (
    ("event_id", "STRING", "REQUIRED", "CloudEvent id: unique per upstream call, stable across redeliveries"),
    ("event_time", "TIMESTAMP", "REQUIRED", "when the upstream call ended (partitioning column, by day)"),
    ("subject", "STRING", "NULLABLE", "the caller: the JWT sub (clustering column)"),
    ("groups", "STRING", "REPEATED", "the caller's groups from the configured JWT claim"),
    ("model", "STRING", "NULLABLE", "the model Anthropic answered with (clustering column)"),
    ("message_id", "STRING", "NULLABLE", "Anthropic's message id"),
    ("status", "STRING", "NULLABLE", "success, error or client_disconnected"),
    ("error_type", "STRING", "NULLABLE", "Anthropic's error type, when the call failed"),
    ("http_status", "INT64", "NULLABLE", "upstream's HTTP status"),
    ("stream", "BOOL", "NULLABLE", "whether the client asked for a stream"),
    ("stop_reason", "STRING", "NULLABLE", "end_turn, max_tokens, tool_use, ..."),
    ("input_tokens", "INT64", "REQUIRED", "input tokens"),
    ("output_tokens", "INT64", "REQUIRED", "output tokens"),
    ("cache_creation_tokens", "INT64", "REQUIRED", "prompt-cache writes"),
    ("cache_creation_5m_tokens", "INT64", "NULLABLE", "prompt-cache writes with the 5-minute lifetime"),
    ("cache_creation_1h_tokens", "INT64", "NULLABLE", "prompt-cache writes with the 1-hour lifetime"),
    ("cache_read_tokens", "INT64", "REQUIRED", "prompt-cache reads"),
    ("total_tokens", "INT64", "REQUIRED", "input + output + cache writes + cache reads"),
    ("web_search_requests", "INT64", "NULLABLE", "server-side web searches"),
    ("web_fetch_requests", "INT64", "NULLABLE", "server-side web fetches"),
    ("cost", "BIGNUMERIC", "NULLABLE", "USD by Gate's price table; null when the model has no price"),
    ("price_version", "STRING", "NULLABLE", "the price version that priced the call"),
    ("latency_ms", "INT64", "NULLABLE", "from the request reaching Gate to its last byte out"),
    ("time_to_first_token_ms", "INT64", "NULLABLE", "streams: to the first content delta"),
    ("key_alias", "STRING", "NULLABLE", "which company key served the call (never its value)"),
    ("trace_id", "STRING", "NULLABLE", "OpenTelemetry trace id"),
    ("anthropic_request_id", "STRING", "NULLABLE", "upstream's request-id"),
    ("service_tier", "STRING", "NULLABLE", "standard, priority, batch"),
    ("claude_code_session_id", "STRING", "NULLABLE", "Claude Code's session id"),
    ("event_type", "STRING", "REQUIRED", "CloudEvent type"),
    ("event_source", "STRING", "REQUIRED", "CloudEvent source"),
    ("data", "JSON", "NULLABLE", "the whole event data, fields added later included"),
)
PARTITION_FIELD = "event_time"
CLUSTERING_FIELDS = ("subject", "model")

DEDUP_VIEW_SQL = """\
CREATE OR REPLACE VIEW `{project}.{dataset}.usage_events_unique` AS
SELECT * FROM `{project}.{dataset}.{table}`
WHERE TRUE
QUALIFY ROW_NUMBER() OVER (PARTITION BY event_id ORDER BY event_time) = 1
"""


class BigQueryUnavailable(Exception):
    """The rows were not all accepted: the batch is to be sent again (insertId makes that safe)."""


def json_row(row: UsageRow) -> dict[str, Any]:
    """The row as insertAll's ``json`` object (timestamps in RFC 3339, cost as an exact decimal string)."""
    cost = None if row.cost is None else format_usd(row.cost)
    out: dict[str, Any] = {}
    for name, _type, _mode, _ in SCHEMA:
        value = getattr(row, name)
        if name == "event_time":
            value = value.isoformat()
        elif name == "cost":
            value = cost
        elif name == "groups":
            value = value or []
        out[name] = value
    return out


def table_resource(settings: SinkBigQuerySettings, project: str) -> Any:
    """A ``bigquery.Table`` with the schema, daily partitioning on event_time and clustering."""
    from google.cloud import bigquery

    table = bigquery.Table(
        f"{project}.{settings.dataset}.{settings.table}",
        schema=[
            bigquery.SchemaField(name, kind, mode=mode, description=description)
            for name, kind, mode, description in SCHEMA
        ],
    )
    table.time_partitioning = bigquery.TimePartitioning(type_=bigquery.TimePartitioningType.DAY, field=PARTITION_FIELD)
    table.clustering_fields = list(CLUSTERING_FIELDS)
    return table


class BigQueryLoader:
    """Streams batches into the table; the blocking client runs in a thread."""

    def __init__(self, settings: SinkBigQuerySettings, *, client: Any = None) -> None:
        self._settings = settings
        self._client = client
        self._table_id: str | None = None
        self.last_error: str | None = None

    def _ready(self) -> tuple[Any, str]:
        if self._client is None:
            from google.cloud import bigquery

            self._client = bigquery.Client(project=self._settings.project_id)
        if self._table_id is None:
            project = self._settings.project_id or self._client.project
            if self._settings.create_table:
                self._client.create_table(table_resource(self._settings, project), exists_ok=True)
            self._table_id = f"{project}.{self._settings.dataset}.{self._settings.table}"
        return self._client, self._table_id

    def _insert(self, rows: Sequence[UsageRow]) -> None:
        try:
            client, table_id = self._ready()
            errors = client.insert_rows_json(
                table_id, [json_row(row) for row in rows], row_ids=[row.event_id for row in rows]
            )
        except Exception as exc:  # noqa: BLE001 - google-api-core and requests share no base: any failure retries
            self.last_error = f"BigQuery: {type(exc).__name__}: {str(exc)[:300]}"
            raise BigQueryUnavailable(self.last_error) from None
        if errors:
            self.last_error = f"BigQuery refused {len(errors)} of {len(rows)} rows: {str(errors[0])[:300]}"
            raise BigQueryUnavailable(self.last_error)
        self.last_error = None

    async def write(self, rows: Sequence[UsageRow]) -> None:
        await asyncio.to_thread(self._insert, rows)
