"""Usage events as structured log records: logger ``gate.usage``, INFO, ``extra={"usage_event": event}``."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import orjson

from gate.events.outbox import PendingEvent
from gate.events.sink import SendResult

__all__ = ["LogSink"]

usage_log = logging.getLogger("gate.usage")


class LogSink:
    """Always connected; an event counts as delivered once it has been handed to logging."""

    name = "log"
    connected = True

    async def connect(self) -> None:
        return None

    async def send(self, events: Sequence[PendingEvent]) -> SendResult:
        for event in events:
            usage_log.info("usage event %s", event.event_id, extra={"usage_event": orjson.loads(event.body)})
        return SendResult(delivered=[event.seq for event in events])

    async def close(self) -> None:
        return None
