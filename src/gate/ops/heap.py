"""The cyclic garbage collector, set for a server's tail: what startup built is frozen, young collections rarer.

CPython's cyclic collector stops the loop while it scans. A full (generation 2) collection scans every tracked
object, and Gate starts with ~90,000 of them (settings, pydantic models, OpenTelemetry, the cloud clients'
modules) that live as long as the process; with 2,000 streams open, the streams' own objects join them. Measured
with the benchmark's streams phase (``benchmarks/run.py --phases streams``, GC pauses timed by ``gc.callbacks``),
three full collections in 20 s paused the loop for up to 252 ms each on a loaded machine, and every stream that
was starting then waited: that was the 2,000-stream time-to-first-byte tail.

``settle`` runs once, when startup is over and the ports are bound: a collection, then ``gc.freeze()`` (the
survivors move to a permanent generation that no collection scans again), and a larger young-generation
threshold, so that the per-request garbage that refcounting does not free is swept in fewer, still small,
passes. A process-wide decision, so it is made by the process entry points (``gate serve`` and each worker), not
by ``serve()``, which tests run inside their own process. No library: these are three calls of the standard
``gc`` module.
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["YOUNG_THRESHOLD", "settle"]

YOUNG_THRESHOLD: Final = 10_000  # allocations (net of frees) between young collections; CPython's default is 700


def settle() -> None:
    """Freeze what startup left alive and make young collections rarer (idempotent)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
