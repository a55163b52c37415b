"""``gate usage-sink``: consume usage events, write them in batches, acknowledge after commit; health, metrics, report.

One task consumes (the source's, reconnecting forever) and hands each delivery to a bounded queue; one task takes
batches from the queue, writes each batch to every target until it is committed (retrying with backoff through a
database outage while the broker keeps the messages unacknowledged) and only then acknowledges them. A broker outage
loses nothing either: what was not acknowledged is redelivered, and the event id keeps a redelivery from counting
twice. The HTTP port serves ``/actuator/health``, ``/metrics`` (Prometheus) and the report (``gate.usagesink.report``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gate.accounting.prices import PriceTable
from gate.http.server import HttpServer, Request, Response, Router
from gate.identity.auth import Authenticator
from gate.ops.backoff import Backoff
from gate.ops.errors import error_response
from gate.settings import GateSettings
from gate.usagesink.bigquery import BigQueryLoader, BigQueryUnavailable
from gate.usagesink.postgres import DatabaseUnavailable, PostgresStore, migrate
from gate.usagesink.rows import BadEvent, UsageRow, row_from_event
from gate.usagesink.sources import Delivery, Source, make_source

__all__ = ["UsageSink", "run"]

log = logging.getLogger("gate.usagesink")

_STOP = object()


class SinkMetrics:
    """The sink's own Prometheus registry (nothing of Gate's telemetry: a separate process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter("gate_usage_sink_events_received", "Messages received from the broker", registry=r)
        self.inserted = Counter("gate_usage_sink_rows_inserted", "New rows committed to PostgreSQL", registry=r)
        self.duplicates = Counter(
            "gate_usage_sink_duplicates", "Events already stored (redeliveries), not counted again", registry=r
        )
        self.rejected = Counter(
            "gate_usage_sink_events_rejected",
            "Messages that are no usage event, or rows refused",
            ["reason"],
            registry=r,
        )
        self.write_failures = Counter(
            "gate_usage_sink_write_failures", "Batch writes that failed and were retried", ["target"], registry=r
        )
        self.acked = Counter("gate_usage_sink_events_acknowledged", "Messages acknowledged after commit", registry=r)
        self.batch_seconds = Histogram(
            "gate_usage_sink_batch_write_seconds", "Time to commit one batch to every target", registry=r
        )
        self.pending = Gauge("gate_usage_sink_pending_events", "Received, not yet acknowledged", registry=r)
        self.broker_up = Gauge("gate_usage_sink_broker_connected", "1 while consuming from the broker", registry=r)
        self.database_up = Gauge("gate_usage_sink_database_connected", "1 while PostgreSQL is reachable", registry=r)


