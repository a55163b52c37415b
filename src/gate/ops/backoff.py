"""Retry delays: exponential steps from ``initial`` to ``maximum``, each drawn from its upper half (equal jitter).

Used by the usage-event delivery (``events/publisher.py``) and the usage sink (``usagesink/``) while a broker or a
database is away. Not ``tenacity`` or ``backoff``: those wrap a call in a retry loop, while these loops also wake
early on new work and reset on success, so they only need the next delay.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """``next()`` is the delay before the next attempt; ``reset()`` after a success starts over."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = max(initial, 0.001)
        self._maximum = max(maximum, self._initial)
        self._attempt = 0

    def next(self) -> float:
        step = min(self._maximum, self._initial * 2 ** min(self._attempt, 32))
        self._attempt += 1
        return float(step / 2 + random.uniform(0, step / 2))

    def reset(self) -> None:
        self._attempt = 0
