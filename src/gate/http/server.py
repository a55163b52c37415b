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

from gate.http.deadlines import Deadline, Deadlines
from gate.http.headers import content_length, decode_fields

__all__ = ["BadBody", "BodyTooLarge", "HttpServer", "Request", "Response", "Router", "StreamResponse"]

log = logging.getLogger("gate.server")

Handler = Callable[["Request"], Awaitable["StreamResponse"]]
ErrorAnswer = Callable[[int, str], "Response"]

_CONTENT_LENGTH = istr("content-length")
_CONTENT_TYPE = istr("content-type")
_DATE = istr("date")
_EXPECT = istr("expect")
_TRANSFER_ENCODING = istr("transfer-encoding")
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})
_MAX_HEADERS = 128  # as aiohttp: real clients send a few dozen
# Bytes parsed at a time, so that parsing stops near where flow control wants it to: a body in 64 KiB slices, the
# bytes from a request's start in 8 KiB ones (a slice of tiny pipelined requests becomes that many queued objects).
_SLICE = 64 * 1024
_HEAD_SLICE = 8 * 1024
_READ_AHEAD = 64 * 1024  # body bytes kept for a running handler before it asks for them (uvicorn pauses at 64 KiB)
_REASONS = {status.value: status.phrase for status in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUSES = frozenset({204, 304})
# A connection's deadline, by phase (compared by identity).
_OFF = "off"
_HEADERS = "headers"
_IDLE = "idle"


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
    """One parsed request: method, raw target, headers; the body arrives while the handler may already run.

    The body is read off the socket as the handler asks for it (``read``), beyond a small read-ahead; the
    connection feeds it through the methods under "the connection's side" (as aiohttp's ``StreamReader``).
    """

    __slots__ = (
        "_body",
        "_body_limit",
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
        body_limit: int | None = None,
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
        self._body_limit = body_limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._body: bytes | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def content_length(self) -> int | None:
        return content_length(self.headers.get(_CONTENT_LENGTH))

    @property
    def transport(self) -> asyncio.Transport | None:
        return None if self._conn is None else self._conn.transport

    async def read(self) -> bytes:
        """The whole body (waits for the rest of it); :class:`BodyTooLarge` past the server's limit,
        :class:`BadBody` when its framing is malformed."""
        if not self.body_ended:
            conn = self._conn
            if conn is None or conn.transport is None:
                raise ConnectionResetError("the client went away")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                conn.want_body(self)  # may deliver the rest at once, from bytes held unparsed
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

    # ------------------------------------------------------------------------------------------- the connection's side

    @property
    def body_ended(self) -> bool:
        """Nothing more of the body will be kept: it is complete, over the limit, or broken."""
        return self.complete or self.too_large or self.broken

    @property
    def reading(self) -> bool:
        """The handler waits in ``read`` for the rest of the body."""
        return self._waiter is not None

    @property
    def buffered(self) -> int:
        """Body bytes received and kept that the handler has not taken yet."""
        return self._size if self._body is None and not self.too_large else 0

    def feed_body(self, data: bytes) -> None:
        if self.too_large:
            return
        self._size += len(data)
        if self._body_limit is not None and self._size > self._body_limit:
            self.refuse_body()
        else:
            self._chunks.append(data)

    def declare_chunk(self, size: int) -> None:
        """A chunk's size line declared ``size`` bytes: past the limit on its face, the body is refused at once."""
        if self._body_limit is not None and not self.too_large and self._size + size > self._body_limit:
            self.refuse_body()

    def refuse_body(self) -> None:
        self.too_large = True
        self._chunks = []
        self._wake()

    def end_body(self) -> None:
        self.complete = True
        self._wake()

    def break_body(self) -> None:
        self.broken = True
        self._wake()

    def lose_connection(self, exc: BaseException) -> None:
        self._wake(exc)

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
    with the first), ``write_eof`` the end (``end`` the last chunk and the end in one write).

    Nothing reaches the client before the first ``write`` (or ``write_eof``): until then (``head_sent`` False) a
    handler may still drop this response and answer with another, say a clean 502 when upstream broke before its
    first byte. Without a ``content_length`` the body is sent chunked (HTTP/1.1) or delimited by closing
    (HTTP/1.0). ``write`` waits while the client's socket buffer is full (``send`` + ``drain`` split the two), and
    raises ``ConnectionResetError`` once it is gone. ``send`` never waits, so it may be called outside the
    handler's task: the relay calls it from the upstream connection's callback, and only drains in its task.
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
            self.content_length = content_length(self.headers.get(_CONTENT_LENGTH))
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

    def end(self, data: bytes = b"") -> bool:
        """Write the last ``data`` (if any) and the end in one write, without waiting; True when the client is not
        keeping up (``drain`` if it must have taken them)."""
        if self.eof:
            return False
        self.eof = True
        conn = self._conn
        if conn is None or conn.transport is None:
            raise ConnectionResetError("the client went away")
        head = self._take_head(conn)
        if self._head_only:
            data = b""
        if self._chunked:
            conn.write(b"%b%x\r\n%b\r\n0\r\n\r\n" % (head, len(data), data) if data else head + b"0\r\n\r\n")
        elif head or data:
            conn.write(head + data)
        return conn.write_paused

    async def write_eof(self) -> None:
        self.end()


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


class _ChunkSizes:
    """The size each chunk of a chunked body declares, which httptools does not expose (llhttp keeps it unread).

    Why by hand: a chunk that declares more than the body limit (say 2^64-1 bytes) must be refused on its face,
    not after the body timeout. llhttp calls ``on_chunk_header`` once a size line (``HEX[;ext]`` and CRLF, no CR
    or LF inside: llhttp is strict) is complete, then hands the chunk's bytes to ``on_body``. Only the last chunk
    of a fed slice can still be open, so the slice's end is the one place to look: its size line ends exactly
    ``data`` bytes (what ``on_body`` got since that header) before the slice's end. The last ``_WINDOW`` bytes of
    the stream are kept, so that a line cut between reads (even byte by byte) is still seen whole; a longer line
    (long extensions) is left to the body limit as its bytes arrive. Trailers (after the last, empty chunk) are
    never read as a size.
    """

    __slots__ = ("_data", "_open", "_opened_here", "_tail")

    _WINDOW = 64

    def __init__(self) -> None:
        self._tail = b""
        self._open = False
        self._opened_here = False
        self._data = 0

    def start(self) -> None:
        """The headers ended: the body's first size line comes next."""
        self._open = self._opened_here = False

    def chunk_header(self) -> None:
        self._open = self._opened_here = True
        self._data = 0

    def data(self, count: int) -> None:
        self._data += count

    def chunk_complete(self) -> None:
        self._open = False

    def trailer(self) -> None:
        self._open = False  # a header after the last chunk's size line: the bytes before the end are a trailer

    def slice_end(self, piece: bytes | memoryview) -> int | None:
        """After ``piece`` was parsed: the size declared by a chunk whose header was in it and that is still open."""
        declared = None
        if self._open and self._opened_here:
            end = len(piece) - self._data  # just past the size line's CRLF
            window = bytes(piece[max(0, end - self._WINDOW) : end])
            if end < self._WINDOW:
                window = self._tail + window
            if window.endswith(b"\r\n"):
                start = window.rfind(b"\n", 0, len(window) - 2) + 1
                if start > 0:
                    digits = window[start:-2].partition(b";")[0]
                    if digits and all(c in b"0123456789abcdefABCDEF" for c in digits):
                        declared = int(digits, 16)
        self._opened_here = False
        self._tail = (self._tail + bytes(piece[-self._WINDOW :]))[-self._WINDOW :]
        return declared


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs their handlers one at a time, in order.

    Flow control: bytes are parsed only while someone wants them: the next request's headers once no request
    waits for its turn, and the running request's body up to a small read-ahead until its handler reads it. Past
    that the rest of a read is held unparsed and the socket is not read, so the client's sends block instead of
    Gate's memory growing. Deadlines: one :class:`Deadline` per connection, re-armed for the phase it is in.
    """

    __slots__ = (
        "_chunk_sizes",
        "_clock",
        "_current",
        "_deadline",
        "_drain_waiter",
        "_failed",
        "_feeding",
        "_head_sent",
        "_header_bytes",
        "_header_count",
        "_headers",
        "_held",
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
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._limit = server.max_header_size
        self.transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._header_count = 0
        self._in_request = False  # bytes of a request whose headers are not complete yet
        self._parsing: Request | None = None  # the request whose body is being parsed
        self._chunk_sizes: _ChunkSizes | None = None  # while that body is chunked
        self._queue: deque[Request | Response] = deque()  # parsed requests (or a final error) awaiting their turn
        self._current: Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._held = b""  # bytes read but not parsed: nothing wants them yet (reading is paused meanwhile)
        self._feeding = False  # inside the parser: decisions to parse more are taken by the loop in _parse
        self._deadline: Deadline | None = None
        self._clock = _OFF  # which deadline runs: request headers, keep-alive idleness, or none
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
        self._clock = _HEADERS  # a connection that never sends a request is closed at the header deadline
        self._deadline = self._server.deadlines.watch(self._server.header_timeout, self._deadline_passed)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._server.connections.discard(self)
        self._stop_clock()
        gone = ConnectionResetError("the client went away")
        for request in (self._current, self._parsing):
            if request is not None:
                request.lose_connection(gone)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(gone)
        if self._task is not None and not self._task.done():
            self._task.cancel()  # a client that goes away cancels its upstream call at once
        self._parsing = None
        self._queue.clear()
        self._held = b""
        # The parser and the deadline's callback refer back to this connection: dropping them lets reference
        # counting free a closed connection at once, not the cyclic collector (whose pauses the streams feel).
        self._parser = None
        self._deadline = None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.must_close and self._parsing is None:
            return  # the connection ends after the current answer; later bytes are not requests we will serve
        if self._held:
            self._held += data  # parsing waits (and reading is paused): keep these after the others
            self._steer_reading()
            return
        self._parse(data)

    # ------------------------------------------------------------------------------------------- flow control

    @property
    def buffered(self) -> int:
        """Bytes read from this client that no handler has taken yet: held unparsed, or kept as bodies."""
        requests = {id(r): r for r in (self._current, self._parsing, *self._queue) if isinstance(r, Request)}
        return len(self._held) + sum(request.buffered for request in requests.values())

    @property
    def queued(self) -> int:
        """Parsed requests waiting for their turn behind the running one."""
        return len(self._queue)

    def _may_parse(self) -> bool:
        """Whether the parser may take more bytes now (see the class docstring)."""
        if self._failed or self.transport is None or (self.must_close and self._parsing is None):
            return False
        request = self._parsing
        if request is None:
            return not self._queue  # the next request's headers: not while another request waits its turn
        if request is not self._current or request.too_large:
            return False  # a queued request's body waits for its handler; a refused body is not read on
        return request.reading or request.buffered < _READ_AHEAD

    def _parse(self, data: bytes) -> None:
        """Feeds ``data`` to the parser a slice at a time while it is wanted; holds the rest."""
        self._feeding = True
        try:
            if len(data) <= _HEAD_SLICE and self._may_parse():  # the common case: one read, wanted whole
                self._feed(data)
                return
            view = memoryview(data)
            offset = 0
            while offset < len(data):
                if not self._may_parse():
                    if not (self.must_close and self._parsing is None):
                        self._held = data[offset:] if offset else data
                    break
                piece = view[offset : offset + (_HEAD_SLICE if self._parsing is None else _SLICE)]
                offset += len(piece)
                if not self._feed(piece):
                    break
        finally:
            self._feeding = False
            self._steer_reading()

    def _feed(self, piece: bytes | memoryview) -> bool:
        """One slice through the parser; False when parsing ended (a protocol error, an upgrade)."""
        parser = self._parser
        if parser is None:  # the connection is gone
            return False
        try:
            parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            self.must_close = True  # Gate speaks no upgraded protocols: the request is answered, then we close
            self.on_message_complete()
            return False
        except httptools.HttpParserCallbackError as exc:  # what a callback raised is its __context__
            if isinstance(exc.__context__, _HeaderLimit):
                self._fail(431, f"The request line or headers exceed the gateway's limit of {self._limit} bytes.")
            else:
                self._fail(400, "The request is not valid HTTP/1.1.")
            return False
        except httptools.HttpParserError as exc:
            # The parser's message can quote the offending bytes (perhaps a token): only the kind is logged.
            log.info("refused a malformed HTTP request: %s", type(exc).__name__)
            self._fail(400, "The request is not valid HTTP/1.1.")
            return False
        sizes = self._chunk_sizes
        if sizes is not None:
            declared = sizes.slice_end(piece)
            if declared is not None and self._parsing is not None:
                self._parsing.declare_chunk(declared)
        return True

    def _steer_reading(self) -> None:
        """Reads the socket while parsing may go on and nothing is held; pauses it otherwise."""
        transport = self.transport
        if transport is None or self._feeding:
            return
        discarding = self.must_close and self._parsing is None and not self._failed
        paused = not discarding and (bool(self._held) or not self._may_parse())
        if paused != self._reading_paused:
            self._reading_paused = paused
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _resume_parsing(self) -> None:
        """Something may want more bytes now (a handler reads, or took its turn): parse what was held, read on."""
        if self._feeding or self.transport is None:
            return
        if self._held and self._may_parse():
            held, self._held = self._held, b""
            self._parse(held)
        else:
            self._steer_reading()

    # ------------------------------------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        self._in_request = True
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._header_count = 0
        if self._clock != _HEADERS:
            self._start_clock(_HEADERS)

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
        if self._parsing is not None:  # a trailer, after a chunked body's last chunk
            if self._chunk_sizes is not None:
                self._chunk_sizes.trailer()
            return
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_request = False
        self._stop_clock()
        if self._failed:
            return
        parser = self._parser
        assert parser is not None  # the parser is calling
        headers = decode_fields(self._headers)  # undecodable bytes survive as surrogates: auth refuses them by name
        self._headers = []
        target = self._url.decode("utf-8", "surrogateescape")
        if not target.startswith("/"):
            parsed = httptools.parse_url(self._url)  # absolute form: keep the path and query only
            target = (parsed.path or b"/").decode() + ("?" + parsed.query.decode() if parsed.query else "")
        chunked = _TRANSFER_ENCODING in headers  # llhttp accepts it only with chunked last
        version = parser.get_http_version()
        request = Request(
            self,
            parser.get_method().decode("ascii"),
            target,
            headers,
            version=version,
            # RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing: close after answering, whatever
            # Connection says (llhttp's should_keep_alive() does not apply this rule).
            keep_alive=parser.should_keep_alive() and not (chunked and version == "1.0"),
            body_limit=self._server.max_body_size,
        )
        if chunked:
            self._chunk_sizes = _ChunkSizes()
            self._chunk_sizes.start()
        self._parsing = request
        self._queue.append(request)
        if self._task is None:
            self._next()

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing.feed_body(body)
        if self._chunk_sizes is not None:
            self._chunk_sizes.data(len(body))

    def on_chunk_header(self) -> None:
        if self._chunk_sizes is not None:
            self._chunk_sizes.chunk_header()

    def on_chunk_complete(self) -> None:
        if self._chunk_sizes is not None:
            self._chunk_sizes.chunk_complete()

    def on_message_complete(self) -> None:
        request, self._parsing = self._parsing, None
        self._chunk_sizes = None
        if request is not None:
            request.end_body()

    # ------------------------------------------------------------------------------------------- requests

    @property
    def handler_task(self) -> asyncio.Task[None] | None:
        """The task answering the current request, if one runs."""
        return self._task

    def want_body(self, request: Request) -> None:
        """A handler waits for its body: a client that sent ``Expect: 100-continue`` may send it now, and bytes
        held or left on the socket are read."""
        expect = request.headers.get(_EXPECT)
        if expect is not None and expect.lower() == "100-continue" and request.version == "1.1":
            self.write(_CONTINUE)
        self._resume_parsing()

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
        self._resume_parsing()  # its body (up to the read-ahead) and the next headers may be parsed now

    async def _serve(self, request: Request) -> None:
        server = self._server
        response: StreamResponse | None = None
        try:
            handler = server.router.resolve(request)
            response = await handler(request)
        except asyncio.CancelledError:
            self._task = self._current = None  # the request refers to this connection: no cycle left behind
            raise
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.path)
            if self._head_sent:  # the client has part of an answer: end it as a broken connection would
                self._task = self._current = None
                self.abort()
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
            self.abort()
            return
        finally:
            self._task = None
            self._current = None
        if self.transport is None or self._closes_after(request):
            self._close()
        elif self._queue:
            self._next()  # the next pipelined request, or the answer to a protocol error after it
        else:
            if not self._in_request:  # else the next request's headers are arriving, under their own deadline
                self._start_clock(_IDLE)
            self._resume_parsing()

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
        """A request we cannot parse (or whose headers ran out of time): answer it after those before it, close."""
        if self._failed:
            return
        self._failed = True  # nothing after it is parsed, and the socket is no longer read
        self._stop_clock()
        parsing, self._parsing = self._parsing, None
        self._in_request = False
        self._held = b""
        if parsing is not None:
            # The headers were fine, the body's framing is not: that request's handler answers (read() raises),
            # and the connection closes after it, its body being incomplete.
            parsing.break_body()
        else:
            answer = self._server.error(status, message)
            if self._task is None and not self._queue:
                self.must_close = True
                self._write_whole(None, answer)
                self._close()
                return
            self._queue.append(answer)  # written, then the connection closed, when its turn comes
        self._steer_reading()

    def _close(self) -> None:
        self._stop_clock()
        if self.transport is not None:
            self.transport.close()  # sends what is buffered, then closes

    def abort(self) -> None:
        """Drops the connection at once (a reset): for an answer that cannot be completed, or at shutdown."""
        if self.transport is not None:
            self.transport.abort()

    def close_if_idle(self) -> bool:
        """Closes the connection when no request is in flight or waiting; True if it did."""
        if self._task is None and not self._queue and not self._in_request:
            self._close()
            return True
        return False

    # ------------------------------------------------------------------------------------------- deadlines

    def _start_clock(self, clock: str) -> None:
        self._clock = clock
        if self._deadline is not None:
            server = self._server
            self._deadline.restart(server.header_timeout if clock is _HEADERS else server.keep_alive_timeout)

    def _stop_clock(self) -> None:
        self._clock = _OFF
        if self._deadline is not None:
            self._deadline.stop()

    def _deadline_passed(self) -> None:
        """The sweep found this connection's deadline past: the request headers' (408 when part of a request came,
        after the answers before it; a silent close otherwise), or keep-alive idleness (close if idle)."""
        clock, self._clock = self._clock, _OFF
        if self.transport is None:
            return
        if clock is _HEADERS:
            log.debug("request headers did not arrive within %.1fs", self._server.header_timeout)
            if self._in_request:  # headers that trickle in (slowloris), perhaps behind a running handler
                self._fail(408, "The request headers did not arrive in time.")
            elif self._task is None and not self._queue:
                self._close()  # a connection that never sent a request
        elif clock is _IDLE:
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
        # Header and idle deadlines of every connection, on one timer: enforced within this much of their time.
        self.deadlines = Deadlines(max(min(1.0, header_timeout / 4, keep_alive_timeout / 4), 0.01))

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
        for bound in server.sockets:
            return int(bound.getsockname()[1])
        return 0

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
        tasks = [conn.handler_task for conn in self.connections if conn.handler_task is not None]
        for conn in list(self.connections):
            conn.abort()
        for task in tasks:
            task.cancel()  # their handlers still record what they cut (usage is owed for every upstream call)
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self.deadlines.close()
