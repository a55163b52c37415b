"""The counter store on PostgreSQL through asyncpg, for replicas that share one database.

asyncpg rather than psycopg 3: it is the fastest asyncio driver (binary protocol, statements prepared and cached
per connection), brings its own connection pool, has no C library to install beside it, and is well kept
(MagicStack; SQLAlchemy's and Tortoise's default asyncio PostgreSQL driver). Each operation is one statement on
one pooled connection: reservations and deltas are the ``gate_reserve``/``gate_add`` functions from
``migrations.py``, so they are atomic and take one round trip. Everything lives in the configured schema.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from gate.settings import PostgresStoreSettings
from gate.store import migrations
from gate.store.counters import (
    AuditEntry,
    Charge,
    Delta,
    Overdrawn,
    SpendLimit,
    StoreUnavailable,
    merge_charges,
    merge_deltas,
)

__all__ = ["PostgresCounters"]

T = TypeVar("T")

_MIGRATION_LOCK = 0x6761746531  # pg_advisory_lock key: one replica migrates, the others wait ("gate1")
# Lock ordering makes deadlocks rare, not impossible (a new row is locked when inserted): PostgreSQL then aborts
# one statement, which is simply run again.
_RETRIED = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
_CONNECTION_LOST = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.exceptions.PostgresConnectionError)


class PostgresCounters:
    """``CounterStore`` over a PostgreSQL schema."""

    kind = "postgresql"

    def __init__(self, settings: PostgresStoreSettings, *, timeout: float) -> None:
        self._dsn = settings.url.get_secret_value()
        self._schema = settings.schema_
        self._pool_size = settings.pool_size
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._starting: asyncio.Lock | None = None

    async def start(self) -> None:
        try:
            await self._ensure_pool()
        except StoreUnavailable:
            raise
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise StoreUnavailable(f"postgresql store: {type(exc).__name__}") from None

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                pool.terminate()

    async def reserve(self, charges: Sequence[Charge]) -> Overdrawn | None:
        merged = merge_charges(charges)

        async def run(conn: asyncpg.Connection) -> Overdrawn | None:
            row = await conn.fetchrow(
                "SELECT failed, current FROM gate_reserve($1::text[], $2::bigint[], $3::bigint[], $4::float8[])",
                [c.key for c in merged],
                [c.amount for c in merged],
                [c.limit for c in merged],
                [c.expires_at for c in merged],
            )
            failed = int(row["failed"]) if row else 0
            return Overdrawn(merged[failed - 1], int(row["current"])) if failed and row else None

        return await self._run(run)

    async def add(self, deltas: Sequence[Delta]) -> None:
        merged = merge_deltas(deltas)
        if not merged:
            return

        async def run(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "SELECT gate_add($1::text[], $2::bigint[], $3::float8[])",
                [d.key for d in merged],
                [d.amount for d in merged],
                [d.expires_at for d in merged],
            )

        await self._run(run)

    async def read(self, keys: Sequence[str]) -> dict[str, int]:
        async def run(conn: asyncpg.Connection) -> dict[str, int]:
            rows = await conn.fetch(
                "SELECT key, value FROM gate_counters WHERE key = ANY($1::text[]) AND expires_at > $2",
                list(keys),
                time.time(),
            )
            return {str(r["key"]): int(r["value"]) for r in rows}

        found = await self._run(run)
        return {key: found.get(key, 0) for key in keys}

    async def delete(self, keys: Sequence[str]) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            await conn.execute("DELETE FROM gate_counters WHERE key = ANY($1::text[])", list(keys))

        await self._run(run)

    async def sweep(self) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            await conn.execute("DELETE FROM gate_counters WHERE expires_at <= $1", time.time())

        await self._run(run)

    async def spend_limits(self) -> list[SpendLimit]:
        async def run(conn: asyncpg.Connection) -> list[SpendLimit]:
            rows = await conn.fetch(
                "SELECT id, scope_type, scope_id, period, amount, currency, created_by, created_at, updated_at "
                "FROM gate_spend_limits ORDER BY scope_type, scope_id, period"
            )
            return [SpendLimit(*row.values()) for row in rows]

        return await self._run(run)

    async def put_spend_limit(self, limit: SpendLimit, audit: AuditEntry) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = on")
                await conn.execute(
                    "INSERT INTO gate_spend_limits VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
                    "ON CONFLICT (id) DO UPDATE SET scope_type = EXCLUDED.scope_type, scope_id = EXCLUDED.scope_id, "
                    "period = EXCLUDED.period, amount = EXCLUDED.amount, currency = EXCLUDED.currency, "
                    "updated_at = EXCLUDED.updated_at",
                    limit.id,
                    limit.scope_type,
                    limit.scope_id,
                    limit.period,
                    limit.amount,
                    limit.currency,
                    limit.created_by,
                    limit.created_at,
                    limit.updated_at,
                )
                await _audit(conn, audit)

        await self._run(run)

    async def delete_spend_limit(self, limit_id: str, audit: AuditEntry) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = on")
                await conn.execute("DELETE FROM gate_spend_limits WHERE id = $1", limit_id)
                await _audit(conn, audit)

        await self._run(run)

    async def record_audit(self, audit: AuditEntry) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = on")
                await _audit(conn, audit)

        await self._run(run)

    async def audit_log(self, limit: int) -> list[AuditEntry]:
        async def run(conn: asyncpg.Connection) -> list[AuditEntry]:
            rows = await conn.fetch(
                "SELECT at, actor, action, target, before::text, after::text, reason FROM gate_admin_audit "
                "ORDER BY id DESC LIMIT $1",
                limit,
            )
            return [AuditEntry(r[0], r[1], r[2], r[3], _loads(r[4]), _loads(r[5]), r[6]) for r in rows]

        return await self._run(run)

    # ------------------------------------------------------------------------------------------ internals

    async def _run(self, operation: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """One operation on a pooled connection, within the store timeout; failures become StoreUnavailable."""
        try:
            async with asyncio.timeout(self._timeout):
                pool = await self._ensure_pool()
                async with pool.acquire() as conn:
                    try:
                        return await operation(conn)
                    except _RETRIED:
                        return await operation(conn)
        except StoreUnavailable:
            raise
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if self._pool is not None and isinstance(exc, _CONNECTION_LOST):
                # A lost connection means the others are likely lost too: replace them all on their next use
                # rather than fail one call per dead connection once the database is back.
                self._pool.expire_connections()
            raise StoreUnavailable(f"postgresql store: {type(exc).__name__}: {_safe(exc)}") from None

    async def _ensure_pool(self) -> asyncpg.Pool:
        """The pool, created (and the schema migrated) on first use, so Gate starts while the store is down."""
        if self._pool is not None:
            return self._pool
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._pool is None:
                await self._migrate()
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=self._pool_size,
                    # Counters trade the last few hundred milliseconds of updates on a PostgreSQL crash for no
                    # WAL fsync per call (it was most of a reservation's time); caps and audit rows commit durably.
                    server_settings={"search_path": self._schema, "synchronous_commit": "off"},
                    timeout=self._timeout * 4,
                    command_timeout=self._timeout * 4,
                )
        assert self._pool is not None
        return self._pool

    async def _migrate(self) -> None:
        conn = await asyncpg.connect(self._dsn, timeout=max(self._timeout * 4, 2.0))
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
                await conn.execute(f'SET search_path TO "{self._schema}"')
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS gate_schema_migrations "
                    "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {r["version"] for r in await conn.fetch("SELECT version FROM gate_schema_migrations")}
                for version, script in migrations.POSTGRES:
                    if version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(script)
                        await conn.execute("INSERT INTO gate_schema_migrations (version) VALUES ($1)", version)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
        finally:
            await conn.close()


async def _audit(conn: asyncpg.Connection, audit: AuditEntry) -> None:
    await conn.execute(
        "INSERT INTO gate_admin_audit (at, actor, action, target, before, after, reason) "
        "VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7)",
        audit.at,
        audit.actor,
        audit.action,
        audit.target,
        None if audit.before is None else json.dumps(audit.before),
        None if audit.after is None else json.dumps(audit.after),
        audit.reason,
    )


def _loads(value: Any) -> dict[str, Any] | None:
    return None if value is None else dict(json.loads(value))


def _safe(exc: BaseException) -> str:
    """An error's text without the DSN (asyncpg quotes neither password nor DSN, but keep it short)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:200]
