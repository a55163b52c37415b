"""The delivery process: usage events built, committed and delivered by a process of their own, off the request core.

``DeliveryProcess`` is what the app and the relay see when ``usage.delivery`` is ``process``: the same face as
``UsageEvents`` (``publish``, ``start``, ``close``, the numbers and ``health``). Behind it a child process
(``gate.events.delivery.main``, one per Gate process, so one per worker) runs a ``UsageEvents`` of its own: the
writer thread that builds CloudEvents and commits them to the outbox, and the delivery task that sends them to the
broker and waits for its confirms. The request process keeps only what a request must: an append per record and,
every ``_FLUSH_DELAY`` (5 ms) while records come, one write of them to the child.

Why a process, and why it is not the default: delivery costs CPU per event (``benchmarks/micro/delivery_cost.py``:
about 60 us with Gate's own AMQP client, ``events/amqp.py``, and 130-180 us with aiormq before it), and on the
request loop that time is taken between requests. A thread would not help (measured worse than the loop: the GIL
hands the core over only every switch interval); a process has its own interpreter and, on a core of its own,
runs beside the requests. On the core the requests use, two Python processes cost more than one doing the same
work (the handover, and the cache each switch evicts): ``make bench``'s ``gate-process`` puts numbers on it. So
``loop`` is the default, and ``process`` is for hosts that give each Gate process a core to spare.

Nothing is lost on the way, and nothing is counted twice:

- The parent keeps every record until the child says it is committed (``written`` in the child's status, which
  counts records in the order they were sent). If the child dies, a new one is started and is sent every record
  not yet acknowledged: a record committed just before the death is committed again with the same event id (the
  at-least-once delivery every sink already has), none is dropped.
- ``usage.outbox.max-events`` is enforced in the parent, against records in its hands plus the child's outbox.
- SIGTERM: ``close`` sends the rest and asks the child to flush within ``flush-timeout`` (commit, deliver, keep the
  rest in the outbox), then waits for it to exit.
- SIGKILL of the request process: the child reads to the end of the socket, commits what it received and exits
  at once, so the outbox slot is free for the next start, which delivers the rows. A SIGKILL of both (a pod
  killed) loses what the child had not committed and the parent had not yet written: the commit interval, plus
  ``_FLUSH_DELAY``.
- The child ignores SIGINT and SIGTERM (a terminal's Ctrl-C reaches the whole process group): its parent alone
  decides when it stops.

The wire between them is a Unix socket pair: frames of a 4-byte length and a pickle. Both ends are this package
in processes of the same user (the child is started with the parent's interpreter and gets the socket as an
inherited descriptor), so pickle carries nothing from outside; a frame over ``_MAX_FRAME`` still ends the link.
No library fits: multiprocessing's connections are blocking, and a queue library would be a second broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import operator
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from typing import Any, NoReturn

from gate.accounting.prices import PriceTable
from gate.accounting.usage import UsageRecord
from gate.events.envelope import new_event_ids
from gate.events.outbox import OutboxError
from gate.events.publisher import Refusals, UsageEvents, usage_health
from gate.ops.backoff import Backoff
from gate.settings import UsageSettings

__all__ = ["DeliveryProcess", "Events", "main", "open_events"]

log = logging.getLogger("gate.events")

_HEADER = struct.Struct("!I")
_MAX_FRAME = 256 * 1024 * 1024  # a batch of records is far smaller; anything larger is a broken link
# Records go to the child this long after the first of them: one write (and one wake-up of the child) for every
# record of that time, not one per request. It adds to what a SIGKILL of the whole pod can lose.
_FLUSH_DELAY = 0.005
_STATUS_EVERY = 0.05  # the child reports its numbers (and what it committed) at most this often
_START_TIMEOUT = 60.0  # the child opens the outbox (and adopts orphans) before it says ready


# A record crosses as the tuple of its fields (in C, and pickled as plain values): a slotted dataclass pickles
# through Python-level __getstate__/__setstate__, about ten times slower.
_values = operator.attrgetter(*(field.name for field in dataclasses.fields(UsageRecord)))


def _frame(message: object) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


class _Frames(asyncio.Protocol):
    """Both ends' reader: whole frames to ``on_message``, the end of the link to ``on_close``."""

    def __init__(self, on_message: Any, on_close: Any) -> None:
        self._on_message = on_message
        self._on_close = on_close
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, start)
            if size > _MAX_FRAME:
                log.error("the usage delivery link sent a frame of %d bytes: closing it", size)
                assert self.transport is not None
                self.transport.abort()
                return
            end = start + _HEADER.size + size
            if len(buffer) < end:
                break
            message = pickle.loads(buffer[start + _HEADER.size : end])  # noqa: S301 - our own child or parent
            start = end
            self._on_message(message)
        if start:
            del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_close()


