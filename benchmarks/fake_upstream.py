"""A fast fake Anthropic upstream for benchmarks: raw asyncio.Protocol on uvloop, HTTP/1.1 keep-alive.

Answers ``POST /v1/messages`` with a ~600-byte JSON message, or (when the body holds ``"stream":true``) with a
chunked SSE stream of 25 events in Anthropic's wire format, optionally paced per event (``--pace-ms``, or
``bench-pace-ms=N`` anywhere in the request body, which every proxy forwards verbatim); ``GET /v1/models``;
``GET /_stats`` (request counters, for checking that a proxy really reached us). Every response is precomputed:
memory stays constant whatever the load.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
from collections import Counter
from collections.abc import Mapping
from typing import cast

from gate.ops import fdtable

MODEL = "claude-sonnet-4-5-20250929"
STREAM_MARKERS = (b'"stream":true', b'"stream": true')
PACE_MARKER = b"bench-pace-ms="
MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024
MAX_KEY_COUNTERS = 16  # distinct x-api-key values counted; bounded so memory stays constant

_compact = json.JSONEncoder(separators=(",", ":")).encode


def message_json() -> bytes:
    """A non-streaming response in the shape Anthropic sends, about 600 bytes."""
    body = {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [
            {
                "type": "text",
                "text": "Hello! This is a benchmark reply from the fake upstream. It is about as long as a "
                "short answer from Claude, so proxies relay a realistic number of bytes per call.",
            }
        ],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 412,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 58,
            "service_tier": "standard",
        },
    }
    return _compact(body).encode()


def sse_events() -> list[bytes]:
    """25 SSE events: message_start, content_block_start, ping, 19 deltas, stop, message_delta, message_stop."""

    def event(name: str, data: Mapping[str, object]) -> bytes:
        return f"event: {name}\ndata: {_compact(data)}\n\n".encode()

    start = {
        "type": "message_start",
        "message": {
            "id": "msg_01StreamBenchFakeUpstream0001",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 412,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                "output_tokens": 1,
                "service_tier": "standard",
            },
        },
    }
    words = [
        "Hello",
        "there,",
        "this",
        "is",
        "a",
        "streamed",
        "benchmark",
        "answer",
        "made",
        "of",
        "small",
        "deltas",
        "from",
        "a",
        "fake",
    ]
    events = [
        event("message_start", start),
        event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        b'event: ping\ndata: {"type": "ping"}\n\n',
    ]
    for i in range(19):
        text = words[i % len(words)] + " "
        events.append(
            event(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
            )
        )
    events += [
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {
                    "input_tokens": 412,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                    "output_tokens": 58,
                },
            },
        ),
        event("message_stop", {"type": "message_stop"}),
    ]
    return events


MODELS_JSON = _compact(
    {
        "data": [
            {"type": "model", "id": MODEL, "display_name": "Claude Sonnet 4.5", "created_at": "2025-09-29T00:00:00Z"}
        ],
        "has_more": False,
        "first_id": MODEL,
        "last_id": MODEL,
    }
).encode()


def requested_pace(body: bytes, default: float) -> float:
    """Seconds between events: ``bench-pace-ms=N`` in the body wins over ``--pace-ms``."""
    at = body.find(PACE_MARKER)
    if at < 0:
        return default
    start = end = at + len(PACE_MARKER)
    while end < len(body) and body[end] in b"0123456789":
        end += 1
    return int(body[start:end]) / 1000.0 if end > start else default


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Responses:
    """Every byte the fake ever sends, built once."""

    def __init__(self, pace: float, json_delay: float) -> None:
        self.pace = pace
        self.json_delay = json_delay
        self.message = message_json()
        self.stream_chunks = [_chunk(e) for e in sse_events()]
        self.stream_tail = b"0\r\n\r\n"
        self.stream_body = b"".join(self.stream_chunks) + self.stream_tail
        self.ids = itertools.count(1)
        self.stats: Counter[str] = Counter()
        self.keys: Counter[str] = Counter()

    def head(self, status: str, content_type: bytes, length: int | None, close: bool) -> bytes:
        framing = b"transfer-encoding: chunked\r\n" if length is None else b"content-length: %d\r\n" % length
        return (
            b"HTTP/1.1 "
            + status.encode()
            + b"\r\ncontent-type: "
            + content_type
            + b"\r\n"
            + framing
            + b"request-id: req_bench%016x\r\n" % next(self.ids)
            + (b"connection: close\r\n" if close else b"")
            + b"\r\n"
        )


class FakeAnthropic(asyncio.Protocol):
    """One client connection: parse requests (content-length or chunked bodies), answer them in order."""

    def __init__(self, responses: Responses) -> None:
        self.r = responses
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False  # a paced stream or delayed reply is being written; later requests wait
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self.process()

    def process(self) -> None:
        try:
            self.parse_and_answer()
        except ValueError:  # a content-length or chunk size that is not a number
            self.fail(b"400 Bad Request")

    def parse_and_answer(self) -> None:
        while self.transport is not None and not self.busy:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self.fail(b"431 Request Header Fields Too Large")
                return
            head = bytes(self.buf[:end])
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                self.fail(b"400 Bad Request")
                return
            method, target, version = parts
            length, chunked, close, api_key = 0, False, version == b"HTTP/1.0", b""
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    low = value.strip().lower()
                    close = low == b"close" or (close and low != b"keep-alive")
                elif name == b"x-api-key":
                    api_key = value.strip()
            start = end + 4
            if chunked:
                parsed = self.dechunk(start)
                if parsed is None:
                    return
                body, consumed = parsed
            else:
                if length > MAX_BODY:
                    self.fail(b"413 Payload Too Large")
                    return
                if len(self.buf) - start < length:
                    return
                body, consumed = bytes(self.buf[start : start + length]), start + length
            del self.buf[:consumed]
            self.count_key(api_key)
            self.respond(method, target.split(b"?", 1)[0], body, close)

    def dechunk(self, pos: int) -> tuple[bytes, int] | None:
        """The decoded body and the bytes consumed, or None if the body has not all arrived yet."""
        out = bytearray()
        while True:
            eol = self.buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(self.buf[pos:eol]).split(b";", 1)[0], 16)
            if size == 0:  # then optional trailers, then a blank line
                trailer_end = self.buf.find(b"\r\n\r\n", eol)
                return None if trailer_end < 0 else (bytes(out), trailer_end + 4)
            if len(self.buf) < eol + 2 + size + 2:
                return None
            out += self.buf[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2
            if len(out) > MAX_BODY:
                self.fail(b"413 Payload Too Large")
                return None

    def count_key(self, api_key: bytes) -> None:
        if not api_key:
            return
        tag = "..." + api_key[-2:].decode("ascii", "replace")  # never keep a whole key, even a fake one
        if tag in self.r.keys or len(self.r.keys) < MAX_KEY_COUNTERS:
            self.r.keys[tag] += 1

    def respond(self, method: bytes, path: bytes, body: bytes, close: bool) -> None:
        r, transport = self.r, self.transport
        assert transport is not None
        if method == b"POST" and path == b"/v1/messages":
            r.stats["messages"] += 1
            if STREAM_MARKERS[0] in body or STREAM_MARKERS[1] in body:
                r.stats["streams"] += 1
                pace = requested_pace(body, r.pace)
                if pace > 0:
                    transport.write(r.head("200 OK", b"text/event-stream; charset=utf-8", None, close))
                    self.busy = True
                    self.paced(0, close, pace)
                else:
                    transport.write(r.head("200 OK", b"text/event-stream; charset=utf-8", None, close) + r.stream_body)
                    self.finish(close)
                return
            if r.json_delay > 0:
                self.busy = True
                self.timer = self.loop.call_later(r.json_delay, self.delayed_json, close)
                return
            transport.write(r.head("200 OK", b"application/json", len(r.message), close) + r.message)
        elif method == b"POST" and path == b"/v1/messages/count_tokens":
            r.stats["count_tokens"] += 1
            reply = b'{"input_tokens":412}'
            transport.write(r.head("200 OK", b"application/json", len(reply), close) + reply)
        elif method == b"GET" and path == b"/v1/models":
            r.stats["models"] += 1
            transport.write(r.head("200 OK", b"application/json", len(MODELS_JSON), close) + MODELS_JSON)
        elif method == b"GET" and path == b"/_stats":
            reply = json.dumps({"requests": dict(r.stats), "keys": dict(r.keys)}).encode()
            transport.write(r.head("200 OK", b"application/json", len(reply), close) + reply)
        else:
            r.stats["not_found"] += 1
            reply = (
                b'{"type":"error","error":{"type":"not_found_error","message":"Not found"},'
                b'"request_id":"req_bench_404"}'
            )
            transport.write(r.head("404 Not Found", b"application/json", len(reply), close) + reply)
        self.finish(close)

    def delayed_json(self, close: bool) -> None:
        self.timer = None
        if self.transport is None:
            return
        self.transport.write(self.r.head("200 OK", b"application/json", len(self.r.message), close) + self.r.message)
        self.busy = False
        self.finish(close)
        self.process()

    def paced(self, index: int, close: bool, pace: float) -> None:
        self.timer = None
        transport = self.transport
        if transport is None:
            return
        chunks = self.r.stream_chunks
        if index < len(chunks) - 1:
            transport.write(chunks[index])
            self.timer = self.loop.call_later(pace, self.paced, index + 1, close, pace)
            return
        transport.write(chunks[index] + self.r.stream_tail)
        self.busy = False
        self.finish(close)
        self.process()

    def finish(self, close: bool) -> None:
        if close and self.transport is not None:
            self.transport.close()
            self.transport = None

    def fail(self, status: bytes) -> None:
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()
            self.transport = None


async def serve(host: str, port: int, pace_ms: float, json_delay_ms: float) -> None:
    loop = asyncio.get_running_loop()
    responses = Responses(pace_ms / 1000.0, json_delay_ms / 1000.0)
    server = await loop.create_server(lambda: FakeAnthropic(responses), host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake upstream on http://{host}:{port} pid {os.getpid()} pace {pace_ms} ms", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--pace-ms", type=float, default=0.0, help="delay between SSE events")
    parser.add_argument("--json-delay-ms", type=float, default=0.0, help="delay before a JSON reply")
    args = parser.parse_args(argv)
    # Every contender's streams phase opens 2,000 connections here: the table grows at start, not at each
    # doubling (this process has libuv's resolver threads, so each doubling would stall it; see gate.ops.fdtable).
    fdtable.prepare()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port, args.pace_ms, args.json_delay_ms))
    else:
        uvloop.run(serve(args.host, args.port, args.pace_ms, args.json_delay_ms))


if __name__ == "__main__":
    main()
