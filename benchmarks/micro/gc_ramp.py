"""Collector pauses while 2,000 streams open, under CPython's thresholds and under ``gate.ops.heap``'s.

A stand-in for the streams phase that the collector alone decides: Gate's modules imported (the startup heap),
then 2,000 "streams" of ~80 long-lived tracked objects with cycles (what a stream holds open), each opened with
request churn (short-lived cyclic garbage) and events (short-lived dicts). ``gc.callbacks`` times every collection.

Run: ``taskset -c 0 .venv/bin/python benchmarks/micro/gc_ramp.py default`` and ``... gate`` (``heap.settle()``),
or ``... 700/10/10`` for other thresholds after a freeze. Prints, per generation: collections, total ms, max ms.
"""

from __future__ import annotations

import gc
import sys
import time

import gate.app  # the startup heap
import gate.cli  # noqa: F401
from gate.events import rabbitmq  # noqa: F401
from gate.ops import heap


class _Held:
    def __init__(self) -> None:
        self.a: dict[str, object] = {}
        self.b: list[object] = []
        self.c = self  # a cycle: only the collector frees it


def main(config: str) -> None:
    if config == "gate":
        heap.settle()
    elif config != "default":
        gc.collect()
        gc.freeze()
        young, middle, old = (int(part) for part in config.split("/"))
        gc.set_threshold(young, middle, old)
    pauses: list[tuple[int, float]] = []
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], (time.perf_counter() - started[0]) * 1000))

    gc.callbacks.append(timed)
    streams = []
    begun = time.perf_counter()
    for n in range(2000):
        streams.append([_Held() for _ in range(60)] + [{"n": n} for _ in range(20)])
        for _ in range(40):
            churn = [_Held() for _ in range(30)]
            del churn
        for _ in range(50):
            event = {"event": [1, 2, 3]}
            del event
    wall = (time.perf_counter() - begun) * 1000
    gc.callbacks.remove(timed)
    print(f"{config}: ramp {wall:.0f} ms; per generation (collections, total ms, max ms):")
    for generation in (0, 1, 2):
        times = [ms for g, ms in pauses if g == generation]
        print(f"  gen {generation}: {len(times)}, {sum(times):.1f}, {max(times, default=0.0):.1f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gate")
