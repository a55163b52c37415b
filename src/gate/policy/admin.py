"""The spend-limits admin API, for callers whose groups claim holds ``limits.admin-group``.

Anthropic's gateway serves ``/v1/organizations/spend_limits[/...]`` (caps per user, group and organisation, plus
``/effective`` and ``/audit``) but does not document the bodies; its table has ``scope_type`` (``user`` |
``rbac_group`` | ``organization``), ``scope_id``, ``amount`` in cents, ``period`` (``daily`` | ``weekly`` |
``monthly``) and ``currency``. These routes keep those paths and names; the bodies are Gate's design:

- ``GET /v1/organizations/spend_limits``: every cap, configured (``source: config``, read only) and set here
  (``source: api``, which win over a configured one of the same scope and period).
- ``POST /v1/organizations/spend_limits``: create or replace the cap of a scope and period (``amount`` in cents,
  or ``amount_usd`` as a decimal string; optional ``reason``); ``GET``/``PUT``/``DELETE .../{id}``.
- ``GET .../effective?user_id=..&groups=a,b``: where that user stands against every limit.
- ``GET .../audit?limit=100``: the newest changes first.
- ``GET /v1/organizations/spend?scope_type=..&scope_id=..``: spend of a scope in the current day, week and month.
- ``POST /v1/organizations/spend/reset``: ``{scope_type, scope_id, period, reason}`` clears a current window.

Every change is one audit row in the store (with the cap before and after) and one ``gate.audit`` log line.
"""

from __future__ import annotations

import logging
import time
import uuid
from decimal import Decimal, InvalidOperation
from typing import Any, get_args
from urllib.parse import parse_qs

import orjson
from multidict import istr

from gate.http.server import Request, Response, Router
from gate.identity.auth import Authenticator, AuthError, Identity, www_authenticate
from gate.ops.errors import error_response
from gate.policy.limits import NANO_PER_CENT, Limits, iso, usd
from gate.policy.periods import PERIODS, Period
from gate.settings import ScopeType, SpendPeriod
from gate.store.counters import AuditEntry, SpendLimit, StoreUnavailable

__all__ = ["SpendLimitsApi"]

audit_log = logging.getLogger("gate.audit")

_BASE = "/v1/organizations/spend_limits"
_SCOPES = frozenset(get_args(ScopeType))
_PERIODS = frozenset(get_args(SpendPeriod))
_MAX_BODY = 64 * 1024


class _BadRequest(Exception):
    pass


