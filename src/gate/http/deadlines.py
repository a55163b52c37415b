"""Many deadlines on one timer: a sweep every ``resolution`` seconds fires those past due.

Why not ``asyncio.timeout`` or ``loop.call_at`` per deadline: profiled at Gate's request rates, a timer per request
(scheduled, then cancelled, on every request and every stream chunk) was a visible cost (``benchmarks/ANALYSIS.md``),
while joining and leaving a set and storing a float are not. The price is resolution: a deadline fires between its
due time and one ``resolution`` later (plus whatever else holds the loop then), never before it.

One ``Deadlines`` serves one event loop (the first that uses it); its timer runs only while something is watched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

__all__ = ["Deadline", "Deadlines"]

log = logging.getLogger("gate.deadlines")


class Deadlines:
    """The sweep: ``watch(timeout, on_expiry)`` gives a :class:`Deadline` that fires once unless touched or stopped."""

    __slots__ = ("_handle", "_loop", "_watching", "resolution")

    def __init__(self, resolution: float) -> None:
        if resolution <= 0:
            raise ValueError("a sweep needs a positive resolution")
        self.resolution = resolution
        self._watching: set[Deadline] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, timeout: float, on_expiry: Callable[[], object] | None = None) -> Deadline:
        """A deadline ``timeout`` seconds from now; on expiry it calls ``on_expiry``, or without one cancels the
        task that called ``watch`` (see :meth:`Deadline.absorb_cancel`)."""
        loop = self._loop if self._loop is not None else self._bind()
        task = asyncio.current_task(loop) if on_expiry is None else None
        deadline = Deadline(self, loop, timeout, on_expiry, task)
        self._arm(deadline)
        return deadline

    def close(self) -> None:
        """Stops the sweep; deadlines still watched never fire."""
        self._watching.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def __len__(self) -> int:
        return len(self._watching)

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _arm(self, deadline: Deadline) -> None:
        self._watching.add(deadline)
        if self._handle is None:
            assert self._loop is not None
            self._handle = self._loop.call_later(self.resolution, self._sweep)

    def _disarm(self, deadline: Deadline) -> None:
        self._watching.discard(deadline)

    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        self._handle = None  # a callback below that arms a deadline may schedule the next sweep itself
        now = loop.time()
        for deadline in [d for d in self._watching if now >= d.due]:
            self._watching.discard(deadline)
            try:
                deadline.expire()
            except Exception:  # one owner's bug must not stop every other deadline
                log.exception("a deadline's expiry callback failed")
        if self._handle is None and self._watching:
            self._handle = loop.call_later(self.resolution, self._sweep)


class Deadline:
    """One watched deadline. ``touch`` (a float store) pushes it ``timeout`` out from now; ``restart`` re-arms it,
    ``stop`` forgets it. It fires at most once per arming."""

    __slots__ = ("_loop", "_on_expiry", "_owner", "_task", "due", "expired", "timeout")

    def __init__(
        self,
        owner: Deadlines,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        on_expiry: Callable[[], object] | None,
        task: asyncio.Task[object] | None,
    ) -> None:
        self._owner = owner
        self._loop = loop
        self._on_expiry = on_expiry
        self._task = task
        self.timeout = timeout
        self.due = loop.time() + timeout
        self.expired = False

    def touch(self, timeout: float | None = None) -> None:
        """Progress: the deadline is ``timeout`` (or the last one) seconds from now again. Unlike ``restart`` it
        never re-arms a deadline that already fired, so a cancel it sent is still owned by it."""
        if timeout is not None:
            self.timeout = timeout
        self.due = self._loop.time() + self.timeout

    def restart(self, timeout: float | None = None) -> None:
        """Arms it again, ``timeout`` (or the last one) seconds from now, whether it fired, was stopped or runs."""
        if timeout is not None:
            self.timeout = timeout
        self.due = self._loop.time() + self.timeout
        self.expired = False
        self._owner._arm(self)

    def stop(self) -> None:
        """Forget it; a deadline that cancels its task also lets go of the task, for good (a cancelled task keeps
        its ``CancelledError``, whose traceback holds the frames that hold this deadline: a reference cycle that
        would keep a whole stream alive until a full collection)."""
        self._owner._disarm(self)
        if self._on_expiry is None:
            self._task = None

    def expire(self) -> None:
        """Called by the sweep once the deadline is past."""
        self.expired = True
        if self._on_expiry is not None:
            self._on_expiry()
        elif self._task is not None:
            self._task.cancel()

    def absorb_cancel(self) -> bool:
        """On a ``CancelledError`` in the watched task: True (and the task's cancel request withdrawn) when this
        deadline caused it, so that the task can answer a timeout instead of ending."""
        if not self.expired or self._task is None:
            return False
        self._task.uncancel()
        return True
