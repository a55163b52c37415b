"""CPU per relayed stream chunk in the relay itself: Gate's upstream connection parses a read, the relay meters it
and writes it to the client's connection, with no sockets (both transports are stand-ins that only count bytes).

This isolates what the stream relay spends per chunk in Python: the upstream parser's callbacks, the hand-over to
the relay (a task woken through a future, or a callback), the usage meter, the chunk framing and the write call.
Syscalls and the event loop's polling, the same for any design, are left out. One read per event, as a paced
stream arrives; the next read is scheduled with ``call_soon`` after the previous one, so a relay task that must
wake per chunk gets its turn in between, as it would between two reads from a socket.

Run the same script against two versions of the code to compare them::

    taskset -c 0 .venv/bin/python benchmarks/micro/stream_relay.py
    PYTHONPATH=/tmp/gate-before/src taskset -c 0 .venv/bin/python benchmarks/micro/stream_relay.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

import orjson
import uvloop
from multidict import CIMultiDict, CIMultiDictProxy

import gate
from gate import relay as gate_relay
from gate.accounting.usage import UsageMeter
from gate.http import client as gate_client
from gate.http import server as gate_server
from gate.http.deadlines import Deadlines

EVENTS = 20_000
ROUNDS = 7

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nrequest-id: req_1\r\n\r\n"
START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message","role":'
    b'"assistant","content":[],"model":"claude-sonnet-4-5","usage":{"input_tokens":25,"output_tokens":1}}}\n\n'
)
DELTA = b"event: content_block_delta\ndata: " + orjson.dumps(
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "a few words of text"}}
) + b"\n\n"
END = (
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":15}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Transport:
    """Counts what is written; reading and writing never pause."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def one_stream(events: int) -> tuple[float, int]:
    loop = asyncio.get_running_loop()
    pool = gate_client.Pool("http://127.0.0.1:9", limit=0, connect_timeout=5)
    upstream_conn = gate_client._Connection(pool)
    upstream_conn.connection_made(Transport())  # type: ignore[arg-type]
    sending = asyncio.ensure_future(upstream_conn.send(b"POST /v1/messages HTTP/1.1\r\n\r\n"))
    loop.call_soon(upstream_conn.data_received, HEAD)
    upstream = await sending

    async def nothing(request: Any) -> Any:
        return None

    server = gate_server.HttpServer(
        gate_server.Router(nothing),
        error=lambda status, message: gate_server.Response(status=status),
        max_body_size=1 << 20,
        max_header_size=1 << 14,
        header_timeout=60,
        keep_alive_timeout=60,
    )
    client_transport = Transport()
    client_conn = gate_server._Connection(server)
    client_conn.connection_made(client_transport)  # type: ignore[arg-type]
    request = gate_server.Request(client_conn, "POST", "/v1/messages", CIMultiDictProxy(CIMultiDict()))
    request.complete = True

    relay: Any = object.__new__(gate_relay.Relay)
    relay._watchdogs = Deadlines(1.0)
    relay._idle_timeout = 60.0
    relay._send_timeout = 60.0
    exchange = gate_relay._Exchange(route="/v1/messages", started=time.perf_counter(), stream=True)
    meter = UsageMeter(stream=True, content_encoding=None)

    reads = [chunk(START)] + [chunk(DELTA)] * events + [chunk(END) + b"0\r\n\r\n"]
    done = loop.create_future()

    def feed(i: int) -> None:
        upstream_conn.data_received(reads[i])
        if i + 1 < len(reads):
            loop.call_soon(feed, i + 1)
        else:
            done.set_result(None)

    started = time.process_time()
    relaying = asyncio.ensure_future(relay._relay_stream(request, exchange, upstream, meter))
    loop.call_soon(feed, 0)
    await done
    await relaying
    used = time.process_time() - started
    assert meter.output_tokens == 15 and meter.input_tokens == 25
    client_conn.connection_lost(None)
    server.deadlines.close()
    relay._watchdogs.close()
    return used, client_transport.written


async def main() -> None:
    await one_stream(100)  # warm up
    per_chunk = []
    for _ in range(ROUNDS):
        used, written = await one_stream(EVENTS)
        per_chunk.append(used / (EVENTS + 2) * 1e6)
    print(
        f"{gate.__file__}: {statistics.median(per_chunk):.2f} us per chunk (median of {ROUNDS}; "
        f"min {min(per_chunk):.2f}, max {max(per_chunk):.2f}; {written} bytes to the client per stream)"
    )


if __name__ == "__main__":
    uvloop.run(main()) if "--asyncio" not in sys.argv else asyncio.run(main())
