"""Usage events: the CloudEvents envelope, the durable outbox, and the sinks (RabbitMQ, Pub/Sub, file, log).

The relay calls ``publish(record)`` once per upstream call; the app starts and closes the events. ``open_events``
gives a ``DeliveryProcess`` (``usage.delivery: process``, the work in a child process) or a ``UsageEvents`` (all of
it in the request process).
"""

from gate.events.delivery import DeliveryProcess, Events, open_events
from gate.events.envelope import (
    BinaryEvent,
    build_event,
    encode_event,
    new_event_id,
    rfc3339_millis,
    to_binary,
)
from gate.events.outbox import Outbox, OutboxError, PendingEvent
from gate.events.publisher import UsageEvents, make_sink
from gate.events.sink import SendResult, Sink, SinkUnavailable

__all__ = [
    "BinaryEvent",
    "DeliveryProcess",
    "Events",
    "Outbox",
    "OutboxError",
    "PendingEvent",
    "SendResult",
    "Sink",
    "SinkUnavailable",
    "UsageEvents",
    "build_event",
    "encode_event",
    "make_sink",
    "new_event_id",
    "open_events",
    "rfc3339_millis",
    "to_binary",
]
