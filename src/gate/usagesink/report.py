"""The usage report served by the sink: tokens and cost by user, group, model and day, cache hit share, top
sessions, errors by type; filters by period, user, group and model; CSV export.

Only callers whose JWT (verified as the gateway verifies it, by ``gate.identity.auth.Authenticator``) carries
``usage-sink.report.admin-group`` among its groups get anything: no token or a bad one is a 401, a valid one
without the group a 403. The page is rendered by Mako (escaping every value) and its charts drawn by plotly.js,
served from the ``plotly`` package itself so that the page needs nothing outside the sink.
"""

from __future__ import annotations

import csv
import datetime
import functools
import io
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlencode

import orjson
import psycopg
from mako.template import Template
from psycopg import sql

from gate.accounting.prices import format_usd
from gate.http.server import Request, Response, Router
from gate.identity.auth import Authenticator, AuthError, www_authenticate
from gate.ops.errors import error_response
from gate.settings import GateSettings
from gate.usagesink.postgres import TABLE, PostgresStore

__all__ = ["Filters", "Report"]

_DEFAULT_DAYS = 30
_MAX_DAYS = 3660
_MAX_VALUE = 512  # a user id, group or model name; PostgreSQL refuses NUL, so control characters are refused here


@dataclass(frozen=True)
class Filters:
    """The report's filters: a period of whole UTC days (``start`` to ``end`` inclusive) and optional equalities."""

    start: datetime.date
    end: datetime.date
    user: str | None = None
    group: str | None = None
    model: str | None = None

    @classmethod
    def from_query(cls, query: str, today: datetime.date) -> Filters:
        """From ``?from=YYYY-MM-DD&to=...&user=...&group=...&model=...``; ``ValueError`` names a bad value."""
        params = {k: v[-1].strip() for k, v in parse_qs(query, keep_blank_values=True).items() if v}
        for name, value in params.items():
            if len(value) > _MAX_VALUE or any(ord(c) < 0x20 for c in value):
                raise ValueError(f"`{name[:40]}` is longer than {_MAX_VALUE} characters or holds control characters")
        end = _date(params.get("to"), "to") or today
        start = _date(params.get("from"), "from") or end - datetime.timedelta(days=_DEFAULT_DAYS - 1)
        if start > end:
            raise ValueError("`from` is after `to`")
        if (end - start).days > _MAX_DAYS:
            raise ValueError(f"the period is longer than {_MAX_DAYS} days")
        return cls(start, end, params.get("user") or None, params.get("group") or None, params.get("model") or None)

    def query_string(self) -> str:
        pairs = {"from": self.start.isoformat(), "to": self.end.isoformat()}
        pairs.update({k: v for k, v in (("user", self.user), ("group", self.group), ("model", self.model)) if v})
        return urlencode(pairs)

    def where(self) -> tuple[sql.Composable, dict[str, Any]]:
        clauses: list[sql.Composable] = [sql.SQL("event_time >= %(start)s AND event_time < %(end)s")]
        params: dict[str, Any] = {
            "start": datetime.datetime.combine(self.start, datetime.time(), datetime.UTC),
            "end": datetime.datetime.combine(self.end + datetime.timedelta(days=1), datetime.time(), datetime.UTC),
        }
        if self.user:
            clauses.append(sql.SQL("subject = %(user)s"))
            params["user"] = self.user
        if self.group:
            clauses.append(sql.SQL("%(group)s = ANY(groups)"))
            params["group"] = self.group
        if self.model:
            clauses.append(sql.SQL("model = %(model)s"))
            params["model"] = self.model
        return sql.SQL(" AND ").join(clauses), params


def _date(value: str | None, name: str) -> datetime.date | None:
    if not value:
        return None
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"`{name}` is not a date (YYYY-MM-DD): {value[:40]!r}") from None


_SUMS = """count(*) AS requests, coalesce(sum(input_tokens), 0) AS input_tokens,
coalesce(sum(output_tokens), 0) AS output_tokens, coalesce(sum(cache_creation_tokens), 0) AS cache_write_tokens,
coalesce(sum(cache_read_tokens), 0) AS cache_read_tokens, coalesce(sum(total_tokens), 0) AS total_tokens,
coalesce(sum(cost), 0) AS cost, count(*) FILTER (WHERE cost IS NULL AND status = 'success') AS unpriced"""

