"""The pooled HTTP/1.1 client to one upstream origin: keep-alive connections on ``asyncio.Protocol``, responses
parsed by httptools (llhttp), TLS from the standard library, an egress proxy by CONNECT (or absolute form for
plain HTTP).

Why not aiohttp's client, which Gate used first: on the benchmark rig a pass-through proxy on a bare server went
from ~9,100 to ~20,000 JSON requests/s on one core when aiohttp's ``ClientSession`` gave way to a bare
protocol on the same parser (``benchmarks/ANALYSIS.md``): about 60 us per call, a third of Gate's whole budget,
spent on machinery a gateway to a single origin does not use (cookies, redirects, auth helpers, payload
registries, tracing hooks, per-request URL and timer objects). What must be exact, the response framing, stays
with llhttp; this module owns the pool, the request bytes, flow control of response bodies, and the limits on
what upstream may send.

When a request is sent twice. Servers, load balancers and egress proxies close keep-alive connections that
stayed idle, and a request written as the close is on its way meets a connection that is gone. So ``Pool.request``
sends a request a second time, once, on a newly opened connection, exactly when all of these hold:

- the first attempt went out on a connection reused from the pool (never on one opened for it);
- that connection ended (FIN, RST, a failed write) or was found closed before the request could be written;
- not one byte of a response had arrived on it since the request was written;
- the caller had not given up (a cancellation is never retried).

Otherwise the failure is the caller's: ``ConnectError`` when nothing can have been sent, ``ClientError`` when the
request may have reached upstream. The rule has one blind spot, shared by every HTTP/1.1 client that retries: an
upstream that accepts a request and then drops the connection without a byte of answer receives it twice. Idle
connections live ``idle_timeout`` seconds at most (below the idle limits of common load balancers), which keeps
the race rare; a connection that its peer closes while idle, or that receives bytes nobody asked for (the rest of
an over-long body, a second answer), is dropped at once and never reused.

A body is read in one of two ways. ``readany``/``read`` buffer it for a task (reading pauses past 256 KB unread).
``push_to`` hands it instead to a ``BodyReceiver`` straight from the connection's ``data_received``: the bytes of
each read (its chunks joined, so a read is one call and one write downstream, however many chunks it held), the
last one with the end (or the failure after it), with no task woken in between; the receiver owns flow control
(``pause_reading``/``resume_reading``) and must not raise. The relay streams pass-through answers this way: a task
woken through a future for every chunk took its Python cost per chunk from about 6 to 9.5 us on the benchmark
machine (``benchmarks/micro/stream_relay.py``; the syscalls and polling around it are the same either way).
Framing, limits and the rules above are the same for both: they are the parser's and the connection's, not the
reader's.

Response heads are limited as request heads are at the server: at most ``MAX_FIELDS`` fields and
``max_head_size`` bytes of names and values, else ``ResponseHeadTooLarge``. httptools gathers a field whole before
it hands it over, so the bytes received before the final head completes (interim ``1xx`` answers included) are
also capped, at twice that size: a field that never ends holds no more memory than that.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Iterable
from typing import Protocol, cast
from urllib.parse import unquote, urlsplit

import httptools
from multidict import CIMultiDictProxy

from gate.http.headers import MAX_FIELDS, content_length, decode_fields

__all__ = [
    "BodyReceiver",
    "ClientError",
    "ConnectError",
    "ConnectTimeout",
    "Pool",
    "ResponseHeadTooLarge",
    "UpstreamResponse",
]

log = logging.getLogger("gate.client")

_HIGH_WATER = 256 * 1024  # buffered response bytes at which the connection stops reading


class ClientError(Exception):
    """The call failed after its request may have reached upstream (never resend it)."""


class ConnectError(ClientError):
    """No connection could be made (DNS, TCP, proxy, TLS): nothing was sent, so trying again is safe."""


class ConnectTimeout(ConnectError):
    """Connecting (pool slot, TCP, proxy CONNECT, TLS) took longer than the connect timeout."""


class ResponseHeadTooLarge(ClientError):
    """Upstream's response head has more fields, or more bytes, than the client accepts."""


class _StaleConnection(ClientError):
    """A reused connection ended before a byte of the response arrived: the request goes again on a fresh one."""


class _UnaskedBytes(Exception):
    """Raised from a parser callback: a response began that no request asked for."""


