"""The durable outbox: usage events in a SQLite file (WAL) until their destination has confirmed them.

One process owns a file at a time (an exclusive ``flock`` on ``<file>.lock``). Every process pointed at a path,
a single one or each of ``--workers N``, takes the first free slot of it (``usage-outbox.sqlite3``, then
``usage-outbox-1.sqlite3``, ...) rather than deliver the same rows twice. At start a process also adopts every
other file of the path's family that no live process holds (the other slots, and the ``<path>.N`` files that
workers used to write): it moves their rows into its own file and deletes them, so that a change in the number
of processes never strands an event.

An event its destination refuses for good (too large, invalid) is moved to the ``usage_dead_letter`` table of
the same file: kept with its reason, never deleted by Gate, never in the way of the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AdoptedFile", "Outbox", "OutboxError", "PendingEvent"]

log = logging.getLogger("gate.events")

MAX_SLOTS = 16

_INSERT = "INSERT INTO usage_outbox (event_id, created, body) VALUES "
# Rows per INSERT or DELETE statement. One statement is one sqlite3_step, and Python's sqlite3 gives the GIL
# away around every step: executemany's step per row meant a GIL handover per row, and with the request loop
# holding the GIL each handover waited up to a switch interval (5 ms), so under load the outbox threads fell
# seconds behind. 300 rows (900 parameters) stays under SQLite's oldest limit of 999 parameters a statement.
_ROWS_PER_STATEMENT = 300
# Rows per INSERT when ``append`` is given a ``pause``: small enough that the caller can let the request loop's
# thread onto the core between statements (see ``UsageEvents._commit``).
_PACED_ROWS = 16
_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS usage_outbox (
        seq INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL,
        created REAL NOT NULL,
        body BLOB NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS usage_dead_letter (
        seq INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL,
        created REAL NOT NULL,
        body BLOB NOT NULL,
        set_aside REAL NOT NULL,
        sink TEXT NOT NULL,
        reason TEXT NOT NULL
    )
    """,
)
_SET_ASIDE = """
INSERT INTO usage_dead_letter (event_id, created, body, set_aside, sink, reason)
SELECT event_id, created, body, ?, ?, ? FROM usage_outbox WHERE seq = ?
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


@dataclass(frozen=True, slots=True)
class AdoptedFile:
    """An outbox file left by a process that is gone, whose rows this outbox took over."""

    path: Path
    pending: int
    dead_letters: int


class Outbox:
    """A thread-safe table of pending events; ``depth``, ``oldest_created`` and ``dead_letters`` are kept
    without queries."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.family = Path(path)  # the configured path: every slot and worker file derives from it
        self.path, self._lock_fd = _claim(self.family)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before we rely on it (power loss included); one fsync per commit-interval batch.
            self._db.execute("PRAGMA synchronous=FULL")
            for statement in _SCHEMA:
                self._db.execute(statement)
            (count,) = self._db.execute("SELECT count(*) FROM usage_outbox").fetchone()
            (dead,) = self._db.execute("SELECT count(*) FROM usage_dead_letter").fetchone()
        except sqlite3.Error as exc:
            _release(self._lock_fd)
            raise OutboxError(f"cannot open the usage outbox {self.path}: {exc}") from None
        self._mutex = threading.Lock()
        self.depth: int = count
        self.dead_letters: int = dead
        self.oldest_created: float | None = self._query_oldest()
        self.commits = 0  # append transactions so far (the writer batches, so this grows slowly)
        self._closed = False

    def append(self, rows: Sequence[tuple[str, float, bytes]], pause: Callable[[], None] | None = None) -> None:
        """Commit ``(event_id, created, body)`` rows in one transaction, or raise :class:`OutboxError`.

        With ``pause``, rows go in statements of ``_PACED_ROWS`` and ``pause()`` is called between them, inside
        the transaction (nothing is visible to readers until the commit)."""
        if not rows:
            return
        step = _ROWS_PER_STATEMENT if pause is None else _PACED_ROWS
        with self._mutex:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for start in range(0, len(rows), step):
                    if start and pause is not None:
                        pause()
                    chunk = rows[start : start + step]
                    values = ", ".join(("(?, ?, ?)",) * len(chunk))
                    self._db.execute(_INSERT + values, [value for row in chunk for value in row])
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot write the usage outbox {self.path}: {exc}") from None
            self.depth += len(rows)
            self.commits += 1
            if self.oldest_created is None:
                self.oldest_created = rows[0][1]

    def pending(self, limit: int, exclude: Collection[int] = ()) -> list[PendingEvent]:
        """The oldest ``limit`` committed events, leaving out the ``seq`` numbers in ``exclude``."""
        query = "SELECT seq, event_id, created, body FROM usage_outbox"
        if exclude:
            query += f" WHERE seq NOT IN ({','.join('?' * len(exclude))})"
        with self._mutex:
            try:
                rows = self._db.execute(f"{query} ORDER BY seq LIMIT ?", (*exclude, limit)).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read the usage outbox {self.path}: {exc}") from None
        return [PendingEvent(seq, event_id, created, bytes(body)) for seq, event_id, created, body in rows]

    def fetch(self, seqs: Collection[int]) -> list[PendingEvent]:
        """The pending events among ``seqs`` (those still in the table), oldest first."""
        if not seqs:
            return []
        marks = ",".join("?" * len(seqs))  # placeholders only: the values are bound
        query = f"SELECT seq, event_id, created, body FROM usage_outbox WHERE seq IN ({marks})"  # noqa: S608
        with self._mutex:
            try:
                rows = self._db.execute(f"{query} ORDER BY seq", tuple(seqs)).fetchall()
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
                for start in range(0, len(seqs), _ROWS_PER_STATEMENT):
                    chunk = seqs[start : start + _ROWS_PER_STATEMENT]
                    marks = ", ".join("?" * len(chunk))
                    self._db.execute(f"DELETE FROM usage_outbox WHERE seq IN ({marks})", tuple(chunk))  # noqa: S608
                removed = self._db.total_changes - before
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot update the usage outbox {self.path}: {exc}") from None
            self.depth -= removed
            self.oldest_created = self._query_oldest()
            return removed

    def set_aside(self, seq: int, sink: str, reason: str) -> bool:
        """Move one pending event to the dead-letter table, with who refused it and why; False if it is gone."""
        with self._mutex:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                moved = self._db.execute(_SET_ASIDE, (time.time(), sink, reason, seq)).rowcount
                self._db.execute("DELETE FROM usage_outbox WHERE seq = ?", (seq,))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot update the usage outbox {self.path}: {exc}") from None
            if moved:
                self.depth -= 1
                self.dead_letters += 1
                self.oldest_created = self._query_oldest()
            return bool(moved)

    def adopt_orphans(self) -> list[AdoptedFile]:
        """Take over the rows of every family file that no live process holds, then delete that file.

        The rows are copied in one transaction of this file before the orphan is deleted: a crash in between
        delivers them twice (with the same ids), never loses them. A file that cannot be read is left alone.
        """
        adopted: list[AdoptedFile] = []
        for candidate in _family(self.family):
            if candidate == self.path:
                continue
            lock_fd = _try_lock(candidate)
            if lock_fd is None:  # a live process owns it
                continue
            try:
                if not candidate.exists():  # another process adopted it between the listing and the lock
                    continue
                taken = self._take_over(candidate)
            except (sqlite3.Error, OSError) as exc:
                log.error("cannot adopt the usage outbox %s (left as it is): %s", candidate, exc)
                continue
            finally:
                _release(lock_fd)
            if taken is not None:
                adopted.append(taken)
        return adopted

    def _take_over(self, orphan: Path) -> AdoptedFile | None:
        with self._mutex:
            self._db.execute("ATTACH DATABASE ? AS orphan", (str(orphan),))
            try:
                tables = {
                    name for (name,) in self._db.execute("SELECT name FROM orphan.sqlite_master WHERE type = 'table'")
                }
                if "usage_outbox" not in tables:
                    log.error("%s is not a usage outbox (no usage_outbox table): left as it is", orphan)
                    return None
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    before = self._db.total_changes
                    self._db.execute(
                        "INSERT INTO main.usage_outbox (event_id, created, body) "
                        "SELECT event_id, created, body FROM orphan.usage_outbox ORDER BY seq"
                    )
                    pending = self._db.total_changes - before
                    dead = 0
                    if "usage_dead_letter" in tables:
                        before = self._db.total_changes
                        self._db.execute(
                            "INSERT INTO main.usage_dead_letter (event_id, created, body, set_aside, sink, reason) "
                            "SELECT event_id, created, body, set_aside, sink, reason "
                            "FROM orphan.usage_dead_letter ORDER BY seq"
                        )
                        dead = self._db.total_changes - before
                    self._db.execute("COMMIT")
                except sqlite3.Error:
                    self._rollback()
                    raise
            finally:
                self._db.execute("DETACH DATABASE orphan")
            self.depth += pending
            self.dead_letters += dead
            self.oldest_created = self._query_oldest()
        for suffix in ("", "-wal", "-shm", "-journal"):  # the lock file stays: another process may hold it open
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{orphan}{suffix}")
        return AdoptedFile(orphan, pending, dead)

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