_SUMS_SQL = sql.SQL(_SUMS)
# Composed by psycopg.sql: {table} is an Identifier, {where} fixed clauses with parameters, {sums} the constant above.
_QUERIES: dict[str, str] = {
    "totals": "SELECT {sums}, count(*) FILTER (WHERE status <> 'success') AS errors FROM {table} WHERE {where}",
    "by_user": "SELECT coalesce(subject, '') AS key, {sums} FROM {table} WHERE {where} "
    "GROUP BY 1 ORDER BY cost DESC, total_tokens DESC, key LIMIT 100",
    "by_group": "SELECT g AS key, {sums} FROM {table}, LATERAL unnest(CASE WHEN cardinality(groups) > 0 "
    "THEN groups ELSE ARRAY['(none)'] END) AS g WHERE {where} GROUP BY 1 ORDER BY cost DESC, key LIMIT 100",
    "by_model": "SELECT coalesce(model, '(unknown)') AS key, {sums} FROM {table} WHERE {where} "
    "GROUP BY 1 ORDER BY cost DESC, key",
    "by_day_model": "SELECT to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, "
    "coalesce(model, '(unknown)') AS model, coalesce(sum(total_tokens), 0) AS total_tokens, "
    "coalesce(sum(cost), 0) AS cost, count(*) AS requests FROM {table} WHERE {where} GROUP BY 1, 2 ORDER BY 1, 2",
    "sessions": "SELECT claude_code_session_id AS key, min(subject) AS subject, {sums}, "
    "min(event_time) AS first, max(event_time) AS last FROM {table} WHERE {where} "
    "AND claude_code_session_id IS NOT NULL GROUP BY 1 ORDER BY cost DESC, total_tokens DESC LIMIT 10",
    "errors": "SELECT coalesce(error_type, status) AS key, count(*) AS requests FROM {table} WHERE {where} "
    "AND status <> 'success' GROUP BY 1 ORDER BY 2 DESC, 1",
    "choices": "SELECT 'user' AS kind, subject AS value FROM (SELECT DISTINCT subject FROM {table} "
    "WHERE subject IS NOT NULL ORDER BY 1 LIMIT 500) u UNION ALL SELECT 'model', model FROM (SELECT DISTINCT "
    "model FROM {table} WHERE model IS NOT NULL ORDER BY 1 LIMIT 500) m UNION ALL SELECT 'group', g FROM "
    "(SELECT DISTINCT unnest(groups) AS g FROM {table} ORDER BY 1 LIMIT 500) gr",
    "csv": "SELECT to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, coalesce(subject, '') AS user, "
    "coalesce(model, '') AS model, count(*) AS requests, coalesce(sum(input_tokens), 0) AS input_tokens, "
    "coalesce(sum(output_tokens), 0) AS output_tokens, coalesce(sum(cache_creation_tokens), 0) AS "
    "cache_write_tokens, coalesce(sum(cache_read_tokens), 0) AS cache_read_tokens, coalesce(sum(total_tokens), 0) "
    "AS total_tokens, coalesce(sum(cost), 0) AS cost_usd, count(*) FILTER (WHERE status <> 'success') AS errors "
    "FROM {table} WHERE {where} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
}


def cache_hit_share(row: dict[str, Any]) -> Decimal | None:
    """Cache reads as a share of all input (input + cache writes + cache reads), None when there was none."""
    total_input = row["input_tokens"] + row["cache_write_tokens"] + row["cache_read_tokens"]
    return None if not total_input else Decimal(row["cache_read_tokens"]) / Decimal(total_input)


@functools.cache
def _template() -> Template:
    text = (resources.files("gate.usagesink") / "report.html.mako").read_text(encoding="utf-8")
    # Every ${} is HTML-escaped ("h"); the one raw value is the chart JSON, with "</" escaped by _context.
    return Template(text, default_filters=["h"], strict_undefined=True)  # noqa: S702


@functools.cache
def _plotly_js() -> bytes:
    return (resources.files("plotly") / "package_data" / "plotly.min.js").read_bytes()


