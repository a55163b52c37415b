"""A TCP fault proxy for outage tests: forwards to a real service until ``cut()``, then drops every connection
and resets new ones until ``restore()``. The service behind it is never touched."""

from __future__ import annotations

import asyncio
import socket
import threading


class FaultProxy:
    """``FaultProxy(port).start()`` listens on 127.0.0.1:``proxy.port`` in a thread of its own."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._down = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="fault-proxy")
        self._server: asyncio.Server | None = None

    def start(self) -> FaultProxy:
        self._thread.start()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        asyncio.run_coroutine_threadsafe(self._listen(sock), self._loop).result(10)
        return self

    async def _listen(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._handle, sock=sock)

    def cut(self) -> None:
        """The service is 'down': open connections are reset, new ones are accepted and reset at once."""
        asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(10)

    async def _cut(self) -> None:
        self._down = True
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()

    def restore(self) -> None:
        self._down = False

    def close(self) -> None:
        async def stop() -> None:
            await self._cut()
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._down:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        self._writers.difference_update((writer, up_writer))
        for w in (writer, up_writer):
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(65536)
            if not data or self._down:
                break
            writer.write(data)
            await writer.drain()
        _reset(writer)


def _reset(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()
