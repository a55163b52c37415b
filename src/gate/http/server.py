"""Gate's HTTP/1.1 server: connections on ``asyncio.Protocol``, parsed by httptools (llhttp), routed to handlers.

Why not a library's server: the relay needs only "a whole request in, bytes streamed out", and a pass-through
proxy with aiohttp's client (wrk, c=50, one pinned core; ``benchmarks/ANALYSIS.md``) served ~6,000 JSON
requests/s on aiohttp's server, ~6,400 as a raw ASGI callable on uvicorn, ~7,500 on Granian's RSGI and ~9,100 on
a bare ``asyncio.Protocol`` over the same parser: about 55 us per request that Gate's budget cannot spare. Parsing,
the part that must be exact under hostile input, stays with llhttp (Node.js's parser, via httptools, as uvicorn
uses it: it refuses smuggling shapes such as Content-Length beside chunked). This module owns only the
connection's life: keep-alive, pipelined requests answered in order, deadlines for headers and idleness, flow
control, size limits, and protocol errors answered through a callback (Gate's are in Anthropic's shape).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from ssl import SSLContext
from typing import Any, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy, istr

__all__ = ["BadBody", "BodyTooLarge", "HttpServer", "Request", "Response", "Router", "StreamResponse"]

log = logging.getLogger("gate.server")

Handler = Callable[["Request"], Awaitable["StreamResponse"]]
ErrorAnswer = Callable[[int, str], "Response"]

_CONTENT_LENGTH = istr("content-length")
_CONTENT_TYPE = istr("content-type")
_DATE = istr("date")
_EXPECT = istr("expect")
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})
_MAX_HEADERS = 128  # as aiohttp: real clients send a few dozen
_MAX_QUEUED = 16  # pipelined requests held before the connection stops reading
_REASONS = {status.value: status.phrase for status in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUSES = frozenset({204, 304})


class BodyTooLarge(Exception):
    """The request body exceeds the server's ``max_body_size``; it was not kept."""


class BadBody(Exception):
    """The request body's framing is broken (say, a malformed chunk size); the connection will close."""


class _HeaderLimit(Exception):
    """Raised from a parser callback: the request line or headers exceed the limits."""


