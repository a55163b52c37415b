"""Time to first SSE event under load: sequential stream requests spread over a window, printed as JSON.

wrk cannot see when the first byte of a stream arrives, so while wrk loads the contender this probe sends up
to ``--count`` stream requests one after another on a keep-alive connection and times, for each, the moment
the first body bytes (``event: message_start``) arrive after the request was written. The bearer token
comes from the BENCH_TOKEN environment variable, so it never shows in a process list.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import uvloop

from gate.ops import fdtable
from sse_client import build_request, exchange, now_ms, percentiles, print_json


async def probe(
    url: str, token: str, count: int, window: float, delay: float, pace_ms: int | None = None
) -> dict[str, object]:
    host, port, request = build_request(url, token, stream=True, pace_ms=pace_ms)
    await asyncio.sleep(delay)
    interval = window / count
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window
    ttfb: list[float] = []
    totals: list[float] = []
    errors: list[str] = []
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while len(ttfb) + len(errors) < count and loop.time() < deadline:
        started = loop.time()
        first: list[float] = []
        body = bytearray()

        def on_body(data: bytes, first: list[float] = first, body: bytearray = body) -> None:
            if not first:
                first.append(now_ms())
            body.extend(data[-64:])

        try:
            if writer is None or reader is None:
                reader, writer = await asyncio.open_connection(host, port)
            t0 = now_ms()
            reply = await asyncio.wait_for(exchange(reader, writer, request, on_body), timeout=30)
            t1 = now_ms()
            if reply.status != 200 or b"message_stop" not in body or not first:
                errors.append(f"status {reply.status}, complete={b'message_stop' in body}")
            else:
                ttfb.append(first[0] - t0)
                totals.append(t1 - t0)
            if not reply.keep_alive:
                writer.close()
                reader = writer = None
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors.append(type(exc).__name__)
            if writer is not None:
                writer.close()
            reader = writer = None
        await asyncio.sleep(max(0.0, interval - (loop.time() - started)))
    if writer is not None:
        writer.close()
    return {
        "count": len(ttfb),
        "errors": len(errors),
        "error_samples": errors[:3],
        "ttfb_ms": percentiles(ttfb),
        "total_ms": percentiles(totals),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--window", type=float, default=6.0, help="seconds over which to spread the probes")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds to wait first (let the load ramp)")
    parser.add_argument(
        "--pace-ms", type=int, help="ask the fake to pace the probe's events so (0: unpaced on a paced fake)"
    )
    args = parser.parse_args()
    token = os.environ.get("BENCH_TOKEN", "")
    fdtable.prepare()  # the instrument's own descriptor table never stalls it (gate.ops.fdtable)
    print_json(uvloop.run(probe(args.url, token, args.count, args.window, args.delay, args.pace_ms)))


if __name__ == "__main__":
    main()
