"""A TCP proxy in front of a real server that fails on demand: a broker outage without touching the broker.

Gate connects to the proxy's port and the proxy forwards to the target (RabbitMQ on 127.0.0.1:5672). On demand it
refuses new connections (its port closes, as a stopped broker's does), cuts the open ones (reset, as a broker
that goes away or a network that breaks), or swallows traffic without answering (a partition). The broker itself,
which other developers and tests may share, is never stopped.

Written here rather than taken from a library: Toxiproxy (Shopify) does this and more, but it is a Go server to
install and run beside the tests; the few lines below run on the test's own machine in a thread of their own, so
that a test blocking its own event loop never stalls the proxied traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

__all__ = ["FaultProxy"]

T = TypeVar("T")
_CHUNK = 256 * 1024


class FaultProxy:
    """``127.0.0.1:<port>`` forwarding to ``target``; ``outage()`` for a broker that is down, then back."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections_accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._blackhole = False

    # ------------------------------------------------------------------------------------- test's side

    def start(self) -> FaultProxy:
        self._thread.start()
        with socket.socket() as probe:  # a free port, kept for every later listen
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.accept()
        return self

    def accept(self) -> None:
        """Listen (again) and forward every new connection."""
        self._blackhole = False
        self._call(self._listen())

    def refuse(self) -> None:
        """Close the port: a new connection is refused; open ones carry on."""
        self._call(self._stop_listening())

    def cut(self) -> None:
        """Reset every open connection, on both sides."""
        self._call(self._cut_all())

    def blackhole(self) -> None:
        """Accept connections and bytes but forward nothing and answer nothing (a partition); ``accept`` ends it."""
        self._blackhole = True
        self._call(self._cut_all())

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Down (port closed, every connection reset) inside; forwarding again after, whatever happened."""
        self.refuse()
        self.cut()
        try:
            yield
        finally:
            self.accept()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._call(self._stop_listening())
            self._call(self._cut_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    # ------------------------------------------------------------------------------------ proxy's loop

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _cut_all(self) -> None:
        for writer in list(self._open):
            _reset(writer)
        self._open.clear()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        self._open.add(client_writer)
        try:
            if self._blackhole:
                while await client_reader.read(_CHUNK):
                    pass
                return
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            except OSError:
                _reset(client_writer)
                return
            self._open.add(upstream_writer)
            try:
                await asyncio.gather(
                    _pump(client_reader, upstream_writer),
                    _pump(upstream_reader, client_writer),
                )
            finally:
                self._open.discard(upstream_writer)
                _reset(upstream_writer)
        except (ConnectionError, OSError):
            pass
        finally:
            self._open.discard(client_writer)
            _reset(client_writer)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of stream or a broken connection, then end the other side too."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        _reset(writer)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close at once with a TCP reset (SO_LINGER 0), as a crashed peer or a broken network would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
