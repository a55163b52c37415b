"""The HTTP server under hostile pipelining, slow headers and lying chunk sizes, driven over raw sockets.

Most tests run a bare ``HttpServer`` with handlers the test controls (one holds its request until released), so
that "a request waits behind a running handler" is a state the test sets up rather than a race it hopes for;
the server answers errors in Anthropic's shape as Gate's does. The last ones run a real ``gate serve``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gate.http.deadlines import Deadline, Deadlines
from gate.http.server import BodyTooLarge, HttpServer, Request, Response, Router, StreamResponse, _ChunkSizes
from gate.ops.errors import error_response
from tests.fake_anthropic import FakeAnthropic, Reply
from tests.harness import BackgroundLoop, free_port
from tests.test_bad_input import assert_anthropic_error, read_response, read_until_closed

WAIT = 10.0  # the longest any socket read here may block: a safety net, not a measured bound
MAX_BODY = 4 * 1024 * 1024
# What the server may hold for one connection: one 64 KiB slice parsed ahead plus a 64 KiB read-ahead for the
# running handler and the unparsed rest of one socket read (256 KiB); far below one pipelined body.
BUFFER_BOUND = 512 * 1024


class Served:
    """An ``HttpServer`` on its own loop. ``/hold`` answers only once released; ``/echo`` reads the body."""

    def __init__(self, *, header_timeout: float = 0.3, hold_for: float = 0.0) -> None:
        self.bg = BackgroundLoop()
        self.hold_for = hold_for  # /hold answers by itself after this long, when set
        self.held = 0  # /hold requests whose handler has started
        self.echoed: list[int] = []
        self.server, self.port, self.release = self.bg.run(self._start(header_timeout))

    async def _start(self, header_timeout: float) -> tuple[HttpServer, int, asyncio.Event]:
        router = Router(self._not_found)
        router.add("POST", "/hold", self._hold)
        router.add("POST", "/echo", self._echo)
        router.add("POST", "/stream", self._stream)
        router.add("GET", "/", self._root)
        server = HttpServer(
            router,
            error=error_response,
            max_body_size=MAX_BODY,
            max_header_size=1024,
            header_timeout=header_timeout,
            keep_alive_timeout=5.0,
        )
        port = await server.listen("127.0.0.1", 0)
        return server, port, asyncio.Event()

    async def _not_found(self, request: Request) -> Response:
        return error_response(404, "no such route")

    async def _root(self, request: Request) -> Response:
        return Response(body=b'{"status":"ok"}', content_type="application/json")

    async def _hold(self, request: Request) -> Response:
        self.held += 1
        if self.hold_for:
            await asyncio.sleep(self.hold_for)
        else:
            await self.release.wait()
        return Response(body=b'{"held":true}', content_type="application/json")

    async def _stream(self, request: Request) -> StreamResponse:
        response = StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(3):
            await response.write(b"data: {}\n\n")
            await asyncio.sleep(self.hold_for / 3)
        await response.write_eof()
        return response

    async def _echo(self, request: Request) -> Response:
        try:
            body = await request.read()
        except BodyTooLarge:
            return error_response(413, "too large")
        self.echoed.append(len(body))
        return Response(body=json.dumps({"length": len(body)}).encode(), content_type="application/json")

    def buffered(self) -> int:
        """Bytes the server holds for all its connections that no handler has taken yet."""
        return self.bg.call(lambda: sum(conn.buffered for conn in self.server.connections))

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)

    def close(self) -> None:
        self.bg.call(self.release.set)
        self.bg.run(self.server.shutdown(1.0))
        self.bg.close()


@pytest.fixture
def served() -> Iterator[Served]:
    running = Served()
    yield running
    running.close()


def statuses(answers: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answers)]


def send_until_blocked(sock: socket.socket, payload: bytes, repeat: int) -> int:
    """Sends ``payload`` ``repeat`` times; returns how much went out before the peer stopped reading."""
    sock.settimeout(1.0)  # no progress for a second means the server stopped reading (a detector, not a bound)
    view = memoryview(payload)
    sent = 0
    try:
        for _ in range(repeat):
            offset = 0
            while offset < len(view):
                count = sock.send(view[offset : offset + 65536])
                offset += count
                sent += count
    except TimeoutError:
        pass
    sock.settimeout(WAIT)
    return sent


# ------------------------------------------------------------------------------------------------ flow control


def test_pipelined_bodies_behind_a_running_handler_stay_on_the_socket(served: Served) -> None:
    """Issue 11 item 7: a held request, then 15 pipelined 3 MB POSTs: the server stops reading, buffers little."""
    body = b"x" * (3 * 1024 * 1024)
    post = b"POST /echo HTTP/1.1\r\nHost: g\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    with served.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.sendall(b"POST /hold HTTP/1.1\r\nHost: g\r\nContent-Length: 0\r\n\r\n")
        sent = send_until_blocked(sock, post, 15)
        assert sent < 15 * len(post)  # the server stopped reading: the rest waits in the client
        assert served.buffered() <= BUFFER_BOUND
        assert served.echoed == []  # and no handler of a queued request ran
        served.bg.call(served.release.set)
        status, _, answer = read_response(sock)
    assert status == 200 and json.loads(answer) == {"held": True}


def test_a_burst_of_tiny_pipelined_requests_is_not_parsed_ahead_of_the_handler(served: Served) -> None:
    """5,000 pipelined GETs behind a held request: only those within one small slice are parsed and queued
    (each parsed request costs far more memory than its 27 bytes); all are answered in order once released."""
    tiny = b"GET / HTTP/1.1\r\nHost: g\r\n\r\n"
    with served.connect() as sock:
        sock.sendall(b"POST /hold HTTP/1.1\r\nHost: g\r\nContent-Length: 0\r\n\r\n" + tiny * 5000)
        queued = 0
        for _ in range(200):  # wait (bounded) until the server has parsed what it will
            queued = served.bg.call(lambda: sum(conn.queued for conn in served.server.connections))
            if queued:
                break
            time.sleep(0.01)
        assert 0 < queued <= 8192 // len(tiny) + 1
        sock.sendall(b"GET / HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
        served.bg.call(served.release.set)
        answers = read_until_closed(sock)
    assert statuses(answers) == [200] * 5002


def test_a_handler_that_never_reads_its_large_body_does_not_get_it_buffered(served: Served) -> None:
    body = b"y" * (2 * 1024 * 1024)
    with served.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sent = send_until_blocked(
            sock, b"POST /hold HTTP/1.1\r\nHost: g\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body), 1
        )
        assert sent < len(body)
        assert served.buffered() <= BUFFER_BOUND
        served.bg.call(served.release.set)
        answers = read_until_closed(sock)  # answered, then closed: the unread body is not a request
    assert statuses(answers) == [200]


def test_pipelined_requests_with_bodies_are_each_read_and_answered_in_order(served: Served) -> None:
    sizes = [300_000, 5, 150_000, 0]
    requests = b"".join(
        b"POST /echo HTTP/1.1\r\nHost: g\r\nContent-Length: %d\r\n\r\n%b" % (size, b"z" * size) for size in sizes
    )
    with served.connect() as sock:
        sock.sendall(requests + b"GET / HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
        answers = read_until_closed(sock)
    assert statuses(answers) == [200] * 5
    assert [json.loads(m)["length"] for m in re.findall(rb'\{"length": ?\d+\}', answers)] == sizes
    assert served.echoed == sizes


def test_a_chunked_body_larger_than_one_read_is_read_whole(served: Served) -> None:
    parts = [b"a" * 100_000, b"b" * 70_000, b"c" * 3]
    chunked = b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
    with served.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
        status, _, body = read_response(sock)
    assert status == 200 and json.loads(body) == {"length": sum(map(len, parts))}


_pipelined = st.lists(
    st.tuples(st.integers(0, 200_000), st.booleans()),  # body size, chunked or not
    min_size=1,
    max_size=4,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=_pipelined, cuts=st.lists(st.integers(1, 100_000), max_size=12))
def test_pipelined_bodies_cut_anywhere_are_each_answered_in_order(
    served: Served, requests: list[tuple[int, bool]], cuts: list[int]
) -> None:
    """Whatever the reads look like, each body reaches its own handler whole, in order, and nothing is left held."""
    stream = b""
    for size, chunked in requests:
        body = b"q" * size
        if chunked:
            framed = (b"%x\r\n%b\r\n" % (size, body) if size else b"") + b"0\r\n\r\n"
            stream += b"POST /echo HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
        else:
            stream += b"POST /echo HTTP/1.1\r\nHost: g\r\nContent-Length: %d\r\n\r\n%b" % (size, body)
    stream += b"GET / HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
    served.echoed.clear()
    with served.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        offset = 0
        for cut in [*cuts, len(stream)]:
            sock.sendall(stream[offset : offset + cut])
            offset += cut
            if offset >= len(stream):
                break
        answers = read_until_closed(sock)
    assert statuses(answers) == [200] * (len(requests) + 1)
    assert served.echoed == [size for size, _ in requests]
    assert served.buffered() == 0


# ------------------------------------------------------------------------------------------------ deadlines


def test_the_header_deadline_holds_for_a_pipelined_request_while_a_handler_runs() -> None:
    """'Also seen' in issue 11, confirmed: a request trickling its headers behind a running handler was never
    timed out. Now it gets its 408 after the answer before it, and the connection closes."""
    served = Served(header_timeout=0.2, hold_for=1.5)
    try:
        with served.connect() as sock:
            sock.sendall(b"POST /stream HTTP/1.1\r\nHost: g\r\nContent-Length: 0\r\n\r\nGET / HTTP/1.1\r\nHost: g")
            answers = read_until_closed(sock)
    finally:
        served.close()
    assert statuses(answers) == [200, 408]
    assert answers.count(b"data: {}") == 3  # the running answer was not cut
    assert_anthropic_error(answers.rpartition(b"\r\n\r\n")[2], "timeout_error")


def test_the_header_deadline_outlives_the_answer_before_it() -> None:
    """A pipelined request whose headers began while the handler before it ran keeps its header deadline when
    that handler ends (it is not swapped for the keep-alive clock, which leaves a half request alone)."""
    served = Served(header_timeout=1.0, hold_for=0.1)
    try:
        with served.connect() as sock:
            sock.sendall(b"POST /hold HTTP/1.1\r\nHost: g\r\nContent-Length: 0\r\n\r\nGET / HTTP/1.1\r\nHost: g")
            answers = read_until_closed(sock)
    finally:
        served.close()
    assert statuses(answers) == [200, 408]


def test_a_protocol_error_after_a_pipelined_request_is_answered_after_it(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: g\r\n\r\nHELLO THERE\r\n\r\n")
        answers = read_until_closed(sock)
    assert statuses(answers) == [200, 400]
    assert_anthropic_error(answers.rpartition(b"\r\n\r\n")[2], "invalid_request_error")


async def test_deadlines_fire_once_after_their_time_and_not_when_stopped_or_touched() -> None:
    deadlines = Deadlines(0.01)
    fired: list[str] = []
    deadlines.watch(0.2, lambda: fired.append("late"))
    stopped = deadlines.watch(0.05, lambda: fired.append("stopped"))
    touched = deadlines.watch(0.05, lambda: fired.append("touched"))
    soon = deadlines.watch(0.05, lambda: fired.append("soon"))
    stopped.stop()
    due = touched.due
    touched.touch()
    assert touched.due >= due
    touched.restart(10.0)  # re-armed far out: it must not fire in this test
    while "late" not in fired:
        await asyncio.sleep(0.01)
    assert fired == ["soon", "late"] and soon.expired and not stopped.expired and not touched.expired
    assert len(deadlines) == 1  # only the re-armed one is still watched
    deadlines.close()
    assert len(deadlines) == 0


async def test_a_deadline_without_a_callback_cancels_its_task_and_says_so() -> None:
    deadlines = Deadlines(0.01)

    async def waits_forever() -> str:
        deadline = deadlines.watch(0.03)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if deadline.absorb_cancel():
                return "timed out"
            raise
        return "never"

    assert await asyncio.wait_for(waits_forever(), WAIT) == "timed out"
    deadlines.close()


async def test_a_stopped_deadline_lets_go_of_its_task_so_a_cancelled_task_leaves_no_cycle() -> None:
    """A cancelled task keeps its CancelledError, whose traceback holds the frame that holds the deadline: were
    the deadline to keep the task, task and frames would wait for the cyclic collector."""
    deadlines = Deadlines(0.01)
    watched: list[Deadline] = []

    async def cancelled_after_its_deadline_fired() -> None:
        deadline = deadlines.watch(0.01)
        watched.append(deadline)
        try:
            await asyncio.Event().wait()
        finally:
            deadline.stop()  # no absorb_cancel: the task ends cancelled

    task = asyncio.create_task(cancelled_after_its_deadline_fired())
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    [deadline] = watched
    assert deadline.expired and deadline._task is None
    assert not deadline.absorb_cancel()  # stopped for good: it no longer speaks for the task
    deadlines.close()


async def test_a_deadline_re_armed_by_its_own_callback_fires_again_on_the_one_timer() -> None:
    deadlines = Deadlines(0.01)
    fired: list[int] = []
    done = asyncio.Event()

    def again() -> None:
        fired.append(len(fired))
        if len(fired) < 3:
            deadline.restart()
        else:
            done.set()

    deadline = deadlines.watch(0.02, again)
    await asyncio.wait_for(done.wait(), WAIT)
    assert fired == [0, 1, 2] and len(deadlines) == 0
    deadlines.close()


async def test_a_failing_expiry_callback_does_not_stop_the_sweep() -> None:
    deadlines = Deadlines(0.01)
    fired: list[str] = []

    def broken() -> None:
        raise RuntimeError("a bug of one owner")

    deadlines.watch(0.02, broken)
    deadlines.watch(0.05, lambda: fired.append("after"))
    while not fired:
        await asyncio.sleep(0.01)
    deadlines.close()


# ------------------------------------------------------------------------------------------------ framing


def test_http_1_0_with_transfer_encoding_is_answered_then_closed(served: Served) -> None:
    """RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing: close after answering."""
    with served.connect() as sock:
        sock.sendall(
            b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        )
        answers = read_until_closed(sock)
    assert statuses(answers) == [200]  # the second request was not served
    head = answers.partition(b"\r\n\r\n")[0].lower()
    assert b"connection: close" in head and b"keep-alive" not in head


@pytest.mark.parametrize(
    "size_line",
    [b"ffffffffffffffff", b"%x" % (MAX_BODY + 1), b"%x;ext=1" % (MAX_BODY + 1), b"000000000000000000%x" % (2**40)],
    ids=["2^64-1", "limit+1", "with-extension", "leading-zeros"],
)
def test_a_chunk_larger_than_the_body_limit_on_its_face_is_413_at_once(served: Served, size_line: bytes) -> None:
    with served.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n" + size_line + b"\r\nab")
        status, headers, body = read_response(sock)  # no more body comes: a wait here would be the body timeout
        assert read_until_closed(sock) == b""
    assert status == 413 and headers["connection"] == "close"
    assert_anthropic_error(body, "request_too_large")


def test_a_huge_chunk_size_sent_byte_by_byte_is_still_413(served: Served) -> None:
    with served.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n")
        for byte in b"ffffffffffff\r\n":
            sock.sendall(bytes([byte]))
        status, _, _ = read_response(sock)
    assert status == 413


# A chunked body as llhttp accepts it: chunk sizes (hex, optional extensions), data, optional trailers.
_chunk = st.tuples(st.integers(1, 300), st.sampled_from([b"", b";a=1", b";name"]), st.sampled_from([b"%x", b"%X"]))


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(_chunk, min_size=0, max_size=6),
    trailers=st.sampled_from([b"", b"X-T: 1\r\n", b"ffffffffffffff: 1\r\n", b"A: b\r\nC: d\r\n"]),
    huge=st.one_of(st.none(), st.integers(1000, 2**64 - 1)),
    cuts=st.lists(st.integers(1, 40), max_size=40),
)
def test_the_declared_chunk_size_is_found_however_the_bytes_are_cut(
    chunks: list[tuple[int, bytes, bytes]], trailers: bytes, huge: int | None, cuts: list[int]
) -> None:
    """The guard must never refuse a chunk that fits (whatever the cuts between reads) and always see one that
    declares more than the limit, as llhttp parses the same bytes."""
    import httptools

    limit = 999
    body = b"".join((fmt % size) + ext + b"\r\n" + b"d" * size + b"\r\n" for size, ext, fmt in chunks)
    body += b"%x\r\n" % huge + b"d" * 10 if huge is not None else b"0\r\n" + trailers + b"\r\n"
    raw = b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n" + body

    class Listener:
        def __init__(self) -> None:
            self.guard = _ChunkSizes()
            self.declared: list[int] = []

        def on_headers_complete(self) -> None:
            self.guard.start()

        def on_header(self, name: bytes, value: bytes) -> None:
            self.guard.trailer()

        def on_chunk_header(self) -> None:
            self.guard.chunk_header()

        def on_body(self, data: bytes) -> None:
            self.guard.data(len(data))

        def on_chunk_complete(self) -> None:
            self.guard.chunk_complete()

    listener = Listener()
    parser = httptools.HttpRequestParser(listener)
    offset = 0
    for cut in [*cuts, len(raw)]:
        piece = raw[offset : offset + cut]
        if not piece:
            break
        offset += len(piece)
        parser.feed_data(piece)
        declared = listener.guard.slice_end(piece)
        if declared is not None:
            listener.declared.append(declared)
    big = [size for size in listener.declared if size > limit]
    if huge is None:
        assert big == []
    else:
        assert big == [huge]


# ------------------------------------------------------------------------------------------------ gate serve


GATE = Path(sys.executable).parent / "gate"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_gate_serve_memory_stays_flat_under_pipelined_unauthenticated_bodies(
    tmp_path: Path, fake: FakeAnthropic
) -> None:
    """Issue 11 item 7 as reported: one authenticated slow stream, then pipelined large POSTs without credentials.
    Gate's RSS grew by the bodies (68 MB to 529 MB); now it stays within a few MB."""
    port = free_port()
    config = tmp_path / "gate.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {
                    "host": "127.0.0.1",
                    "port": port,
                    "limits": {"max-body-size": "10MB"},
                    "shutdown": {"drain-timeout": "1s", "flush-timeout": "1s"},
                },
                "security": {"jwt": {"dev": {"data-dir": str(tmp_path / "dev-keys")}}},
                "anthropic": {
                    "api": {
                        "base-url": fake.url,
                        "keys": [{"alias": "k", "value": "sk-ant-test-rss-0000000000000000000000"}],
                    }
                },
                "usage": {
                    "publisher": "file",
                    "file": {"path": str(tmp_path / "usage.jsonl")},
                    "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
                },
                "observability": {"logging": {"level": "WARNING", "access-log": False}},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "GATE_", "OTEL_", "USAGE_"))}
    options = ["--config", str(config), "--profile", "local"]
    token = subprocess.run(
        [str(GATE), "token", "--sub", "alice", *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    process = subprocess.Popen([str(GATE), "serve", *options], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:  # started when it answers (bounded: a Gate that cannot start fails the test)
            assert process.poll() is None, "gate serve exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gate serve did not start"
            time.sleep(0.05)
        fake.enqueue(Reply(stall_after=200))  # the authenticated stream: a few bytes, then upstream goes quiet
        before = _rss_kb(process.pid)
        stream = json.dumps(
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 8,
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
            }
        ).encode()
        body = b"x" * (8 * 1024 * 1024)
        post = b"POST /v1/messages HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            sock.sendall(
                b"POST /v1/messages HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer %b\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                % (token.encode(), len(stream), stream)
            )
            sent = send_until_blocked(sock, (post % len(body)) + body, 15)
            grown_mb = (_rss_kb(process.pid) - before) / 1024
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise
    assert sent < 15 * len(body)
    assert grown_mb < 20, f"RSS grew by {grown_mb:.0f} MB"
