"""The durable outbox: usage events in a SQLite file (WAL) until their destination has confirmed them.

One process owns a file at a time (an exclusive ``flock`` on ``<file>.lock``). A second process pointed at
the same path takes the next free slot (``usage-outbox-1.sqlite3``, ...) rather than deliver the same rows
twice; a slot's leftovers are delivered by whichever process takes that slot next.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Outbox", "OutboxError", "PendingEvent"]

MAX_SLOTS = 16

_INSERT = "INSERT INTO usage_outbox (event_id, created, body) VALUES (?, ?, ?)"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_outbox (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    created REAL NOT NULL,
    body BLOB NOT NULL
)
"""


class OutboxError(Exception):
    """The outbox file cannot be opened or written."""


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """A committed, not yet confirmed event: ``body`` is the structured CloudEvent JSON."""

    seq: int
    event_id: str
    created: float  # unix time the event was published
    body: bytes


class Outbox:
    """A thread-safe table of pending events; ``depth`` and ``oldest_created`` are kept without queries."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path, self._lock_fd = _claim(Path(path))
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before we rely on it (power loss included); one fsync per commit-interval batch.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
            (count,) = self._db.execute("SELECT count(*) FROM usage_outbox").fetchone()
        except sqlite3.Error as exc:
            _release(self._lock_fd)
            raise OutboxError(f"cannot open the usage outbox {self.path}: {exc}") from None
        self._mutex = threading.Lock()
        self.depth: int = count
        self.oldest_created: float | None = self._query_oldest()
        self.commits = 0  # append transactions so far (the writer batches, so this grows slowly)
        self._closed = False

    def append(self, rows: Sequence[tuple[str, float, bytes]]) -> None:
        """Commit ``(event_id, created, body)`` rows in one transaction, or raise :class:`OutboxError`."""
        if not rows:
            return
        with self._mutex:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(_INSERT, rows)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot write the usage outbox {self.path}: {exc}") from None
            self.depth += len(rows)
            self.commits += 1
            if self.oldest_created is None:
                self.oldest_created = rows[0][1]

    def pending(self, limit: int) -> list[PendingEvent]:
        """The oldest ``limit`` committed events."""
        with self._mutex:
            try:
                rows = self._db.execute(
                    "SELECT seq, event_id, created, body FROM usage_outbox ORDER BY seq LIMIT ?", (limit,)
                ).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read the usage outbox {self.path}: {exc}") from None
        return [PendingEvent(seq, event_id, created, bytes(body)) for seq, event_id, created, body in rows]

    def remove(self, seqs: Sequence[int]) -> int:
        """Forget confirmed events; returns how many rows went."""
        if not seqs:
            return 0
        with self._mutex:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                before = self._db.total_changes
                self._db.executemany("DELETE FROM usage_outbox WHERE seq = ?", [(seq,) for seq in seqs])
                removed = self._db.total_changes - before
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot update the usage outbox {self.path}: {exc}") from None
            self.depth -= removed
            self.oldest_created = self._query_oldest()
            return removed

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._db.close()
            _release(self._lock_fd)

    def _query_oldest(self) -> float | None:
        row = self._db.execute("SELECT created FROM usage_outbox ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else float(row[0])

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")


def _slot_path(path: Path, slot: int) -> Path:
    return path if slot == 0 else path.with_name(f"{path.stem}-{slot}{path.suffix}")


if sys.platform == "win32":  # pragma: no cover - Gate runs on POSIX; no cross-process guard there

    def _claim(path: Path) -> tuple[Path, int]:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, -1

    def _release(fd: int) -> None:
        return None

else:
    import fcntl

    def _claim(path: Path) -> tuple[Path, int]:
        """The first slot of ``path`` that no other live process holds, with its lock held."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"cannot create the directory {path.parent}: {exc.strerror}") from None
        for slot in range(MAX_SLOTS):
            candidate = _slot_path(path, slot)
            try:
                fd = os.open(f"{candidate}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise OutboxError(f"cannot open the lock file {candidate}.lock: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return candidate, fd
        raise OutboxError(f"all {MAX_SLOTS} slots of the usage outbox {path} are held by other processes")

    def _release(fd: int) -> None:
        os.close(fd)  # closing the descriptor drops the flock
