"""Bad input and load at the HTTP layer: every misbehaving client gets a bounded wait and a clean answer.

Headers that never finish, bodies that never arrive, oversized or malformed requests and a flood of idle sockets
each end in 408, 413, 431, 400 or a closed connection, in Anthropic's error shape, never a stuck worker or a trace.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fake_anthropic import FakeAnthropic
from tests.harness import RunningGate

LIMITS = {"limits": {"header-timeout": "300ms", "body-timeout": "300ms", "max-header-size": "1KB"}}
WAIT = 10.0  # the longest any socket read here may block: a safety net, not a measured bound


def connect(gate: RunningGate) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length (or ended by close): status, headers, body."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a whole response: {buffer!r}")
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    else:
        body += read_until_closed(sock)
    return status, headers, body


def assert_anthropic_error(body: bytes, error_type: str) -> None:
    payload = json.loads(body)
    assert payload["type"] == "error"
    assert payload["error"]["type"] == error_type
    assert "Traceback" not in payload["error"]["message"]


@pytest.fixture
def gate(start_gate: Callable[..., RunningGate]) -> RunningGate:
    return start_gate(server=LIMITS)


# ------------------------------------------------------------------------------------------------ slow clients


def test_headers_that_never_finish_get_408_then_close(gate: RunningGate, fake: FakeAnthropic) -> None:
    with connect(gate) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: gate\r\nContent-Type: application/")  # ... and nothing more
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"x-gate-error: timeout_error" in head.lower()
    assert_anthropic_error(body, "timeout_error")
    assert fake.received == []


def test_a_connection_that_sends_nothing_is_closed(gate: RunningGate) -> None:
    with connect(gate) as sock:
        assert read_until_closed(sock) == b""


def test_the_header_deadline_applies_to_every_request_on_a_kept_alive_connection(gate: RunningGate) -> None:
    with connect(gate) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: gate\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 200 and headers.get("connection", "").lower() != "close"
        sock.sendall(b"GET / HTTP/1.1\r\nHost: ga")  # the next request stalls halfway through its headers
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_body_that_never_arrives_is_408(gate: RunningGate, fake: FakeAnthropic) -> None:
    with connect(gate) as sock:
        sock.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: gate\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + gate.token().encode() + b"\r\nContent-Length: 200\r\n\r\n{\"model\":"
        )
        status, _, body = read_response(sock)
    assert status == 408
    assert_anthropic_error(body, "timeout_error")
    assert fake.received == []


# ------------------------------------------------------------------------------------------------ oversized


def test_an_oversized_header_is_431(gate: RunningGate, fake: FakeAnthropic) -> None:
    response = httpx.get(gate.url + "/v1/models", headers={"x-padding": "a" * 2000}, timeout=WAIT)
    assert response.status_code == 431
    assert response.headers["x-gate-error"] == "request_too_large"
    assert_anthropic_error(response.content, "request_too_large")
    assert fake.received == []


def test_an_oversized_token_is_431_and_never_echoed(gate: RunningGate, fake: FakeAnthropic) -> None:
    secret = "eyJ" + "s" * 3000
    response = httpx.get(gate.url + "/v1/models", headers={"authorization": f"Bearer {secret}"}, timeout=WAIT)
    assert response.status_code == 431
    assert "sss" not in response.text


def test_too_many_headers_is_431(gate: RunningGate) -> None:
    headers = {f"x-h{i}": "v" for i in range(200)}
    response = httpx.get(gate.url + "/", headers=headers, timeout=WAIT)
    assert response.status_code == 431
    assert_anthropic_error(response.content, "request_too_large")


def test_an_oversized_request_line_is_431(gate: RunningGate) -> None:
    response = httpx.get(gate.url + "/v1/models/" + "m" * 3000, timeout=WAIT)
    assert response.status_code == 431


def test_malformed_http_is_a_json_400(gate: RunningGate) -> None:
    with connect(gate) as sock:
        sock.sendall(b"HELLO THERE\r\n\r\n")
        status, headers, body = read_response(sock)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert_anthropic_error(body, "invalid_request_error")


def _post_head(gate: RunningGate, extra: bytes) -> bytes:
    return b"POST /v1/messages HTTP/1.1\r\nHost: gate\r\nAuthorization: Bearer %b\r\n%b" % (
        gate.token().encode(),
        extra,
    )


_BODY = b'{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # CL.TE smuggling shape
        b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"Content-Length: -1\r\n\r\n",
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",  # a chunk size that is not hex
    ],
    ids=["cl-and-te", "two-lengths", "negative-length", "bad-chunk-size"],
)
def test_ambiguous_or_broken_body_framing_is_a_json_400_and_reaches_no_one(
    gate: RunningGate, fake: FakeAnthropic, framing: bytes
) -> None:
    with connect(gate) as sock:
        sock.sendall(_post_head(gate, framing))
        status, _, body = read_response(sock)
        assert read_until_closed(sock) == b""  # and the connection is not reused after it
    assert status == 400
    assert_anthropic_error(body, "invalid_request_error")
    assert fake.received == []


def test_a_chunked_request_body_is_relayed_like_any_other(gate: RunningGate, fake: FakeAnthropic) -> None:
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in (_BODY[:20], _BODY[20:]))
    with connect(gate) as sock:
        sock.sendall(_post_head(gate, b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"))
        status, _, _ = read_response(sock)
    assert status == 200
    assert fake.received[-1].body == _BODY  # forwarded byte for byte, with its length


@pytest.mark.parametrize("size", [2**64 - 1, 32 * 1024 * 1024 + 1], ids=["2^64-1", "limit+1"])
def test_a_chunk_declaring_more_than_the_body_limit_is_413_at_once(
    start_gate: Callable[..., RunningGate], fake: FakeAnthropic, size: int
) -> None:
    gate = start_gate(server={"limits": {"body-timeout": "60s", "max-body-size": "32MB"}})  # no 408 to hide behind
    with connect(gate) as sock:
        sock.sendall(_post_head(gate, b"Transfer-Encoding: chunked\r\n\r\n%x\r\n{" % size))
        status, headers, body = read_response(sock)
        assert read_until_closed(sock) == b""
    assert status == 413 and headers["connection"] == "close"
    assert_anthropic_error(body, "request_too_large")
    assert fake.received == []


def test_http_1_0_with_transfer_encoding_is_answered_and_closed_whatever_connection_says(gate: RunningGate) -> None:
    with connect(gate) as sock:
        sock.sendall(
            b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n0\r\n\r\n"
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        )
        answers = read_until_closed(sock)
    assert len(re.findall(rb"HTTP/1\.1 \d{3} ", answers)) == 1  # the second request is not served
    head = answers.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200 ") and b"connection: close" in head and b"keep-alive" not in head


def test_expect_100_continue_gets_continue_then_the_answer(gate: RunningGate, fake: FakeAnthropic) -> None:
    with connect(gate) as sock:
        sock.sendall(_post_head(gate, b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(_BODY)))
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(_BODY)
        status, _, _ = read_response(sock)
    assert status == 200


def test_pipelined_requests_are_answered_in_order(gate: RunningGate) -> None:
    with connect(gate) as sock:
        sock.sendall(
            b"GET /nowhere HTTP/1.1\r\nHost: gate\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: gate\r\n\r\n"
            b"DELETE /v1/messages HTTP/1.1\r\nHost: gate\r\nConnection: close\r\n\r\n"
        )
        answers = read_until_closed(sock)  # the last request asked to close
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answers)]
    assert statuses == [404, 200, 405]


def test_http_1_0_gets_an_answer_and_a_closed_connection(gate: RunningGate) -> None:
    with connect(gate) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        status, headers, body = read_response(sock)
    assert status == 200 and headers["connection"] == "close" and json.loads(body)["status"] == "ok"


# ------------------------------------------------------------------------------------------------ load


def test_a_flood_of_idle_connections_neither_blocks_others_nor_lingers(gate: RunningGate) -> None:
    idle = [connect(gate) for _ in range(1000)]
    try:
        response = httpx.get(gate.url + "/", timeout=WAIT)  # a real client among the idle ones
        assert response.status_code == 200
        for sock in idle:
            assert read_until_closed(sock) == b""  # each was closed by the header deadline
    finally:
        for sock in idle:
            sock.close()
    assert httpx.get(gate.url + "/", timeout=WAIT).status_code == 200


# ------------------------------------------------------------------------------------------------ arbitrary input

_REQUEST_LINES = st.sampled_from(
    [b"", b"GET / HTTP/1.1\r\n", b"POST /v1/messages HTTP/1.1\r\n", b"GET /v1/models HTTP/1.0\r\n", b"\r\n"]
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=_REQUEST_LINES, junk=st.binary(max_size=300))
def test_arbitrary_bytes_never_get_a_500(gate: RunningGate, start: bytes, junk: bytes) -> None:
    with connect(gate) as sock:
        try:
            sock.sendall(start + junk + b"\r\n\r\n")
            status, headers, body = read_response(sock)
        except (AssertionError, ConnectionResetError, BrokenPipeError):
            return  # a closed connection is a clean answer too
    assert status < 500
    if status >= 400:
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body)["type"] == "error"