# --------------------------------------------------------------------------------------------- parent side


class DeliveryProcess:
    """``UsageEvents``'s face in the request process, with the work in a child process (see the module doc)."""

    def __init__(
        self,
        settings: UsageSettings,
        *,
        prices: PriceTable | None = None,
        logging: tuple[str, str] = ("json", "INFO"),
    ) -> None:
        self._settings = settings
        self._prices = prices
        self._logging = logging  # the child logs as the parent does: format and level
        self._enabled = settings.publisher != "none"
        self._max_events = settings.outbox.max_events
        self._accepting = self._enabled
        self._started = False
        self._closed = False
        # Every record not yet committed by the child, oldest first: the first ``_sent`` went to the current child.
        self._unacked: deque[tuple[UsageRecord, float]] = deque()
        self._sent = 0
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._transport: asyncio.Transport | None = None
        self._written = 0  # the current child's ``written`` so far
        self._status: dict[str, Any] = {}
        self._base: dict[str, int] = {}  # counts of the children before this one
        self._ready: asyncio.Future[None] | None = None
        self._closed_reply: asyncio.Future[dict[str, Any]] | None = None
        self._gone: asyncio.Event = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._child_error: str | None = None
        self._refusals = Refusals()

    # --------------------------------------------------------------------------------------------- numbers

    @property
    def depth(self) -> int:
        return len(self._unacked) + int(self._status.get("outbox_depth", 0))

    @property
    def oldest_age_seconds(self) -> float | None:
        oldest = self._status.get("oldest_created")
        if oldest is None and self._unacked:
            oldest = self._unacked[0][1]
        return None if oldest is None else max(time.time() - oldest, 0.0)

    @property
    def published_total(self) -> int:
        return self._total("published")

    @property
    def publish_failures_total(self) -> int:
        return self._total("failures")

    @property
    def dropped_total(self) -> int:
        return self._refusals.count + self._total("dropped")

    def _total(self, key: str) -> int:
        """A count kept by the children: the ones before this one (``_base``) and this one's."""
        return self._base.get(key, 0) + int(self._status.get(key, 0))

    @property
    def dead_letters(self) -> int:
        return int(self._status.get("dead_letters", 0))

    @property
    def outbox_commits_total(self) -> int:
        return self._total("commits")

    @property
    def last_delivery_lag_seconds(self) -> float | None:
        lag = self._status.get("lag")
        return None if lag is None else float(lag)

    def health(self) -> dict[str, object]:
        status = self._status
        return usage_health(
            self._settings,
            self,
            connected=bool(status.get("connected")) and self._child_error is None,
            last_dead_letter=status.get("last_dead_letter"),
            error=self._child_error or status.get("writer_error") or status.get("last_error"),
            failing=self._child_error is not None or status.get("writer_error") is not None,
            deliveryProcess=None if self._child is None else self._child.pid,
        )

    # --------------------------------------------------------------------------------------- the relay's side

    def publish(self, record: UsageRecord) -> None:
        """Accept one record: O(1), never blocks, never raises; refused (and counted) when full or closed."""
        if self._accepting:
            if self.depth < self._max_events:
                self._unacked.append((record, time.time()))
                if not self._flush_scheduled and self._loop is not None:  # before start: the child's first batch
                    self._flush_scheduled = True
                    self._loop.call_later(_FLUSH_DELAY, self._flush)
                return
            self._refusals.refuse(f"the outbox holds usage.outbox.max-events={self._max_events} undelivered events")
        elif self._enabled:
            self._refusals.refuse("usage events are closed")

    def _flush(self) -> None:
        """Send the child what it has not had yet: one write for every record of the last few milliseconds."""
        self._flush_scheduled = False
        transport = self._transport
        if transport is None or transport.is_closing() or self._ready is None or not self._ready.done():
            return  # kept: the next child gets them
        unacked = self._unacked
        if self._sent >= len(unacked):
            return
        fresh = list(itertools.islice(unacked, self._sent, None))
        unnamed = [record for record, _ in fresh if not record.event_id]
        # The id is made here, once, not by the child's writer: a record handed again to a new child keeps it,
        # so a record committed twice (its child died before saying so) is one event delivered twice, never two.
        for record, event_id in zip(unnamed, new_event_ids(len(unnamed)), strict=True):
            record.event_id = event_id
        batch = [(_values(record), at) for record, at in fresh]
        self._sent = len(unacked)
        transport.write(_frame(("records", batch)))

    # ---------------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the child and wait until its outbox is open; raises OutboxError when it cannot be."""
        if not self._enabled or self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        try:
            await self._spawn()
        except OutboxError:
            await self._reap()
            raise
        self._keeper = asyncio.create_task(self._keep_running(), name="gate-usage-process")

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            command = [sys.executable, "-c", "from gate.events.delivery import main; main()", str(theirs.fileno())]
            self._child = await loop.run_in_executor(
                None,
                lambda: subprocess.Popen(command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL),  # noqa: S603 - our interpreter, our module
            )
        except OSError as exc:
            ours.close()
            raise OutboxError(f"cannot start the usage delivery process: {exc}") from None
        finally:
            theirs.close()
        self._written = 0
        self._sent = 0
        self._gone.clear()
        self._ready = loop.create_future()
        transport, _ = await loop.create_unix_connection(lambda: _Frames(self._on_message, self._on_close), sock=ours)
        self._transport = transport
        transport.write(_frame(("init", self._settings, self._prices, self._logging)))
        try:
            async with asyncio.timeout(_START_TIMEOUT):
                await asyncio.shield(self._ready)
        except TimeoutError:
            transport.abort()
            raise OutboxError(f"the usage delivery process did not start within {_START_TIMEOUT:.0f}s") from None
        self._flush()  # whatever waited for this child

    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "status":
            self._take_status(message[1])
        elif kind == "ready":
            pid = self._child.pid if self._child is not None else -1
            again = " again" if self._child_error is not None else ""
            log.info("usage events are delivered%s by process %d, from the outbox %s", again, pid, message[1])
            self._child_error = None
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif kind == "failed":
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(OutboxError(message[1]))
        elif kind == "closed":
            self._take_status(message[1])
            if self._closed_reply is not None and not self._closed_reply.done():
                self._closed_reply.set_result(message[1])

    def _take_status(self, status: dict[str, Any]) -> None:
        written = int(status["written"])
        done = written - self._written
        self._written = written
        unacked = self._unacked
        for _ in range(min(done, len(unacked))):
            unacked.popleft()
        self._sent = max(self._sent - done, 0)
        self._status = status

    def _on_close(self) -> None:
        self._transport = None
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(OutboxError("the usage delivery process exited before it was ready"))
        self._gone.set()

    async def _keep_running(self) -> None:
        """Restart a child that dies while Gate runs; every record it had not committed goes to the next one."""
        backoff = Backoff(self._settings.outbox.retry_initial, self._settings.outbox.retry_max)
        while True:
            await self._gone.wait()
            code = await self._reap()
            if self._closed:
                return
            status = self._status
            for key in ("published", "failures", "dropped", "commits"):
                self._base[key] = self._total(key)
            # The outbox (and its dead letters) stays on disk for the next child, which reports it afresh.
            self._status = {key: status.get(key, 0) for key in ("outbox_depth", "dead_letters")}
            self._child_error = f"the usage delivery process exited with code {code}; restarting it"
            log.error("%s (%d usage events not yet committed are kept for it)", self._child_error, len(self._unacked))
            while not self._closed:
                await asyncio.sleep(backoff.next())
                if self._closed:
                    return
                try:
                    await self._spawn()
                except OutboxError as exc:
                    self._child_error = f"the usage delivery process cannot start: {exc}"
                    log.error("%s", self._child_error)
                    await self._reap()
                else:
                    backoff.reset()
                    break

    async def _reap(self) -> int | None:
        child = self._child
        if child is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, lambda: child.wait(timeout=40))
        except subprocess.TimeoutExpired:
            child.kill()
            return await loop.run_in_executor(None, child.wait)

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 - the app's shutdown budget, not a cancel
        """Send the rest, let the child commit and deliver within ``timeout``, then wait for it to exit."""
        if not self._enabled or self._closed:
            return
        self._closed = True
        self._accepting = False
        if not self._started:
            if self._unacked:
                log.error("%d usage events lost: closed before start", len(self._unacked))
            return
        self._closed_reply = asyncio.get_running_loop().create_future()
        self._flush()
        transport = self._transport
        reply: dict[str, Any] | None = None
        if transport is not None and not transport.is_closing():
            transport.write(_frame(("close", max(timeout, 0.0))))
            # The child's own close commits first (SQLite gives up on a lock after 30 s), then delivers for
            # ``timeout``: wait for both, and a little more for its exit.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(max(timeout, 0.0) + 40.0):
                    reply = await asyncio.shield(self._closed_reply)
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.wait({self._keeper})
        if self._transport is not None:
            self._transport.close()
        await self._reap()
        if reply is None and self._unacked:
            log.error(
                "%d usage events lost: the usage delivery process ended before it committed them (%s)",
                len(self._unacked),
                self._child_error or "no reply to close",
            )


