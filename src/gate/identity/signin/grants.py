"""Device grants (RFC 8628) kept in the shared store, so that any replica can answer any step: the code pair
issued, approved or denied from the browser, polled, and redeemed exactly once.

A grant lives under ``device:<sha256(device_code)>`` (the device code itself is never stored) as encrypted JSON,
and ``usercode:<USER-CODE>`` points at it. Every change is a compare-and-set on the entry's version, so two
replicas answering two polls of one code cannot both hand out the tokens. The entry outlives the code by
``_TOMBSTONE`` seconds so that a late or replayed poll is told ``expired_token`` rather than ``invalid_grant``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import orjson

from gate.store.kv import KeyValueStore

__all__ = ["USER_CODE_ALPHABET", "DeviceGrants", "Grant", "Poll", "normalise_user_code"]

USER_CODE_ALPHABET: Final = "BCDFGHJKLMNPQRSTVWXZ"  # RFC 8628 section 6.1: base-20, no vowels, no look-alikes
_USER_CODE_LENGTH: Final = 8
_TOMBSTONE: Final = 600.0
_NOT_CODE = re.compile(r"[^A-Z]")
_POLL_SLACK: Final = 0.8  # a poll this fraction of the interval after the last one is on time (network jitter)


def normalise_user_code(text: str) -> str | None:
    """``wdjb mjht`` / ``WDJB-MJHT`` -> ``WDJB-MJHT``; None if it cannot be a user code."""
    letters = _NOT_CODE.sub("", text.upper()[:64])
    if len(letters) != _USER_CODE_LENGTH or any(c not in USER_CODE_ALPHABET for c in letters):
        return None
    return f"{letters[:4]}-{letters[4:]}"


def _digest(device_code: str) -> str:
    return hashlib.sha256(device_code.encode()).hexdigest()


class Poll(StrEnum):
    PENDING = "authorization_pending"
    SLOW_DOWN = "slow_down"
    DENIED = "access_denied"
    EXPIRED = "expired_token"
    UNKNOWN = "invalid_grant"
    ISSUED = "issued"


@dataclass(slots=True)
class Grant:
    key: str
    version: int
    data: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.data["status"])

    @property
    def user_code(self) -> str:
        return str(self.data["user_code"])


class DeviceGrants:
    def __init__(self, store: KeyValueStore, *, lifetime: float, interval: int) -> None:
        self._store = store
        self.lifetime = lifetime
        self.interval = interval

    async def issue(self, client_ip: str) -> tuple[str, str]:
        """A new (device_code, user_code) pair, pending."""
        now = self._store.clock()
        for _ in range(8):  # a user-code collision among live codes is rare; try another
            device_code = secrets.token_urlsafe(32)  # 256 bits
            letters = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(_USER_CODE_LENGTH))
            user_code = f"{letters[:4]}-{letters[4:]}"
            key = f"device:{_digest(device_code)}"
            if not await self._store.add(f"usercode:{user_code}", key.encode(), self.lifetime):
                continue
            data = {"status": "pending", "user_code": user_code, "created": now, "ip": client_ip, "last_poll": None}
            await self._store.put(key, orjson.dumps(data), self.lifetime + _TOMBSTONE)
            return device_code, user_code
        raise RuntimeError("could not find a free user code")

    async def by_user_code(self, user_code: str) -> Grant | None:
        """The live, pending grant a user code names; None when unknown, expired or already used."""
        pointer = await self._store.get(f"usercode:{user_code}")
        if pointer is None:
            return None
        grant = await self._load(pointer.value.decode())
        if grant is None or grant.status != "pending" or self._expired(grant):
            return None
        return grant

    async def by_key(self, key: str) -> Grant | None:
        return await self._load(key)

    async def approve(self, grant: Grant, tokens: dict[str, Any], sub: str) -> bool:
        return await self._finish(grant, {"status": "approved", "tokens": tokens, "sub": sub})

    async def deny(self, grant: Grant, reason: str) -> bool:
        return await self._finish(grant, {"status": "denied", "reason": reason})

    async def poll(self, device_code: str) -> tuple[Poll, dict[str, Any] | None]:
        """One token-endpoint poll: the outcome, and the tokens when they are handed out (once)."""
        key = f"device:{_digest(device_code)}"
        for _ in range(4):  # lost a compare-and-set to a concurrent poll: look again
            grant = await self._load(key)
            if grant is None:
                return Poll.UNKNOWN, None
            if grant.status == "redeemed" or self._expired(grant):
                return Poll.EXPIRED, None
            if grant.status == "denied":
                return Poll.DENIED, None
            now = self._store.clock()
            if grant.status == "approved":
                tokens = grant.data.get("tokens")
                done = {"status": "redeemed", "user_code": grant.user_code, "created": grant.data["created"]}
                if await self._store.replace(key, orjson.dumps(done), grant.version, _TOMBSTONE):
                    return Poll.ISSUED, tokens
                continue
            last = grant.data.get("last_poll")
            early = isinstance(last, int | float) and now - last < self.interval * _POLL_SLACK
            grant.data["last_poll"] = now
            if await self._store.replace(key, orjson.dumps(grant.data), grant.version, self._remaining(grant)):
                return (Poll.SLOW_DOWN if early else Poll.PENDING), None
        return Poll.SLOW_DOWN, None

    async def _finish(self, grant: Grant, update: dict[str, Any]) -> bool:
        data = {**grant.data, **update}
        ok = await self._store.replace(grant.key, orjson.dumps(data), grant.version, self._remaining(grant))
        if ok:
            await self._store.delete(f"usercode:{grant.user_code}")  # a user code approves once
        return ok

    async def _load(self, key: str) -> Grant | None:
        entry = await self._store.get(key)
        if entry is None:
            return None
        return Grant(key, entry.version, orjson.loads(entry.value))

    def _expired(self, grant: Grant) -> bool:
        return bool(self._store.clock() >= float(grant.data["created"]) + self.lifetime)

    def _remaining(self, grant: Grant) -> float:
        return max(float(grant.data["created"]) + self.lifetime + _TOMBSTONE - self._store.clock(), 1.0)