class _DateCache:
    """The ``Date`` header value, formatted at most once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def get(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True)
        return self._value


_DATES = _DateCache()


class Request:
    """One parsed request: method, raw target, headers; the body arrives while the handler may already run."""

    __slots__ = (
        "_body",
        "_chunks",
        "_conn",
        "_size",
        "_waiter",
        "broken",
        "complete",
        "headers",
        "keep_alive",
        "match_info",
        "method",
        "path",
        "path_qs",
        "too_large",
        "version",
    )

    def __init__(
        self,
        conn: _Connection | None,
        method: str,
        path_qs: str,
        headers: CIMultiDictProxy[str],
        *,
        version: str = "1.1",
        keep_alive: bool = True,
    ) -> None:
        self._conn = conn
        self.method = method
        self.path_qs = path_qs  # the request target as sent (origin form), forwarded upstream unchanged
        self.path = path_qs.partition("?")[0]
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.match_info: dict[str, str] = {}
        self.complete = False  # the whole body has arrived
        self.too_large = False
        self.broken = False  # the body's framing was malformed
        self._chunks: list[bytes] = []
        self._size = 0
        self._body: bytes | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def content_length(self) -> int | None:
        value = self.headers.get(_CONTENT_LENGTH)
        return int(value) if value is not None and value.isdigit() else None

    @property
    def transport(self) -> asyncio.Transport | None:
        return None if self._conn is None else self._conn.transport

    async def read(self) -> bytes:
        """The whole body (waits for the rest of it); :class:`BodyTooLarge` past the server's limit,
        :class:`BadBody` when its framing is malformed."""
        if not self.complete and not self.too_large and not self.broken:
            if self._conn is None or self._conn.transport is None:
                raise ConnectionResetError("the client went away")
            self._conn.continue_body(self)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.too_large:
            raise BodyTooLarge()
        if self.broken:
            raise BadBody()
        if self._body is None:
            self._body = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
            self._chunks = []
        return self._body

    def _feed(self, data: bytes, limit: int) -> None:
        if self.too_large:
            return
        self._size += len(data)
        if self._size > limit:
            self.too_large = True
            self._chunks = []
            self._wake()
        else:
            self._chunks.append(data)

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _wake(self, exc: BaseException | None = None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)


def _header_items(headers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> CIMultiDict[str]:
    if headers is None:
        return CIMultiDict()
    if isinstance(headers, CIMultiDict):
        return headers
    return CIMultiDict(headers)


class StreamResponse:
    """A response written as it goes: ``prepare`` fixes status and headers, ``write`` sends each chunk (the head
    with the first), ``write_eof`` the end.

    Nothing reaches the client before the first ``write`` (or ``write_eof``): until then (``head_sent`` False) a
    handler may still drop this response and answer with another, say a clean 502 when upstream broke before its
    first byte. Without a ``content_length`` the body is sent chunked (HTTP/1.1) or delimited by closing
    (HTTP/1.0). ``write`` waits while the client's socket buffer is full (``send`` + ``drain`` split the two), and
    raises ``ConnectionResetError`` once it is gone.
    """

    __slots__ = (
        "_chunked",
        "_conn",
        "_head_only",
        "_request",
        "content_length",
        "eof",
        "headers",
        "prepared",
        "status",
    )

    def __init__(
        self, *, status: int = 200, headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None
    ) -> None:
        self.status = status
        self.headers = _header_items(headers)
        self.content_length: int | None = None
        self.prepared = False
        self.eof = False
        self._conn: _Connection | None = None
        self._chunked = False
        self._head_only = False
        self._request: Request | None = None  # set from ``prepare`` until the head goes out with the first bytes

    @property
    def head_sent(self) -> bool:
        """Whether the client has (been sent) the status line: from then on no other answer is possible."""
        return self.prepared and self._request is None

    async def prepare(self, request: Request) -> None:
        conn = request._conn
        if conn is None or conn.transport is None:
            raise ConnectionResetError("the client went away")
        self._conn = conn
        self._head_only = request.method == "HEAD"
        if self.content_length is None:  # a relayed Content-Length frames the body (the head writes it once)
            given = self.headers.get(_CONTENT_LENGTH)
            if given is not None and given.isdigit():
                self.content_length = int(given)
        if self.content_length is None and self.status not in _NO_BODY_STATUSES and not self._head_only:
            self._chunked = request.version == "1.1"  # else delimited by closing: the head says so
        self.prepared = True
        self._request = request

    def _take_head(self, conn: _Connection) -> bytes:
        request, self._request = self._request, None
        if request is None:
            return b""
        return conn.head(request, self.status, self.headers, self.content_length, chunked=self._chunked)

    def send(self, data: bytes) -> bool:
        """Write ``data`` without waiting; True when the client is not keeping up (``drain`` before more)."""
        conn = self._conn
        if conn is None or conn.transport is None:
            raise ConnectionResetError("the client went away")
        if not data or self._head_only:
            return False
        head = self._take_head(conn)
        if self._chunked:
            conn.write(b"%b%x\r\n%b\r\n" % (head, len(data), data))
        else:
            conn.write(head + data if head else data)
        return conn.write_paused

    async def drain(self) -> None:
        """Wait until the client has taken what was sent (ConnectionResetError once it is gone)."""
        conn = self._conn
        if conn is None:
            raise ConnectionResetError("the client went away")
        await conn.drain()

    async def write(self, data: bytes) -> None:
        if self.send(data):
            await self.drain()

    async def write_eof(self) -> None:
        if self.eof:
            return
        self.eof = True
        conn = self._conn
        if conn is None or conn.transport is None:
            raise ConnectionResetError("the client went away")
        head = self._take_head(conn)
        if self._chunked:
            conn.write(head + b"0\r\n\r\n")
        elif head:
            conn.write(head)


class Response(StreamResponse):
    """A response whose body is known: the server sends head and body in one write once the handler returns."""

    __slots__ = ("body",)

    def __init__(
        self,
        *,
        status: int = 200,
        body: bytes = b"",
        text: str | None = None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        content_type: str | None = None,
    ) -> None:
        super().__init__(status=status, headers=headers)
        if text is not None:
            body = text.encode()
            if content_type is not None and "charset" not in content_type:
                content_type += "; charset=utf-8"
        self.body = body
        if content_type is not None:
            self.headers[_CONTENT_TYPE] = content_type


class Router:
    """Exact paths, plus one-segment parameters under a prefix (``/v1/models/{id}``); the rest goes to a fallback."""

    def __init__(self, fallback: Handler) -> None:
        self._fallback = fallback
        self._exact: dict[str, dict[str, Handler]] = {}
        self._params: list[tuple[str, str, dict[str, Handler]]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._exact.setdefault(path, {})[method] = handler

    def add_param(self, method: str, prefix: str, name: str, handler: Handler) -> None:
        for known_prefix, known_name, methods in self._params:
            if known_prefix == prefix and known_name == name:
                methods[method] = handler
                return
        self._params.append((prefix, name, {method: handler}))

    def resolve(self, request: Request) -> Handler:
        methods = self._exact.get(request.path)
        if methods is not None:
            return methods.get(request.method, self._fallback)
        for prefix, name, methods in self._params:
            if request.path.startswith(prefix):
                value = request.path[len(prefix) :]
                if value and "/" not in value and request.method in methods:
                    request.match_info = {name: value}
                    return methods[request.method]
        return self._fallback


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs their handlers one at a time, in order."""

    __slots__ = (
        "_current",
        "_drain_waiter",
        "_failed",
        "_head_sent",
        "_header_bytes",
        "_header_count",
        "_headers",
        "_headers_since",
        "_idle_since",
        "_in_request",
        "_limit",
        "_loop",
        "_parser",
        "_parsing",
        "_queue",
        "_reading_paused",
        "_server",
        "_task",
        "_url",
        "must_close",
        "transport",
        "write_paused",
    )

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self._limit = server.max_header_size
        self.transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._header_count = 0
        self._in_request = False  # bytes of a request whose headers are not complete yet
        self._parsing: Request | None = None  # the request whose body is being parsed
        self._queue: deque[Request | Response] = deque()  # parsed requests (or a final error) awaiting their turn
        self._current: Request | None = None
        self._task: asyncio.Task[None] | None = None
        # Deadlines are loop times checked by the server's sweep (one timer per server, not two per request).
        self._headers_since: float | None = None  # waiting for a request's headers since then
        self._idle_since: float | None = None  # idle between requests since then
        self._reading_paused = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.must_close = False  # close once the current response is complete
        self._failed = False  # a protocol error was answered (or queued): nothing after it is parsed
        self._head_sent = False  # the current request's response has begun

    # ------------------------------------------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._server.connections.add(self)
        self._start_header_clock()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._server.connections.discard(self)
        self._stop_header_clock()
        self._stop_idle_clock()
        gone = ConnectionResetError("the client went away")
        for request in (self._current, self._parsing):
            if request is not None:
                request._wake(gone)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(gone)
        if self._task is not None and not self._task.done():
            self._task.cancel()  # a client that goes away cancels its upstream call at once
        self._queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.must_close and self._parsing is None:
            return  # the connection ends after the current answer; later bytes are not requests we will serve
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.must_close = True  # Gate speaks no upgraded protocols: the request is answered, then we close
            self.on_message_complete()
        except httptools.HttpParserCallbackError as exc:  # what a callback raised is its __context__
            if isinstance(exc.__context__, _HeaderLimit):
                self._fail(431, f"The request line or headers exceed the gateway's limit of {self._limit} bytes.")
            else:
                self._fail(400, "The request is not valid HTTP/1.1.")
        except httptools.HttpParserError as exc:
            # The parser's message can quote the offending bytes (perhaps a token): only the kind is logged.
            log.info("refused a malformed HTTP request: %s", type(exc).__name__)
            self._fail(400, "The request is not valid HTTP/1.1.")

    # ------------------------------------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        self._in_request = True
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._header_count = 0
        self._idle_since = None
        if self._headers_since is None:
            self._start_header_clock()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limit:
            raise _HeaderLimit()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value)
        if (
            len(name) + len(value) > self._limit
            or self._header_count > _MAX_HEADERS
            or self._header_bytes > 2 * self._limit
        ):
            raise _HeaderLimit()
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_request = False
        self._stop_header_clock()
        if self._failed:
            return
        parser = self._parser
        # As aiohttp does: undecodable bytes survive as surrogates, so auth can refuse them by name.
        headers = CIMultiDictProxy(
            CIMultiDict(
                [(name.decode("latin-1"), value.decode("utf-8", "surrogateescape")) for name, value in self._headers]
            )
        )
        self._headers = []
        target = self._url.decode("utf-8", "surrogateescape")
        if not target.startswith("/"):
            parsed = httptools.parse_url(self._url)  # absolute form: keep the path and query only
            target = (parsed.path or b"/").decode() + ("?" + parsed.query.decode() if parsed.query else "")
        request = Request(
            self,
            parser.get_method().decode("ascii"),
            target,
            headers,
            version=parser.get_http_version(),
            keep_alive=parser.should_keep_alive(),
        )
        self._parsing = request
        self._queue.append(request)
        if self._task is None:
            self._next()
        elif len(self._queue) > _MAX_QUEUED and self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing._feed(body, self._server.max_body_size)

    def on_message_complete(self) -> None:
        request, self._parsing = self._parsing, None
        if request is not None:
            request._finish()

    # ------------------------------------------------------------------------------------------- requests

    def continue_body(self, request: Request) -> None:
        """A handler waits for the body: a client that sent ``Expect: 100-continue`` may send it now."""
        expect = request.headers.get(_EXPECT)
        if expect is not None and expect.lower() == "100-continue" and request.version == "1.1":
            self.write(_CONTINUE)

    def _next(self) -> None:
        if not self._queue or self.transport is None:
            return
        item = self._queue.popleft()
        if isinstance(item, Response):  # a protocol error after earlier pipelined requests
            self.must_close = True
            self._write_whole(None, item)
            self._close()
            return
        self._current = item
        self._head_sent = False
        self._task = self._loop.create_task(self._serve(item))
        if self._reading_paused and len(self._queue) <= _MAX_QUEUED // 2 and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    async def _serve(self, request: Request) -> None:
        server = self._server
        response: StreamResponse | None = None
        try:
            handler = server.router.resolve(request)
            response = await handler(request)
        except asyncio.CancelledError:
            self._task = None
            raise
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.path)
            if self._head_sent:  # the client has part of an answer: end it as a broken connection would
                self._task = self._current = None
                self._abort()
                return
            response = server.error(500, "The gateway failed to answer this request.")
        try:
            if self.transport is None:
                return
            if isinstance(response, Response) and not response.prepared:
                self._write_whole(request, response)
            elif not response.prepared:
                raise RuntimeError("a handler returned a stream response it never prepared")
            elif not response.eof:
                await response.write_eof()
        except Exception:
            log.exception("unhandled error finishing %s %s", request.method, request.path)
            self._abort()
            return
        finally:
            self._task = None
            self._current = None
        if self.transport is None or self._closes_after(request):
            self._close()
        elif self._queue:
            self._next()
        else:
            self._start_idle_clock()

    # ------------------------------------------------------------------------------------------- writing

    def head(
        self,
        request: Request | None,
        status: int,
        headers: CIMultiDict[str],
        length: int | None,
        *,
        chunked: bool,
    ) -> bytes:
        """Status line and headers, with framing, ``Date``, and ``Connection: close`` on a last answer."""
        self._head_sent = True
        head_only = request is not None and request.method == "HEAD"
        if length is None and not chunked and status not in _NO_BODY_STATUSES and not head_only:
            self.must_close = True  # an HTTP/1.0 body without a length ends when the connection does
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
        for name, value in headers.items():
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                continue  # never let a header value split the response
            if name.lower() in _FRAMING:
                continue  # the framing below is the one this response is sent with
            lines.append(f"{name}: {value}\r\n")
        if _DATE not in headers:
            lines.append(f"Date: {_DATES.get()}\r\n")
        if length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        elif chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        if self._closes_after(request):
            self.must_close = True
            lines.append("Connection: close\r\n")
        elif request is not None and request.version == "1.0":
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    def _closes_after(self, request: Request | None) -> bool:
        return (
            request is None
            or self.must_close
            or not request.keep_alive
            or not request.complete
            or self._server.draining
        )

    def _write_whole(self, request: Request | None, response: Response) -> None:
        body = response.body
        status = response.status
        response.prepared = response.eof = True
        if status in _NO_BODY_STATUSES:
            self.write(self.head(request, status, response.headers, None, chunked=False))
            return
        head = self.head(request, status, response.headers, len(body), chunked=False)
        if request is not None and request.method == "HEAD":
            self.write(head)
        else:
            self.write(head + body)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.transport is None:
            raise ConnectionResetError("the client went away")
        if not self.write_paused:
            return
        self._drain_waiter = self._loop.create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    # ------------------------------------------------------------------------------------------- ending

    def _fail(self, status: int, message: str) -> None:
        """A request we cannot parse: answer it (after those before it) and close."""
        if self._failed:
            return
        self._failed = True
        self._stop_header_clock()
        parsing, self._parsing = self._parsing, None
        self._in_request = False
        self.must_close = True
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        if parsing is not None:
            # The headers were fine, the body's framing is not: that request's handler answers (read() raises).
            parsing.broken = True
            parsing._wake()
            return
        answer = self._server.error(status, message)
        if self._task is None and not self._queue:
            self._write_whole(None, answer)
            self._close()
        else:
            self._queue.append(answer)

    def _close(self) -> None:
        self._stop_header_clock()
        self._stop_idle_clock()
        if self.transport is not None:
            self.transport.close()  # sends what is buffered, then closes

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close_if_idle(self) -> bool:
        """Closes the connection when no request is in flight or waiting; True if it did."""
        if self._task is None and not self._queue and not self._in_request:
            self._close()
            return True
        return False

    def _start_header_clock(self) -> None:
        self._headers_since = self._loop.time()

    def _stop_header_clock(self) -> None:
        self._headers_since = None

    def _header_clock_ran_out(self) -> None:
        """Headers that trickle in (slowloris) hold a connection only this long; a silent one is just closed."""
        self._headers_since = None
        if self.transport is None or self._task is not None:
            return
        if self._in_request:
            self.must_close = True
            self._write_whole(None, self._server.error(408, "The request headers did not arrive in time."))
        log.debug("closed a connection whose request headers did not arrive within %.1fs", self._server.header_timeout)
        self._close()

    def _start_idle_clock(self) -> None:
        self._idle_since = self._loop.time()

    def _stop_idle_clock(self) -> None:
        self._idle_since = None

    def check_deadlines(self, now: float) -> None:
        """Called by the server's sweep: enforce the header deadline and the keep-alive idle time."""
        since = self._headers_since
        if since is not None and now - since >= self._server.header_timeout:
            self._header_clock_ran_out()
            return
        since = self._idle_since
        if since is not None and now - since >= self._server.keep_alive_timeout:
            self._idle_since = None
            self.close_if_idle()


