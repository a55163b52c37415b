"""Usage events to a JSON Lines file: one structured CloudEvent per line, fsynced per batch."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from gate.events.outbox import PendingEvent
from gate.events.sink import SendResult, SinkUnavailable, describe_error
from gate.settings import UsageSettings

__all__ = ["FileSink"]

_T = TypeVar("_T")


class FileSink:
    """Appends to ``usage.file.path`` (parent directories created); a batch counts once it is on disk.

    All file work runs on one thread of its own, so a close can never race a write that is still running.
    """

    name = "file"

    def __init__(self, settings: UsageSettings) -> None:
        self.path = Path(settings.file.path)
        self._fd: int | None = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate-usage-file")

    @property
    def connected(self) -> bool:
        return self._fd is not None

    async def connect(self) -> None:
        try:
            await self._run(self._open)
        except OSError as exc:
            raise SinkUnavailable(f"file {self.path}: {describe_error(exc)}") from None

    async def send(self, events: Sequence[PendingEvent]) -> SendResult:
        lines = b"".join(event.body + b"\n" for event in events)
        try:
            await self.connect()
            await self._run(lambda: self._write(lines))
        except SinkUnavailable as exc:
            return SendResult(error=str(exc))
        except OSError as exc:
            await self._run(self._close_file)  # reopen next time: the file may have been moved or replaced
            return SendResult(error=f"file {self.path}: {describe_error(exc)}")
        return SendResult(delivered=[event.seq for event in events])

    async def close(self) -> None:
        await self._run(self._close_file)
        self._io.shutdown(wait=False)

    async def _run(self, work: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._io, work)

    def _open(self) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def _write(self, lines: bytes) -> None:
        fd = self._fd
        assert fd is not None
        view = memoryview(lines)
        while view:  # O_APPEND keeps every write at the end; loop over short writes
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)

    def _close_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
