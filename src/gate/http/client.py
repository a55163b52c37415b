"""The pooled HTTP/1.1 client to one upstream origin: keep-alive connections on ``asyncio.Protocol``, responses
parsed by httptools (llhttp), TLS from the standard library, an egress proxy by CONNECT (or absolute form for
plain HTTP).

Why not aiohttp's client, which Gate used first: on the benchmark rig a pass-through proxy on a bare server went
from ~9,100 to ~20,000 JSON requests/s on one core when aiohttp's ``ClientSession`` gave way to a bare
protocol on the same parser (``benchmarks/ANALYSIS.md``): about 60 us per call, a third of Gate's whole budget,
spent on machinery a gateway to a single origin does not use (cookies, redirects, auth helpers, payload
registries, tracing hooks, per-request URL and timer objects). What must be exact, the response framing, stays
with llhttp; this module owns the pool, the request bytes, and flow control of response bodies.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections import deque
from collections.abc import Iterable
from typing import cast
from urllib.parse import unquote, urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["ClientError", "ConnectError", "ConnectTimeout", "Pool", "UpstreamResponse"]

_HIGH_WATER = 256 * 1024  # buffered response bytes at which the connection stops reading
_IDLE_KEEP = 30.0  # an idle pooled connection older than this is closed rather than reused


class ClientError(Exception):
    """The call failed after its request may have reached upstream (never resend it)."""


class ConnectError(ClientError):
    """No connection could be made (DNS, TCP, proxy, TLS): nothing was sent, so trying again is safe."""


class ConnectTimeout(ConnectError):
    """Connecting (pool slot, TCP, proxy CONNECT, TLS) took longer than the connect timeout."""


class UpstreamResponse:
    """A response whose headers have arrived; its body is read with ``readany``/``read``.

    ``release`` hands a fully read connection back to the pool and drops any other (upstream sees the cancel).
    """

    __slots__ = (
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_size",
        "_waiter",
        "content_length",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection, status: int, headers: CIMultiDictProxy[str]) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers
        length = headers.get("content-length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self._error: ClientError | None = None
        self._waiter: asyncio.Future[None] | None = None

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

    def release(self) -> None:
        """Back to the pool when the body was read to its end, else closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finished(reusable=self._done and self._error is None)

    # -------------------------------------------------------------------------------------- the connection's side

    def _feed(self, data: bytes) -> bool:
        """Buffer body bytes; True when the buffer is past the high-water mark."""
        self._chunks.append(data)
        self._size += len(data)
        self._wake()
        return self._size > _HIGH_WATER

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
    """One keep-alive connection; one request at a time."""

    __slots__ = (
        "_head_waiter",
        "_headers",
        "_parser",
        "_pool",
        "_response",
        "idle_since",
        "reading_paused",
        "reusable",
        "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self.reading_paused = False
        self.reusable = True
        self.idle_since = 0.0

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
        self._broke("the connection to upstream closed")
        self._pool.forget(self)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.reusable = False
            self._broke("upstream sent a malformed response")
            self.abort()

    # ------------------------------------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        headers = CIMultiDictProxy(
            CIMultiDict(
                [(name.decode("latin-1"), value.decode("utf-8", "surrogateescape")) for name, value in self._headers]
            )
        )
        self._headers = []
        response = UpstreamResponse(self, status, headers)
        self._response = response
        if not self._parser.should_keep_alive():
            self.reusable = False
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None and response._feed(body) and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() < 200:
            return
        response = self._response
        if response is not None:
            response._finish()

    # ------------------------------------------------------------------------------------------- requests

    async def send(self, payload: bytes) -> UpstreamResponse:
        """Write one request; return its response once the headers are in."""
        assert self.transport is not None
        self._response = None
        self._head_waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        try:
            return await self._head_waiter
        finally:
            self._head_waiter = None

    def resume(self) -> None:
        self.reading_paused = False
        if self.transport is not None:
            self.transport.resume_reading()

    def finished(self, *, reusable: bool) -> None:
        if reusable and self.reusable and self.transport is not None and not self.reading_paused:
            self._response = None
            self._pool.put_back(self)
        else:
            self.reusable = False
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _broke(self, message: str) -> None:
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ClientError(message))
        if self._response is not None:
            self._response._fail(ClientError(message))


class Pool:
    """Keep-alive connections to one origin, at most ``limit`` of them (0: no limit)."""

    def __init__(self, base_url: str, *, limit: int, connect_timeout: float, proxy: str | None = None) -> None:
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
        self._ssl = ssl.create_default_context() if self.tls else None
        self._proxy = urlsplit(proxy) if proxy else None
        self._forward_proxy = self._proxy is not None and not self.tls  # plain HTTP: absolute-form requests
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def request(
        self, method: str, path_qs: str, headers: Iterable[tuple[str, str]], body: bytes | None
    ) -> UpstreamResponse:
        """Send one request; the response once its headers are in. Raises ConnectError or ClientError."""
        conn = await self._acquire()
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
        try:
            return await conn.send(head + body if body else head)
        except BaseException:
            conn.reusable = False
            conn.abort()  # cancelled or broken before the headers: upstream sees the connection go
            raise

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectError("the upstream pool is closed"))

    # ------------------------------------------------------------------------------------------- pool

    async def _acquire(self) -> _Connection:
        if self._closed:
            raise ConnectError("the upstream pool is closed")
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None and not conn.transport.is_closing() and now - conn.idle_since < _IDLE_KEEP:
                return conn
            conn.abort()
            self._open.discard(conn)
        try:
            async with asyncio.timeout(self._connect_timeout):
                while self._limit and len(self._open) >= self._limit:
                    waiter = loop.create_future()
                    self._waiters.append(waiter)
                    try:
                        await waiter
                    finally:
                        if waiter in self._waiters:
                            self._waiters.remove(waiter)
                    if self._idle:
                        return await self._acquire()
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
        if self._closed:
            conn.abort()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.append(conn)
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
