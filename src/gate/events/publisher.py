"""``UsageEvents``: takes usage records without blocking, keeps them durable, delivers them at least once.

``publish`` appends to an in-memory buffer. A writer thread turns the buffer into CloudEvents and commits them
to the outbox every ``usage.outbox.commit-interval`` (so a SIGKILL loses at most that much). A delivery task
sends committed events to the sink in batches and deletes them only once the broker has confirmed them,
retrying with exponential backoff and jitter for as long as the broker is away.

An event the sink refuses (``SendResult.refused``: too large, invalid) is held out of the batches and tried
alone; once the destination has confirmed another event since that refusal, so that the fault is the event's
and not the destination's (a malformed Pub/Sub topic is refused for every event), a refused event is set aside
in the outbox's dead-letter table, counted, shown in health and metrics, and never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from gate.accounting.prices import PriceTable
from gate.accounting.usage import UsageRecord
from gate.events.envelope import build_event, encode_event, new_event_ids
from gate.events.outbox import Outbox, OutboxError, PendingEvent
from gate.events.sink import SendResult, Sink, SinkUnavailable
from gate.ops.backoff import Backoff
from gate.settings import UsageSettings

if TYPE_CHECKING:
    from gate.events.delivery import DeliveryProcess

__all__ = ["Refusals", "UsageEvents", "make_sink", "usage_health"]

log = logging.getLogger("gate.events")

_T = TypeVar("_T")
_IDLE_CHECK = 1.0  # an idle delivery task looks for a lost connection or stray rows this often
_LOG_EVERY = 10.0  # repeated warnings about the same trouble are logged at most this often
# Refused events held out of the batches at once; more refusals than this (a destination refusing everything)
# wait in the outbox as in an outage.
_MAX_SUSPECTS = 64
_MAX_REASON = 1000  # characters of a refusal's reason kept with a dead letter
# The writer builds events (~10 us each) holding the GIL, and CPython makes a waiting thread wait up to a switch
# interval (5 ms) before it asks for the GIL: a batch of 50 events built at once held the request loop for
# ~0.5 ms. So the writer sleeps a little after every _BUILD_SLICE of building; the loop takes the GIL then.
# ``benchmarks/micro/delivery_stall.py`` at 2,000 events/s, pinned to one core: the loop's lateness p99 0.79 ms
# with it against 0.95 without (no delivery at all: 0.24-0.32). The outbox's INSERTs are paced the same way:
# SQLite runs them without the GIL but on the same core, and Linux (6.18 as measured) need not switch to a
# woken thread before the running one sleeps or its slice ends (``perf sched timehist`` at c=1: 91 of the
# writer's runs in 5 s lasted over 0.5 ms, the loop's thread waiting behind them; 2 with the paced inserts).
_BUILD_SLICE = 0.0001
_GIL_PAUSE = 0.00002


class _Slices:
    """Called often during a long piece of work: sleeps ``_GIL_PAUSE`` once every ``_BUILD_SLICE`` of it."""

    def __init__(self) -> None:
        self._ends = time.perf_counter() + _BUILD_SLICE

    def __call__(self) -> None:
        if time.perf_counter() >= self._ends:
            time.sleep(_GIL_PAUSE)  # a real sleep: sleep(0) takes the GIL straight back
            self._ends = time.perf_counter() + _BUILD_SLICE


def make_sink(settings: UsageSettings) -> Sink:
    """The sink named by ``usage.publisher`` (imported on demand: the Pub/Sub client is slow to import)."""
    if settings.publisher == "rabbitmq":
        from gate.events.rabbitmq import RabbitMQSink

        return RabbitMQSink(settings)
    if settings.publisher == "pubsub":
        from gate.events.pubsub import PubSubSink

        return PubSubSink(settings)
    if settings.publisher == "file":
        from gate.events.file import FileSink

        return FileSink(settings)
    if settings.publisher == "log":
        from gate.events.log import LogSink

        return LogSink()
    raise ValueError(f"usage.publisher {settings.publisher!r} has no sink")


def usage_health(
    settings: UsageSettings,
    events: UsageEvents | DeliveryProcess,
    *,
    connected: bool,
    last_dead_letter: str | None,
    error: str | None,
    failing: bool,
    **more: object,
) -> dict[str, object]:
    """The ``pubsub`` health component of either face: DOWN when the outbox nears ``max-events`` (the alarm) or
    when events cannot be committed (``failing``); ``more`` adds details of its own."""
    depth = events.depth
    alarm = settings.publisher != "none" and depth >= math.ceil(
        settings.outbox.max_events * settings.outbox.alarm_ratio
    )
    age = events.oldest_age_seconds
    return {
        "status": "DOWN" if alarm or failing else "UP",
        "details": {
            "publisher": settings.publisher,
            "connected": connected,
            "outboxDepth": depth,
            "oldestUndeliveredAgeSeconds": None if age is None else round(age, 3),
            "alarm": alarm,
            "dropped": events.dropped_total,
            "deadLetters": events.dead_letters,
            "lastDeadLetter": last_dead_letter,
            "lastError": error,
            **more,
        },
    }


class Refusals:
    """Records refused at publish (outbox full, or closed): counted, and logged at most every ``_LOG_EVERY``.
    Shared by ``UsageEvents`` and ``delivery.DeliveryProcess``, whichever admits records."""

    def __init__(self) -> None:
        self.count = 0
        self._logged_at = -math.inf

    def refuse(self, reason: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            self._logged_at = now
            log.error("usage event refused and lost: %s (%d refused so far)", reason, self.count)


class UsageEvents:
    """The usage-events room as the app and the relay see it (``usage.publisher: none`` makes it a no-op).

    Read by metrics callbacks: ``depth``, ``oldest_age_seconds``, ``published_total``,
    ``publish_failures_total`` (events per failed attempt), ``dropped_total``, ``dead_letters`` (events set
    aside) and ``last_delivery_lag_seconds`` (age of the newest event of the last confirmed batch, at
    confirmation).
    """

    def __init__(self, settings: UsageSettings, *, sink: Sink | None = None, prices: PriceTable | None = None) -> None:
        self._settings = settings
        self._prices = prices  # events are priced as they are built, in the writer thread: off the request path
        self._enabled = settings.publisher != "none"
        self._max_events = settings.outbox.max_events
        self._sink: Sink | None = sink
        self._accepting = self._enabled
        self._started = False
        self._closed = False
        # publish() appends, the writer thread pops: deque's append/popleft are atomic.
        self._buffer: deque[tuple[UsageRecord, float]] = deque()
        self._unwritten: list[tuple[str, float, bytes]] = []  # built rows the outbox refused; writer-owned
        self._outbox: Outbox | None = None
        self._db: ThreadPoolExecutor | None = None
        self._writer: threading.Thread | None = None
        self._stop_writer = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._draining = False
        self._stopping = False
        self._delivery: asyncio.Task[None] | None = None
        self._writer_error: str | None = None
        self._last_error: str | None = None
        self._error_logged: tuple[str | None, float] = (None, -math.inf)
        self._refusals = Refusals()
        self._unencodable = 0
        # seq -> (why the sink refused it, published_total before that send): held out of the batches
        self._suspects: dict[int, tuple[str, int]] = {}
        self._last_dead_letter: str | None = None
        self._taken = 0  # records the writer took from the buffer whose rows are not committed yet
        self.written_total = 0  # records committed to the outbox (or dropped as unencodable) so far
        self.published_total = 0
        self.publish_failures_total = 0
        self.last_delivery_lag_seconds: float | None = None

    # --------------------------------------------------------------------------------------------- numbers

    @property
    def depth(self) -> int:
        """Events accepted and not yet confirmed by the broker (in memory and in the outbox)."""
        outbox = self._outbox
        return len(self._buffer) + len(self._unwritten) + (outbox.depth if outbox is not None else 0)

    @property
    def oldest_age_seconds(self) -> float | None:
        oldest: float | None = None
        if self._outbox is not None:
            oldest = self._outbox.oldest_created
        if oldest is None:
            with contextlib.suppress(IndexError):  # the writer may empty them between check and read
                oldest = self._unwritten[0][1] if self._unwritten else self._buffer[0][1]
        return None if oldest is None else max(time.time() - oldest, 0.0)

    @property
    def dropped_total(self) -> int:
        return self._refusals.count + self._unencodable

    @property
    def dead_letters(self) -> int:
        """Events a sink refused for good, kept in the outbox's dead-letter table (0 before start)."""
        return 0 if self._outbox is None else self._outbox.dead_letters

    @property
    def outbox_commits_total(self) -> int:
        """Outbox transactions so far: the writer batches, so this grows far slower than events."""
        return 0 if self._outbox is None else self._outbox.commits

    def health(self) -> dict[str, object]:
        sink = self._sink
        return usage_health(
            self._settings,
            self,
            connected=bool(sink is not None and sink.connected),
            last_dead_letter=self._last_dead_letter,
            error=self._writer_error or self._last_error,
            failing=self._writer_error is not None,
        )

    def report(self) -> dict[str, object]:
        """Every number and error at once, as the delivery process sends them to the request process."""
        outbox, sink = self._outbox, self._sink
        return {
            "written": self.written_total,
            "outbox_depth": 0 if outbox is None else outbox.depth,
            "oldest_created": None if outbox is None else outbox.oldest_created,
            "published": self.published_total,
            "failures": self.publish_failures_total,
            "dropped": self.dropped_total,
            "dead_letters": self.dead_letters,
            "commits": self.outbox_commits_total,
            "lag": self.last_delivery_lag_seconds,
            "connected": bool(sink is not None and sink.connected),
            "writer_error": self._writer_error,
            "last_error": self._last_error,
            "last_dead_letter": self._last_dead_letter,
            "path": None if outbox is None else str(outbox.path),
        }

    # --------------------------------------------------------------------------------------- the relay's side

    def publish(self, record: UsageRecord) -> None:
        """Accept one record: O(1), never blocks, never raises; refused (and counted) when full or closed."""
        if self._accepting:
            outbox = self._outbox
            depth = len(self._buffer) + len(self._unwritten) + (outbox.depth if outbox is not None else 0)
            if depth < self._max_events:
                self._buffer.append((record, time.time()))
                return
            self._refusals.refuse(f"the outbox holds usage.outbox.max-events={self._max_events} undelivered events")
        elif self._enabled:
            self._refusals.refuse("usage events are closed")

    def accept(self, record: UsageRecord, at: float) -> None:
        """Take a record published at ``at`` that a caller already admitted against ``max-events``: the delivery
        process's way in (``events/delivery.py``), where the request process keeps the count. Never refuses
        while open: a refusal here would lose an event that its publisher was told was taken."""
        if self._accepting:
            self._buffer.append((record, at))
        elif self._enabled:
            self._refusals.refuse("usage events are closed")

    # ---------------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the outbox (leftovers go first) and start delivering; a broker that is down is fine."""
        if not self._enabled or self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate-outbox")
        try:
            self._outbox = await self._loop.run_in_executor(self._db, Outbox, self._settings.outbox.path)
        except OutboxError:
            self._db.shutdown(wait=False)
            raise
        for adopted in await self._loop.run_in_executor(self._db, self._outbox.adopt_orphans):
            log.warning(
                "adopted %d undelivered usage events (and %d set aside) from %s, left by a process that is gone",
                adopted.pending,
                adopted.dead_letters,
                adopted.path,
            )
        if self._outbox.depth:
            log.info("%d undelivered usage events in %s: delivering", self._outbox.depth, self._outbox.path)
        if self._outbox.dead_letters:
            log.warning(
                "%d usage events in the dead-letter table of %s (refused by the destination for good)",
                self._outbox.dead_letters,
                self._outbox.path,
            )
        if self._sink is None:
            self._sink = make_sink(self._settings)
        self._writer = threading.Thread(target=self._write_loop, name="gate-outbox-writer", daemon=True)
        self._writer.start()
        self._delivery = asyncio.create_task(self._deliver_loop(self._sink, self._outbox), name="gate-usage")

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 - the app's shutdown budget, not a cancel
        """Commit the buffer, deliver what the broker takes within ``timeout``, keep the rest for later."""
        if not self._enabled or self._closed:
            return
        self._closed = True
        self._accepting = False
        if not self._started:
            if self._buffer:
                log.error("%d usage events lost: closed before start", len(self._buffer))
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        assert self._writer is not None and self._delivery is not None and self._outbox is not None
        self._stop_writer.set()
        await asyncio.to_thread(self._writer.join, max(deadline - loop.time(), 1.0))
        if self._writer.is_alive():
            log.warning(
                "%d usage events are still being committed to %s; waiting for that before exit",
                self._in_memory(),
                self._outbox.path,
            )
        self._draining = True
        self._wakeup.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._drained.wait()
        self._stopping = True
        self._delivery.cancel()
        await asyncio.wait({self._delivery}, timeout=5.0)  # the loop also checks _stopping after each step
        await self._close_sink(max(deadline - loop.time(), 1.0))
        # Never close the outbox under the writer: its last commit ends by itself (SQLite gives up waiting for a
        # lock after 30 s), and until then the rows it holds can still reach the disk.
        await asyncio.to_thread(self._writer.join)
        outbox = self._outbox
        kept, lost = outbox.depth, self._in_memory()
        await self._in_db(outbox.close)
        assert self._db is not None
        self._db.shutdown(wait=False)
        if kept:
            log.warning("%d usage events stay in %s, to be delivered after the next start", kept, outbox.path)
        if lost:
            log.error(
                "%d usage events lost: the outbox %s did not take them before exit (%s)",
                lost,
                outbox.path,
                self._writer_error or "no error reported",
            )

    def _in_memory(self) -> int:
        return len(self._buffer) + len(self._unwritten)

    async def _close_sink(self, budget: float) -> None:
        assert self._sink is not None
        try:
            async with asyncio.timeout(budget):
                await self._sink.close()
        except TimeoutError:
            log.warning("the usage sink %s did not close within %.1fs", self._sink.name, budget)
        except Exception:
            log.exception("the usage sink %s failed to close", self._sink.name)

    # ------------------------------------------------------------------------------------------ writer thread

    def _write_loop(self) -> None:
        # A fixed cadence, not "interval after the last commit": under load a commit (building events with the
        # GIL shared, then an fsync) takes a while, and waiting a whole interval after it would stretch the window
        # a SIGKILL can lose.
        interval = self._settings.outbox.commit_interval
        deadline = time.monotonic() + interval
        while not self._stop_writer.wait(max(deadline - time.monotonic(), 0.0)):
            deadline += interval
            self._commit()
            deadline = max(deadline, time.monotonic())  # after a stall, do not fire a burst of catch-up commits
        self._commit()  # what was published up to close

    def _commit(self) -> None:
        rows = self._unwritten
        buffer = self._buffer
        # Only what is there now: under a flood of publishes the commits still come every interval.
        taken = [buffer.popleft() for _ in range(len(buffer))]
        self._taken += len(taken)
        event_type, source, prices = self._settings.event_type, self._settings.event_source, self._prices
        slices = _Slices()
        for (record, at), event_id in zip(taken, new_event_ids(len(taken)), strict=True):
            slices()
            try:
                event = build_event(
                    record, event_type=event_type, source=source, event_id=event_id, at=at, prices=prices
                )
                rows.append((event["id"], at, encode_event(event)))
            except (TypeError, ValueError) as exc:  # orjson's encode error is a TypeError
                self._unencodable += 1
                log.error("usage record dropped: it cannot be encoded as JSON (%s)", exc)
        if not rows:
            self._written()
            return
        assert self._outbox is not None
        try:
            self._outbox.append(rows, pause=slices)
        except OutboxError as exc:
            # Keep the rows (ids and times stay as built) and try again next interval.
            self._writer_error = str(exc)
            self._warn(str(exc))
            return
        if self._writer_error is not None:
            log.info("the usage outbox accepts writes again")
            self._writer_error = None
        rows.clear()
        self._written()
        self._wake_delivery()

    def _written(self) -> None:
        # Every record taken so far is in the outbox now (or was dropped as unencodable): rows the outbox refused
        # are retried together with later ones, so a commit that succeeds settles all of them at once.
        self.written_total += self._taken
        self._taken = 0

    def _wake_delivery(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile; the rows wait for next start
                loop.call_soon_threadsafe(self._wakeup.set)

    # ----------------------------------------------------------------------------------------- delivery task

    async def _deliver_loop(self, sink: Sink, outbox: Outbox) -> None:
        backoff = Backoff(self._settings.outbox.retry_initial, self._settings.outbox.retry_max)
        batch_size = self._settings.outbox.batch_size
        while not self._stopping:
            self._wakeup.clear()
            try:
                batch = await self._in_db(outbox.pending, batch_size, tuple(self._suspects))
                outage: str | None = None  # the destination is away: back off
                refusal: str | None = None  # events refused, not yet known to be at fault: wait for proof
                failed = 0
                if batch:
                    confirmed_before = self.published_total
                    result = await sink.send(batch)
                    if result.delivered:
                        # Counted before the rows go: whoever sees the outbox empty sees them counted.
                        self._count_delivered(batch, result)
                        await self._in_db(outbox.remove, result.delivered)
                    outage = result.error
                    refusal = self._suspect(result.refused, confirmed_before)
                    failed = len(batch) - len(result.delivered)
                elif self._draining:
                    self._drained.set()  # anything left is held out as refused: it will not go now
                if self._suspects and outage is None:
                    outage, unproven = await self._try_suspects(sink, outbox)
                    refusal = refusal or unproven
                if outage is None and refusal is None:
                    if self._last_error is not None:
                        log.info("usage events reach %s again", sink.name)
                        self._last_error = None
                    backoff.reset()
                    if not batch:
                        await self._idle(sink, backoff)
                    continue
                self.publish_failures_total += failed
                self._note_error(outage or refusal or "")
                if outage is None and not batch:
                    # Only held-out events are left: new events (the proof needed) wake this up early.
                    await self._idle(sink, backoff, wait=backoff.next())
                    continue
            except OutboxError as exc:
                self._note_error(str(exc))
            except Exception as exc:  # a bug must not stop delivery for good: log it, back off, go on
                log.exception("usage delivery failed unexpectedly")
                self._note_error(f"{type(exc).__name__}: unexpected failure in usage delivery")
            await asyncio.sleep(backoff.next())

    def _suspect(self, refused: dict[int, str], confirmed_before: int) -> str | None:
        """Hold refused events out of the batches; the refusal left over when too many are held already."""
        overflow: str | None = None
        for seq, reason in refused.items():
            if seq in self._suspects or len(self._suspects) < _MAX_SUSPECTS:
                self._suspects.setdefault(seq, (reason, confirmed_before))
            else:
                overflow = overflow or reason
        return overflow

    async def _try_suspects(self, sink: Sink, outbox: Outbox) -> tuple[str | None, str | None]:
        """Send each held-out event alone: delivered, set aside (refused while the sink took others), or kept.

        Returns (an outage that stopped the round, a refusal not yet told apart from the destination's fault).
        """
        events = await self._in_db(outbox.fetch, tuple(self._suspects))
        present = {event.seq for event in events}
        for seq in [seq for seq in self._suspects if seq not in present]:
            del self._suspects[seq]  # no longer pending (removed or set aside meanwhile)
        unproven: str | None = None
        for event in events:
            result = await sink.send([event])
            if result.delivered:
                self._count_delivered([event], result)
                await self._in_db(outbox.remove, result.delivered)
                del self._suspects[event.seq]
            elif event.seq in result.refused:
                reason = result.refused[event.seq]
                confirmed_before = self._suspects[event.seq][1]
                if self.published_total > confirmed_before:  # others got through since: the fault is this one's
                    await self._set_aside(sink, outbox, event, reason)
                else:
                    unproven = unproven or reason
            else:
                return result.error or f"{sink.name}: no answer", unproven
            if self._stopping:
                break
        return None, unproven

    async def _set_aside(self, sink: Sink, outbox: Outbox, event: PendingEvent, reason: str) -> None:
        reason = reason[:_MAX_REASON]
        await self._in_db(outbox.set_aside, event.seq, sink.name, reason)
        del self._suspects[event.seq]
        self._last_dead_letter = f"{event.event_id}: {reason}"
        log.error(
            "usage event %s (%d bytes) set aside in the dead-letter table of %s: %s refuses it for good (%s); "
            "%d set aside in all",
            event.event_id,
            len(event.body),
            outbox.path,
            sink.name,
            reason,
            outbox.dead_letters,
        )

    def _count_delivered(self, batch: list[PendingEvent], result: SendResult) -> None:
        delivered = set(result.delivered)
        self.published_total += len(delivered)
        newest = max(event.created for event in batch if event.seq in delivered)
        self.last_delivery_lag_seconds = max(time.time() - newest, 0.0)

    async def _idle(self, sink: Sink, backoff: Backoff, wait: float = _IDLE_CHECK) -> None:
        if not sink.connected and not self._draining:
            try:
                await sink.connect()
            except SinkUnavailable as exc:
                self._note_error(str(exc))
                wait = backoff.next()
            else:
                backoff.reset()
                self._last_error = None
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that meets a set event.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._wakeup.wait()

    async def _in_db(self, work: Callable[..., _T], *args: object) -> _T:
        assert self._loop is not None and self._db is not None
        return await self._loop.run_in_executor(self._db, work, *args)

    def _note_error(self, error: str) -> None:
        self._last_error = error
        self._warn(error)

    def _warn(self, error: str) -> None:
        last, at = self._error_logged
        now = time.monotonic()
        if error != last or now - at >= _LOG_EVERY:
            self._error_logged = (error, now)
            log.warning("usage events wait in the outbox (depth %d): %s", self.depth, error)