class HttpServer:
    """The protocol factory and the set of live connections; ``shutdown`` drains them."""

    def __init__(
        self,
        router: Router,
        *,
        error: ErrorAnswer,
        max_body_size: int,
        max_header_size: int,
        header_timeout: float,
        keep_alive_timeout: float,
    ) -> None:
        self.router = router
        self.error = error
        self.max_body_size = max_body_size
        self.max_header_size = max_header_size
        self.header_timeout = header_timeout
        self.keep_alive_timeout = keep_alive_timeout
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.draining = False
        self._servers: list[asyncio.Server] = []
        # Deadlines are enforced this often (so within this much of their time), by one timer for all connections.
        self._sweep_every = max(min(1.0, header_timeout / 4, keep_alive_timeout / 4), 0.01)
        self._sweep: asyncio.TimerHandle | None = None

    def __call__(self) -> _Connection:
        return _Connection(self)

    async def listen(
        self,
        host: str | None = None,
        port: int = 0,
        *,
        sock: Any = None,
        reuse_port: bool = False,
        backlog: int = 1024,
        ssl: SSLContext | None = None,
    ) -> int:
        """Starts accepting (over TLS with ``ssl``); returns the bound port."""
        # A TLS handshake gets the header deadline: connection_made, where the header clock starts, follows it.
        tls: dict[str, Any] = {"ssl": ssl, "ssl_handshake_timeout": self.header_timeout} if ssl is not None else {}
        if sock is not None:
            server = await self.loop.create_server(self, sock=sock, backlog=backlog, **tls)
        else:
            server = await self.loop.create_server(self, host, port, reuse_port=reuse_port, backlog=backlog, **tls)
        self._servers.append(server)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self._sweep_every, self._check_deadlines)
        for bound in server.sockets:
            return int(bound.getsockname()[1])
        return 0

    def _check_deadlines(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            conn.check_deadlines(now)
        self._sweep = self.loop.call_later(self._sweep_every, self._check_deadlines)

    async def shutdown(self, grace: float) -> None:
        """Stops accepting, closes idle connections, lets in-flight requests finish for ``grace`` seconds."""
        self.draining = True
        for server in self._servers:
            server.close()
        deadline = self.loop.time() + grace
        while True:
            busy = [conn for conn in list(self.connections) if not conn.close_if_idle()]
            if not busy or self.loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        tasks = [conn._task for conn in self.connections if conn._task is not None]
        for conn in list(self.connections):
            conn._abort()
        for task in tasks:
            task.cancel()  # their handlers still record what they cut (usage is owed for every upstream call)
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
