"""A key-value store with expiry, shared by every Gate process that points at the same database: sign-in device
grants, refresh bookkeeping, rate-limit counters and generated session keys.

Two backends behind one class: embedded SQLite in the data folder (the default, so ``make run`` needs nothing) and
PostgreSQL (asyncpg) when several replicas share the work. Values are encrypted at rest with Fernet (AES-128-CBC
with HMAC-SHA256, from ``cryptography``) under the configured keys, so a database dump holds no refresh token;
MultiFernet lets an operator rotate keys (the first encrypts, all decrypt). Keys (the names of entries) are not
encrypted: callers hash anything secret before using it as a key. Versioned migrations run at start, under an
advisory lock on PostgreSQL so that replicas starting together apply each one once.

Written here rather than taken from a cache library because the operations that matter are atomic across
processes (insert-if-absent, compare-and-set on a version, a windowed counter), which is one SQL statement each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from gate.settings import StoreSettings

__all__ = ["Entry", "KeyValueStore", "StoreError", "open_store"]

log = logging.getLogger(__name__)

_PG_LOCK: Final = 0x6761_7465  # "gate": the advisory lock that serialises migrations between replicas
_KEY_FILE_SUFFIX: Final = ".key"

# Each migration is applied once, in order, and recorded in kv_migrations; never edit one that has shipped.
_SQLITE_MIGRATIONS: Final[Sequence[Sequence[str]]] = (
    (
        "CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL, expires_at REAL)",
        "CREATE INDEX kv_expires ON kv (expires_at)",
        "CREATE TABLE kv_counters (key TEXT PRIMARY KEY, count INTEGER NOT NULL, expires_at REAL NOT NULL)",
        "CREATE INDEX kv_counters_expires ON kv_counters (expires_at)",
    ),
)
_POSTGRES_MIGRATIONS: Final[Sequence[Sequence[str]]] = (
    (
        "CREATE TABLE kv (key TEXT PRIMARY KEY, value BYTEA NOT NULL, version BIGINT NOT NULL, "
        "expires_at DOUBLE PRECISION)",
        "CREATE INDEX kv_expires ON kv (expires_at)",
        "CREATE TABLE kv_counters (key TEXT PRIMARY KEY, count BIGINT NOT NULL, expires_at DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX kv_counters_expires ON kv_counters (expires_at)",
    ),
)


class StoreError(Exception):
    """The store cannot be used (unreachable, or a value that does not decrypt); safe to log."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A live value and its version, which :meth:`KeyValueStore.replace` compares before it writes."""

    value: bytes
    version: int