class UsageSink:
    """Every part of one sink process; ``start`` then ``stop``, or ``serve`` until a signal."""

    def __init__(self, settings: GateSettings, *, source: Source | None = None, bigquery_client: Any = None) -> None:
        self.settings = settings
        sink = settings.usage_sink
        self.prices = PriceTable.from_settings(settings.prices)
        self.metrics = SinkMetrics()
        self.source: Source = source or make_source(sink, settings.usage)
        self.store = PostgresStore(sink.database) if "postgresql" in sink.targets else None
        self.bigquery = BigQueryLoader(sink.bigquery, client=bigquery_client) if "bigquery" in sink.targets else None
        self.auth: Authenticator | None = None
        if sink.report.enabled and self.store is not None:
            self.auth = Authenticator(settings.security.jwt, dev_auth=settings.dev_auth)
        # Bounded: a consumer that outruns the database waits here (and the broker's prefetch holds the rest).
        self._queue: asyncio.Queue[Delivery | object] = asyncio.Queue(maxsize=max(sink.batch_size * 2, 1))
        self._in_flight = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._server: HttpServer | None = None
        self.port = 0
        self.batches_committed = 0

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self, *, port: int | None = None) -> int:
        """Migrate, start consuming and writing, listen; returns the HTTP port."""
        sink = self.settings.usage_sink
        if self.store is not None and sink.database.migrate:
            await self._migrate()
        if self.auth is not None:
            await self.auth.start()
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="usage-sink-writer"),
            asyncio.create_task(self.source.run(self._accept), name="usage-sink-source"),
        ]
        self._server = HttpServer(
            self.router(),
            error=error_response,
            max_body_size=64 * 1024,  # nothing here takes a body
            max_header_size=64 * 1024,
            header_timeout=10.0,
            keep_alive_timeout=75.0,
        )
        self.port = await self._server.listen(sink.server.host, sink.server.port if port is None else port)
        log.info(
            "usage sink ready: %s -> %s, http://%s:%d",
            self.source.name,
            ",".join(sink.targets),
            sink.server.host,
            self.port,
        )
        return self.port

    async def _migrate(self) -> None:
        assert self.store is not None
        backoff = Backoff(self.settings.usage_sink.retry_initial, self.settings.usage_sink.retry_max)
        while True:  # the database may come up after the sink: wait for it rather than crash-loop
            try:
                await asyncio.to_thread(migrate, self.settings.usage_sink.database)
                self.store.last_error = None  # the database answered: health says so before the first write
                return
            except Exception as exc:  # noqa: BLE001 - SQLAlchemy wraps the driver's errors in its own tree
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self.store.last_error = f"PostgreSQL (migrations): {message[:300]}"
                log.warning("usage sink: %s (retrying)", self.store.last_error)
            await asyncio.sleep(backoff.next())

    async def stop(self, *, grace: float = 5.0) -> None:
        """Stop consuming, write and acknowledge what is in hand within ``grace``, close everything."""
        if not self._tasks:
            return
        writer, consumer = self._tasks
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):  # the queue may be full behind a database that is down
                await self._queue.put(_STOP)
                await asyncio.wait({writer})  # its end, whatever it was: stop() reports nothing of the writer's
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await self.source.close()
        if self._server is not None:
            await self._server.shutdown(1.0)
        if self.store is not None:
            await self.store.close()
        if self.auth is not None:
            await self.auth.close()
        self._tasks = []

    async def abort(self) -> None:
        """Stop at once as a crash would: nothing more is written or acknowledged (the broker redelivers)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.source.close()
        if self._server is not None:
            await self._server.shutdown(0.1)
        if self.store is not None:
            await self.store.close()
        if self.auth is not None:
            await self.auth.close()

    # ------------------------------------------------------------------------------------------ the pipeline

    async def _accept(self, delivery: Delivery) -> None:
        self.metrics.received.inc()
        self._in_flight += 1
        self.metrics.pending.set(self._in_flight)
        await self._queue.put(delivery)

    async def _next_batch(self) -> tuple[list[Delivery], bool]:
        sink = self.settings.usage_sink
        first = await self._queue.get()
        if first is _STOP:
            return [], True
        batch: list[Delivery] = [first]  # type: ignore[list-item]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + sink.batch_linger
        while len(batch) < sink.batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(left):
                        item = await self._queue.get()
                except TimeoutError:
                    break
            if item is _STOP:
                return batch, True
            batch.append(item)  # type: ignore[arg-type]
        return batch, False

    async def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = await self._next_batch()
            if batch:
                await self._settle(batch)

    async def _settle(self, batch: list[Delivery]) -> None:
        rows: list[UsageRow] = []
        rows_of: list[Delivery] = []
        for delivery in batch:
            try:
                if delivery.event is None:
                    raise BadEvent(delivery.error or "not a CloudEvent")
                rows.append(row_from_event(delivery.event, self.prices))
                rows_of.append(delivery)
            except BadEvent as exc:
                log.error("usage sink: a message is no usage event and is rejected: %s", exc)
                self.metrics.rejected.labels("undecodable").inc()
                await self._settle_one(delivery.reject)
        refused_ids = await self._write(rows)
        for delivery, row in zip(rows_of, rows, strict=True):
            if row.event_id in refused_ids:
                await self._settle_one(delivery.reject)
            else:
                await self._settle_one(delivery.ack)
                self.metrics.acked.inc()
        self._in_flight -= len(batch)
        self.metrics.pending.set(self._in_flight)
        self.batches_committed += 1

    async def _settle_one(self, settle: Callable[[], Any]) -> None:
        try:
            await settle()
        except asyncio.CancelledError:
            # aiormq cancels an acknowledgement in flight when its connection closes: that is the broker going
            # away, not this task being stopped, and it must not end the writer (every later batch would wait).
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            log.info("usage sink: the broker connection closed while settling a message; it will be redelivered")
        except Exception as exc:  # noqa: BLE001 - the channel is gone: the broker redelivers, the key dedups
            log.info("usage sink: could not settle a message (%s: %s); it will be redelivered", type(exc).__name__, exc)

    async def _write(self, rows: list[UsageRow]) -> set[str]:
        """Write to every target until committed; the ids of rows PostgreSQL refuses for good."""
        if not rows:
            return set()
        sink = self.settings.usage_sink
        backoff = Backoff(sink.retry_initial, sink.retry_max)
        refused: set[str] = set()
        started = time.perf_counter()
        if self.store is not None:
            while True:
                try:
                    result = await self.store.write(rows)
                    break
                except DatabaseUnavailable as exc:
                    self.metrics.write_failures.labels("postgresql").inc()
                    self.metrics.database_up.set(0)
                    log.warning("usage sink: %s; %d events wait unacknowledged", exc, self._in_flight)
                await asyncio.sleep(backoff.next())
            self.metrics.database_up.set(1)
            self.metrics.inserted.inc(result.inserted)
            self.metrics.duplicates.inc(result.duplicates)
            for row, reason in result.refused:
                log.error("usage sink: PostgreSQL refused event %s: %s", row.event_id, reason)
                self.metrics.rejected.labels("refused_by_database").inc()
                refused.add(row.event_id)
        if self.bigquery is not None:
            backoff.reset()
            kept = [row for row in rows if row.event_id not in refused]
            while kept:
                try:
                    await self.bigquery.write(kept)
                    break
                except BigQueryUnavailable as exc:
                    self.metrics.write_failures.labels("bigquery").inc()
                    log.warning("usage sink: %s", exc)
                await asyncio.sleep(backoff.next())
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return refused

    # ------------------------------------------------------------------------------------------ HTTP

    def router(self) -> Router:
        r = Router(self._not_found)
        r.add("GET", "/actuator/health", self._health)
        r.add("GET", "/metrics", self._metrics)
        if self.auth is not None and self.store is not None:
            from gate.usagesink.report import Report

            Report(self.settings, self.auth, self.store).add_routes(r)
        return r

    def health(self) -> dict[str, Any]:
        source_up = self.source.connected
        components: dict[str, Any] = {
            "broker": {
                "status": "UP" if source_up else "DOWN",
                "details": {"source": self.source.name, "lastError": self.source.last_error},
            }
        }
        if self.store is not None:
            components["database"] = {
                "status": "UP" if self.store.last_error is None else "DOWN",
                "details": {"connected": self.store.connected, "lastError": self.store.last_error},
            }
        if self.bigquery is not None:
            components["bigquery"] = {
                "status": "UP" if self.bigquery.last_error is None else "DOWN",
                "details": {"lastError": self.bigquery.last_error},
            }
        components["pipeline"] = {"status": "UP", "details": {"pendingEvents": self._in_flight}}
        status = "UP" if all(c["status"] == "UP" for c in components.values()) else "DOWN"
        return {"status": status, "components": components}

    async def _health(self, request: Request) -> Response:
        health = self.health()
        return Response(
            status=200 if health["status"] == "UP" else 503,
            body=orjson.dumps(health),
            content_type="application/vnd.spring-boot.actuator.v3+json",
        )

    async def _metrics(self, request: Request) -> Response:
        self.metrics.broker_up.set(1 if self.source.connected else 0)
        if self.store is not None:
            self.metrics.database_up.set(1 if self.store.last_error is None else 0)
        return Response(body=generate_latest(self.metrics.registry), content_type=CONTENT_TYPE_LATEST)

    async def _not_found(self, request: Request) -> Response:
        return error_response(404, f"Not found: {request.method} {request.path}")


async def serve(settings: GateSettings, *, stop: asyncio.Event | None = None) -> None:
    """Run the sink until SIGTERM/SIGINT (or ``stop``)."""
    sink = UsageSink(settings)
    await sink.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("usage sink stopping: writing and acknowledging what is in hand")
    await sink.stop()


def run(settings: GateSettings, *, migrate_only: bool = False) -> None:
    """Blocking entry point for ``gate usage-sink``."""
    if migrate_only:
        migrate(settings.usage_sink.database)
        log.info("usage sink schema %s is up to date", settings.usage_sink.database.schema_name)
        return
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
