"""An AMQP 0-9-1 endpoint that confirms every publish as it reads it: Gate's whole RabbitMQ path, no broker's CPU.

Why: on a 2-core rig the broker has to share a core with something, and ``make bench`` pins its own RabbitMQ node
to the rig's core (wrk and the fake upstream). The node spends about 95 us of Erlang CPU on each persistent
message (read from ``/proc`` in an earlier pass), in runs of 1-2 ms, and on this kernel a task woken on that core
(wrk, the fake) waits for such a run to end: ``perf sched timehist`` shows wrk's wake-ups delayed 1.0-1.7 ms
behind the node's scheduler thread, also when the node runs under ``SCHED_IDLE`` (ANALYSIS.md). A deployment's
broker runs on other hosts. Publishing to this peer, Gate does all its own work (the outbox, its AMQP client,
framing, waiting for confirms, deleting confirmed rows) and the rig's core does almost none: the ``gate-peer``
contender and ``micro/publisher_peer.py`` use it to tell Gate's tail from the broker's. It is not a broker: it
keeps nothing.

Run: ``python benchmarks/amqp_peer.py --port N`` (serves until killed).
"""

from __future__ import annotations

import argparse
import asyncio
import struct
from collections.abc import Callable
from typing import cast

from pamqp import commands as spec
from pamqp import frame as amqp_frame


class ConfirmingPeer(asyncio.Protocol):
    """Just enough AMQP 0-9-1 for Gate's publisher: the handshake, a confirming channel, an exchange declared,
    then every ``Basic.Publish`` read is confirmed at once (one ``multiple`` ack per read)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses (an isinstance assert here refused them all)
        self.transport = cast(asyncio.Transport, transport)
        self.buffer = b""
        self.published = 0
        self.opened = False

    def send(self, method: object, channel: int = 0) -> None:
        self.transport.write(amqp_frame.marshal(method, channel))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.opened and self.buffer.startswith(b"AMQP"):
            self.buffer = self.buffer[8:]
            self.opened = True
            self.send(spec.Connection.Start(server_properties={"product": "peer"}, mechanisms="PLAIN"))
        confirmed = self.published
        while len(self.buffer) >= 7:
            kind, channel, size = struct.unpack(">BHI", self.buffer[:7])
            if len(self.buffer) < size + 8:
                break
            raw, self.buffer = self.buffer[: size + 8], self.buffer[size + 8 :]
            if kind != 1:
                continue  # content headers and bodies
            if raw[7:11] == b"\x00\x3c\x00\x28":  # Basic.Publish
                self.published += 1
                continue
            _, _, method = amqp_frame.unmarshal(raw)
            answers: dict[str, Callable[[], object]] = {
                "Connection.StartOk": lambda: spec.Connection.Tune(channel_max=2047, frame_max=131072, heartbeat=0),
                "Connection.Open": spec.Connection.OpenOk,
                "Channel.Open": spec.Channel.OpenOk,
                "Confirm.Select": spec.Confirm.SelectOk,
                "Exchange.Declare": spec.Exchange.DeclareOk,
                "Channel.Close": spec.Channel.CloseOk,
                "Connection.Close": spec.Connection.CloseOk,
            }
            answer = answers.get(method.name)
            if answer is not None:
                self.send(answer(), channel)
        if self.published > confirmed:
            self.send(spec.Basic.Ack(delivery_tag=self.published, multiple=True), 1)


def serve_peer(port: int) -> None:
    import uvloop

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(ConfirmingPeer, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(serve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    serve_peer(parser.parse_args().port)


if __name__ == "__main__":
    main()