def _family(path: Path) -> list[Path]:
    """Every outbox file of ``path`` in its directory: its slots (``stem-K.suffix``) and the ``path.N`` files
    that ``--workers N`` wrote before workers took slots (and their slots, ``path-K.N``)."""
    name, stem, suffix = re.escape(path.name), re.escape(path.stem), re.escape(path.suffix)
    pattern = re.compile(rf"{stem}-\d+{suffix}|{name}(?:-\d+)?(?:\.\d+)?")
    try:
        names = sorted(entry.name for entry in os.scandir(path.parent) if entry.is_file())
    except OSError:
        return []
    return [path.with_name(found) for found in names if pattern.fullmatch(found)]


if sys.platform == "win32":  # pragma: no cover - Gate runs on POSIX; no cross-process guard there

    def _claim(path: Path) -> tuple[Path, int]:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, -1

    def _try_lock(path: Path) -> int | None:
        return None

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
                fd = _try_lock(candidate)
            except OSError as exc:
                raise OutboxError(f"cannot open the lock file {candidate}.lock: {exc.strerror}") from None
            if fd is not None:
                return candidate, fd
        raise OutboxError(f"all {MAX_SLOTS} slots of the usage outbox {path} are held by other processes")

    def _try_lock(path: Path) -> int | None:
        """The descriptor of ``<path>.lock`` with its exclusive lock held, or None when a live process holds it."""
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _release(fd: int) -> None:
        os.close(fd)  # closing the descriptor drops the flock
