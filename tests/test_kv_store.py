"""The shared key-value store on both backends (embedded SQLite, the machine's PostgreSQL): expiry, atomic
insert-if-absent, compare-and-set, single-use take, windowed counters, encryption at rest, key rotation,
versioned migrations run once by concurrent openers."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from gate.settings import StoreSettings
from gate.store.kv import KeyValueStore, StoreError, open_store
from tests.postgres_db import throwaway_database

KEY_A = Fernet.generate_key().decode()
KEY_B = Fernet.generate_key().decode()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., StoreSettings]]:
    if request.param == "sqlite":
        yield lambda keys=(): StoreSettings(sqlite_path=str(tmp_path / "kv.sqlite3"), encryption_keys=list(keys))
        return
    with throwaway_database() as url:
        yield lambda keys=(KEY_A,): StoreSettings(backend="postgres", postgres_url=url, encryption_keys=list(keys))


@pytest.fixture
async def store(store_settings: Callable[..., StoreSettings]) -> AsyncIterator[KeyValueStore]:
    opened = open_store(store_settings())
    opened.clock = Clock()
    await opened.start()
    yield opened
    await opened.close()


async def test_values_expire_and_versions_guard_writes(store: KeyValueStore) -> None:
    clock: Any = store.clock
    assert await store.get("missing") is None
    await store.put("a", b"one", ttl=10)
    entry = await store.get("a")
    assert entry is not None and entry.value == b"one"
    assert await store.replace("a", b"two", entry.version, ttl=10)
    assert not await store.replace("a", b"three", entry.version, ttl=10)  # a stale version loses
    fresh = await store.get("a")
    assert fresh is not None and fresh.value == b"two" and fresh.version == entry.version + 1
    clock.now += 11
    assert await store.get("a") is None
    assert not await store.replace("a", b"x", fresh.version, ttl=10)  # an expired entry cannot be revived
    await store.put("forever", b"kept", ttl=None)
    clock.now += 10**6
    assert (await store.get("forever")).value == b"kept"  # type: ignore[union-attr]


async def test_add_only_when_absent_or_expired(store: KeyValueStore) -> None:
    clock: Any = store.clock
    assert await store.add("k", b"first", ttl=5)
    assert not await store.add("k", b"second", ttl=5)
    clock.now += 6
    assert await store.add("k", b"third", ttl=5)
    assert (await store.get("k")).value == b"third"  # type: ignore[union-attr]
    results = await asyncio.gather(*(store.add("race", str(i).encode(), ttl=5) for i in range(8)))
    assert results.count(True) == 1


async def test_take_is_single_use(store: KeyValueStore) -> None:
    await store.put("code", b"secret", ttl=5)
    taken = await asyncio.gather(*(store.take("code") for _ in range(6)))
    assert [t for t in taken if t is not None] == [b"secret"]
    assert await store.take("code") is None
    assert not await store.delete("code")


async def test_windowed_counters(store: KeyValueStore) -> None:
    clock: Any = store.clock
    assert [await store.hit("rl:x", 60) for _ in range(3)] == [1, 2, 3]
    assert await store.hit("rl:y", 60) == 1
    clock.now += 61
    assert await store.hit("rl:x", 60) == 1  # a new window


async def test_values_are_encrypted_at_rest_and_keys_rotate(
    store_settings: Callable[..., StoreSettings], tmp_path: Path
) -> None:
    first = open_store(store_settings((KEY_A,)))
    await first.start()
    await first.put("refresh:abc", b"idp-refresh-token-VALUE", ttl=60)
    settings = first._backend
    raw = await settings.get("refresh:abc", 0.0)  # type: ignore[attr-defined]
    assert raw is not None and b"idp-refresh-token" not in raw[0] and raw[0].startswith(b"gAAAAA")
    await first.close()
    rotated = open_store(store_settings((KEY_B, KEY_A)))  # new key first: old values still read
    await rotated.start()
    assert (await rotated.get("refresh:abc")).value == b"idp-refresh-token-VALUE"  # type: ignore[union-attr]
    await rotated.close()
    wrong = open_store(store_settings((KEY_B,)))
    await wrong.start()
    with pytest.raises(StoreError, match="does not decrypt"):
        await wrong.get("refresh:abc")
    await wrong.close()


async def test_migrations_run_once_for_concurrent_openers(store_settings: Callable[..., StoreSettings]) -> None:
    stores = [open_store(store_settings((KEY_A,))) for _ in range(3)]
    await asyncio.gather(*(s.start() for s in stores))
    await stores[0].put("shared", b"v", ttl=60)
    assert (await stores[2].get("shared")).value == b"v"  # type: ignore[union-attr]
    for s in stores:
        await s.close()


async def test_sqlite_generates_a_private_key_file(tmp_path: Path) -> None:
    path = tmp_path / "data" / "kv.sqlite3"
    store = open_store(StoreSettings(sqlite_path=str(path)))
    await store.start()
    await store.put("x", b"y", ttl=None)
    await store.close()
    key_file = path.with_name("kv.sqlite3.key")
    assert key_file.stat().st_mode & 0o777 == 0o600
    again = open_store(StoreSettings(sqlite_path=str(path)))
    await again.start()
    assert (await again.get("x")).value == b"y"  # type: ignore[union-attr]
    await again.close()
    versions = sqlite3.connect(path).execute("SELECT version FROM kv_migrations").fetchall()
    assert versions == [(1,)]


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="postgres-url"):
        StoreSettings(backend="postgres", encryption_keys=[KEY_A])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="encryption-keys"):
        StoreSettings(backend="postgres", postgres_url="postgresql://x@127.0.0.1/db")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a Fernet key"):
        StoreSettings(encryption_keys=["short"])  # type: ignore[list-item]


async def test_unreachable_postgres_is_a_clear_error() -> None:
    store = open_store(
        StoreSettings(backend="postgres", postgres_url="postgresql://u:pw@127.0.0.1:1/db", encryption_keys=[KEY_A])  # type: ignore[arg-type,list-item]
    )
    with pytest.raises(StoreError, match="cannot connect") as error:
        await store.start()
    assert "pw" not in str(error.value)