class BodyReceiver(Protocol):
    """Where ``UpstreamResponse.push_to`` sends a body. Called from the connection's protocol callbacks, on the
    event loop, between two reads: it must neither raise nor block (a receiver that fails keeps its failure)."""

    def body(self, data: bytes) -> None:
        """The body bytes of one read from the socket (never empty)."""

    def body_end(self, data: bytes) -> None:
        """The last bytes of the body (those of the read that completed it, perhaps none) and its end: nothing
        follows. Given together so that the receiver can pass on the last bytes and the end at once."""

    def body_failed(self, error: ClientError) -> None:
        """The body broke (the connection ended, a malformed chunk); nothing follows."""


class UpstreamResponse:
    """A response whose headers have arrived; its body is read with ``readany``/``read``, or pushed as it arrives
    to a receiver (``push_to``).

    ``release`` hands a fully read connection back to the pool and drops any other (upstream sees the cancel).
    """

    __slots__ = (
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_held",
        "_receiver",
        "_size",
        "_told",
        "_waiter",
        "content_length",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection, status: int, headers: CIMultiDictProxy[str]) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers
        self.content_length = content_length(headers.get("content-length"))
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self._error: ClientError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._receiver: BodyReceiver | None = None
        self._told = False  # the receiver was given the end or the failure
        self._held = False  # the receiver paused reading

    def complete(self) -> bool:
        """The whole body has arrived (some of it may still be buffered here)."""
        return self._done

    async def readany(self) -> bytes:
        """Whatever body bytes have arrived (waiting for some), or b"" at the end; ClientError if it broke."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks, self._chunks = self._chunks, []
        self._size = 0
        conn = self._conn
        if conn is not None and conn.reading_paused:
            conn.resume()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def read(self) -> bytes:
        """The rest of the body."""
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def push_to(self, receiver: BodyReceiver) -> None:
        """From now on the body goes to ``receiver`` from the connection's own callbacks, with no task in between:
        the bytes of each read from the socket (its chunks joined), then ``body_end`` (with the last read's bytes) or
        ``body_failed`` (after them) once. What
        arrived before is pushed at once. ``readany`` is not for a pushed body; flow control is the receiver's
        (``pause_reading``/``resume_reading``) instead of the buffer's high-water mark."""
        if self._receiver is not None or self._waiter is not None:
            raise RuntimeError("the body already has a reader")
        self._receiver = receiver
        self._push()
        conn = self._conn
        if conn is not None and conn.reading_paused and not self._held:
            conn.resume()  # paused at the high-water mark before the receiver came: nothing is buffered now

    def pause_reading(self) -> None:
        """The receiver takes no more for now: the socket is not read (the rest of the current read still comes)."""
        self._held = True
        if self._conn is not None:
            self._conn.pause()

    def resume_reading(self) -> None:
        self._held = False
        conn = self._conn
        if conn is not None and conn.reading_paused:
            conn.resume()

    def release(self) -> None:
        """Back to the pool when the body was read to its end, else closed."""
        conn, self._conn = self._conn, None
        self._receiver = None  # nothing is pushed after this
        if conn is not None:
            reusable = self._done and self._error is None
            if reusable and conn.reading_paused:
                conn.resume()  # the whole body is here: paused only because its reader fell behind
            conn.finished(reusable=reusable)

    # -------------------------------------------------------------------------------------- the connection's side

    def _feed(self, data: bytes) -> bool:
        """Buffer body bytes; True when the buffer is past the high-water mark (never for a pushed body: those
        bytes go to the receiver at the end of this read)."""
        self._chunks.append(data)
        self._size += len(data)
        if self._receiver is not None:
            return False
        self._wake()
        return self._size > _HIGH_WATER

    def _push(self) -> None:
        """To the receiver: the bytes that arrived since the last push, with the end when it came, or before the
        failure (once)."""
        receiver = self._receiver
        if receiver is None:
            return
        data = b""
        if self._chunks:
            chunks, self._chunks = self._chunks, []
            self._size = 0
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if not self._told and self._done and self._error is None:
            self._told = True
            receiver.body_end(data)
            return
        if data:
            receiver.body(data)
        if not self._told and self._error is not None and self._receiver is not None:
            self._told = True
            receiver.body_failed(self._error)

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, error: ClientError) -> None:
        if not self._done and self._error is None:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time.

    ``in_flight`` runs from writing a request to the end of its final response: bytes that arrive outside it were
    not asked for, and end the connection.
    """

    __slots__ = (
        "_field_bytes",
        "_fields",
        "_head_bytes",
        "_head_done",
        "_head_waiter",
        "_headers",
        "_parser",
        "_pool",
        "_received",
        "_response",
        "exchanges",
        "idle_since",
        "in_flight",
        "reading_paused",
        "reusable",
        "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self.reading_paused = False
        self.reusable = True
        self.idle_since = 0.0
        self.exchanges = 0  # requests written on this connection: more than one means it was reused
        self.in_flight = False
        self._received = False  # a byte of the current request's response has arrived
        self._head_done = False  # the current request's final response head is complete
        self._head_bytes = 0  # bytes received for the current request while its final head was incomplete
        self._fields = 0
        self._field_bytes = 0

    # ------------------------------------------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.reusable = False
        response = self._response
        if (
            exc is None
            and response is not None
            and response.content_length is None
            and "chunked" not in response.headers.get("transfer-encoding", "").lower()
        ):
            response._finish()  # neither length nor chunks: the body ends with the connection (RFC 9112 6.3)
        if self.in_flight and not self._received and self.exchanges > 1:
            self._broke(_StaleConnection("the reused connection to upstream closed before any answer"))
        else:
            self._broke(ClientError("the connection to upstream closed"))
        self._pool.forget(self)
        if response is not None:
            response._push()
        # The parser refers back to this connection, as does its response: dropping both lets reference counting
        # free a closed connection at once (the response keeps what its reader still needs).
        self._parser = None
        self._response = None

    def data_received(self, data: bytes) -> None:
        if not self.in_flight:
            log.info("dropped an upstream connection that sent %d bytes no request asked for", len(data))
            self.discard()
            return
        self._received = True
        parser = self._parser
        if parser is None:  # the connection is gone
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._break(ClientError("upstream switched protocols (101), which Gate never asks for"))
        except httptools.HttpParserCallbackError as exc:  # what a callback raised is its __context__
            cause = exc.__context__
            if isinstance(cause, _UnaskedBytes):
                log.info("dropped an upstream connection that sent bytes after its answer")
                self.discard()
            elif isinstance(cause, ClientError):
                self._break(cause)
            else:
                self._break(ClientError("upstream sent a malformed response"))
        except httptools.HttpParserError:
            self._break(ClientError("upstream sent a malformed response"))
        else:
            if not self._head_done:
                self._head_bytes += len(data)
                if self._head_bytes > 2 * self._pool.max_head_size:
                    self._break(self._head_too_large())
        response = self._response
        if response is not None:
            response._push()  # a pushed body: this read's bytes, then its end or failure, to the receiver

    # ------------------------------------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        if not self.in_flight:
            raise _UnaskedBytes()  # the rest of an over-long body, or an answer to nothing
        self._headers = []
        self._fields = 0
        self._field_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        self._field_bytes += len(name) + len(value)
        if self._fields > MAX_FIELDS or self._field_bytes > self._pool.max_head_size:
            raise self._head_too_large()
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # the parser is calling
        status = parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows; a 101 raises next
        headers = decode_fields(self._headers)
        self._headers = []
        self._head_done = True
        response = UpstreamResponse(self, status, headers)
        self._response = response
        if not parser.should_keep_alive():
            self.reusable = False
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None and response._feed(body):
            self.pause()

    def on_message_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # the parser is calling
        if parser.get_status_code() < 200:
            return
        self.in_flight = False
        response = self._response
        if response is not None:
            response._finish()

    # ------------------------------------------------------------------------------------------- requests

    async def send(self, payload: bytes) -> UpstreamResponse:
        """Write one request; return its response once the headers are in.

        A connection found closed before the request could be written raises ``_StaleConnection`` when it was
        reused and ``ConnectError`` when it is new (a peer that closes as it accepts): in both cases nothing went.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            self.reusable = False
            if self.exchanges:
                raise _StaleConnection("the reused connection to upstream closed before the request was sent")
            raise ConnectError("the connection to upstream closed before the request was sent")
        self.exchanges += 1
        self.in_flight = True
        self._received = self._head_done = False
        self._head_bytes = 0
        self._response = None
        self._head_waiter = asyncio.get_running_loop().create_future()
        transport.write(payload)
        try:
            return await self._head_waiter
        finally:
            self._head_waiter = None

    def pause(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        self.reading_paused = False
        if self.transport is not None:
            self.transport.resume_reading()

    def finished(self, *, reusable: bool) -> None:
        if reusable and self.reusable and not self.in_flight and self.transport is not None and not self.reading_paused:
            self._response = None
            self._pool.put_back(self)
        else:
            self.discard()

    def usable(self) -> bool:
        return self.reusable and self.transport is not None and not self.transport.is_closing()

    def discard(self) -> None:
        """Never to be used again; closed at once (upstream sees a reset if it was still answering)."""
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Closed politely: an idle connection past its time."""
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    def _head_too_large(self) -> ResponseHeadTooLarge:
        return ResponseHeadTooLarge(
            f"upstream's response head exceeds {MAX_FIELDS} fields or {self._pool.max_head_size} bytes"
        )

    def _break(self, error: ClientError) -> None:
        """The exchange cannot go on: its caller gets ``error``, the connection is dropped."""
        self._broke(error)
        self.discard()

    def _broke(self, error: ClientError) -> None:
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self._response is not None:
            self._response._fail(error)


class Pool:
    """Keep-alive connections to one origin, at most ``limit`` of them (0: no limit).

    An idle connection is reused for ``idle_timeout`` seconds at most (0: never); response heads may hold
    ``max_head_size`` bytes of field names and values.
    """

    def __init__(
        self,
        base_url: str,
        *,
        limit: int,
        connect_timeout: float,
        proxy: str | None = None,
        idle_timeout: float = 4.0,
        max_head_size: int = 16 * 1024,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https"
        self.prefix = parts.path.rstrip("/")  # a base URL's path goes before every request's
        default_port = self.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._authority = host if default_port else f"{host}:{self.port}"
        self._origin = f"{parts.scheme}://{self._authority}"
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self.max_head_size = max_head_size
        self._ssl = ssl.create_default_context() if self.tls else None
        self._proxy = urlsplit(proxy) if proxy else None
        self._forward_proxy = self._proxy is not None and not self.tls  # plain HTTP: absolute-form requests
        self._idle: deque[_Connection] = deque()  # oldest on the left; reused from the right (LIFO)
        self._open: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def request(
        self, method: str, path_qs: str, headers: Iterable[tuple[str, str]], body: bytes | None
    ) -> UpstreamResponse:
        """Send one request; the response once its headers are in. Raises ConnectError or ClientError.

        Sent a second time, on a new connection, only as the module's docstring says.
        """
        payload = self._request_bytes(method, path_qs, headers, body)
        conn = await self._acquire(reuse=True)
        try:
            return await self._exchange(conn, payload)
        except _StaleConnection:
            log.debug("a reused upstream connection closed before answering; sending again on a new one")
        return await self._exchange(await self._acquire(reuse=False), payload)

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.discard()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectError("the upstream pool is closed"))

    def _request_bytes(
        self, method: str, path_qs: str, headers: Iterable[tuple[str, str]], body: bytes | None
    ) -> bytes:
        target = self.prefix + path_qs
        if self._forward_proxy:
            target = self._origin + target
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self._authority}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers)
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")
        if self._forward_proxy and self._proxy is not None and self._proxy.username:
            lines.append(f"Proxy-Authorization: {_basic(self._proxy.username, self._proxy.password)}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("utf-8", "surrogateescape")
        return head + body if body else head

    @staticmethod
    async def _exchange(conn: _Connection, payload: bytes) -> UpstreamResponse:
        try:
            return await conn.send(payload)
        except BaseException:
            conn.discard()  # cancelled or broken before the headers: upstream sees the connection go
            raise

    # ------------------------------------------------------------------------------------------- pool

    async def _acquire(self, *, reuse: bool) -> _Connection:
        """A connection for one request: the most recently idle one if ``reuse`` and one is fresh, else a new one
        (waiting for a slot under the limit)."""
        if self._closed:
            raise ConnectError("the upstream pool is closed")
        try:
            async with asyncio.timeout(self._connect_timeout):
                while True:
                    if reuse and (idle := self._take_idle()) is not None:
                        return idle
                    if not self._limit or len(self._open) < self._limit:
                        break
                    if not reuse and self._idle:
                        # A new connection is wanted and the pool is full: an idle one as old as the one that just
                        # failed is suspect too, so it makes room.
                        self._drop_idle(self._idle.popleft())
                        continue
                    await self._wait_for_slot()
                conn = _Connection(self)
                self._open.add(conn)
                try:
                    await self._connect(conn)
                except BaseException:
                    self.forget(conn)
                    raise
                return conn
        except TimeoutError:
            raise ConnectTimeout(f"no connection to upstream within {self._connect_timeout:g}s") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"cannot connect to upstream: {type(exc).__name__}") from None

    def _take_idle(self) -> _Connection | None:
        self._expire_idle()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn
            self._drop_idle(conn)
        return None

    def _expire_idle(self) -> None:
        """Close the connections idle for ``idle_timeout`` or longer (the oldest are on the left).

        Run whenever the pool is used rather than on a timer: an expired connection is never reused either way,
        and one its peer closes meanwhile leaves the pool at once (``forget``).
        """
        now = asyncio.get_running_loop().time()
        idle = self._idle
        while idle and now - idle[0].idle_since >= self._idle_timeout:
            self._drop_idle(idle.popleft())

    def _drop_idle(self, conn: _Connection) -> None:
        self._open.discard(conn)
        conn.close()

    async def _wait_for_slot(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Woken in the same turn as our timeout (or the caller's cancel) fired: the slot is not ours to
                # take any more, so the wake-up goes to the next in line instead of being lost.
                self._wake_one()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    async def _connect(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        proxy = self._proxy
        if proxy is None:
            await loop.create_connection(
                lambda: conn, self.host, self.port, ssl=self._ssl, server_hostname=self.host if self.tls else None
            )
            return
        proxy_host = proxy.hostname or ""
        proxy_port = proxy.port or (443 if proxy.scheme == "https" else 80)
        proxy_tls = ssl.create_default_context() if proxy.scheme == "https" else None
        if self._forward_proxy:
            await loop.create_connection(lambda: conn, proxy_host, proxy_port, ssl=proxy_tls)
            return
        # HTTPS through the proxy: a CONNECT tunnel, then TLS with upstream inside it.
        tunnel = _Tunnel()
        transport, _ = await loop.create_connection(lambda: tunnel, proxy_host, proxy_port, ssl=proxy_tls)
        request = f"CONNECT {self.host}:{self.port} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if proxy.username:
            request += f"Proxy-Authorization: {_basic(proxy.username, proxy.password)}\r\n"
        transport.write((request + "\r\n").encode())
        try:
            await tunnel.established
        except BaseException:
            transport.abort()
            raise
        assert self._ssl is not None
        tls = await loop.start_tls(transport, conn, self._ssl, server_hostname=self.host)
        if tls is None:
            raise ConnectError("the proxy tunnel closed during the TLS handshake")
        conn.connection_made(tls)

    def put_back(self, conn: _Connection) -> None:
        if self._closed or self._idle_timeout <= 0:
            self._drop_idle(conn)
            self._wake_one()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.append(conn)
        self._expire_idle()
        self._wake_one()

    def forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class _Tunnel(asyncio.Protocol):
    """Reads a proxy's answer to CONNECT; ``established`` resolves on a 2xx."""

    def __init__(self) -> None:
        self.established: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buffer = b""

    def data_received(self, data: bytes) -> None:
        if self.established.done():
            return
        self._buffer += data
        if b"\r\n\r\n" not in self._buffer:
            if len(self._buffer) > 16384:
                self.established.set_exception(ConnectError("the egress proxy sent an oversized answer"))
            return
        status_line = self._buffer.split(b"\r\n", 1)[0].split()
        if len(status_line) >= 2 and status_line[1].startswith(b"2"):
            self.established.set_result(None)
        else:
            code = status_line[1].decode("ascii", "replace") if len(status_line) >= 2 else "?"
            self.established.set_exception(ConnectError(f"the egress proxy refused the tunnel ({code})"))

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.established.done():
            self.established.set_exception(ConnectError("the egress proxy closed the connection"))


def _basic(username: str, password: str | None) -> str:
    credentials = f"{unquote(username)}:{unquote(password or '')}".encode()
    return "Basic " + base64.b64encode(credentials).decode("ascii")
