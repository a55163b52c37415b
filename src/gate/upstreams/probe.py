"""Background probes of quarantined keys: is a key Anthropic rejected (401) accepted again?

A 401 quarantines a key at once (no user request should meet it again), but one request's answer is weak
evidence: an intermediary may have answered, or the key was rotated back in. So the prober asks Anthropic about
the key itself with the cheapest authenticated call there is, ``GET /v1/models?limit=1`` (no tokens, no usage
event): right away, then after ``probe-interval`` (30 s), doubling up to ``quarantine`` (1 h). A 200 puts the key
back in rotation; a 401 or 403 keeps it out; anything else (5xx, 429, no connection) says nothing about the key
and is tried again after ``probe-interval``. Probing stops once the key is back, by the prober or by the end of its
quarantine, and at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gate.http.client import ClientError
from gate.settings import KeyHealthSettings
from gate.upstreams.anthropic import Upstream, request_headers
from gate.upstreams.keys import Key, KeyPool

__all__ = ["KeyProber"]

log = logging.getLogger("gate.keys")

_PROBE_PATH = "/v1/models?limit=1"


class KeyProber:
    """Probes each quarantined key on its own schedule; ``watch`` is the pool's ``on_quarantine`` hook."""

    def __init__(
        self,
        pool: KeyPool,
        upstream: Upstream,
        settings: KeyHealthSettings,
        *,
        default_version: str,
        timeout: float,
    ) -> None:
        self._pool = pool
        self._upstream = upstream
        self._first_interval = settings.probe_interval
        self._max_interval = max(settings.quarantine, settings.probe_interval)
        self._version = default_version
        self._timeout = timeout
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def watch(self, key: Key) -> None:
        """Start probing ``key`` unless it is probed already (called from the event loop)."""
        task = self._tasks.get(key.alias)
        if task is not None and not task.done():
            return
        self._tasks[key.alias] = asyncio.get_running_loop().create_task(
            self._probe_until_back(key), name=f"gate-key-probe-{key.alias}"
        )

    async def close(self) -> None:
        tasks = [task for task in self._tasks.values() if not task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _probe_until_back(self, key: Key) -> None:
        delay = 0.0
        interval = self._first_interval
        while self._pool.is_quarantined(key.alias):
            if delay:
                await asyncio.sleep(delay)
                if not self._pool.is_quarantined(key.alias):
                    return
            status = await self._probe(key)
            if status is not None and 200 <= status < 300:
                log.warning("Anthropic accepts key %r again (probe answered %d): back in rotation", key.alias, status)
                self._pool.restore(key.alias)
                return
            if status in (401, 403):
                delay, interval = interval, min(interval * 2, self._max_interval)
                log.info("key %r still rejected by Anthropic (%d); next probe in %.0f s", key.alias, status, delay)
            else:
                delay = self._first_interval  # says nothing about the key: ask again later

    async def _probe(self, key: Key) -> int | None:
        headers = request_headers({}, api_key=key.value, default_version=self._version, accept_encoding=None)
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._upstream.request("GET", _PROBE_PATH, headers, None)
                try:
                    await response.read()
                finally:
                    response.release()
        except (ClientError, TimeoutError) as exc:
            log.info("probe of key %r got no answer (%s)", key.alias, type(exc).__name__)
            return None
        return response.status