class _Backend(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def get(self, key: str, now: float) -> tuple[bytes, int] | None: ...
    async def put(self, key: str, value: bytes, expires_at: float | None) -> None: ...
    async def add(self, key: str, value: bytes, expires_at: float | None, now: float) -> bool: ...
    async def replace(self, key: str, value: bytes, version: int, expires_at: float | None, now: float) -> bool: ...
    async def delete(self, key: str) -> bool: ...
    async def take(self, key: str, now: float) -> bytes | None: ...
    async def hit(self, key: str, expires_at: float, now: float) -> int: ...
    async def sweep(self, now: float) -> int: ...
    async def ping(self) -> None: ...


class KeyValueStore:
    """Encrypted values with optional expiry (seconds of ``ttl``); every operation is atomic across processes."""

    def __init__(self, backend: _Backend, cipher: MultiFernet, *, sweep_interval: float, name: str) -> None:
        self._backend = backend
        self._cipher = cipher
        self._sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None
        self.name = name  # "sqlite:<path>" or "postgres": for logs and health, never a password
        self.last_error: str | None = None  # the last sweep's failure (every sweep-interval): for health
        self.clock: Callable[[], float] = time.time

    async def start(self) -> None:
        await self._backend.start()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="gate-kv-sweep")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self._backend.close()

    async def get(self, key: str) -> Entry | None:
        found = await self._backend.get(key, self.clock())
        if found is None:
            return None
        return Entry(self._decrypt(key, found[0]), found[1])

    async def put(self, key: str, value: bytes, ttl: float | None) -> None:
        await self._backend.put(key, self._encrypt(value), self._expiry(ttl))

    async def add(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Store ``value`` only if ``key`` is absent (or expired); True if it was stored."""
        return await self._backend.add(key, self._encrypt(value), self._expiry(ttl), self.clock())

    async def replace(self, key: str, value: bytes, version: int, ttl: float | None) -> bool:
        """Overwrite ``key`` only if it still holds ``version`` (compare-and-set); True if it did."""
        return await self._backend.replace(key, self._encrypt(value), version, self._expiry(ttl), self.clock())

    async def delete(self, key: str) -> bool:
        return await self._backend.delete(key)

    async def take(self, key: str) -> bytes | None:
        """Remove ``key`` and return its value: whoever takes it first gets it, once (single-use codes)."""
        value = await self._backend.take(key, self.clock())
        return None if value is None else self._decrypt(key, value)

    async def hit(self, key: str, window: float) -> int:
        """Count one event in the fixed window that starts at the key's first hit; the count so far."""
        now = self.clock()
        return await self._backend.hit(key, now + window, now)

    async def ping(self) -> None:
        await self._backend.ping()

    def _expiry(self, ttl: float | None) -> float | None:
        return None if ttl is None else self.clock() + ttl

    def _encrypt(self, value: bytes) -> bytes:
        return self._cipher.encrypt(value)

    def _decrypt(self, key: str, value: bytes) -> bytes:
        try:
            return self._cipher.decrypt(value)
        except InvalidToken:
            raise StoreError(f"the stored value of {key.split(':', 1)[0]}:... does not decrypt with any key") from None

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                removed = await self._backend.sweep(self.clock())
            except StoreError as exc:  # a sweep failing (database away) must not end the loop
                log.warning("store %s: sweeping expired entries failed: %s", self.name, exc)
                self.last_error = str(exc)
                continue
            self.last_error = None
            if removed:
                log.debug("store %s: %d expired entries removed", self.name, removed)


# ---------------------------------------------------------------------------------------------- SQLite


class _SqliteBackend:
    """One connection, used from worker threads one at a time; each statement is its own transaction."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=10.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE IF NOT EXISTS kv_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
        db.execute("BEGIN IMMEDIATE")  # a second process opening the same file waits here
        try:
            applied = {row[0] for row in db.execute("SELECT version FROM kv_migrations")}
            for version, statements in enumerate(_SQLITE_MIGRATIONS, start=1):
                if version in applied:
                    continue
                for statement in statements:
                    db.execute(statement)
                db.execute("INSERT INTO kv_migrations VALUES (?, ?)", (version, time.time()))
                log.info("store sqlite:%s: migration %d applied", self._path, version)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            db.close()
            raise
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)

    async def _run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        def call() -> Any:
            with self._lock:
                if self._db is None:
                    raise StoreError("the store is closed")
                return fn(self._db)

        try:
            return await asyncio.to_thread(call)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite: {exc}") from None

    async def get(self, key: str, now: float) -> tuple[bytes, int] | None:
        sql = "SELECT value, version FROM kv WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)"
        row = await self._run(lambda db: db.execute(sql, (key, now)).fetchone())
        return None if row is None else (bytes(row[0]), int(row[1]))

    async def put(self, key: str, value: bytes, expires_at: float | None) -> None:
        sql = (
            "INSERT INTO kv VALUES (?, ?, 1, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "version = kv.version + 1, expires_at = excluded.expires_at"
        )
        await self._run(lambda db: db.execute(sql, (key, value, expires_at)))

    async def add(self, key: str, value: bytes, expires_at: float | None, now: float) -> bool:
        sql = (
            "INSERT INTO kv VALUES (?, ?, 1, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "version = kv.version + 1, expires_at = excluded.expires_at "
            "WHERE kv.expires_at IS NOT NULL AND kv.expires_at <= ?"
        )
        return bool(await self._run(lambda db: db.execute(sql, (key, value, expires_at, now)).rowcount))

    async def replace(self, key: str, value: bytes, version: int, expires_at: float | None, now: float) -> bool:
        sql = (
            "UPDATE kv SET value = ?, version = version + 1, expires_at = ? "
            "WHERE key = ? AND version = ? AND (expires_at IS NULL OR expires_at > ?)"
        )
        return bool(await self._run(lambda db: db.execute(sql, (value, expires_at, key, version, now)).rowcount))

    async def delete(self, key: str) -> bool:
        return bool(await self._run(lambda db: db.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount))

    async def take(self, key: str, now: float) -> bytes | None:
        sql = "DELETE FROM kv WHERE key = ? AND (expires_at IS NULL OR expires_at > ?) RETURNING value"
        row = await self._run(lambda db: db.execute(sql, (key, now)).fetchone())
        return None if row is None else bytes(row[0])

    async def hit(self, key: str, expires_at: float, now: float) -> int:
        sql = (
            "INSERT INTO kv_counters VALUES (?, 1, ?) ON CONFLICT (key) DO UPDATE SET "
            "count = CASE WHEN kv_counters.expires_at <= ? THEN 1 ELSE kv_counters.count + 1 END, "
            "expires_at = CASE WHEN kv_counters.expires_at <= ? THEN excluded.expires_at "
            "ELSE kv_counters.expires_at END RETURNING count"
        )
        row = await self._run(lambda db: db.execute(sql, (key, expires_at, now, now)).fetchone())
        return int(row[0])

    async def sweep(self, now: float) -> int:
        def run(db: sqlite3.Connection) -> int:
            removed = db.execute("DELETE FROM kv WHERE expires_at <= ?", (now,)).rowcount
            return int(removed + db.execute("DELETE FROM kv_counters WHERE expires_at <= ?", (now,)).rowcount)

        return int(await self._run(run))

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())


# ---------------------------------------------------------------------------------------------- PostgreSQL


class _PostgresBackend:
    """An asyncpg pool; each operation is one statement, so atomic without explicit transactions."""

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self._url = url
        self._timeout = timeout
        self._pool: Any = None

    async def start(self) -> None:
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(
                self._url, min_size=1, max_size=4, command_timeout=self._timeout, timeout=self._timeout
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {type(exc).__name__}: {_redacted(str(exc))}") from None
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _PG_LOCK)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS kv_migrations (version INTEGER PRIMARY KEY, "
                    "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                applied = {row[0] for row in await conn.fetch("SELECT version FROM kv_migrations")}
                for version, statements in enumerate(_POSTGRES_MIGRATIONS, start=1):
                    if version in applied:
                        continue
                    async with conn.transaction():
                        for statement in statements:
                            await conn.execute(statement)
                        await conn.execute("INSERT INTO kv_migrations (version) VALUES ($1)", version)
                    log.info("store postgres: migration %d applied", version)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _PG_LOCK)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def _call(self, method: str, sql: str, *args: Any) -> Any:
        import asyncpg

        if self._pool is None:
            raise StoreError("the store is closed")
        try:
            return await getattr(self._pool, method)(sql, *args)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise StoreError(f"PostgreSQL: {type(exc).__name__}") from None

    async def get(self, key: str, now: float) -> tuple[bytes, int] | None:
        sql = "SELECT value, version FROM kv WHERE key = $1 AND (expires_at IS NULL OR expires_at > $2)"
        row = await self._call("fetchrow", sql, key, now)
        return None if row is None else (bytes(row[0]), int(row[1]))

    async def put(self, key: str, value: bytes, expires_at: float | None) -> None:
        sql = (
            "INSERT INTO kv VALUES ($1, $2, 1, $3) ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "version = kv.version + 1, expires_at = excluded.expires_at"
        )
        await self._call("execute", sql, key, value, expires_at)

    async def add(self, key: str, value: bytes, expires_at: float | None, now: float) -> bool:
        sql = (
            "INSERT INTO kv VALUES ($1, $2, 1, $3) ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "version = kv.version + 1, expires_at = excluded.expires_at "
            "WHERE kv.expires_at IS NOT NULL AND kv.expires_at <= $4 RETURNING 1"
        )
        return await self._call("fetchval", sql, key, value, expires_at, now) is not None

    async def replace(self, key: str, value: bytes, version: int, expires_at: float | None, now: float) -> bool:
        sql = (
            "UPDATE kv SET value = $1, version = version + 1, expires_at = $2 "
            "WHERE key = $3 AND version = $4 AND (expires_at IS NULL OR expires_at > $5) RETURNING 1"
        )
        return await self._call("fetchval", sql, value, expires_at, key, version, now) is not None

    async def delete(self, key: str) -> bool:
        return await self._call("fetchval", "DELETE FROM kv WHERE key = $1 RETURNING 1", key) is not None

    async def take(self, key: str, now: float) -> bytes | None:
        sql = "DELETE FROM kv WHERE key = $1 AND (expires_at IS NULL OR expires_at > $2) RETURNING value"
        value = await self._call("fetchval", sql, key, now)
        return None if value is None else bytes(value)

    async def hit(self, key: str, expires_at: float, now: float) -> int:
        sql = (
            "INSERT INTO kv_counters VALUES ($1, 1, $2) ON CONFLICT (key) DO UPDATE SET "
            "count = CASE WHEN kv_counters.expires_at <= $3 THEN 1 ELSE kv_counters.count + 1 END, "
            "expires_at = CASE WHEN kv_counters.expires_at <= $3 THEN excluded.expires_at "
            "ELSE kv_counters.expires_at END RETURNING count"
        )
        return int(await self._call("fetchval", sql, key, expires_at, now))

    async def sweep(self, now: float) -> int:
        first = await self._call("execute", "DELETE FROM kv WHERE expires_at <= $1", now)
        second = await self._call("execute", "DELETE FROM kv_counters WHERE expires_at <= $1", now)
        return int(first.rsplit(" ", 1)[-1]) + int(second.rsplit(" ", 1)[-1])

    async def ping(self) -> None:
        await self._call("fetchval", "SELECT 1")


def _redacted(text: str) -> str:
    import re

    return re.sub(r"://[^@/\s]*@", "://******@", text)


# ---------------------------------------------------------------------------------------------- building


def open_store(settings: StoreSettings) -> KeyValueStore:
    """The store the settings name (not started); with SQLite and no configured key, one is made beside it."""
    keys = [key.get_secret_value().encode() for key in settings.encryption_keys]
    if settings.backend == "postgres":
        backend: _Backend = _PostgresBackend(settings.postgres_url.get_secret_value())
        name = "postgres"
    else:
        path = Path(os.path.expanduser(settings.sqlite_path))
        backend = _SqliteBackend(path)
        name = f"sqlite:{path}"
        if not keys:
            keys = [_local_key(path.with_name(path.name + _KEY_FILE_SUFFIX))]
    cipher = MultiFernet([Fernet(key) for key in keys])
    return KeyValueStore(backend, cipher, sweep_interval=settings.sweep_interval, name=name)


def _local_key(path: Path) -> bytes:
    """The generated encryption key of an embedded store, created once with owner-only permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    key = Fernet.generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as file:
        file.write(key)
    log.info("store: generated the encryption key %s (keep it with the database)", path)
    return key
