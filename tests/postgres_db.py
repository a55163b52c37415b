"""A throwaway PostgreSQL database per test on the machine's server (trust auth), dropped afterwards."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


async def _admin(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(ADMIN_URL, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextmanager
def throwaway_database() -> Iterator[str]:
    """The URL of a new, empty database; skipped when no PostgreSQL answers on 127.0.0.1:5432."""
    name = f"gate_test_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except OSError:
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
