"""The seam between the outbox and a destination: the ``Sink`` protocol, its result, and safe error text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gate.events.outbox import PendingEvent
from gate.ops.redact import redact

__all__ = ["SendResult", "Sink", "SinkUnavailable", "describe_error"]


@dataclass(slots=True)
class SendResult:
    """Which events of a batch the destination confirmed (by outbox ``seq``), and why the rest were not.

    ``error`` is a transient failure (an outage: the events are retried as they are). ``refused`` names the
    events that failed for a reason that may be the event's own (too large, invalid) and would fail again
    however often they are retried; the publisher then tries each alone, and sets aside one that the
    destination still refuses while it takes others.
    """

    delivered: list[int] = field(default_factory=list)
    error: str | None = None
    refused: dict[int, str] = field(default_factory=dict)

    def refuse(self, seq: int, reason: str) -> None:
        self.refused[seq] = reason


class SinkUnavailable(Exception):
    """The destination cannot be reached now; the message is safe to log (no credentials)."""


class Sink(Protocol):
    """A destination for usage events. ``send`` never raises for broker trouble: it reports it."""

    name: str

    @property
    def connected(self) -> bool: ...

    async def connect(self) -> None:
        """Connect (or check) now; raise :class:`SinkUnavailable` when the destination is unreachable."""

    async def send(self, events: Sequence[PendingEvent]) -> SendResult:
        """Deliver a batch and wait for the destination's confirmation of each event; tell an outage
        (``error``) from a refusal that retrying cannot cure (``refused``)."""

    async def close(self) -> None: ...


def describe_error(exc: BaseException, *secrets: str) -> str:
    """``ExceptionType: message`` with URL credentials and any of ``secrets`` masked, for logs and health."""
    text = redact(str(exc).strip(), *secrets)  # gate.ops.redact: the one masking rule
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