class SpendLimitsApi:
    """The admin routes over ``Limits``; ``routes`` adds them to the main router."""

    def __init__(self, limits: Limits, auth: Authenticator, admin_group: str | None) -> None:
        self._limits = limits
        self._auth = auth
        self._admin_group = admin_group

    def routes(self, router: Router) -> None:
        router.add("GET", _BASE, self._guard(self._list))
        router.add("POST", _BASE, self._guard(self._create))
        router.add("GET", f"{_BASE}/effective", self._guard(self._effective))
        router.add("GET", f"{_BASE}/audit", self._guard(self._audit))
        router.add_param("GET", f"{_BASE}/", "id", self._guard(self._get))
        router.add_param("PUT", f"{_BASE}/", "id", self._guard(self._update))
        router.add_param("DELETE", f"{_BASE}/", "id", self._guard(self._delete))
        router.add("GET", "/v1/organizations/spend", self._guard(self._spend))
        router.add("POST", "/v1/organizations/spend/reset", self._guard(self._reset))

    def _guard(self, handler: Any) -> Any:
        async def guarded(request: Request) -> Response:
            try:
                identity = await self._auth.authenticate(
                    request.headers.get(istr("authorization")), request.headers.get(istr("x-api-key"))
                )
            except AuthError as exc:
                return error_response(401, exc.message, headers={"WWW-Authenticate": www_authenticate(exc)})
            if self._admin_group is None or self._admin_group not in identity.groups:
                return error_response(403, "The spend-limits API is for members of the gateway's admin group.")
            try:
                response: Response = await handler(request, identity)
                return response
            except _BadRequest as exc:
                return error_response(400, str(exc))
            except StoreUnavailable:
                retry = {"retry-after": "5"}
                return error_response(503, "The limits store is unavailable; retry later.", headers=retry)

        return guarded

    # ------------------------------------------------------------------------------------------- caps

    async def _list(self, request: Request, identity: Identity) -> Response:
        await self._limits.refresh_caps()
        api = [_limit_json(x, "api") for x in self._limits.api_limits()]
        configured = [
            {
                "id": f"config:{scope_type}:{scope_id}:{period}",
                "scope_type": scope_type,
                "scope_id": scope_id,
                "period": period,
                "amount": nano // NANO_PER_CENT,
                "amount_usd": str(usd(nano)),
                "currency": "USD",
                "source": "config",
            }
            for (scope_type, scope_id, period), nano in sorted(self._limits.configured_caps().items())
        ]
        return _json({"data": api + configured, "has_more": False})

    async def _create(self, request: Request, identity: Identity) -> Response:
        body = await _body(request)
        scope_type = _choice(body, "scope_type", _SCOPES)
        scope_id = "*" if scope_type == "organization" else _text(body, "scope_id")
        period = _choice(body, "period", _PERIODS)
        amount = _amount(body)
        await self._limits.refresh_caps()
        existing = next(
            (
                x
                for x in self._limits.api_limits()
                if (x.scope_type, x.scope_id, x.period) == (scope_type, scope_id, period)
            ),
            None,
        )
        now = time.time()
        if existing is not None:
            limit = SpendLimit(**{**existing.as_dict(), "amount": amount, "updated_at": now})
            action, status = "spend_limit.update", 200
        else:
            limit = SpendLimit(
                id=f"sl_{uuid.uuid4().hex[:24]}",
                scope_type=scope_type,
                scope_id=scope_id,
                period=period,
                amount=amount,
                created_by=identity.sub,
                created_at=now,
                updated_at=now,
            )
            action, status = "spend_limit.create", 201
        await self._write(limit, existing, action, identity, body.get("reason"))
        return _json(_limit_json(limit, "api"), status)

    async def _get(self, request: Request, identity: Identity) -> Response:
        limit = await self._find(request.match_info["id"])
        if limit is None:
            return error_response(404, "No spend limit has this id.")
        return _json(_limit_json(limit, "api"))

    async def _update(self, request: Request, identity: Identity) -> Response:
        existing = await self._find(request.match_info["id"])
        if existing is None:
            return error_response(404, "No spend limit has this id.")
        body = await _body(request)
        limit = SpendLimit(**{**existing.as_dict(), "amount": _amount(body), "updated_at": time.time()})
        await self._write(limit, existing, "spend_limit.update", identity, body.get("reason"))
        return _json(_limit_json(limit, "api"))

    async def _delete(self, request: Request, identity: Identity) -> Response:
        existing = await self._find(request.match_info["id"])
        if existing is None:
            return error_response(404, "No spend limit has this id.")
        reason = _query(request).get("reason")
        before = existing.as_dict()
        audit = AuditEntry(time.time(), identity.sub, "spend_limit.delete", existing.id, before, None, reason)
        await self._limits.store.delete_spend_limit(existing.id, audit)
        _log(audit)
        await self._limits.refresh_caps()
        return _json({"id": existing.id, "type": "spend_limit_deleted"})

    async def _write(
        self, limit: SpendLimit, before: SpendLimit | None, action: str, identity: Identity, reason: object
    ) -> None:
        audit = AuditEntry(
            time.time(),
            identity.sub,
            action,
            limit.id,
            None if before is None else before.as_dict(),
            limit.as_dict(),
            reason if isinstance(reason, str) else None,
        )
        await self._limits.store.put_spend_limit(limit, audit)
        _log(audit)
        await self._limits.refresh_caps()

    async def _find(self, limit_id: str) -> SpendLimit | None:
        await self._limits.refresh_caps()
        return next((x for x in self._limits.api_limits() if x.id == limit_id), None)

    # ------------------------------------------------------------------------------------------- spend

    async def _effective(self, request: Request, identity: Identity) -> Response:
        query = _query(request)
        user = query.get("user_id")
        if not user:
            raise _BadRequest("Query parameter user_id is required.")
        groups = [g for g in (query.get("groups") or "").split(",") if g]
        await self._limits.refresh_caps()
        standing = await self._limits.standing(user, groups)
        return _json({"user_id": user, "groups": groups, "data": [s.as_dict() for s in standing]})

    async def _audit(self, request: Request, identity: Identity) -> Response:
        raw = _query(request).get("limit") or "100"
        if not raw.isdigit() or not 1 <= int(raw) <= 1000:
            raise _BadRequest("limit must be an integer from 1 to 1000.")
        entries = await self._limits.store.audit_log(int(raw))
        return _json({"data": [{**e.as_dict(), "at": iso(e.at)} for e in entries]})

    async def _spend(self, request: Request, identity: Identity) -> Response:
        query = _query(request)
        scope_type = _choice(query, "scope_type", _SCOPES)
        scope_id = "*" if scope_type == "organization" else _text(query, "scope_id")
        now = time.time()
        keys = {period: self._limits.spend_key(scope_type, scope_id, period, now) for period in PERIODS}
        values = await self._limits.store.read(list(keys.values()))
        data = []
        for period in PERIODS:
            window = self._limits.window(period, now)
            data.append(
                {
                    "period": period,
                    "bucket": window.label,
                    "spent_usd": str(usd(values[keys[period]])),
                    "resets_at": iso(window.end),
                }
            )
        return _json({"scope_type": scope_type, "scope_id": scope_id, "data": data})

    async def _reset(self, request: Request, identity: Identity) -> Response:
        body = await _body(request)
        scope_type = _choice(body, "scope_type", _SCOPES)
        scope_id = "*" if scope_type == "organization" else _text(body, "scope_id")
        period: Period = _choice(body, "period", _PERIODS)  # type: ignore[assignment]
        key = self._limits.spend_key(scope_type, scope_id, period, time.time())
        before = (await self._limits.store.read([key]))[key]
        target = f"{scope_type}:{scope_id}:{period}"
        reason = body.get("reason")
        audit = AuditEntry(
            time.time(),
            identity.sub,
            "spend.reset",
            target,
            {"spent_usd": str(usd(before))},
            {"spent_usd": "0"},
            reason if isinstance(reason, str) else None,
        )
        await self._limits.store.delete([key])
        await self._limits.store.record_audit(audit)
        _log(audit)
        return _json({"scope_type": scope_type, "scope_id": scope_id, "period": period, "spent_usd": "0"})


