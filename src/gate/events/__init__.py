"""Usage events: the CloudEvents envelope, the durable outbox, and the sinks (RabbitMQ, Pub/Sub, file, log).

The relay calls ``UsageEvents.publish(record)`` once per upstream call; the app starts and closes it.
"""

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
    "rfc3339_millis",
    "to_binary",
]
