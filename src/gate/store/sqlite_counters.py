"""The embedded counter store: one SQLite file (WAL), for a single Gate process or workers on one host.

Calls run on the event loop itself: each is one short ``BEGIN IMMEDIATE`` transaction (tens of microseconds
with ``synchronous=NORMAL``), cheaper than a hop to a thread. ``BEGIN IMMEDIATE`` takes the write lock before
reading, so the check and the add of a reservation cannot interleave with another process's.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from gate.settings import SqliteStoreSettings
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

__all__ = ["SqliteCounters"]

_UPSERT = """
INSERT INTO gate_counters (key, value, expires_at) VALUES (?, ?, ?)
ON CONFLICT (key) DO UPDATE SET
    value = CASE WHEN gate_counters.expires_at <= ? THEN max(excluded.value, 0)
                 ELSE gate_counters.value + excluded.value END,
    expires_at = CASE WHEN gate_counters.expires_at <= ? THEN excluded.expires_at
                      ELSE max(gate_counters.expires_at, excluded.expires_at) END
"""
_DECREMENT = "UPDATE gate_counters SET value = value + ? WHERE key = ? AND expires_at > ?"


class SqliteCounters:
    """``CounterStore`` over one SQLite file."""

    kind = "sqlite"

    def __init__(self, settings: SqliteStoreSettings) -> None:
        self._path = Path(settings.path)
        self._db: sqlite3.Connection | None = None

    async def start(self) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=2.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._db = db
            self._migrate(db)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"sqlite store {self._path}: {exc}") from None

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def reserve(self, charges: Sequence[Charge]) -> Overdrawn | None:
        merged = merge_charges(charges)
        now = time.time()
        with self._transaction() as db:
            for charge in merged:
                if charge.limit is None:
                    continue
                row = db.execute(
                    "SELECT value FROM gate_counters WHERE key = ? AND expires_at > ?", (charge.key, now)
                ).fetchone()
                current = int(row[0]) if row else 0
                if current + charge.amount > charge.limit:
                    db.execute("ROLLBACK")
                    return Overdrawn(charge, current)
            db.executemany(_UPSERT, [(c.key, c.amount, c.expires_at, now, now) for c in merged])
        return None

    async def add(self, deltas: Sequence[Delta]) -> None:
        merged = merge_deltas(deltas)
        if not merged:
            return
        now = time.time()
        with self._transaction() as db:
            db.executemany(_UPSERT, [(d.key, d.amount, d.expires_at, now, now) for d in merged if d.amount > 0])
            db.executemany(_DECREMENT, [(d.amount, d.key, now) for d in merged if d.amount < 0])

    async def read(self, keys: Sequence[str]) -> dict[str, int]:
        now = time.time()
        with self._transaction(write=False) as db:
            rows = db.execute(
                f"SELECT key, value FROM gate_counters WHERE expires_at > ? AND key IN ({','.join('?' * len(keys))})",  # noqa: S608 - placeholders only
                (now, *keys),
            ).fetchall()
        found = {str(key): int(value) for key, value in rows}
        return {key: found.get(key, 0) for key in keys}

    async def delete(self, keys: Sequence[str]) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM gate_counters WHERE key = ?", [(key,) for key in keys])

    async def sweep(self) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM gate_counters WHERE expires_at <= ?", (time.time(),))

    async def spend_limits(self) -> list[SpendLimit]:
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT id, scope_type, scope_id, period, amount, currency, created_by, created_at, updated_at "
                "FROM gate_spend_limits ORDER BY scope_type, scope_id, period"
            ).fetchall()
        return [SpendLimit(*row) for row in rows]

    async def put_spend_limit(self, limit: SpendLimit, audit: AuditEntry) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO gate_spend_limits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "scope_type = excluded.scope_type, scope_id = excluded.scope_id, period = excluded.period, "
                "amount = excluded.amount, currency = excluded.currency, updated_at = excluded.updated_at",
                (
                    limit.id,
                    limit.scope_type,
                    limit.scope_id,
                    limit.period,
                    limit.amount,
                    limit.currency,
                    limit.created_by,
                    limit.created_at,
                    limit.updated_at,
                ),
            )
            self._audit(db, audit)

    async def delete_spend_limit(self, limit_id: str, audit: AuditEntry) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM gate_spend_limits WHERE id = ?", (limit_id,))
            self._audit(db, audit)

    async def record_audit(self, audit: AuditEntry) -> None:
        with self._transaction() as db:
            self._audit(db, audit)

    async def audit_log(self, limit: int) -> list[AuditEntry]:
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT at, actor, action, target, before, after, reason FROM gate_admin_audit "
                "ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            AuditEntry(at, actor, action, target, _loads(before), _loads(after), reason)
            for at, actor, action, target, before, after, reason in rows
        ]

    # ------------------------------------------------------------------------------------------ internals

    def _transaction(self, *, write: bool = True) -> _Transaction:
        if self._db is None:
            raise StoreUnavailable("sqlite store is not open")
        return _Transaction(self._db, write)

    @staticmethod
    def _audit(db: sqlite3.Connection, audit: AuditEntry) -> None:
        db.execute(
            "INSERT INTO gate_admin_audit (at, actor, action, target, before, after, reason) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                audit.at,
                audit.actor,
                audit.action,
                audit.target,
                _dumps(audit.before),
                _dumps(audit.after),
                audit.reason,
            ),
        )

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS gate_schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)"
            )
            done = {int(row[0]) for row in db.execute("SELECT version FROM gate_schema_migrations")}
            for version, script in migrations.SQLITE:
                if version in done:
                    continue
                for statement in (s for s in script.split(";") if s.strip()):
                    db.execute(statement)
                db.execute("INSERT INTO gate_schema_migrations VALUES (?, ?)", (version, time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


class _Transaction:
    """``BEGIN IMMEDIATE`` (or a read) ... ``COMMIT``; any SQLite error becomes :class:`StoreUnavailable`."""

    __slots__ = ("_db", "_write")

    def __init__(self, db: sqlite3.Connection, write: bool) -> None:
        self._db = db
        self._write = write

    def __enter__(self) -> sqlite3.Connection:
        try:
            self._db.execute("BEGIN IMMEDIATE" if self._write else "BEGIN")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite store: {exc}") from None
        return self._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        db = self._db
        if not db.in_transaction:
            return  # ended inside (a refused reservation rolled back)
        if exc_type is None:
            try:
                db.execute("COMMIT")
                return
            except sqlite3.Error as error:
                db.execute("ROLLBACK")
                raise StoreUnavailable(f"sqlite store: {error}") from None
        db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreUnavailable(f"sqlite store: {exc}") from None


def _dumps(value: object) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _loads(value: str | None) -> dict[str, object] | None:
    return None if value is None else dict(json.loads(value))
