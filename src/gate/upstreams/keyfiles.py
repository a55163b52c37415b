"""Anthropic keys from a directory of files (a mounted Kubernetes Secret), re-read while Gate runs.

Each regular file is one key: its name is the alias, its content the value (surrounding whitespace dropped;
an empty file is no key). Names starting with a dot are skipped: Kubernetes keeps its ``..data`` symlink and
timestamped directories there, and swaps ``..data`` atomically when the Secret changes, so a read sees either
the old set or the new one. The directory is polled every ``poll-interval`` (2 s) and on SIGHUP; polling rather
than inotify (watchfiles, watchdog) because the atomic swap replaces a symlink above the watched files, which
file watches miss, and because reading a few small files every two seconds costs nothing measurable.

A change swaps the pool's keys (``KeyPool.replace_keys``): a rotated key is used from the next request on, a
removed one never again, requests in flight finish on the key they hold. A directory that cannot be read keeps
the keys already loaded. Only aliases are logged, never values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from pydantic import SecretStr

from gate.settings import ApiKey, KeyFilesSettings
from gate.upstreams.keys import KeyPool

__all__ = ["KeyFiles", "read_key_dir"]

log = logging.getLogger("gate.keys")


def read_key_dir(directory: Path) -> list[ApiKey]:
    """The keys in ``directory``, sorted by alias; raises OSError when the directory cannot be listed."""
    keys: list[ApiKey] = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        value = entry.read_text(encoding="utf-8").strip()
        if value:
            keys.append(ApiKey(alias=entry.name, value=SecretStr(value)))
    return keys


class KeyFiles:
    """Keeps ``pool`` equal to the configured keys plus those in the key directory (the directory's win)."""

    def __init__(self, settings: KeyFilesSettings, pool: KeyPool, configured: Sequence[ApiKey]) -> None:
        if settings.dir is None:
            raise ValueError("anthropic.api.key-files.dir is not set")
        self.directory = Path(settings.dir)
        self._interval = settings.poll_interval
        self._pool = pool
        self._configured = list(configured)
        self._loaded: tuple[tuple[str, str], ...] | None = None
        self._failing = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def load(self) -> bool:
        """Read the directory now and swap the pool's keys if they changed; True when they did."""
        try:
            found = read_key_dir(self.directory)
        except OSError as exc:
            if not self._failing:
                log.warning("cannot read key directory %s (%s); keeping the keys loaded", self.directory, exc.strerror)
                self._failing = True
            return False
        if self._failing:
            log.info("key directory %s is readable again", self.directory)
            self._failing = False
        from_files = {key.alias for key in found}
        keys = [key for key in self._configured if key.alias not in from_files] + found
        fingerprint = tuple((key.alias, key.value.get_secret_value()) for key in keys)
        if fingerprint == self._loaded:
            return False
        first = self._loaded is None
        self._loaded = fingerprint
        added, removed, rotated = self._pool.replace_keys(keys)
        if first:
            log.info("%d Anthropic key(s) from %s: %s", len(found), self.directory, ", ".join(sorted(from_files)))
        elif added or removed or rotated:
            log.info(
                "Anthropic keys reloaded from %s: added %s, removed %s, rotated %s",
                self.directory,
                ", ".join(added) or "none",
                ", ".join(removed) or "none",
                ", ".join(rotated) or "none",
            )
        return True

    def reload_now(self) -> None:
        """Re-read at once (the SIGHUP handler)."""
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="gate-key-files")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            self.load()
