"""A bare HTTP/1.1 client over asyncio streams for the probes: one request, the body handed over as it comes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from load import request_body, request_headers


def build_request(url: str, token: str, stream: bool = True, pace_ms: int | None = None) -> tuple[str, int, bytes]:
    """(host, port, raw request bytes) for a Messages API call to ``url``; ``pace_ms`` as in ``request_body``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = request_body(stream, pace_ms)
    headers = {"Host": f"{host}:{port}", **request_headers(token), "Content-Length": str(len(body))}
    head = "POST /v1/messages HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return host, port, head.encode() + body


@dataclass
class Reply:
    status: int
    keep_alive: bool


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, on_body: Callable[[bytes], None]
) -> Reply:
    """Send one request, read the whole reply; ``on_body`` gets each piece of the decoded body on arrival."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    chunked, keep_alive = False, True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"connection":
            keep_alive = value != b"close"
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then a blank line
                    pass
                break
            data = await reader.readexactly(size + 2)
            on_body(data[:-2])
    elif length is not None:
        while length > 0:
            data = await reader.read(min(length, 65536))
            if not data:
                raise ConnectionError("connection closed inside the body")
            length -= len(data)
            on_body(data)
    else:
        keep_alive = False
        while data := await reader.read(65536):
            on_body(data)
    return Reply(status, keep_alive)


def percentiles(values: list[float], points: tuple[float, ...] = (50, 90, 99, 99.9)) -> dict[str, float]:
    """Nearest-rank percentiles (and max) of ``values``, rounded to microseconds; empty if no values.

    Keys are ``p50``, ``p90``, ``p99``, ``p99.9`` and ``max``. Nearest rank: with fewer than 1,000 values p99.9 is
    the largest value, and with fewer than 100, p99 is too.
    """
    if not values:
        return {}
    ordered = sorted(values)
    out = {f"p{p:g}": ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] for p in points}
    out["max"] = ordered[-1]
    return {k: round(v, 3) for k, v in out.items()}


def now_ms() -> float:
    return time.perf_counter() * 1000.0


def print_json(data: object) -> None:
    print(json.dumps(data), flush=True)
