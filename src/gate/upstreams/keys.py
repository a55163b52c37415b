"""The Anthropic key pool: round-robin selection over the configured keys, skipping keys that are cooling down
after a 429 or quarantined after a 401. Aliases name keys everywhere; values never leave the ``Key``.

Only a 401 (``authentication_error``: Anthropic's answer to an invalid, disabled or deleted key) quarantines; a
403 ``permission_error`` is about the request (a model or beta the organisation lacks) and leaves keys alone.
A quarantined key is handed to ``on_quarantine`` (the background ``KeyProber``), which restores it as soon as
Anthropic accepts it again, so one request's answer never locks keys out for the whole quarantine.

With ``session-affinity`` selection, a call that names an affinity (its Claude Code session) goes to the same
organisation every time while one of its keys is in rotation: Anthropic's prompt cache lives per organisation, so
a session that hopped between organisations would pay a full cache write after every hop. The organisation is
chosen by rendezvous hashing (highest ``hash(organisation, session)`` among organisations with a usable key), so
when an organisation's keys are all out only its own sessions move, each to its next choice, and come back when
it returns; within the organisation keys still take turns. A key without an organisation is one of its own.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from gate.settings import ApiKey, KeyHealthSettings

__all__ = ["Key", "KeyPool", "NoKeyAvailable"]

logger = logging.getLogger("gate.keys")

KeyState = Literal["available", "cooling", "quarantined"]
KeyEvent = Literal["selected", "cooldown", "quarantine", "restored"]


@dataclass(frozen=True, slots=True)
class Key:
    """One Anthropic API key; ``repr`` and ``str`` show the alias only."""

    alias: str
    value: str = field(repr=False)


class NoKeyAvailable(Exception):
    """No key can take a call now; ``retry_after``: seconds until one returns, None if none is configured."""

    def __init__(self, retry_after: float | None, reason: str, *, rejected_only: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.rejected_only = rejected_only  # every key out was rejected (401/403), none is merely rate limited


class KeyPool:
    """Thread- and task-safe round robin over keys; ``acquire`` is cheap enough to run on every request."""

    def __init__(
        self,
        keys: Sequence[ApiKey],
        settings: KeyHealthSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, str], None] | None = None,
        selection: Literal["round-robin", "session-affinity"] = "round-robin",
    ) -> None:
        self._keys = tuple(Key(key.alias, key.value.get_secret_value()) for key in keys)
        self._index = {key.alias: i for i, key in enumerate(self._keys)}
        if len(self._index) != len(self._keys):
            raise ValueError("key aliases must be unique")
        self._settings = settings
        self._clock = clock
        self._on_event = on_event
        self._lock = threading.Lock()
        self._next = 0
        # Health by key index. ``_out`` counts keys not "available": the healthy path never reads the clock.
        self._state: list[KeyState] = ["available"] * len(self._keys)
        self._until = [0.0] * len(self._keys)
        self._out = 0
        self.on_quarantine: Callable[[Key], None] | None = None  # the prober, set by the app
        self._selection = selection
        self._group_organizations(keys)

    def _group_organizations(self, keys: Sequence[ApiKey]) -> None:
        """Session affinity: key indices by organisation (a key without one is an organisation of its own)."""
        by_org: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            by_org.setdefault(key.organization or f"key:{key.alias}", []).append(i)
        self._orgs = tuple((org, tuple(indices)) for org, indices in by_org.items())
        self._org_turn = dict.fromkeys(by_org, 0)
        self._affine = self._selection == "session-affinity" and len(self._orgs) > 1

    def __len__(self) -> int:
        return len(self._keys)

    def acquire(self, exclude: frozenset[str] = frozenset(), affinity: str | None = None) -> Key:
        """The next key in turn that is in rotation and not in ``exclude``; else :class:`NoKeyAvailable`.

        With session-affinity selection, ``affinity`` (a session id) picks the organisation first.
        """
        count = len(self._keys)
        if count == 0:
            raise NoKeyAvailable(None, "no Anthropic API key is configured")
        with self._lock:
            start = self._next
            self._next = start + 1 if start + 1 < count else 0
            key: Key | None
            restored: list[str]
            if affinity is not None and self._affine:
                key, restored, retry_after = self._select_affine(affinity, exclude)
            elif not self._out and not exclude:
                key = self._keys[start]
                restored = []
                retry_after = 0.0
            else:
                key, restored, retry_after = self._select(start, exclude)
        for alias in restored:
            self._emit("restored", alias)
        if key is None:
            if exclude and retry_after == 0.0:
                raise NoKeyAvailable(0.0, "every Anthropic API key in rotation has already been tried")
            reason = f"every Anthropic API key is out of rotation; the first returns in {retry_after:.1f} s"
            raise NoKeyAvailable(retry_after, reason, rejected_only=self._all_out_rejected(exclude))
        self._emit("selected", key.alias)
        return key

    def report_rate_limited(self, alias: str, retry_after: float | None) -> None:
        """Upstream answered 429 for ``alias``: rest it ``retry_after`` seconds, or the default cooldown."""
        settings = self._settings
        if retry_after is None or math.isnan(retry_after):
            retry_after = settings.rate_limit_cooldown
        seconds = min(max(retry_after, 0.0), settings.max_cooldown)
        if self._take_out(alias, seconds, "cooling"):
            logger.warning("Anthropic key %r is rate limited; out of rotation for %.1f s", alias, seconds)
            self._emit("cooldown", alias)

    def report_rejected(self, alias: str, status: int) -> None:
        """Upstream refused ``alias`` as a key (401): quarantine it, raise the alarm (naming the alias only) and
        have it probed in the background."""
        seconds = self._settings.quarantine
        if self._take_out(alias, seconds, "quarantined"):
            logger.error(
                "Anthropic rejected key %r with HTTP %d: out of rotation, probed in the background and back as soon "
                "as Anthropic accepts it (at the latest in %.0f s); check or replace this key",
                alias,
                status,
                seconds,
            )
            self._emit("quarantine", alias)
            if self.on_quarantine is not None:
                self.on_quarantine(self._keys[self._index[alias]])

    def restore(self, alias: str) -> None:
        """Put a quarantined key back in rotation now (a probe found Anthropic accepts it)."""
        i = self._index.get(alias)
        if i is None:
            return
        with self._lock:
            restored = self._state[i] == "quarantined"
            if restored:
                self._restore(i)
        if restored:
            self._emit("restored", alias)

    def is_quarantined(self, alias: str) -> bool:
        i = self._index.get(alias)
        return i is not None and self._state[i] == "quarantined" and self._until[i] > self._clock()

    def report_success(self, alias: str) -> None:
        """A call on ``alias`` succeeded. Nothing to do: keys return on their own clock, not on a success."""

    def snapshot(self) -> dict[str, object]:
        """Pool health for /actuator/health: counts and per-alias state, never a key value."""
        now = self._clock()
        with self._lock:
            states = list(zip(self._keys, self._state, self._until, strict=True))
        entries: list[dict[str, object]] = []
        for key, state, until in states:
            back_in = until - now
            if state != "available" and back_in <= 0:
                state = "available"  # due back; the next acquire puts it back in rotation
            entries.append(
                {
                    "alias": key.alias,
                    "state": state,
                    "availableInSeconds": round(back_in, 3) if state != "available" else 0.0,
                }
            )
        available = sum(1 for entry in entries if entry["state"] == "available")
        return {"count": len(self._keys), "available": available, "keys": entries}

    # ------------------------------------------------------------------------------------------ internals

    def _select(self, start: int, exclude: frozenset[str]) -> tuple[Key | None, list[str], float]:
        """Under the lock: (key or None, aliases put back in rotation, seconds until the soonest return)."""
        now = self._clock()
        count = len(self._keys)
        restored: list[str] = []
        soonest = math.inf
        for step in range(count):
            i = start + step
            if i >= count:
                i -= count
            key = self._keys[i]
            if self._state[i] != "available":
                if self._until[i] > now:
                    if key.alias not in exclude:
                        soonest = min(soonest, self._until[i] - now)
                    continue
                self._restore(i)
                restored.append(key.alias)
            if key.alias not in exclude:
                return key, restored, 0.0
        # Every key outside ``exclude`` is out; if every key is excluded, only a retry elsewhere can help now.
        return None, restored, 0.0 if soonest == math.inf else soonest

    def _select_affine(self, affinity: str, exclude: frozenset[str]) -> tuple[Key | None, list[str], float]:
        """Under the lock: the session's organisation by rendezvous hashing, then that organisation's next key."""
        now = self._clock() if self._out else 0.0
        restored: list[str] = []
        soonest = math.inf
        best: tuple[int, str, list[int]] | None = None
        for org, indices in self._orgs:
            usable: list[int] = []
            for i in indices:
                alias = self._keys[i].alias
                if self._state[i] != "available":
                    if self._until[i] > now:
                        if alias not in exclude:
                            soonest = min(soonest, self._until[i] - now)
                        continue
                    self._restore(i)
                    restored.append(alias)
                if alias not in exclude:
                    usable.append(i)
            if usable:
                score = _rendezvous(org, affinity)
                if best is None or score > best[0]:
                    best = (score, org, usable)
        if best is None:
            return None, restored, 0.0 if soonest == math.inf else soonest
        _, org, usable = best
        turn = self._org_turn[org]
        self._org_turn[org] = turn + 1
        return self._keys[usable[turn % len(usable)]], restored, 0.0

    def _all_out_rejected(self, exclude: frozenset[str]) -> bool:
        """Whether no key outside ``exclude`` is cooling (so waiting for a rate limit would not help)."""
        with self._lock:
            return all(
                state != "cooling"
                for key, state in zip(self._keys, self._state, strict=True)
                if key.alias not in exclude
            )

    def _restore(self, i: int) -> None:
        alias, state = self._keys[i].alias, self._state[i]
        logger.info("Anthropic key %r is back in rotation after being %s", alias, state)
        self._state[i] = "available"
        self._until[i] = 0.0
        self._out -= 1

    def _take_out(self, alias: str, seconds: float, state: KeyState) -> bool:
        i = self._index.get(alias)
        if i is None:
            logger.warning("health report for unknown Anthropic key alias %r ignored", alias)
            return False
        until = self._clock() + seconds
        with self._lock:
            if self._state[i] == "available":
                self._out += 1
                self._state[i], self._until[i] = state, until
            elif until > self._until[i]:
                self._state[i], self._until[i] = state, until
            elif state == "quarantined":
                self._state[i] = state  # a rejected key is reported as such, for the longer of the two rests
        return True

    def _emit(self, kind: KeyEvent, alias: str) -> None:
        if self._on_event is not None:
            self._on_event(kind, alias)

    def replace_keys(self, keys: Sequence[ApiKey]) -> tuple[list[str], list[str], list[str]]:
        """Swap the pool's keys for ``keys`` (a reload of mounted key files); returns (added, removed, rotated).

        A removed key is never handed out again; a key whose value changed comes back into rotation (its rest
        was about the old value); an unchanged key keeps its cooldown or quarantine. Calls in flight keep the
        ``Key`` they hold, so they finish on it. Call it on the thread that serves requests (Gate's event loop):
        ``acquire`` reads the pool's size before it takes the lock.
        """
        fresh = tuple(Key(key.alias, key.value.get_secret_value()) for key in keys)
        index = {key.alias: i for i, key in enumerate(fresh)}
        if len(index) != len(fresh):
            raise ValueError("key aliases must be unique")
        with self._lock:
            old = {key.alias: (key, self._state[i], self._until[i]) for i, key in enumerate(self._keys)}
            state: list[KeyState] = []
            until: list[float] = []
            added: list[str] = []
            rotated: list[str] = []
            for key in fresh:
                before = old.get(key.alias)
                if before is not None and before[0].value == key.value:
                    state.append(before[1])
                    until.append(before[2])
                    continue
                (added if before is None else rotated).append(key.alias)
                state.append("available")
                until.append(0.0)
            removed = [alias for alias in old if alias not in index]
            self._keys, self._index, self._state, self._until = fresh, index, state, until
            self._out = sum(1 for s in state if s != "available")
            self._group_organizations(keys)
            self._next = self._next % len(fresh) if fresh else 0
        return added, removed, rotated


def _rendezvous(organization: str, affinity: str) -> int:
    """The weight of ``organization`` for ``affinity``: stable across processes and restarts (not ``hash()``)."""
    digest = hashlib.blake2b(f"{organization}\0{affinity}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
