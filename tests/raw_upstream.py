"""Upstreams that misbehave on the wire, for the upstream client's hostile-input tests.

``RawUpstream`` answers each request with bytes a test scripts (anything: a 101, a header of 200 KB, a body
longer than its Content-Length, a second answer later) and can close connections that stay idle, as a load
balancer does. ``DelayProxy`` adds latency each way, FIN and RST included, to widen a race as a real network does.
Both run on a ``BackgroundLoop`` of their own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import httptools

from tests.harness import BackgroundLoop

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class RawRequest:
    method: str
    path: str
    body: bytes


Answer = Callable[[RawRequest], bytes]


def http_response(
    body: bytes,
    *,
    status: str = "200 OK",
    headers: list[tuple[str, str]] | None = None,
    content_type: str = "application/json",
    length: int | None = None,
) -> bytes:
    """A response's bytes: status line, headers (Content-Length ``length``, else the body's), body."""
    lines = [f"HTTP/1.1 {status}", f"Content-Type: {content_type}", "request-id: req_raw_1"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    lines.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def message_json() -> bytes:
    return (FIXTURES / "message-basic.json").read_bytes()


def json_message(_: RawRequest) -> bytes:
    """A plain 200 with the documented Messages example."""
    return http_response(message_json())


def error_body(message: str = "boom") -> bytes:
    return json.dumps({"type": "error", "error": {"type": "api_error", "message": message}}).encode()


class _Conn(asyncio.Protocol):
    def __init__(self, upstream: RawUpstream) -> None:
        self._upstream = upstream
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._upstream.connections += 1
        self._upstream.open.add(self._transport)
        # The idle clock starts at the first answer: a new connection is never closed under its first request, even
        # when a loaded machine stalls the request past the idle limit (the race under test is on reused ones).

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_idle()
        if self._transport is not None:
            self._upstream.open.discard(self._transport)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._stop_idle()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.abort()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        request = RawRequest(self._parser.get_method().decode(), self._url.decode(), b"".join(self._body))
        self._url, self._body = b"", []
        self._upstream.requests.append(request)
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        answer = self._upstream.answer(request)
        self._upstream.answered += 1  # counted before the write, so a client that has the answer sees the count
        transport.write(answer)
        if self._upstream.close_after_answer or len(self._upstream.requests) in self._upstream.close_after:
            transport.close()
        for later, data in self._upstream.later:
            asyncio.get_running_loop().call_later(later, self._write_later, data)
        self._start_idle()

    def _write_later(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _start_idle(self) -> None:
        if self._upstream.idle_close is not None:
            loop = asyncio.get_running_loop()
            self._idle = loop.call_later(self._upstream.idle_close, self._close_idle)

    def _stop_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _close_idle(self) -> None:
        self._idle = None
        if self._transport is not None:
            self._upstream.idle_closed += 1
            self._transport.close()


@dataclass
class RawUpstream:
    """``answer`` scripts every response; ``idle_close`` closes a connection idle that long after its last answer;
    ``later`` writes extra bytes that many seconds after each answer; ``close_after_answer`` ends each connection
    after its answer, ``close_after`` only those of the requests with these numbers (counted from 1)."""

    answer: Answer = json_message
    idle_close: float | None = None
    later: list[tuple[float, bytes]] = field(default_factory=list)
    close_after_answer: bool = False
    close_after: set[int] = field(default_factory=set)  # close the connection after answering these requests (1-based)
    requests: list[RawRequest] = field(default_factory=list)
    answered: int = 0
    connections: int = 0
    idle_closed: int = 0
    open: set[asyncio.Transport] = field(default_factory=set)
    port: int = 0
    _bg: BackgroundLoop | None = None
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RawUpstream:
        self._bg = BackgroundLoop()

        async def listen() -> int:
            self._server = await asyncio.get_running_loop().create_server(lambda: _Conn(self), "127.0.0.1", 0)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = self._bg.run(listen())
        return self

    def stop(self) -> None:
        assert self._bg is not None

        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            for transport in list(self.open):
                transport.abort()

        self._bg.run(shut())
        self._bg.close()


class DelayProxy:
    """A TCP proxy that delivers every byte, and every FIN or RST, ``delay`` seconds after it arrived (each way)."""

    def __init__(self, target_port: int, delay: float) -> None:
        self._target_port = target_port
        self._delay = delay
        self._bg = BackgroundLoop()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DelayProxy:
        async def listen() -> int:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = self._bg.run(listen())
        return self

    def stop(self) -> None:
        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        self._bg.run(shut())
        self._bg.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            writer.transport.abort()
            return
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Bytes, then the end (FIN as close, a reset as abort), each delivered ``delay`` after it came."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes | None, bool]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data, reset = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if data is None:
                    if reset:
                        writer.transport.abort()
                    else:
                        writer.close()
                    return
                writer.write(data)

        delivering = asyncio.ensure_future(deliver())
        try:
            while True:
                try:
                    data = await reader.read(65536)
                except (ConnectionError, OSError):
                    queue.put_nowait((loop.time() + self._delay, None, True))
                    break
                queue.put_nowait((loop.time() + self._delay, data or None, False))
                if not data:
                    break
            await delivering
        except asyncio.CancelledError:
            delivering.cancel()
            writer.transport.abort()
            raise
        except (ConnectionError, OSError):
            writer.transport.abort()