def _limit_json(limit: SpendLimit, source: str) -> dict[str, Any]:
    data = limit.as_dict()
    data["amount_usd"] = str(usd(limit.amount * NANO_PER_CENT))
    data["created_at"] = iso(limit.created_at)
    data["updated_at"] = iso(limit.updated_at)
    data["source"] = source
    return data


async def _body(request: Request) -> dict[str, Any]:
    if (request.content_length or 0) > _MAX_BODY:
        raise _BadRequest("The request body is too large.")
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _BadRequest("The request body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise _BadRequest("The request body must be a JSON object.")
    return body


def _query(request: Request) -> dict[str, str]:
    query = request.path_qs.partition("?")[2]
    return {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}


def _choice(data: dict[str, Any], name: str, allowed: frozenset[str]) -> str:
    value = data.get(name)
    if not isinstance(value, str) or value not in allowed:
        raise _BadRequest(f"{name} must be one of {', '.join(sorted(allowed))}.")
    return value


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip() or len(value) > 256:
        raise _BadRequest(f"{name} must be a non-empty string of at most 256 characters.")
    return value


def _amount(body: dict[str, Any]) -> int:
    """Cents, from ``amount`` (integer cents, Anthropic's unit) or ``amount_usd`` (a decimal string)."""
    if "amount" in body:
        amount = body["amount"]
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise _BadRequest("amount must be a non-negative integer number of cents.")
        return amount
    raw = body.get("amount_usd")
    try:
        value = Decimal(str(raw)) if isinstance(raw, str | int) and not isinstance(raw, bool) else None
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite() or value < 0 or value != value.quantize(Decimal("0.01")):
        raise _BadRequest("Give amount (integer cents) or amount_usd (a decimal string with at most 2 decimals).")
    return int(value * 100)


def _json(data: Any, status: int = 200) -> Response:
    return Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _log(audit: AuditEntry) -> None:
    audit_log.info(
        "admin change: %s %s by %s",
        audit.action,
        audit.target,
        audit.actor,
        extra={"audit": {**audit.as_dict(), "at": iso(audit.at)}},
    )
