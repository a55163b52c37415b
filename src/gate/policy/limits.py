"""Spend caps and rate limits, checked before the upstream call and reconciled with the exact cost after it.

``Limits.admit`` reserves an estimate on every counter the call touches, in one atomic store operation: the
spend of the user, each of their groups and the organisation for the day, week and month (in nano-dollars, an
integer, so that counters add exactly), requests and tokens of the current minute for the user and each group,
and a stream slot for the user. When any capped counter would pass its cap, nothing is reserved and the caller
gets a ``Refusal`` (429, naming the limit and when it resets). ``Admission.settle`` replaces the estimate with
what the usage records cost (or gives it all back when no upstream call was made).

Reserving before the call is what keeps several replicas under one cap: a replica sees every other's calls in
flight, not only those that ended. Spend can pass a cap only by what calls cost beyond their estimate; output
is bounded by ``max_tokens``, input is estimated from the request's size (``limits.estimate``).

When the store cannot be reached, ``limits.store.on-failure`` decides: ``open`` admits unchecked (and keeps
what those calls cost, to add when the store is back), ``closed`` refuses with 503. Either way the health
component ``limitsStore`` turns DOWN and ``gate_limits_store_failures_total`` counts it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any, Protocol
from urllib.parse import quote

from gate.accounting.usage import UsageRecord
from gate.http.server import Response
from gate.identity.auth import Identity
from gate.ops.errors import error_response
from gate.policy.periods import PERIODS, Period, Window, Windows, minute
from gate.settings import GateSettings, RateSettings, UsageLimitsSettings
from gate.store.counters import Charge, CounterStore, Delta, Overdrawn, SpendLimit, StoreUnavailable

__all__ = [
    "NANO_PER_USD",
    "Admission",
    "Limits",
    "Pricer",
    "Refusal",
    "Standing",
    "iso",
    "nano",
    "standing_report",
    "usd",
]

log = logging.getLogger("gate.limits")

NANO_PER_USD = Decimal(1_000_000_000)
NANO_PER_CENT = 10_000_000
STREAM_SLOT_TTL = 3600.0  # a replica that dies holding stream slots gives them back after this
SETTLE_BATCH = 0.005  # settled deltas wait this long for others to share their store operation
_MAX_PENDING = 100_000  # counters kept in memory while the store is down, before the oldest are dropped
_MAX_MEMO = 10_000  # callers whose counters are kept built
ORGANIZATION = "*"


class _Costed(Protocol):
    @property
    def usd(self) -> Decimal: ...


class Pricer(Protocol):
    """The price table's face (``gate.accounting.prices.PriceTable``)."""

    def cost(self, record: UsageRecord) -> _Costed | None: ...

    def estimate(self, model: str, *, input_tokens: int, output_tokens: int) -> Decimal | None: ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call the limits refuse: answer it with ``response()`` and do not call upstream."""

    status: int
    error_type: str
    message: str
    retry_after: int
    limit: str  # a short name for metrics: spend_user_daily, requests_per_minute_group, ...

    def response(self) -> Response:
        headers = {"retry-after": str(self.retry_after)}
        return error_response(self.status, self.message, error_type=self.error_type, headers=headers)


@dataclass(frozen=True, slots=True)
class _Counter:
    """One counter a call touches: its key, what it limits (for the refusal message) and its window."""

    key: str
    kind: str  # spend | requests | tokens | streams
    scope_type: str  # user | rbac_group | organization
    scope_id: str
    period: str  # daily | weekly | monthly | minute | concurrent
    window: Window | None
    limit: int | None  # in the counter's unit (nano-dollars for spend)


class Admission:
    """A call the limits let through; exactly one of ``settle``/``release`` ends it (later calls do nothing)."""

    __slots__ = ("_charges", "_done", "_limits", "_reserved")

    def __init__(self, limits: Limits | None, charges: list[tuple[_Counter, int]], reserved: bool) -> None:
        self._limits = limits
        self._charges = charges
        self._reserved = reserved
        self._done = False

    def settle(self, records: Sequence[UsageRecord]) -> None:
        """Reconcile with what the call's upstream attempts cost; no records means no call: ``release``."""
        if self._done or self._limits is None:
            return
        self._done = True
        self._limits.reconcile(self._charges, self._reserved, records)

    def release(self) -> None:
        self.settle(())


@dataclass(slots=True)
class _StoreState:
    """The store's health as the limits saw it on their last operations."""

    up: bool = True
    failures: int = 0
    last_error: str | None = None
    last_failure: float | None = None