class Report:
    """The report's routes: ``/report`` (the page), ``/report/usage.csv``, ``/report/assets/plotly.min.js``."""

    def __init__(self, settings: GateSettings, auth: Authenticator, store: PostgresStore) -> None:
        self._auth = auth
        self._admin_group = settings.usage_sink.report.admin_group
        self._database = settings.usage_sink.database
        self._table = sql.Identifier(self._database.schema_name, TABLE)

    def add_routes(self, router: Router) -> None:
        router.add("GET", "/report", self.page)
        router.add("GET", "/report/usage.csv", self.csv)
        router.add("GET", "/report/assets/plotly.min.js", self.plotly)

    # ------------------------------------------------------------------------------------------ access

    async def _refusal(self, request: Request) -> Response | None:
        """None for an admin; else the 401 or 403 answer."""
        try:
            identity = await self._auth.authenticate(request.headers.get("authorization"), None)
        except AuthError as exc:
            return error_response(401, exc.message, headers={"WWW-Authenticate": www_authenticate(exc)})
        if self._admin_group not in identity.groups:
            return error_response(403, "The usage report is for members of the admin group only.")
        return None

    # ------------------------------------------------------------------------------------------ routes

    async def plotly(self, request: Request) -> Response:
        refusal = await self._refusal(request)
        if refusal is not None:
            return refusal
        return Response(
            body=_plotly_js(),
            content_type="text/javascript; charset=utf-8",
            headers={"Cache-Control": "private, max-age=86400"},
        )

    async def page(self, request: Request) -> Response:
        refusal = await self._refusal(request)
        if refusal is not None:
            return refusal
        try:
            filters = Filters.from_query(request.path_qs.partition("?")[2], _today())
        except ValueError as exc:
            return error_response(400, str(exc))
        try:
            results = await self._run(filters, [k for k in _QUERIES if k != "csv"])
        except psycopg.Error as exc:
            return error_response(503, f"The usage database is unavailable: {type(exc).__name__}")
        html = _template().render(**self._context(filters, results))
        return Response(
            text=html,
            content_type="text/html",
            headers={"Cache-Control": "no-store", "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff"},
        )

    async def csv(self, request: Request) -> Response:
        refusal = await self._refusal(request)
        if refusal is not None:
            return refusal
        try:
            filters = Filters.from_query(request.path_qs.partition("?")[2], _today())
        except ValueError as exc:
            return error_response(400, str(exc))
        try:
            rows = (await self._run(filters, ["csv"]))["csv"]
        except psycopg.Error as exc:
            return error_response(503, f"The usage database is unavailable: {type(exc).__name__}")
        out = io.StringIO()
        columns = [
            "day",
            "user",
            "model",
            "requests",
            "input_tokens",
            "output_tokens",
            "cache_write_tokens",
            "cache_read_tokens",
            "total_tokens",
            "cost_usd",
            "errors",
        ]
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(
                [_csv_safe(format_usd(v) if k == "cost_usd" else v) for k, v in ((c, row[c]) for c in columns)]
            )
        name = f"gate-usage-{filters.start.isoformat()}-{filters.end.isoformat()}.csv"
        return Response(
            text=out.getvalue(),
            content_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"},
        )

    # ------------------------------------------------------------------------------------------ data

    async def _run(self, filters: Filters, names: list[str]) -> dict[str, list[dict[str, Any]]]:
        where, params = filters.where()
        results: dict[str, list[dict[str, Any]]] = {}
        async with await psycopg.AsyncConnection.connect(
            self._database.url.get_secret_value(),
            connect_timeout=max(int(self._database.connect_timeout), 1),
            application_name="gate-usage-report",
            row_factory=psycopg.rows.dict_row,
        ) as connection:
            await connection.set_read_only(True)
            for name in names:
                query = sql.SQL(_QUERIES[name]).format(table=self._table, where=where, sums=_SUMS_SQL)
                cursor = await connection.execute(query, params if name != "choices" else None)
                results[name] = list(await cursor.fetchall())
        return results

    def _context(self, filters: Filters, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        totals = results["totals"][0]
        choices: dict[str, list[str]] = {"user": [], "group": [], "model": []}
        for row in results["choices"]:
            choices[row["kind"]].append(row["value"])
        days = sorted({row["day"] for row in results["by_day_model"]})
        models = sorted({row["model"] for row in results["by_day_model"]})
        by = {(row["day"], row["model"]): row for row in results["by_day_model"]}
        chart = {
            "days": days,
            "cost": [
                {"name": m, "y": [float(by[(d, m)]["cost"]) if (d, m) in by else 0 for d in days]} for m in models
            ],
            "tokens": [
                {"name": m, "y": [int(by[(d, m)]["total_tokens"]) if (d, m) in by else 0 for d in days]} for m in models
            ],
            "models": [row["key"] for row in results["by_model"]],
            "model_cost": [float(row["cost"]) for row in results["by_model"]],
        }
        return {
            "chosen": filters,
            "query": filters.query_string(),
            "totals": totals,
            "hit_share": _percent(cache_hit_share(totals)),
            "by_user": results["by_user"],
            "by_group": results["by_group"],
            "by_model": results["by_model"],
            "sessions": results["sessions"],
            "errors": results["errors"],
            "choices": choices,
            "usd": format_usd,
            "percent": lambda row: _percent(cache_hit_share(row)),
            "chart_json": orjson.dumps(chart).decode().replace("</", "<\\/"),
        }


# Scripts and styles from the sink only (plotly.js needs inline styles and eval); no frames, no foreign origins.
_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def _percent(share: Decimal | None) -> str:
    return "n/a" if share is None else f"{share * 100:.1f} %"


def _csv_safe(value: Any) -> Any:
    """Cells that a spreadsheet would run as a formula get a leading quote (OWASP's CSV injection advice)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()
