"""The cyclic garbage collector, set for a server's tail: what startup built is frozen, young collections rarer.

CPython's cyclic collector stops the loop while it scans. A full (generation 2) collection scans every tracked
object, and Gate starts with ~90,000 of them (settings, pydantic models, OpenTelemetry, the cloud clients'
modules) that live as long as the process; with 2,000 streams open, the streams' own objects join them. Measured
with the benchmark's streams phase (``benchmarks/run.py --phases streams``, GC pauses timed by ``gc.callbacks``),
three full collections in 20 s paused the loop for up to 252 ms each on a loaded machine, and every stream that
was starting then waited: that was the 2,000-stream time-to-first-byte tail.

``settle`` runs once, when startup is over and the ports are bound: a collection, then ``gc.freeze()`` (the
survivors move to a permanent generation that no collection scans again), and thresholds for the tail: young
collections every 5,000 net allocations (CPython: 700), the middle one every third young one (CPython: every
eleventh), full ones after 100 middle ones (CPython: 10), still only once the long-lived objects grew by a
quarter. Most of a request's garbage is freed by reference counting and never waits for these.

Why the middle one so often: a stream's ~90 tracked objects (coroutines, the parsers' bound callbacks, header
dicts; counted with ``gc.get_objects()`` in a Gate holding 500 streams) live as long as the stream, so while
streams open every one of them survives the young collection and waits in the middle generation, which a middle
collection scans whole. Every eleventh young one, that was up to 100,000 objects and a 20 ms pause (timed with
``gc.callbacks`` in ``gate serve`` while 2,000 streams opened over 3 s); every third, 15,000 and 3-4.5 ms. Each
object is still scanned once on its way to the old generation, so the collector's work is the same, in smaller
pauses. Full collections keep their spacing: 101 middle ones of 3 young ones each is about the 11 x 21 of
before (1.5 against 1.2 million net allocations).

Measured, in this order. On a simulated ramp of 2,000 streams (``benchmarks/micro/gc_ramp.py``: 80 tracked
objects with cycles per stream, plus churn; ``gc.callbacks`` timing) CPython's defaults made 8 full collections of
up to 142-462 ms, (5,000, 20, 10) 5 of up to ~115 ms; a full threshold of 100 instead of 10 made none. But in the
10-minute soak (``benchmarks/run.py --phases soak --soak-minutes 10``) that full threshold of 100 on top of a
middle one of 20 (full collections 10 times rarer) let Gate's RSS climb from 70.2 to 83.1 MB (+0.49 MB/min),
while with 10 it settled at 80.6 MB (+0.07 MB/min): memory that stays flat is worth more to an operator than the
last full collections of a ramp. The present (5,000, 2, 100) keeps the full collections as frequent as
(5,000, 20, 10) did: ``gc_ramp.py 5000/2/100`` made 3 full collections of up to 28 ms against 5 of up to 31 ms,
and 537 against 567 ms in all collections.

A process-wide decision, so it is made by the process entry points (``gate serve`` and each worker), not by
``serve()``, which tests run inside their own process. No library: these are three calls of the standard ``gc``
module.
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["THRESHOLDS", "settle"]

THRESHOLDS: Final = (5_000, 2, 100)  # young, middle, old (see above); CPython's defaults are (700, 10, 10)


def settle() -> None:
    """Freeze what startup left alive and make young collections rarer (idempotent)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
