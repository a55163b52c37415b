"""The counter store on Redis through redis-py's asyncio client, for replicas that share one Redis.

Counters are plain integer keys with ``EXPIREAT``, so Redis expires them by itself; a reservation (check every
limit, then add every charge) and a batch of deltas are each one Lua script, which Redis runs atomically. Caps
are one hash, the audit log one stream (trimmed to the newest 100,000 entries); a cap and its audit entry are
written in one ``MULTI``. Every key starts with the configured prefix. For Redis Cluster the keys of one script
would need one hash slot: not supported here (one primary, with replicas for failover, is the intended setup).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gate.settings import RedisStoreSettings
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

__all__ = ["RedisCounters"]

T = TypeVar("T")

# KEYS: counters. ARGV: per key amount, limit (-1: none), expiry (epoch seconds). Returns {failed index, value}.
_RESERVE = """
for i = 1, #KEYS do
    local limit = tonumber(ARGV[3 * i - 1])
    if limit >= 0 then
        local value = tonumber(redis.call('GET', KEYS[i]) or '0')
        if value + tonumber(ARGV[3 * i - 2]) > limit then
            return {i, value}
        end
    end
end
for i = 1, #KEYS do
    redis.call('INCRBY', KEYS[i], ARGV[3 * i - 2])
    redis.call('EXPIREAT', KEYS[i], ARGV[3 * i])
end
return {0, 0}
"""

# KEYS: counters. ARGV: per key amount, expiry. A decrement touches only a live counter and never goes below 0.
_ADD = """
for i = 1, #KEYS do
    local amount = tonumber(ARGV[2 * i - 1])
    if amount > 0 then
        redis.call('INCRBY', KEYS[i], amount)
        redis.call('EXPIREAT', KEYS[i], ARGV[2 * i])
    elseif redis.call('EXISTS', KEYS[i]) == 1 then
        local value = redis.call('INCRBY', KEYS[i], amount)
        if value < 0 then
            redis.call('SET', KEYS[i], 0, 'KEEPTTL')
        end
    end
end
return 0
"""

_AUDIT_MAXLEN = 100_000


class RedisCounters:
    """``CounterStore`` over Redis."""

    kind = "redis"

    def __init__(self, settings: RedisStoreSettings, *, timeout: float) -> None:
        self._prefix = settings.key_prefix
        self._timeout = timeout
        self._client = aioredis.Redis.from_url(
            settings.url.get_secret_value(),
            max_connections=settings.pool_size,
            socket_timeout=timeout * 4,
            socket_connect_timeout=timeout * 4,
            decode_responses=True,
        )
        self._reserve = self._client.register_script(_RESERVE)
        self._add = self._client.register_script(_ADD)
        self._limits_key = f"{self._prefix}spend_limits"
        self._audit_key = f"{self._prefix}audit"

    async def start(self) -> None:
        await self._run(self._client.ping())

    async def close(self) -> None:
        await self._client.aclose()

    async def reserve(self, charges: Sequence[Charge]) -> Overdrawn | None:
        merged = merge_charges(charges)
        args: list[Any] = []
        for c in merged:
            args += [c.amount, -1 if c.limit is None else c.limit, int(c.expires_at) + 1]
        failed, current = await self._run(self._reserve(keys=[self._key(c.key) for c in merged], args=args))
        return Overdrawn(merged[int(failed) - 1], int(current)) if int(failed) else None

    async def add(self, deltas: Sequence[Delta]) -> None:
        merged = merge_deltas(deltas)
        if not merged:
            return
        args: list[Any] = []
        for d in merged:
            args += [d.amount, int(d.expires_at) + 1]
        await self._run(self._add(keys=[self._key(d.key) for d in merged], args=args))

    async def read(self, keys: Sequence[str]) -> dict[str, int]:
        if not keys:
            return {}
        values = await self._run(self._client.mget([self._key(k) for k in keys]))
        return {key: int(value) if value is not None else 0 for key, value in zip(keys, values, strict=True)}

    async def delete(self, keys: Sequence[str]) -> None:
        if keys:
            await self._run(self._client.delete(*[self._key(k) for k in keys]))

    async def sweep(self) -> None:
        """Nothing to do: Redis expires counters itself."""

    async def spend_limits(self) -> list[SpendLimit]:
        rows: dict[str, str] = await self._run(self._client.hgetall(self._limits_key))  # type: ignore[arg-type]
        limits = [SpendLimit(**json.loads(value)) for value in rows.values()]
        return sorted(limits, key=lambda x: (x.scope_type, x.scope_id, x.period))

    async def put_spend_limit(self, limit: SpendLimit, audit: AuditEntry) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(self._limits_key, limit.id, json.dumps(limit.as_dict()))
        self._queue_audit(pipe, audit)
        await self._run(pipe.execute())

    async def delete_spend_limit(self, limit_id: str, audit: AuditEntry) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.hdel(self._limits_key, limit_id)
        self._queue_audit(pipe, audit)
        await self._run(pipe.execute())

    async def record_audit(self, audit: AuditEntry) -> None:
        pipe = self._client.pipeline(transaction=True)
        self._queue_audit(pipe, audit)
        await self._run(pipe.execute())

    async def audit_log(self, limit: int) -> list[AuditEntry]:
        entries: list[tuple[str, dict[str, str]]] = await self._run(
            self._client.xrevrange(self._audit_key, count=limit)  # type: ignore[arg-type]
        )
        return [AuditEntry(**json.loads(fields["entry"])) for _id, fields in entries]

    # ------------------------------------------------------------------------------------------ internals

    def _key(self, key: str) -> str:
        return f"{self._prefix}c:{key}"

    def _queue_audit(self, pipe: Any, audit: AuditEntry) -> None:
        pipe.xadd(self._audit_key, {"entry": json.dumps(audit.as_dict())}, maxlen=_AUDIT_MAXLEN, approximate=True)

    async def _run(self, operation: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                return await operation
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis store: {type(exc).__name__}") from None
        except RuntimeError as exc:
            # redis-py on uvloop: a write on a connection the server (or network) closed raises uvloop's
            # RuntimeError ("the handler is closed") instead of a ConnectionError; it is the same outage.
            raise StoreUnavailable(f"redis store: connection closed ({type(exc).__name__})") from None
