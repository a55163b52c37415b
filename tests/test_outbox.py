"""The outbox and ``UsageEvents``: durability across restarts and SIGKILL, batching, limits, concurrency."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from gate.accounting.usage import UsageRecord
from gate.events import Outbox, OutboxError, PendingEvent, SendResult, SinkUnavailable, UsageEvents
from gate.settings import UsageSettings
from tests.brokers import wait_until


class RecordingSink:
    """A destination in memory that can be switched off: stands in for a broker at the sink seam."""

    name = "recording"

    def __init__(self, *, up: bool = True) -> None:
        self.up = up
        self.received: list[PendingEvent] = []
        self.attempts = 0

    @property
    def connected(self) -> bool:
        return self.up

    async def connect(self) -> None:
        if not self.up:
            raise SinkUnavailable("recording sink is down")

    async def send(self, events: Sequence[PendingEvent]) -> SendResult:
        self.attempts += 1
        if not self.up:
            return SendResult(error="recording sink is down")
        self.received.extend(events)
        return SendResult(delivered=[event.seq for event in events])

    async def close(self) -> None:
        return None

    def ids(self) -> list[str]:
        return [event.event_id for event in self.received]


def record(n: int = 0, **changes: Any) -> UsageRecord:
    base = UsageRecord(
        subject="alice",
        model="claude-sonnet-4-5",
        message_id=f"msg_{n}",
        input_tokens=10,
        output_tokens=20,
        cache_creation_tokens=0,
        cache_read_tokens=0,
        latency_ms=100,
        stream=True,
        stop_reason="end_turn",
        status="success",
        error_type=None,
        key_alias="primary",
        trace_id=None,
        anthropic_request_id=None,
    )
    return dataclasses.replace(base, **changes)


def settings_for(tmp_path: Path, **outbox: Any) -> UsageSettings:
    return UsageSettings.model_validate(
        {
            "publisher": "log",
            "outbox": {
                "path": str(tmp_path / "outbox.sqlite3"),
                "retry-initial": "20ms",
                "retry-max": "100ms",
            }
            | outbox,
        }
    )


def rows_on_disk(path: Path) -> int:
    with sqlite3.connect(path) as db:
        (count,) = db.execute("SELECT count(*) FROM usage_outbox").fetchone()
        return int(count)


async def test_events_survive_a_restart_and_keep_their_ids(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    first = UsageEvents(settings, sink=RecordingSink(up=False))
    await first.start()
    for n in range(100):
        first.publish(record(n, event_id=f"given-{n}"))  # the relay's id
    for n in range(100, 200):
        first.publish(record(n))  # no id: the outbox makes one
    await wait_until(lambda: first.publish_failures_total > 0, what="a failed delivery")
    await first.close(timeout=0.2)
    assert rows_on_disk(tmp_path / "outbox.sqlite3") == 200

    # A second start while the broker is still down: the same ids are offered again.
    down = RecordingSink(up=False)
    second = UsageEvents(settings, sink=down)
    await second.start()
    assert second.depth == 200
    await second.close(timeout=0.1)
    stored = Outbox(tmp_path / "outbox.sqlite3")
    ids_on_disk = [event.event_id for event in stored.pending(1000)]
    stored.close()

    sink = RecordingSink()
    third = UsageEvents(settings, sink=sink)
    await third.start()
    await wait_until(lambda: len(sink.received) == 200, what="200 deliveries")
    await third.close(timeout=1)
    assert sink.ids() == ids_on_disk
    assert sink.ids()[:100] == [f"given-{n}" for n in range(100)]
    assert len(set(sink.ids())) == 200
    assert [orjson.loads(e.body)["id"] for e in sink.received] == sink.ids()
    assert [orjson.loads(e.body)["data"]["message_id"] for e in sink.received] == [
        f"msg_{n}" for n in range(200)
    ]
    assert rows_on_disk(tmp_path / "outbox.sqlite3") == 0
    assert third.health()["details"] == {
        "publisher": "log",
        "connected": True,
        "outboxDepth": 0,
        "oldestUndeliveredAgeSeconds": None,
        "alarm": False,
        "dropped": 0,
        "deadLetters": 0,
        "lastDeadLetter": None,
        "lastError": None,
    }


async def test_publish_buffers_in_memory_and_commits_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    slow = UsageEvents(settings_for(tmp_path, **{"commit-interval": "30s"}), sink=RecordingSink(up=False))
    await slow.start()
    for n in range(50):
        slow.publish(record(n))
    assert slow.depth == 50  # accepted ...
    assert rows_on_disk(path) == 0  # ... but not yet committed: that is the writer's job, every interval
    await slow.close(timeout=0)  # close commits the buffer
    assert rows_on_disk(path) == 50

    sink = RecordingSink()
    fast = UsageEvents(settings_for(tmp_path, **{"commit-interval": "100ms"}), sink=sink)
    await fast.start()
    await wait_until(lambda: len(sink.received) == 50, what="the leftovers")
    commits_before = fast.outbox_commits_total
    for n in range(2000):
        fast.publish(record(n))
    await wait_until(lambda: len(sink.received) == 2050, what="2050 deliveries")
    await fast.close(timeout=1)
    # 2000 publishes in a tight loop land in a handful of transactions, not 2000.
    assert fast.outbox_commits_total - commits_before < 20


async def test_full_outbox_refuses_and_the_alarm_fires_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = RecordingSink(up=False)
    events = UsageEvents(settings_for(tmp_path, **{"max-events": 10, "alarm-ratio": 0.5}), sink=sink)
    await events.start()
    for n in range(4):
        events.publish(record(n))
    health = events.health()
    assert health["status"] == "UP"
    assert health["details"]["alarm"] is False  # type: ignore[index]

    events.publish(record(4))
    health = events.health()
    assert health["status"] == "DOWN"
    assert health["details"]["alarm"] is True  # type: ignore[index]
    assert events.dropped_total == 0

    with caplog.at_level(logging.ERROR, logger="gate.events"):
        for n in range(5, 15):
            events.publish(record(n))  # never raises
    assert events.depth == 10
    assert events.dropped_total == 5
    assert events.health()["details"]["dropped"] == 5  # type: ignore[index]
    assert any("refused" in r.getMessage() and "max-events=10" in r.getMessage() for r in caplog.records)

    await wait_until(lambda: events.publish_failures_total > 0, what="a failed attempt")
    assert events.health()["details"]["lastError"] == "recording sink is down"  # type: ignore[index]
    age = events.oldest_age_seconds
    assert age is not None and age >= 0

    sink.up = True  # the broker is back: everything accepted is delivered, the alarm clears
    await wait_until(lambda: len(sink.received) == 10, what="10 deliveries")
    await wait_until(lambda: events.health()["status"] == "UP", what="health UP")
    assert events.health()["details"]["alarm"] is False  # type: ignore[index]
    assert events.health()["details"]["lastError"] is None  # type: ignore[index]
    assert [orjson.loads(e.body)["data"]["message_id"] for e in sink.received] == [
        f"msg_{n}" for n in range(10)
    ]
    events.publish(record(99))  # room again
    await wait_until(lambda: len(sink.received) == 11, what="the 11th delivery")
    assert events.last_delivery_lag_seconds is not None
    await events.close(timeout=1)


async def test_many_publishing_tasks_deliver_every_event_exactly_once(tmp_path: Path) -> None:
    sink = RecordingSink()
    events = UsageEvents(settings_for(tmp_path, **{"batch-size": 100}), sink=sink)
    await events.start()

    async def publisher(task: int) -> None:
        for n in range(250):
            events.publish(record(task * 1000 + n))
            if n % 10 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(*(publisher(task) for task in range(20)))
    await wait_until(lambda: len(sink.received) >= 5000, what="5000 deliveries")
    await events.close(timeout=1)
    assert len(sink.received) == 5000
    assert len(set(sink.ids())) == 5000  # no duplicates in normal delivery
    messages = {orjson.loads(e.body)["data"]["message_id"] for e in sink.received}
    assert messages == {f"msg_{t * 1000 + n}" for t in range(20) for n in range(250)}
    assert events.published_total == 5000
    assert events.publish_failures_total == 0


async def test_closed_events_refuse_without_raising(tmp_path: Path) -> None:
    events = UsageEvents(settings_for(tmp_path), sink=RecordingSink())
    await events.start()
    await events.close(timeout=1)
    events.publish(record())
    assert events.dropped_total == 1


async def test_publisher_none_is_a_no_op(tmp_path: Path) -> None:
    settings = UsageSettings.model_validate(
        {"publisher": "none", "outbox": {"path": str(tmp_path / "o.sqlite3")}}
    )
    events = UsageEvents(settings)
    await events.start()
    events.publish(record())
    assert events.depth == 0 and events.dropped_total == 0
    assert events.health()["status"] == "UP"
    await events.close(timeout=1)
    assert not (tmp_path / "o.sqlite3").exists()


async def test_log_publisher_logs_each_event_as_a_structured_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = UsageEvents(settings_for(tmp_path))  # publisher: log, its own sink
    with caplog.at_level(logging.INFO, logger="gate.usage"):
        await events.start()
        events.publish(record(7, event_id="log-7"))
        await wait_until(lambda: events.published_total == 1, what="the log delivery")
        await events.close(timeout=1)
    [logged] = [r for r in caplog.records if r.name == "gate.usage"]
    assert logged.levelno == logging.INFO
    usage_event = logged.__dict__["usage_event"]
    assert usage_event["id"] == "log-7"
    assert usage_event["data"]["message_id"] == "msg_7"


def test_a_second_process_on_the_same_path_takes_the_next_slot(tmp_path: Path) -> None:
    first = Outbox(tmp_path / "outbox.sqlite3")
    second = Outbox(tmp_path / "outbox.sqlite3")
    try:
        assert first.path == tmp_path / "outbox.sqlite3"
        assert second.path == tmp_path / "outbox-1.sqlite3"
    finally:
        second.close()
        first.close()
    again = Outbox(tmp_path / "outbox.sqlite3")  # released on close
    assert again.path == tmp_path / "outbox.sqlite3"
    again.close()


def test_a_paced_append_is_one_transaction_in_order(tmp_path: Path) -> None:
    """The writer pauses between INSERT statements (to let the request loop's thread onto the core): a reader
    sees none of the rows while it pauses, all of them in order after, and a failure midway commits nothing."""
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    reader = sqlite3.connect(outbox.path)
    seen: list[int] = []

    def pause() -> None:
        seen.append(reader.execute("SELECT count(*) FROM usage_outbox").fetchone()[0])

    try:
        rows = [(f"id-{n}", float(n), b'{"n": %d}' % n) for n in range(50)]
        outbox.append(rows, pause=pause)
        assert seen == [0, 0, 0]  # statements of 16, 16, 16 and 2 rows: a pause between each two
        assert [event.event_id for event in outbox.pending(100)] == [row[0] for row in rows]
        assert outbox.depth == 50

        def fail() -> None:
            raise sqlite3.OperationalError("disk I/O error")

        with pytest.raises(OutboxError):
            outbox.append([(f"more-{n}", 0.0, b"{}") for n in range(20)], pause=fail)
        assert len(outbox.pending(100)) == 50 and outbox.depth == 50
    finally:
        reader.close()
        outbox.close()


_PUBLISHER = textwrap.dedent(
    """
    import asyncio, sys
    from gate.events import SendResult, SinkUnavailable, UsageEvents
    from gate.settings import UsageSettings
    from gate.accounting.usage import UsageRecord

    class Unreachable:
        name = "unreachable"
        connected = False
        async def connect(self): raise SinkUnavailable("unreachable")
        async def send(self, events): return SendResult(error="unreachable")
        async def close(self): return None

    async def main(path):
        settings = UsageSettings.model_validate(
            {"publisher": "log", "outbox": {"path": path, "retry-initial": "10s", "retry-max": "10s"}}
        )
        events = UsageEvents(settings, sink=Unreachable())
        await events.start()
        print("ready", flush=True)
        n = 0
        while True:
            events.publish(UsageRecord(
                subject="alice", model="m", message_id=str(n), input_tokens=1, output_tokens=1,
                cache_creation_tokens=0, cache_read_tokens=0, latency_ms=1, stream=False, stop_reason=None,
                status="success", error_type=None, key_alias=None, trace_id=None, anthropic_request_id=None,
            ))
            n += 1
            if n % 10 == 0:
                await asyncio.sleep(0.0005)

    asyncio.run(main(sys.argv[1]))
    """
)


def test_sigkill_loses_only_the_last_commit_interval(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    child = subprocess.Popen(
        [sys.executable, "-c", _PUBLISHER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(1.5)
        killed_at = time.time()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    outbox = Outbox(path)
    survivors = outbox.pending(10_000_000)
    outbox.close()
    numbers = [int(orjson.loads(e.body)["data"]["message_id"]) for e in survivors]
    assert numbers, "nothing was committed"
    assert numbers == list(range(len(numbers)))  # no gaps, no duplicates: only a tail can be missing
    assert len({e.event_id for e in survivors}) == len(survivors)
    span = survivors[-1].created - survivors[0].created
    rate = (len(survivors) - 1) / span if span > 0 else 0.0
    lost_window = killed_at - survivors[-1].created
    print(
        f"\nSIGKILL: {len(survivors)} events survived over {span:.2f}s (~{rate:.0f}/s); "
        f"the newest committed was published {lost_window * 1000:.0f} ms before the kill "
        f"(~{rate * lost_window:.0f} events lost)"
    )


# ------------------------------------------------------------------------------------ refused for good


class PickySink(RecordingSink):
    """Refuses any event whose model is ``poison``. With ``whole_batch`` the refusal hits every event of the
    batch (as a Pub/Sub request-level ``InvalidArgument`` or a closed AMQP channel does); ``refuse_all`` refuses
    everything (a destination misconfigured: no event is at fault)."""

    def __init__(self, *, whole_batch: bool = False, refuse_all: bool = False) -> None:
        super().__init__()
        self.whole_batch = whole_batch
        self.refuse_all = refuse_all
        self.batches: list[list[str]] = []

    async def send(self, events: Sequence[PendingEvent]) -> SendResult:
        self.attempts += 1
        self.batches.append([event.event_id for event in events])
        poisoned = {e.seq for e in events if self.refuse_all or orjson.loads(e.body)["data"]["model"] == "poison"}
        if not poisoned:
            self.received.extend(events)
            return SendResult(delivered=[event.seq for event in events])
        refused = {e.seq for e in events} if self.whole_batch else poisoned
        result = SendResult()
        for event in events:
            if event.seq in refused:
                result.refuse(event.seq, "picky: message too large")
            else:
                self.received.append(event)
                result.delivered.append(event.seq)
        return result


def dead_letter_rows(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as db:
        return [tuple(row) for row in db.execute("SELECT event_id, sink, reason FROM usage_dead_letter")]


@pytest.mark.parametrize("whole_batch", [False, True], ids=["refused-alone", "refused-with-its-batch"])
@pytest.mark.parametrize("batch_size", [1, 3, 500])
async def test_an_event_refused_for_good_is_set_aside_and_the_others_flow(
    tmp_path: Path, whole_batch: bool, batch_size: int
) -> None:
    sink = PickySink(whole_batch=whole_batch)
    events = UsageEvents(settings_for(tmp_path, **{"batch-size": batch_size}), sink=sink)
    await events.start()
    try:
        events.publish(record(0, model="poison", event_id="poison"))
        for n in range(1, 11):
            events.publish(record(n, event_id=f"normal-{n}"))
        await wait_until(lambda: len(set(sink.ids())) == 10, what="the ten normal events")
        await wait_until(lambda: events.dead_letters == 1, what="the refused event set aside")
        await wait_until(lambda: events.depth == 0, what="the delivered ones removed")  # just after the sink took them
        details: Any = events.health()["details"]
        assert events.health()["status"] == "UP" and details["outboxDepth"] == 0
        assert details["deadLetters"] == 1 and details["lastDeadLetter"] == "poison: picky: message too large"
        attempts = sink.attempts
        for n in range(11, 16):  # later events flow as before, and the refused one is not tried again
            events.publish(record(n, event_id=f"normal-{n}"))
        await wait_until(lambda: len(set(sink.ids())) == 15, what="five more")
        assert all("poison" not in batch for batch in sink.batches[attempts:])
    finally:
        await events.close(timeout=1)
    assert sorted(set(sink.ids())) == sorted(f"normal-{n}" for n in range(1, 16))
    assert dead_letter_rows(tmp_path / "outbox.sqlite3") == [("poison", "recording", "picky: message too large")]
    assert rows_on_disk(tmp_path / "outbox.sqlite3") == 0
    again = UsageEvents(settings_for(tmp_path), sink=RecordingSink())  # kept across a restart, never re-sent
    await again.start()
    assert again.dead_letters == 1 and again.health()["details"]["deadLetters"] == 1  # type: ignore[index]
    await again.close(timeout=1)


async def test_a_refused_event_alone_waits_until_another_event_gets_through(tmp_path: Path) -> None:
    sink = PickySink()
    events = UsageEvents(settings_for(tmp_path), sink=sink)
    await events.start()
    try:
        events.publish(record(0, model="poison", event_id="poison"))
        await wait_until(lambda: sink.attempts >= 3, what="a few attempts")
        # Nothing proves yet that the fault is the event's and not the destination's: it stays pending.
        assert events.dead_letters == 0 and events.depth == 1
        assert "message too large" in str(events.health()["details"]["lastError"])  # type: ignore[index]
        events.publish(record(1, event_id="normal"))
        await wait_until(lambda: events.dead_letters == 1, what="the refused event set aside")
        assert sink.ids() == ["normal"] and events.depth == 0
    finally:
        await events.close(timeout=1)


async def test_a_destination_refusing_everything_sets_nothing_aside(tmp_path: Path) -> None:
    sink = PickySink(refuse_all=True)
    events = UsageEvents(settings_for(tmp_path, **{"batch-size": 2}), sink=sink)
    await events.start()
    try:
        for n in range(10):
            events.publish(record(n))
        await wait_until(lambda: sink.attempts >= 30, what="many attempts")
        assert events.dead_letters == 0 and events.depth == 10
        assert events.health()["details"]["lastError"] == "picky: message too large"  # type: ignore[index]
        sink.refuse_all = False  # the destination fixed: every event goes, none was lost
        await wait_until(lambda: events.depth == 0, what="the outbox to drain")
        assert len(set(sink.ids())) == 10 and events.dead_letters == 0
    finally:
        await events.close(timeout=1)


# --------------------------------------------------------------------------------- outbox files adopted


def fill(path: Path, ids: Sequence[str], *, dead: Sequence[str] = ()) -> None:
    """An outbox file as a process that is gone left it: pending rows (and dead letters), its lock released."""
    box = Outbox(path)
    assert box.path == path
    box.append([(event_id, time.time(), orjson.dumps({"id": event_id, "data": {}})) for event_id in ids])
    for event_id in dead:
        box.append([(event_id, time.time(), b"{}")])
        (seq,) = [event.seq for event in box.pending(10_000) if event.event_id == event_id]
        assert box.set_aside(seq, "rabbitmq", "too large")
    box.close()


@pytest.mark.parametrize(
    "left_behind",
    [
        ["outbox.sqlite3.0", "outbox.sqlite3.1"],  # --workers 2 before workers took slots
        ["outbox.sqlite3", "outbox-1.sqlite3", "outbox-2.sqlite3"],  # three processes' slots
        ["outbox.sqlite3.1", "outbox-1.sqlite3", "outbox.sqlite3-1.0"],  # a mix, and a slot of a worker file
    ],
)
async def test_every_outbox_file_left_behind_is_delivered_whatever_the_process_count(
    tmp_path: Path, left_behind: list[str]
) -> None:
    expected: list[str] = []
    for index, name in enumerate(left_behind):
        ids = [f"{name}-{n}" for n in range(4)]
        fill_any(tmp_path / name, ids, dead=[f"{name}-dead"] if index == 0 else [])
        expected.extend(ids)
    sink = RecordingSink()
    events = UsageEvents(settings_for(tmp_path), sink=sink)  # one process now
    await events.start()
    try:
        await wait_until(lambda: len(sink.received) >= len(expected), what="every left-behind event")
        assert events.dead_letters == 1
    finally:
        await events.close(timeout=1)
    assert sorted(sink.ids()) == sorted(expected)
    remaining = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith((".lock", "-wal", "-shm")))
    assert remaining == ["outbox.sqlite3"]
    assert rows_on_disk(tmp_path / "outbox.sqlite3") == 0
    assert [row[0] for row in dead_letter_rows(tmp_path / "outbox.sqlite3")] == [f"{left_behind[0]}-dead"]


def fill_any(path: Path, ids: Sequence[str], *, dead: Sequence[str] = ()) -> None:
    """``fill`` for any file name: a slot name is claimed directly, by holding the lower slots meanwhile."""
    holders = []
    try:
        while True:
            box = Outbox(path_family(path))
            if box.path == path:
                box.close()
                break
            holders.append(box)
        fill(path, ids, dead=dead)
    finally:
        for holder in holders:
            holder.close()


def path_family(path: Path) -> Path:
    """The configured path a slot file belongs to (``outbox-2.sqlite3`` -> ``outbox.sqlite3``)."""
    return path.with_name(re.sub(r"-\d+(\.[^.]+)$", r"\1", path.name))


async def test_a_live_process_keeps_its_file(tmp_path: Path) -> None:
    other = Outbox(tmp_path / "outbox.sqlite3")  # a live worker's outbox, with events of its own
    other.append([("theirs", time.time(), b'{"id": "theirs", "data": {}}')])
    sink = RecordingSink()
    events = UsageEvents(settings_for(tmp_path), sink=sink)
    await events.start()
    try:
        assert events.depth == 0  # it took the next slot and left the live one alone
        events.publish(record(1, event_id="mine"))
        await wait_until(lambda: sink.ids() == ["mine"], what="its own event")
    finally:
        await events.close(timeout=1)
        assert other.depth == 1
        other.close()


def test_adoption_leaves_a_file_that_is_not_an_outbox_alone(tmp_path: Path) -> None:
    stranger = tmp_path / "outbox.sqlite3.7"
    with sqlite3.connect(stranger) as db:
        db.execute("CREATE TABLE something_else (x)")
    box = Outbox(tmp_path / "outbox.sqlite3")
    try:
        assert box.adopt_orphans() == []
    finally:
        box.close()
    assert stranger.exists()


# ----------------------------------------------------------------------------------------- shutdown


async def test_events_still_being_written_at_shutdown_reach_the_outbox(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path)
    events = UsageEvents(settings, sink=RecordingSink(up=False))
    await events.start()
    # Another connection holds the write lock: the writer's commit waits (as on a stalled disk).
    blocker = sqlite3.connect(tmp_path / "outbox.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        for n in range(5):
            events.publish(record(n))
        with caplog.at_level(logging.WARNING, logger="gate.events"):
            closing = asyncio.create_task(events.close(timeout=0.1))
            await wait_until(
                lambda: any("still being committed" in r.getMessage() for r in caplog.records),
                what="the warning that the writer is still busy",
            )
            assert not closing.done()  # the outbox is not closed under the writer
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await closing
    assert rows_on_disk(tmp_path / "outbox.sqlite3") == 5
    messages = [r.getMessage() for r in caplog.records]
    assert any("5 usage events stay in" in m for m in messages), messages
    assert not any("lost" in m for m in messages), messages


async def test_events_the_outbox_never_took_are_reported_lost_not_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path)
    events = UsageEvents(settings, sink=RecordingSink(up=False))
    await events.start()
    blocker = sqlite3.connect(tmp_path / "outbox.sqlite3", isolation_level=None, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    assert events._outbox is not None
    events._outbox._db.execute("PRAGMA busy_timeout = 50")  # the writer gives up fast instead of after 30 s
    try:
        for n in range(5):
            events.publish(record(n))
        with caplog.at_level(logging.WARNING, logger="gate.events"):
            await events.close(timeout=0.1)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert rows_on_disk(tmp_path / "outbox.sqlite3") == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("5 usage events lost") for m in messages), messages
    assert not any("stay in" in m for m in messages), messages
