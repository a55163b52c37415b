"""The counter store's contract: what the limits need from SQLite, PostgreSQL or Redis, all atomic.

A counter is an integer under a key with an expiry time (epoch seconds); a key names its window
(``spend:user:alice:daily:2026-12-03``), so a window is never reset in place, it simply expires. ``reserve``
adds several charges all or nothing, refusing when any would pass its limit; ``add`` applies deltas without
limits (reconciling a reservation, releasing a stream slot). Each backend does each of these in one atomic step:
one SQLite ``BEGIN IMMEDIATE`` transaction, one PostgreSQL statement, one Redis Lua script.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from gate.settings import CounterStoreSettings

__all__ = [
    "AuditEntry",
    "Charge",
    "CounterStore",
    "Delta",
    "Overdrawn",
    "SpendLimit",
    "StoreUnavailable",
    "open_counter_store",
]


class StoreUnavailable(Exception):
    """The store could not be reached or answered with an error; the message names no credential."""


@dataclass(frozen=True, slots=True)
class Charge:
    """Add ``amount`` to ``key`` unless the result would pass ``limit`` (None: never refused)."""

    key: str
    amount: int
    limit: int | None
    expires_at: float


@dataclass(frozen=True, slots=True)
class Delta:
    """Add ``amount`` (possibly negative) to ``key``; a negative amount never creates a counter."""

    key: str
    amount: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class Overdrawn:
    """The reservation was refused: ``charge`` would have passed its limit; the counter stood at ``current``."""

    charge: Charge
    current: int


@dataclass(frozen=True, slots=True)
class SpendLimit:
    """A cap set through the admin API, in the shape of Anthropic's gateway's ``spend_limits`` table."""

    id: str
    scope_type: str  # user | rbac_group | organization
    scope_id: str
    period: str  # daily | weekly | monthly
    amount: int  # cents
    currency: str = "USD"
    created_by: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One administrative change: who did what to which target, with the state before and after."""

    at: float
    actor: str
    action: str  # spend_limit.create | spend_limit.update | spend_limit.delete | spend.reset
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CounterStore(Protocol):
    """What the limits and the admin API need; every method raises :class:`StoreUnavailable` on failure."""

    kind: str

    async def start(self) -> None:
        """Connect and apply pending schema migrations."""

    async def close(self) -> None: ...

    async def reserve(self, charges: Sequence[Charge]) -> Overdrawn | None:
        """Apply every charge, or none when one would pass its limit (then say which)."""

    async def add(self, deltas: Sequence[Delta]) -> None:
        """Apply every delta at once, without limits."""

    async def read(self, keys: Sequence[str]) -> dict[str, int]:
        """Current values (0 for a missing or expired counter)."""

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove counters (an administrative reset)."""

    async def sweep(self) -> None:
        """Remove expired counters (Redis expires them by itself)."""

    async def spend_limits(self) -> list[SpendLimit]: ...

    async def put_spend_limit(self, limit: SpendLimit, audit: AuditEntry) -> None:
        """Create or replace a cap (by id) and record the change, in one transaction."""

    async def delete_spend_limit(self, limit_id: str, audit: AuditEntry) -> None: ...

    async def record_audit(self, audit: AuditEntry) -> None: ...

    async def audit_log(self, limit: int) -> list[AuditEntry]:
        """The newest ``limit`` entries, newest first."""


def merge_charges(charges: Sequence[Charge]) -> list[Charge]:
    """One charge per key (summed, the tightest limit), in key order so that backends lock in one order."""
    merged: dict[str, Charge] = {}
    for charge in charges:
        known = merged.get(charge.key)
        if known is None:
            merged[charge.key] = charge
            continue
        limits = [x for x in (known.limit, charge.limit) if x is not None]
        merged[charge.key] = Charge(
            charge.key,
            known.amount + charge.amount,
            min(limits) if limits else None,
            max(known.expires_at, charge.expires_at),
        )
    return [merged[key] for key in sorted(merged)]


def merge_deltas(deltas: Sequence[Delta]) -> list[Delta]:
    """One delta per key, zeros dropped, in key order."""
    merged: dict[str, Delta] = {}
    for delta in deltas:
        known = merged.get(delta.key)
        if known is not None:
            delta = Delta(delta.key, known.amount + delta.amount, max(known.expires_at, delta.expires_at))
        merged[delta.key] = delta
    return [merged[key] for key in sorted(merged) if merged[key].amount]


def open_counter_store(settings: CounterStoreSettings) -> CounterStore:
    """The configured backend, not yet started."""
    if settings.type == "postgresql":
        from gate.store.postgres_counters import PostgresCounters

        return PostgresCounters(settings.postgresql, timeout=settings.timeout)
    if settings.type == "redis":
        from gate.store.redis_counters import RedisCounters

        return RedisCounters(settings.redis, timeout=settings.timeout)
    from gate.store.sqlite_counters import SqliteCounters

    return SqliteCounters(settings.sqlite)
