"""A TCP proxy that a test can cut and restore: the outage of a shared service (RabbitMQ, PostgreSQL) as its
clients see it, without stopping the service that other tests use.

    proxy = FaultProxy(5432); port = await proxy.start()
    await proxy.cut()      # every open connection is reset, new ones are closed at once
    proxy.restore()        # new connections reach the service again
"""

from __future__ import annotations

import asyncio
import contextlib


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.down = False
        self.connections = 0  # accepted while up, over the proxy's life
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def cut(self) -> None:
        """Reset every connection through the proxy and refuse new ones until ``restore``."""
        self.down = True
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()
        await asyncio.sleep(0)

    def restore(self) -> None:
        self.down = False

    async def close(self) -> None:
        await self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if self.down:  # cut while connecting
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.connections += 1
        self._open.update((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink, (writer, up_writer)))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, pair: tuple[asyncio.StreamWriter, ...]
    ) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for writer in pair:
                self._open.discard(writer)
                with contextlib.suppress(Exception):
                    writer.transport.abort()
