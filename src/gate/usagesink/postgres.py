"""PostgreSQL for the usage sink: schema migrations (Alembic) and idempotent batch writes (psycopg 3).

A batch is one transaction of ``INSERT ... ON CONFLICT (event_id) DO NOTHING``: a redelivered event finds its row
and adds nothing, so the broker may redeliver whatever it likes. A lost connection is an outage (reconnect, try
the same batch again); a row PostgreSQL refuses as data (a NUL in a string, say) is set apart from its batch and
reported, so that one bad event cannot hold up the rest.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from gate.settings import SinkDatabaseSettings
from gate.usagesink.rows import COLUMNS, UsageRow

__all__ = ["DatabaseUnavailable", "PostgresStore", "WriteResult", "migrate", "sqlalchemy_url"]

log = logging.getLogger("gate.usagesink")

TABLE = "usage_events"


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached (or the connection broke): the batch is to be written again later."""


@dataclass
class WriteResult:
    inserted: int = 0  # new rows
    duplicates: int = 0  # events already stored (redeliveries)
    refused: list[tuple[UsageRow, str]] = field(default_factory=list)  # rows PostgreSQL will never take


def sqlalchemy_url(url: str) -> str:
    """The SQLAlchemy URL for a libpq one, with psycopg 3 as the driver."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgres", "postgresql", "postgresql+psycopg"):
        raise ValueError("usage-sink.database.url must be a postgresql:// URL")
    return f"postgresql+psycopg://{rest}"


def migrate(settings: SinkDatabaseSettings) -> None:
    """Bring the schema up to date (blocking: Alembic is synchronous; run it in a thread)."""
    import sqlalchemy
    from alembic import command
    from alembic.config import Config

    schema = settings.schema_name
    engine = sqlalchemy.create_engine(
        sqlalchemy_url(settings.url.get_secret_value()),
        poolclass=sqlalchemy.pool.NullPool,
        connect_args={"connect_timeout": max(int(settings.connect_timeout), 1)},
    )
    try:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        with engine.connect() as connection:
            config = Config()
            config.set_main_option("script_location", str(resources.files("gate.usagesink") / "migrations"))
            config.attributes["connection"] = connection
            config.attributes["schema"] = schema
            command.upgrade(config, "head")
            connection.commit()
    finally:
        engine.dispose()


class PostgresStore:
    """One connection for writes, reopened after an outage; each ``write`` is one transaction."""

    def __init__(self, settings: SinkDatabaseSettings) -> None:
        self._settings = settings
        self._connection: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        table = sql.Identifier(settings.schema_name, TABLE)
        self._insert = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (event_id) DO NOTHING").format(
            table,
            sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
            sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)),
        )
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.closed and not self._connection.broken

    async def connect(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        if self._connection is not None and self.connected:
            return self._connection
        await self.close()
        try:
            self._connection = await psycopg.AsyncConnection.connect(
                self._settings.url.get_secret_value(),
                connect_timeout=max(int(self._settings.connect_timeout), 1),
                application_name="gate-usage-sink",
            )
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from None
        return self._connection

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.closed:
            with contextlib.suppress(psycopg.Error):
                await connection.close()

    async def write(self, rows: Sequence[UsageRow]) -> WriteResult:
        """Store the batch in one transaction; raises ``DatabaseUnavailable`` when it could not be committed."""
        result = WriteResult()
        if not rows:
            return result
        connection = await self.connect()
        try:
            result.inserted = await self._insert_all(connection, rows)
        except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError) as exc:
            if connection.broken:
                raise self._unavailable(exc) from None
            log.warning("a batch of %d usage rows was refused (%s): writing them one by one", len(rows), exc)
            result = await self._one_by_one(connection, rows)
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError, TimeoutError) as exc:
            await self.close()
            raise self._unavailable(exc) from None
        else:
            result.duplicates = len(rows) - result.inserted
        self.last_error = None
        return result

    async def _insert_all(
        self, connection: psycopg.AsyncConnection[tuple[object, ...]], rows: Sequence[UsageRow]
    ) -> int:
        async with connection.transaction(), connection.cursor() as cursor:
            await cursor.executemany(self._insert, [_params(row) for row in rows])
            return max(cursor.rowcount, 0)

    async def _one_by_one(
        self, connection: psycopg.AsyncConnection[tuple[object, ...]], rows: Sequence[UsageRow]
    ) -> WriteResult:
        result = WriteResult()
        for row in rows:
            try:
                inserted = await self._insert_all(connection, [row])
            except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError) as exc:
                if connection.broken:
                    raise self._unavailable(exc) from None
                result.refused.append((row, f"{type(exc).__name__}: {str(exc)[:200]}"))
                continue
            except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
                await self.close()
                raise self._unavailable(exc) from None
            result.inserted += inserted
            result.duplicates += 1 - inserted
        return result

    def _unavailable(self, exc: BaseException) -> DatabaseUnavailable:
        # psycopg's messages name host and port, never the password; still, say only the kind and first line.
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.last_error = f"PostgreSQL: {text[:300]}"
        return DatabaseUnavailable(self.last_error)


def _params(row: UsageRow) -> tuple[object, ...]:
    values = list(row.values())
    values[-1] = Jsonb(row.data)
    return tuple(values)
