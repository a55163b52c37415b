"""Issue 11's relay findings, end to end: key health on 401/403, the half-open trial judged at the response's head,
a slow client told apart from a silent upstream, and an upstream that fails before the first byte reached the
client answered cleanly. A real Gate in-process against the scriptable fake Anthropic; httpx or the SDK as client.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gate import relay
from gate.accounting.usage import UsageMeter
from gate.http import server
from tests.fake_anthropic import FakeAnthropic, Received, Reply, error_reply, fixture
from tests.harness import BackgroundLoop, RunningGate, read_events, stalled_stream_client
from tests.test_bad_input import connect

MESSAGE = {"model": "claude-opus-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]}
STREAM = {**MESSAGE, "stream": True}
PRIMARY = "sk-ant-test-primary-0000000000000000"
SECONDARY = "sk-ant-test-secondary-000000000000000"
ALIAS_BY_VALUE = {PRIMARY: "primary", SECONDARY: "secondary"}
WAIT = 10.0  # a safety net for blocking calls, never an assertion
StartGate = Callable[..., RunningGate]


def post(gate: RunningGate, body: dict[str, Any] = MESSAGE, timeout: float = WAIT) -> httpx.Response:
    headers = {"authorization": f"Bearer {gate.token()}", "content-type": "application/json"}
    return httpx.post(gate.url + "/v1/messages", content=json.dumps(body).encode(), headers=headers, timeout=timeout)


def health(gate: RunningGate) -> dict[str, Any]:
    return dict(httpx.get(gate.url + "/actuator/health", timeout=WAIT).json())


def key_states(gate: RunningGate) -> dict[str, str]:
    keys = health(gate)["components"]["apiKeys"]["details"]["keys"]
    return {k["alias"]: k["state"] for k in keys}


def events(gate: RunningGate, count: int) -> list[dict[str, Any]]:
    return [event["data"] for event in read_events(Path(gate.settings.usage.file.path), count)]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def is_error_shape(response: httpx.Response, status: int, error_type: str) -> bool:
    body = response.json()
    return (
        response.status_code == status
        and body["type"] == "error"
        and body["error"]["type"] == error_type
        and isinstance(body["error"]["message"], str)
    )


# ------------------------------------------------------------------------------------------------ keys


def test_a_403_reaches_the_client_unchanged_and_leaves_every_key_in_rotation(
    start_gate: StartGate, fake: FakeAnthropic
) -> None:
    gate = start_gate()
    fake.responder = lambda r: error_reply(403, "permission_error", "this organisation may not use this model")
    response = post(gate)
    assert response.status_code == 403 and "x-gate-error" not in response.headers
    assert response.json()["error"]["type"] == "permission_error"
    assert len(fake.received) == 1  # a request-level refusal: not retried on another key
    assert key_states(gate) == {"primary": "available", "secondary": "available"}
    fake.responder = None
    assert post(gate).status_code == 200 and post(gate).status_code == 200
    [data] = events(gate, 1)[:1]
    assert (data["status"], data["error_type"], data["http_status"]) == ("error", "permission_error", 403)


def test_a_401_quarantines_the_key_and_a_background_probe_confirms_it(
    start_gate: StartGate, fake: FakeAnthropic
) -> None:
    gate = start_gate(anthropic={"api": {"key-health": {"quarantine": "1h", "probe-interval": "30s"}}})

    def revoked_primary(r: Received) -> Reply:
        if r.headers.get("x-api-key") == PRIMARY:
            return error_reply(401, "authentication_error", "invalid x-api-key")
        return Reply(fixture="message-basic.json")

    fake.responder = revoked_primary
    for _ in range(4):
        assert post(gate).status_code == 200
    probes = lambda: [r for r in fake.received if r.method == "GET" and r.path_qs.startswith("/v1/models")]  # noqa: E731
    wait_for(lambda: len(probes()) >= 1, "a probe of the rejected key")
    assert ALIAS_BY_VALUE[probes()[0].headers["x-api-key"]] == "primary"
    assert "authorization" not in probes()[0].headers
    assert key_states(gate) == {"primary": "quarantined", "secondary": "available"}
    messages = [ALIAS_BY_VALUE[r.headers["x-api-key"]] for r in fake.received if r.method == "POST"]
    assert messages.count("primary") == 1  # once, then never again while quarantined


def test_one_request_answered_401_on_every_key_does_not_lock_the_keys_out(
    start_gate: StartGate, fake: FakeAnthropic
) -> None:
    gate = start_gate(anthropic={"api": {"key-health": {"quarantine": "1h"}}})
    # Both keys refused for this one request (say, an intermediary's answer); the keys themselves are fine.
    refusals = [error_reply(401, "authentication_error", "invalid x-api-key") for _ in range(2)]

    def first_two_posts_refused(r: Received) -> Reply:
        if r.method == "GET":
            return Reply(body=b'{"data":[],"has_more":false}', stream=False)  # the probes: the keys are good
        return refusals.pop() if refusals else Reply(fixture="message-basic.json")

    fake.responder = first_two_posts_refused
    response = post(gate)
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    # The background probes find both keys good and put them back at once, not after an hour.
    wait_for(lambda: key_states(gate) == {"primary": "available", "secondary": "available"}, "keys restored")
    assert post(gate).status_code == 200
    outcomes = [(e["status"], e["http_status"]) for e in events(gate, 3)]
    assert outcomes == [("error", 401), ("error", 401), ("success", 200)]


# ------------------------------------------------------------------------------------------------ breaker


BREAKER = {
    "circuit-breaker": {
        "sliding-window-size": 4,
        "minimum-number-of-calls": 4,
        "wait-duration-in-open-state": "300ms",
        "permitted-number-of-calls-in-half-open-state": 2,
    }
}


def test_the_half_open_trial_is_judged_at_the_head_so_long_streams_do_not_hold_it(
    start_gate: StartGate, fake: FakeAnthropic
) -> None:
    gate = start_gate(resilience=BREAKER)
    fake.responder = lambda r: error_reply(500, "api_error", "boom")
    for _ in range(4):
        assert post(gate).status_code == 500
    assert health(gate)["components"]["circuitBreaker"]["details"]["state"] == "OPEN"
    time.sleep(0.4)
    # Two long trial streams: their heads come at once, their bodies take seconds.
    fake.responder = lambda r: Reply(fixture="stream-basic.sse", cuts=[40] * 40, delay=0.1)
    headers = {"authorization": f"Bearer {gate.token()}", "content-type": "application/json"}
    clients = [httpx.Client(timeout=WAIT) for _ in range(2)]
    streams: list[Any] = []
    try:
        for client in clients:
            cm = client.stream("POST", gate.url + "/v1/messages", content=json.dumps(STREAM).encode(), headers=headers)
            response = cm.__enter__()
            assert response.status_code == 200
            chunks = response.iter_raw()
            next(chunks)  # the trial's first bytes are here; its end is seconds away
            streams.append((cm, chunks))
        fake.responder = None
        third = post(gate)  # before the fix: 503, the trial was held until both streams ended
        assert third.status_code == 200
        assert health(gate)["components"]["circuitBreaker"]["details"]["state"] == "CLOSED"
        for _cm, rest in streams:
            b"".join(rest)
    finally:
        for cm, _rest in streams:
            cm.__exit__(None, None, None)
        for client in clients:
            client.close()


# ------------------------------------------------------------------------------------------------ slow client


def big_stream(events_count: int = 4000) -> bytes:
    """A valid Messages stream with many ~1 KB deltas: far more than socket buffers hold."""
    text = "x" * 1000
    parts = [fixture("stream-basic.sse").split(b"event: content_block_delta", 1)[0]]
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
    line = b"event: content_block_delta\ndata: " + json.dumps(delta).encode() + b"\n\n"
    parts.append(line * events_count)
    parts.append(
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
        b'"usage":{"output_tokens":4000}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    return b"".join(parts)


def test_a_client_that_stops_reading_is_not_blamed_on_anthropic(start_gate: StartGate, fake: FakeAnthropic) -> None:
    gate = start_gate(
        anthropic={"api": {"timeouts": {"stream-idle": "1s"}}},
        server={"limits": {"send-timeout": "2s"}},
    )
    fake.responder = lambda r: Reply(body=big_stream(), stream=True, cuts=[64 * 1024] * 100)
    body = json.dumps(STREAM).encode()
    sock = stalled_stream_client(gate.port, gate.token(), body)
    try:
        [data] = events(gate, 1)
    finally:
        sock.close()
    assert data["status"] == "client_timeout", data
    assert data["error_type"] is None and data["http_status"] == 200
    details = health(gate)["components"]["circuitBreaker"]["details"]
    assert details["failedCalls"] == 0  # not counted against Anthropic: its head was a success


# ------------------------------------------------------------------------------------------------ before the first byte


def test_upstream_dropping_right_after_a_streams_head_gets_a_clean_502(
    start_gate: StartGate, fake: FakeAnthropic
) -> None:
    gate = start_gate()
    fake.enqueue(Reply(fixture="stream-basic.sse", drop_after=0))
    response = post(gate, STREAM)
    assert is_error_shape(response, 502, "api_error")
    [data] = events(gate, 1)
    assert (data["status"], data["error_type"]) == ("error", "api_error")


def test_a_stream_stalled_before_its_first_chunk_gets_a_clean_504(start_gate: StartGate, fake: FakeAnthropic) -> None:
    gate = start_gate(anthropic={"api": {"timeouts": {"stream-idle": "500ms"}}})
    fake.enqueue(Reply(fixture="stream-basic.sse", stall_after=0))
    response = post(gate, STREAM)
    assert is_error_shape(response, 504, "timeout_error")
    [data] = events(gate, 1)
    assert (data["status"], data["error_type"]) == ("error", "timeout_error")


class RawUpstream:
    """A loopback upstream that answers every request with the same raw bytes (and ``later`` bytes 0.1 s after
    them, in a read of their own), then closes."""

    def __init__(self, answer: bytes, later: bytes = b"") -> None:
        self.answer = answer
        self.later = later
        self.bg = BackgroundLoop()
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(self.answer)
        await writer.drain()
        if self.later:
            await asyncio.sleep(0.1)
            writer.write(self.later)
            await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()

    def __enter__(self) -> str:
        server = self.bg.run(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.bg.close()


@pytest.mark.parametrize(
    "first_chunk",
    [b"0x10\r\n", b"ffffffffffffffffffff\r\n", b"10\ndata: x\n"],
    ids=["0x-prefix", "overflowing-size", "bare-LF"],
)
def test_a_malformed_first_chunk_gets_a_clean_502(start_gate: StartGate, first_chunk: bytes) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    with RawUpstream(head + first_chunk) as url:
        gate = start_gate(upstream_url=url)
        response = post(gate, STREAM)
        assert is_error_shape(response, 502, "api_error")
        [data] = events(gate, 1)
        assert (data["status"], data["error_type"]) == ("error", "api_error")


# ------------------------------------------------------------------------------------------------ bounded input


def test_a_model_name_no_model_has_is_refused_before_any_upstream_call(
    start_gate: StartGate, fake: FakeAnthropic
) -> None:
    gate = start_gate()
    response = post(gate, {**MESSAGE, "model": "m" * 100_000})
    assert is_error_shape(response, 400, "invalid_request_error")
    assert len(response.content) < 1000  # the name is not echoed back
    assert fake.received == []
    assert post(gate).status_code == 200
    [data] = events(gate, 1)
    assert data["status"] == "success"  # the refused call owed no event: the next event is the sentinel's


# ------------------------------------------------------------------------------------------------ the stream relay
# A pass-through answer's chunks go from the upstream connection's callback to the client's transport; the relay
# task wakes only at the start, the end, on failures, deadlines and a client that does not keep up.


def relayed_streams(gate: RunningGate) -> list[tuple[bool, int, int]]:
    """For each stream Gate is relaying from Anthropic: (upstream reading paused, bytes buffered unread
    from upstream, bytes waiting in the client's transport), read on Gate's own loop."""

    def look() -> list[tuple[bool, int, int]]:
        assert gate.gate is not None
        pool = gate.gate.upstream._pool  # the anthropic upstream's (shared with the key prober)
        assert pool is not None
        found = []
        for conn in pool._open:
            response = conn._response
            sink = getattr(response, "_receiver", None)
            if response is None or sink is None:
                continue
            transport = sink._response._conn.transport
            waiting = transport.get_write_buffer_size() if transport is not None else 0
            found.append((conn.reading_paused, response._size, waiting))
        return found

    return gate.bg.call(look)


def test_a_client_that_never_reads_holds_gate_to_bounded_buffers_while_upstream_floods(
    start_gate: StartGate, fake: FakeAnthropic
) -> None:
    gate = start_gate(
        anthropic={"api": {"timeouts": {"stream-idle": "1s"}}},
        server={"limits": {"send-timeout": "2s"}},
    )
    flood = big_stream(16000)  # 16 MB, written as fast as Gate takes it
    fake.responder = lambda r: Reply(body=flood, stream=True, cuts=[64 * 1024] * 300)
    body = json.dumps(STREAM).encode()
    sock = stalled_stream_client(gate.port, gate.token(), body)
    samples: list[tuple[bool, int, int]] = []
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            samples += relayed_streams(gate)
            time.sleep(0.05)
        [data] = events(gate, 1)
    finally:
        sock.close()
    assert samples, "the stream was not being relayed"
    assert any(paused for paused, _, _ in samples)  # Gate stopped reading upstream
    # What Gate holds for this stream: nothing unread from upstream, and in the client's transport no more than
    # its high-water mark plus one read from upstream (256 KB), however much upstream has to send.
    assert max(buffered for _, buffered, _ in samples) <= 256 * 1024
    assert max(waiting for _, _, waiting in samples) <= 1024 * 1024
    assert data["status"] == "client_timeout", data
    assert data["error_type"] is None and data["http_status"] == 200
    assert health(gate)["components"]["circuitBreaker"]["details"]["failedCalls"] == 0


@pytest.mark.parametrize("same_read", [True, False], ids=["same-read", "later-read"])
def test_a_malformed_chunk_after_good_ones_cuts_the_client_off_after_the_good_bytes(
    start_gate: StartGate, same_read: bool
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    good = fixture("stream-basic.sse").split(b"event: content_block_stop", 1)[0]
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in (good[:300], good[300:]))
    bad = b"zz\r\nnot a chunk\r\n"
    with RawUpstream(head + chunks + bad if same_read else head + chunks, later=b"" if same_read else bad) as url:
        gate = start_gate(upstream_url=url)
        received = b""
        headers = {"authorization": f"Bearer {gate.token()}"}
        with (
            pytest.raises(httpx.HTTPError),
            httpx.stream("POST", gate.url + "/v1/messages", content=json.dumps(STREAM).encode(), headers=headers) as r,
        ):
            assert r.status_code == 200
            for piece in r.iter_raw():
                received += piece
        [data] = events(gate, 1)
    assert received == good  # every good byte, then the connection cut: never a well-framed end
    assert (data["status"], data["error_type"], data["http_status"]) == ("error", "api_error", 200)
    assert data["input_tokens"] == 25  # metered up to the break
    assert health(gate)["components"]["circuitBreaker"]["details"]["failedCalls"] == 1  # a late failure


def test_a_client_leaving_mid_stream_while_upstream_floods_cancels_upstream(
    start_gate: StartGate, fake: FakeAnthropic
) -> None:
    gate = start_gate()
    flood = big_stream(16000)
    fake.responder = lambda r: Reply(body=flood, stream=True, cuts=[64 * 1024] * 300)
    headers = {"authorization": f"Bearer {gate.token()}"}
    with httpx.stream(
        "POST", gate.url + "/v1/messages", content=json.dumps(STREAM).encode(), timeout=WAIT, headers=headers
    ) as response:
        assert next(response.iter_raw()).startswith(b"event: message_start")
    wait_for(lambda: fake.cancelled == 1, "the upstream request to be cancelled")
    assert fake.completed == 0
    [data] = events(gate, 1)
    assert (data["status"], data["error_type"], data["http_status"]) == ("client_disconnected", None, 200)
    assert relayed_streams(gate) == []  # nothing left relaying
    assert post(gate).status_code == 200  # and the next call is fine


def test_the_relay_task_sleeps_through_a_pass_through_stream(
    start_gate: StartGate, fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    wakes: list[str] = []
    wait = relay._StreamSink.wait

    async def counted(self: relay._StreamSink) -> None:
        wakes.append("wait")
        await wait(self)

    monkeypatch.setattr(relay._StreamSink, "wait", counted)
    gate = start_gate()
    sse = fixture("stream-basic.sse")
    fake.enqueue(Reply(fixture="stream-basic.sse", cuts=[40] * 60, delay=0.005))  # dozens of reads
    response = post(gate, STREAM)
    assert response.status_code == 200 and response.content == sse  # every byte, in order
    [data] = events(gate, 1)
    assert (data["status"], data["input_tokens"], data["output_tokens"]) == ("success", 25, 15)
    assert len(wakes) <= 2, wakes  # once for the whole stream (twice if its first bytes came apart from the head)


def test_a_stream_that_arrives_whole_reaches_the_client_in_one_write(
    start_gate: StartGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    write = server._Connection.write

    def counted(self: server._Connection, data: bytes) -> None:
        writes.append(len(data))
        write(self, data)

    monkeypatch.setattr(server._Connection, "write", counted)
    sse = fixture("stream-basic.sse")
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    with RawUpstream(head + b"%x\r\n%b\r\n0\r\n\r\n" % (len(sse), sse)) as url:
        gate = start_gate(upstream_url=url)
        response = post(gate, STREAM)
        [data] = events(gate, 1)
    assert response.status_code == 200 and response.content == sse
    assert len(writes) == 1  # head, the events and the end together: one write, one segment for the client
    assert (data["status"], data["output_tokens"]) == ("success", 15)


def _raw(gate: RunningGate, data: bytes, *, read_some: bool = False) -> None:
    """A client that sends ``data`` and goes away (after the first bytes of the answer when ``read_some``)."""
    with connect(gate) as sock:
        sock.sendall(data)
        if read_some:
            sock.recv(1)


def test_finished_streams_and_closed_connections_leave_nothing_for_the_cyclic_collector(
    start_gate: StartGate, fake: FakeAnthropic
) -> None:
    """A stream holds ~90 objects (connection, parser, sink, meter, task, span...). Held in a reference cycle after
    it ends, all of them wait for a full collection, whose pause every stream starting then feels: with 2,000
    streams open, ~100,000 objects. Every way a connection or a stream can end must free them by reference count."""
    gate = start_gate()
    token = gate.token()
    body = json.dumps(STREAM).encode()
    head = f"POST /v1/messages HTTP/1.1\r\nHost: gate\r\nAuthorization: Bearer {token}\r\n".encode()
    gone = (server._Connection, server.StreamResponse, relay._Exchange, relay._StreamSink, UsageMeter)

    def alive() -> list[str]:
        return [type(o).__qualname__ for o in gc.get_objects() if type(o) in gone]

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds unreachable is kept in gc.garbage, not freed
    try:
        for _ in range(5):
            assert post(gate).status_code == 200  # a new connection each time
            assert post(gate, STREAM).status_code == 200
        _raw(gate, head + b"Content-Le")  # gone in the middle of the headers
        _raw(gate, head + b"Content-Length: 500\r\n\r\n" + body[:20])  # in the middle of the body
        _raw(gate, head + b"Content-Length: %d\r\n\r\n" % len(body) + body, read_some=True)  # in the middle of a stream
        fake.enqueue(Reply(fixture="stream-basic.sse", cuts=[40] * 60, delay=0.01))
        _raw(gate, head + b"Content-Length: %d\r\n\r\n" % len(body) + body, read_some=True)  # while upstream sends
        _raw(gate, b"GET / HTTP/1.1\r\nHost: gate\r\n\r\n", read_some=True)
        _raw(gate, b"\x16\x03\x01 not http at all\r\n\r\n", read_some=True)
        deadline = time.monotonic() + WAIT
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = sorted(alive())
        gc.collect()
        cyclic = sorted(type(o).__qualname__ for o in gc.garbage if "gate" in getattr(type(o), "__module__", ""))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert (left, cyclic) == ([], [])
