"""The cyclic garbage collector, set for a server's tail: what startup built is frozen, young collections rarer.

CPython's cyclic collector stops the loop while it scans. A full (generation 2) collection scans every tracked
object, and Gate starts with ~90,000 of them (settings, pydantic models, OpenTelemetry, the cloud clients'
modules) that live as long as the process; with 2,000 streams open, the streams' own objects join them. Measured
with the benchmark's streams phase (``benchmarks/run.py --phases streams``, GC pauses timed by ``gc.callbacks``),
three full collections in 20 s paused the loop for up to 252 ms each on a loaded machine, and every stream that
was starting then waited: that was the 2,000-stream time-to-first-byte tail.

``settle`` runs once, when startup is over and the ports are bound: a collection, then ``gc.freeze()`` (the
survivors move to a permanent generation that no collection scans again), and thresholds that make the young and
middle collections rarer: young ones every 5,000 net allocations (CPython: 700), the middle one every 20 young ones
(10); full ones keep CPython's rule (after 10 middle ones, once the long-lived objects grew by a quarter). Most of
a request's garbage is freed by reference counting and never waits for these.

Measured, in this order. On a simulated ramp of 2,000 streams (``benchmarks/micro/gc_ramp.py``: 80 tracked
objects with cycles per stream, plus churn; ``gc.callbacks`` timing) CPython's defaults made 8 full collections of
up to 142-462 ms, these thresholds 5 of up to ~115 ms; a full threshold of 100 instead of 10 made none. But in the
10-minute soak (``benchmarks/run.py --phases soak --soak-minutes 10``) that full threshold of 100 let Gate's RSS
climb from 70.2 to 83.1 MB (+0.49 MB/min), while with 10 it settled at 80.6 MB (+0.07 MB/min): memory that stays
flat is worth more to an operator than the last full collections of a ramp.

A process-wide decision, so it is made by the process entry points (``gate serve`` and each worker), not by
``serve()``, which tests run inside their own process. No library: these are three calls of the standard ``gc``
module.
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["THRESHOLDS", "settle"]

THRESHOLDS: Final = (5_000, 20, 10)  # young, middle, old (see above); CPython's defaults are (700, 10, 10)


def settle() -> None:
    """Freeze what startup left alive and make young collections rarer (idempotent)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
