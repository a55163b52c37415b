"""Hold many paced streams open at once and check every event arrives, and on time; prints JSON.

Each stream is its own connection. An event ends with a blank line (``\\n\\n``); we count them as bytes arrive,
note when each arrived, and report the largest gap between two events of one stream (the upstream paces them
evenly, so a gap much larger than the pace means the proxy held an event back). The bearer token comes from
the BENCH_TOKEN environment variable.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os

import uvloop

from gate.ops import fdtable
from sse_client import build_request, exchange, now_ms, percentiles, print_json


class StreamWatch:
    """Events seen on one stream and when they came."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.events = 0
        self.last_event_at: float | None = None
        self.first_event_ms: float | None = None
        self.max_gap = 0.0
        self.tail = b""

    def feed(self, data: bytes) -> None:
        joined = self.tail[-1:] + data
        new = joined.count(b"\n\n")
        self.tail = joined[-64:]
        if not new:
            return
        now = now_ms()
        if self.last_event_at is None:
            self.first_event_ms = now - self.started
        else:
            self.max_gap = max(self.max_gap, now - self.last_event_at)
        self.last_event_at = now
        self.events += new


async def one_stream(host: str, port: int, request: bytes, delay: float, timeout: float) -> StreamWatch | str:
    await asyncio.sleep(delay)
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        watch = StreamWatch(now_ms())
        reply = await asyncio.wait_for(exchange(reader, writer, request, watch.feed), timeout=timeout)
        if reply.status != 200:
            return f"status {reply.status}"
        if b"message_stop" not in watch.tail:
            return "stream ended without message_stop"
        return watch
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
        return type(exc).__name__
    finally:
        if writer is not None:
            writer.close()


async def hold(url: str, token: str, streams: int, ramp: float, events: int, timeout: float) -> dict[str, object]:
    host, port, request = build_request(url, token, stream=True)
    started = now_ms()
    results = await asyncio.gather(
        *(one_stream(host, port, request, ramp * i / streams, timeout) for i in range(streams))
    )
    watches = [r for r in results if isinstance(r, StreamWatch)]
    failures = [r for r in results if isinstance(r, str)]
    short = [w for w in watches if w.events != events]
    return {
        "streams": streams,
        "completed": len(watches) - len(short),
        "failed": len(failures) + len(short),
        "failure_samples": sorted(set(failures))[:5] + [f"{w.events} events of {events}" for w in short[:3]],
        "events_expected_per_stream": events,
        "max_gap_ms": round(max((w.max_gap for w in watches), default=0.0), 3),
        "gap_ms": percentiles([w.max_gap for w in watches]),
        "ttfb_ms": percentiles([w.first_event_ms for w in watches if w.first_event_ms is not None]),
        "wall_s": round((now_ms() - started) / 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--ramp", type=float, default=3.0, help="seconds over which the streams are opened")
    parser.add_argument("--events", type=int, default=25, help="events each stream must deliver")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one stream may take")
    args = parser.parse_args()
    token = os.environ.get("BENCH_TOKEN", "")
    # The client's own pauses would show in every contender's figures: its descriptor table is grown at start
    # (gate.ops.fdtable: 5-20 ms at each doubling otherwise), and its collector, which would scan the 2,000
    # streams' objects while they are timed, is off for this short run.
    fdtable.prepare()
    gc.disable()
    print_json(uvloop.run(hold(args.url, token, args.streams, args.ramp, args.events, args.timeout)))


if __name__ == "__main__":
    main()