Events = UsageEvents | DeliveryProcess  # what the app holds and the relay publishes to


def open_events(settings: UsageSettings, *, prices: PriceTable | None, logging: tuple[str, str]) -> Events:
    """The usage events of one Gate process, as ``usage.delivery`` says: in a child process, or in this one."""
    if settings.delivery == "process" and settings.publisher != "none":
        return DeliveryProcess(settings, prices=prices, logging=logging)
    return UsageEvents(settings, prices=prices)


# ---------------------------------------------------------------------------------------------- child side


def main(argv: list[str] | None = None) -> NoReturn:
    """The child (``python -c "from gate.events.delivery import main; main()" FD``), talking to its parent over the
    socket ``FD``; exits with its code."""
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(AttributeError, ValueError):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sock = socket.socket(fileno=int(args[0]))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency everywhere but Windows
        sys.exit(asyncio.run(_child(sock)))
    sys.exit(uvloop.run(_child(sock)))


async def _child(sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()
    transport, _ = await loop.create_unix_connection(
        lambda: _Frames(inbox.put_nowait, lambda: inbox.put_nowait(None)), sock=sock
    )
    try:
        async with asyncio.timeout(_START_TIMEOUT):
            first = await inbox.get()
    except TimeoutError:
        first = None
    if first is None or first[0] != "init":
        return 2  # not started by a DeliveryProcess, or it went away
    _, settings, prices, (log_format, log_level) = first
    from gate.ops.logs import configure_logging

    configure_logging(log_format, log_level)
    events = UsageEvents(settings, prices=prices)

    def send(message: tuple[Any, ...]) -> None:
        if not transport.is_closing():  # else the parent is gone: what it would have read no longer matters
            transport.write(_frame(message))

    try:
        await events.start()
    except OutboxError as exc:
        send(("failed", str(exc)))
        await _drain_and_close(transport)
        return 1
    send(("ready", events.report()["path"]))
    reporter = asyncio.create_task(_report(events, send))
    close_budget = 0.0  # the parent went away without a word: commit what came, leave delivery to the next start
    while True:
        message = await inbox.get()
        if message is None:
            break
        if message[0] == "records":
            for values, at in message[1]:
                events.accept(UsageRecord(*values), at)
        elif message[0] == "close":
            close_budget = float(message[1])
            break
    reporter.cancel()
    await events.close(close_budget)
    send(("closed", events.report()))
    await _drain_and_close(transport)
    return 0


async def _report(events: UsageEvents, send: Any) -> None:
    last: dict[str, object] | None = None
    while True:
        status = events.report()
        if status != last:
            send(("status", status))
            last = status
        await asyncio.sleep(_STATUS_EVERY)


async def _drain_and_close(transport: asyncio.Transport) -> None:
    transport.close()  # a Unix socket's close flushes what is buffered first
    for _ in range(100):
        if transport.get_write_buffer_size() == 0:
            return
        await asyncio.sleep(0.01)