@dataclass(frozen=True, slots=True)
class Standing:
    """One limit and where a user stands against it (``gate usage`` and the ``effective`` admin route)."""

    kind: str
    scope_type: str
    scope_id: str
    period: str
    used: int
    limit: int | None
    resets_at: float | None

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": self.kind,
            "scope_type": self.scope_type,
            "scope_id": self.scope_id,
            "period": self.period,
        }
        if self.kind == "spend":
            data["spent_usd"] = str(usd(self.used))
            data["limit_usd"] = None if self.limit is None else str(usd(self.limit))
        else:
            data["used"] = self.used
            data["limit"] = self.limit
        data["resets_at"] = None if self.resets_at is None else iso(self.resets_at)
        return data


@dataclass(slots=True)
class _Caps:
    """Effective spend caps by (scope type, scope id, period): configuration, overridden by the admin API's."""

    configured: dict[tuple[str, str, str], int] = field(default_factory=dict)
    api: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def get(self, scope_type: str, scope_id: str, period: str) -> int | None:
        for key in ((scope_type, scope_id, period), (scope_type, "*", period)):
            if key in self.api:
                return self.api[key]
            if key in self.configured:
                return self.configured[key]
        return None


class Limits:
    """Every limit of one Gate process over a shared ``CounterStore``; built by ``app.py``."""

    def __init__(
        self,
        settings: UsageLimitsSettings,
        store: CounterStore,
        prices: Pricer,
        *,
        on_refusal: Callable[[str], None] | None = None,
        on_store_failure: Callable[[str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._prices = prices
        self._windows = Windows(settings.time_zone)
        self._fail_open = settings.store.on_failure == "open"
        self._bytes_per_token = settings.estimate.bytes_per_token
        self._default_max_tokens = settings.estimate.default_max_tokens
        self._retention = settings.retention
        self._rate = settings.rate
        self._caps = _Caps(
            configured={
                (c.scope_type, _scope_id(c.scope_type, c.scope_id), c.period): nano(c.amount_usd)
                for c in settings.spend_caps
            }
        )
        self._api_limits: list[SpendLimit] = []
        self._memo: dict[tuple[str, frozenset[str], bool, int], list[_Counter]] = {}
        self._state = _StoreState()
        self._unsent: dict[str, Delta] = {}  # settled deltas waiting for the next batch
        self._settler: asyncio.Task[None] | None = None
        self._pending: dict[str, Delta] = {}  # deltas the store could not take yet
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._on_refusal = on_refusal
        self._on_store_failure = on_store_failure

    @property
    def store(self) -> CounterStore:
        return self._store

    # ------------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect (a store that is down now is retried on use) and load the admin API's caps."""
        try:
            await self._store.start()
            await self.refresh_caps()
        except StoreUnavailable as exc:
            self._failed(exc)
        self._refresher = asyncio.create_task(self._refresh_forever(), name="gate-limits-refresh")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        if self._settler is not None:
            await asyncio.wait([self._settler], timeout=2.0)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        await self._flush_pending()
        await self._store.close()

    async def refresh_caps(self) -> None:
        limits = await self._store.spend_limits()
        self._api_limits = limits
        api = {(x.scope_type, x.scope_id, x.period): x.amount * NANO_PER_CENT for x in limits}
        if api != self._caps.api:
            self._caps.api = api
            self._memo.clear()

    def api_limits(self) -> list[SpendLimit]:
        return list(self._api_limits)

    def configured_caps(self) -> dict[tuple[str, str, str], int]:
        return dict(self._caps.configured)

    # ------------------------------------------------------------------------------------------- admission

    async def admit(
        self, identity: Identity, model: str | None, body_size: int, max_tokens: object, stream: bool
    ) -> Admission | Refusal:
        """Reserve the call's estimate on every counter it touches, or refuse it naming the limit."""
        now = time.time()
        wanted = max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else 0
        output_tokens = wanted if wanted > 0 else self._default_max_tokens
        input_tokens = math.ceil(body_size / self._bytes_per_token)
        estimate = None
        if model:
            estimate = self._prices.estimate(model, input_tokens=input_tokens, output_tokens=output_tokens)
        spend = nano(estimate) if estimate is not None else 0
        counters = self.counters(identity.sub, identity.groups, now, stream=stream)
        amounts = {"spend": spend, "requests": 1, "tokens": input_tokens + output_tokens, "streams": 1}
        charges = [(counter, amounts[counter.kind]) for counter in counters]
        try:
            if self._pending:
                # Usage kept while the store was down goes in first, so that this reservation sees it.
                await self._flush_pending(strict=True)
            reserving = asyncio.ensure_future(
                self._store.reserve([Charge(c.key, amount, c.limit, self._expiry(c, now)) for c, amount in charges])
            )
            try:
                overdrawn = await asyncio.shield(reserving)
            except asyncio.CancelledError:
                # The client left while the store worked: whatever it reserved goes back once it is done.
                reserving.add_done_callback(lambda done: self._undo(done, charges))
                raise
        except StoreUnavailable as exc:
            self._failed(exc)
            if self._fail_open:
                return Admission(self, charges, reserved=False)
            return Refusal(
                503,
                "overloaded_error",
                "The gateway cannot check usage limits right now (its limits store is unavailable); retry later.",
                5,
                "store_unavailable",
            )
        self._succeeded()
        if overdrawn is None:
            return Admission(self, charges, reserved=True)
        counter = next(c for c, _ in charges if c.key == overdrawn.charge.key)
        refusal = self._refusal(counter, overdrawn, now)
        if self._on_refusal is not None:
            self._on_refusal(refusal.limit)
        return refusal

    def counters(self, sub: str, groups: Iterable[str], now: float, *, stream: bool) -> list[_Counter]:
        """Every counter a call of ``sub`` (in ``groups``) touches now, with its limit (None: only counted).

        Memoised until the minute (the shortest window) ends or the caps change: building the keys was most of
        the limits' own CPU time per call.
        """
        this_minute = int(now // 60)
        memo_key = (sub, frozenset(groups), stream, this_minute)
        found = self._memo.get(memo_key)
        if found is not None:
            return found
        if len(self._memo) >= _MAX_MEMO:
            self._memo.clear()
        built = self._build_counters(sub, memo_key[1], now, stream=stream)
        self._memo[memo_key] = built
        return built

    def _build_counters(self, sub: str, groups: Iterable[str], now: float, *, stream: bool) -> list[_Counter]:
        scopes: list[tuple[str, str]] = [("user", sub), *(("rbac_group", g) for g in sorted(groups))]
        scopes.append(("organization", ORGANIZATION))
        counters: list[_Counter] = []
        for period in PERIODS:
            window = self._windows.window(period, now)
            for scope_type, scope_id in scopes:
                counters.append(
                    _Counter(
                        f"spend:{scope_type}:{quote(scope_id, safe='')}:{period}:{window.label}",
                        "spend",
                        scope_type,
                        scope_id,
                        period,
                        window,
                        self._caps.get(scope_type, scope_id, period),
                    )
                )
        this_minute = minute(now)
        for scope_type, scope_id in scopes[:-1]:
            rate = self._rate_for(scope_type, scope_id)
            if rate is None:
                continue
            ident = quote(scope_id, safe="")
            if rate.requests_per_minute:
                counters.append(
                    _Counter(
                        f"rpm:{scope_type}:{ident}:{this_minute.label}",
                        "requests",
                        scope_type,
                        scope_id,
                        "minute",
                        this_minute,
                        rate.requests_per_minute,
                    )
                )
            if rate.tokens_per_minute:
                counters.append(
                    _Counter(
                        f"tpm:{scope_type}:{ident}:{this_minute.label}",
                        "tokens",
                        scope_type,
                        scope_id,
                        "minute",
                        this_minute,
                        rate.tokens_per_minute,
                    )
                )
            if stream and scope_type == "user" and rate.concurrent_streams:
                counters.append(
                    _Counter(
                        f"streams:user:{ident}",
                        "streams",
                        "user",
                        scope_id,
                        "concurrent",
                        None,
                        rate.concurrent_streams,
                    )
                )
        return counters

    def _rate_for(self, scope_type: str, scope_id: str) -> RateSettings | None:
        if scope_type == "user":
            return self._rate.users.get(scope_id, self._rate.user)
        return self._rate.groups.get(scope_id)

    def _expiry(self, counter: _Counter, now: float) -> float:
        if counter.window is None:
            return now + STREAM_SLOT_TTL
        if counter.kind == "spend":
            return counter.window.end + self._retention
        return counter.window.end + 60.0

    def _undo(self, done: asyncio.Future[Overdrawn | None], charges: list[tuple[_Counter, int]]) -> None:
        if not done.cancelled() and done.exception() is None and done.result() is None:
            self.reconcile(charges, True, ())

    # ------------------------------------------------------------------------------------------- settling

    def reconcile(self, charges: list[tuple[_Counter, int]], reserved: bool, records: Sequence[UsageRecord]) -> None:
        """Replace the reservation by what the records cost, in the background (never blocks a response)."""
        now = time.time()
        if records:
            spent = sum((nano(c.usd) for r in records if (c := self._prices.cost(r)) is not None), 0)
            tokens = sum(r.input_tokens + r.output_tokens + r.cache_creation_tokens for r in records)
            actual = {"spend": spent, "tokens": tokens, "requests": 1, "streams": 0}
        else:
            actual = {"spend": 0, "tokens": 0, "requests": 0, "streams": 0}
        unsent = self._unsent
        for counter, amount in charges:
            if not reserved and counter.kind in ("requests", "streams"):
                continue  # admitted unchecked: these were never counted, and their moment has passed
            change = actual[counter.kind] - (amount if reserved else 0)
            if not change:
                continue
            expires_at = self._expiry(counter, now)
            known = unsent.get(counter.key)
            if known is not None:
                change, expires_at = known.amount + change, max(known.expires_at, expires_at)
            unsent[counter.key] = Delta(counter.key, change, expires_at)
        if unsent and (self._settler is None or self._settler.done()):
            self._settler = asyncio.get_running_loop().create_task(self._settle_unsent())

    async def _settle_unsent(self) -> None:
        """Send the settled deltas in batches: under load one store operation serves many calls."""
        while self._unsent:
            await asyncio.sleep(SETTLE_BATCH)
            batch, self._unsent = self._unsent, {}
            try:
                await self._store.add(list(batch.values()))
            except StoreUnavailable as exc:
                self._failed(exc)
                self._keep(batch.values())
                continue
            self._succeeded()

    def _keep(self, deltas: Iterable[Delta]) -> None:
        """Hold deltas the store could not take, summed per counter, to add when it is back."""
        for delta in deltas:
            known = self._pending.pop(delta.key, None)
            if known is not None:
                delta = Delta(delta.key, known.amount + delta.amount, max(known.expires_at, delta.expires_at))
            self._pending[delta.key] = delta
        while len(self._pending) > _MAX_PENDING:
            dropped = next(iter(self._pending))
            del self._pending[dropped]
            log.warning("limits store down too long: dropped the unsaved usage of counter %s", dropped)

    async def _flush_pending(self, *, strict: bool = False) -> None:
        """Add the usage kept while the store was down; ``strict`` lets a failure reach the caller."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}  # deltas kept meanwhile start a new batch
        try:
            await self._store.add(list(pending.values()))
        except StoreUnavailable as exc:
            self._keep(pending.values())
            if strict:
                raise
            self._failed(exc)
            return
        log.info("limits store is back: added the usage of %d counters kept while it was down", len(pending))

    async def _refresh_forever(self) -> None:
        period = self._settings.caps_refresh
        sweeps = 0
        while True:
            await asyncio.sleep(period)
            try:
                await self._flush_pending()
                await self.refresh_caps()
                sweeps += 1
                if sweeps * period >= 60:
                    sweeps = 0
                    await self._store.sweep()
            except StoreUnavailable as exc:
                self._failed(exc)
                continue
            self._succeeded()

    # ------------------------------------------------------------------------------------------- reading

    async def standing(self, sub: str, groups: Iterable[str], now: float | None = None) -> list[Standing]:
        """Where ``sub`` stands against every counter a call would touch, limited or not."""
        now = time.time() if now is None else now
        counters = self.counters(sub, groups, now, stream=True)
        values = await self._store.read([c.key for c in counters])
        return [
            Standing(
                c.kind,
                c.scope_type,
                c.scope_id,
                c.period,
                values.get(c.key, 0),
                c.limit,
                None if c.window is None else c.window.end,
            )
            for c in counters
        ]

    def spend_key(self, scope_type: str, scope_id: str, period: Period, now: float) -> str:
        window = self._windows.window(period, now)
        return f"spend:{scope_type}:{quote(_scope_id(scope_type, scope_id), safe='')}:{period}:{window.label}"

    def window(self, period: Period, now: float) -> Window:
        return self._windows.window(period, now)

    # ------------------------------------------------------------------------------------------- health

    def health(self) -> dict[str, Any]:
        state = self._state
        details: dict[str, Any] = {
            "type": self._store.kind,
            "onFailure": "open" if self._fail_open else "closed",
            "failures": state.failures,
            "pendingCounters": len(self._pending),
        }
        if state.last_error is not None:
            details["lastError"] = state.last_error
        return {"status": "UP" if state.up else "DOWN", "details": details}

    @property
    def store_up(self) -> bool:
        return self._state.up

    def _failed(self, exc: StoreUnavailable) -> None:
        state = self._state
        if state.up:
            log.error(
                "limits store %s unavailable (%s): %s",
                self._store.kind,
                exc,
                "admitting calls unchecked" if self._fail_open else "refusing calls",
            )
        state.up = False
        state.failures += 1
        state.last_error = str(exc)
        state.last_failure = time.time()
        if self._on_store_failure is not None:
            self._on_store_failure("open" if self._fail_open else "closed")

    def _succeeded(self) -> None:
        if not self._state.up:
            self._state.up = True
            log.warning("limits store %s is reachable again", self._store.kind)
            if self._pending:
                task = asyncio.get_running_loop().create_task(self._flush_pending())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------------------- refusals

    def _refusal(self, counter: _Counter, overdrawn: Overdrawn, now: float) -> Refusal:
        who = _who(counter.scope_type, counter.scope_id)
        limit = counter.limit or 0
        if counter.kind == "spend":
            assert counter.window is not None
            resets = counter.window.end
            message = (
                f"Spend cap reached: the {counter.period} cap of ${usd(limit):.2f} for {who} "
                f"(${usd(overdrawn.current):.2f} spent or reserved, this request is estimated at "
                f"${usd(overdrawn.charge.amount):.4f}); it resets at {iso(resets)}."
            )
            name = f"spend_{counter.scope_type}_{counter.period}"
        elif counter.kind == "streams":
            return Refusal(
                429,
                "rate_limit_error",
                f"Concurrent stream limit reached: at most {limit} streams at once for {who}; "
                "retry when one of them ends.",
                1,
                "concurrent_streams",
            )
        else:
            assert counter.window is not None
            resets = counter.window.end
            unit = "requests" if counter.kind == "requests" else "tokens"
            message = f"Rate limit reached: {limit} {unit} per minute for {who}; it resets at {iso(resets)}."
            name = f"{unit}_per_minute_{counter.scope_type}"
        return Refusal(429, "rate_limit_error", message, max(1, math.ceil(resets - now)), name)


def _who(scope_type: str, scope_id: str) -> str:
    if scope_type == "organization":
        return "the organisation"
    if scope_type == "rbac_group":
        return f"group {scope_id}"
    return f"user {scope_id}"


def _scope_id(scope_type: str, scope_id: str) -> str:
    return ORGANIZATION if scope_type == "organization" else scope_id


def nano(amount: Decimal) -> int:
    """Nano-dollars, rounded up: a counter never shows less than was spent."""
    return int((amount * NANO_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def usd(nano_dollars: int) -> Decimal:
    return Decimal(nano_dollars) / NANO_PER_USD


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def standing_report(settings: GateSettings, sub: str, groups: Sequence[str]) -> str:
    """``gate usage``: one line per limit a call of ``sub`` meets, read from the configured store."""
    from gate.accounting.prices import PriceTable
    from gate.store.counters import open_counter_store

    limits = Limits(settings.limits, open_counter_store(settings.limits.store), PriceTable.from_settings(settings))
    try:
        await limits.store.start()
        await limits.refresh_caps()
        rows = await limits.standing(sub, groups)
    except StoreUnavailable as exc:
        raise ConnectionError(f"the limits store is unavailable: {exc}") from None
    finally:
        await limits.store.close()
    lines = [f"Standing of user {sub}" + (f" (groups: {', '.join(groups)})" if groups else "") + ":"]
    for row in rows:
        who = _who(row.scope_type, row.scope_id)
        resets = "" if row.resets_at is None else f", resets {iso(row.resets_at)}"
        if row.kind == "spend":
            cap = "no cap" if row.limit is None else f"of ${usd(row.limit):.2f}"
            lines.append(f"  spend    {row.period:<8} {who:<28} ${usd(row.used):.2f} {cap}{resets}")
        elif row.kind == "streams":
            lines.append(f"  streams  {'now':<8} {who:<28} {row.used} of {row.limit} at once")
        else:
            unit = "requests/min" if row.kind == "requests" else "tokens/min"
            lines.append(f"  rate     {'minute':<8} {who:<28} {row.used} of {row.limit} {unit}{resets}")
    return "\n".join(lines) + "\n"
