"""Resilience end to end: the circuit breaker, key health, timeouts and disconnects, seen from a client.

A real Gate in-process against the scriptable fake Anthropic, over real sockets; the official SDK or httpx as client.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.fake_anthropic import FakeAnthropic, Received, Reply, error_reply, fixture
from tests.harness import RunningGate, read_events

MESSAGE = {"model": "claude-opus-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]}
STREAM = {**MESSAGE, "stream": True}
BREAKER = {
    "circuit-breaker": {
        "sliding-window-size": 10,
        "minimum-number-of-calls": 5,
        "wait-duration-in-open-state": "1s",
        "permitted-number-of-calls-in-half-open-state": 2,
    }
}
PRIMARY = "sk-ant-test-primary-0000000000000000"
SECONDARY = "sk-ant-test-secondary-000000000000000"
ALIAS_BY_VALUE = {PRIMARY: "primary", SECONDARY: "secondary"}
WAIT = 10.0  # a safety net for blocking calls, never an assertion
StartGate = Callable[..., RunningGate]


def sdk(gate: RunningGate) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gate.url, api_key=gate.token(), max_retries=0, timeout=WAIT)


def post(gate: RunningGate, body: dict[str, Any] = MESSAGE, timeout: float = WAIT) -> httpx.Response:
    headers = {"authorization": f"Bearer {gate.token()}", "content-type": "application/json"}
    return httpx.post(gate.url + "/v1/messages", content=json.dumps(body).encode(), headers=headers, timeout=timeout)


def health(gate: RunningGate, path: str = "/actuator/health") -> tuple[int, dict[str, Any]]:
    response = httpx.get(gate.url + path, timeout=WAIT)
    return response.status_code, response.json()


def breaker_state(gate: RunningGate) -> str:
    return str(health(gate)[1]["components"]["circuitBreaker"]["details"]["state"])


def events(gate: RunningGate, count: int) -> list[dict[str, Any]]:
    return [event["data"] for event in read_events(Path(gate.settings.usage.file.path), count)]


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def sent_aliases(fake: FakeAnthropic) -> list[str]:
    return [ALIAS_BY_VALUE[r.headers["x-api-key"]] for r in fake.received]


@pytest.fixture
def breaker_gate(start_gate: StartGate) -> RunningGate:
    return start_gate(resilience=BREAKER)


def open_breaker(gate: RunningGate, fake: FakeAnthropic, status: int = 500) -> None:
    error_type = "overloaded_error" if status == 529 else "api_error"
    fake.enqueue(*(error_reply(status, error_type, "upstream is failing") for _ in range(5)))
    for _ in range(5):
        assert post(gate).status_code == status  # passed through, and counted
    assert breaker_state(gate) == "OPEN"


# ------------------------------------------------------------------------------------------------ circuit breaker


def test_breaker_opens_answers_503_then_closes_through_half_open(
    breaker_gate: RunningGate, fake: FakeAnthropic
) -> None:
    gate = breaker_gate
    open_breaker(gate, fake, 500)
    upstream_calls = len(fake.received)

    refused = post(gate)
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "overloaded_error"
    assert refused.headers["x-gate-error"] == "overloaded_error"
    retry_after = int(refused.headers["retry-after"])
    assert retry_after == 1  # the seconds left of wait-duration-in-open-state (1s), rounded up
    with pytest.raises(anthropic.InternalServerError) as caught:  # what an SDK user sees
        sdk(gate).messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert caught.value.status_code == 503
    assert len(fake.received) == upstream_calls  # answered at once, upstream untouched

    status, body = health(gate)
    assert status == 503 and body["status"] == "DOWN"
    assert body["components"]["circuitBreaker"]["status"] == "DOWN"
    assert health(gate, "/actuator/health/readiness")[0] == 200  # an open breaker keeps the pod in rotation

    time.sleep(retry_after)
    assert post(gate).status_code == 200  # first trial call
    assert breaker_state(gate) == "HALF_OPEN"
    assert post(gate).status_code == 200  # second and last trial call: healthy, so CLOSED again
    assert breaker_state(gate) == "CLOSED"
    status, body = health(gate)
    assert status == 200 and body["components"]["circuitBreaker"]["status"] == "UP"


def test_half_open_lets_only_the_permitted_calls_through(breaker_gate: RunningGate, fake: FakeAnthropic) -> None:
    gate = breaker_gate
    open_breaker(gate, fake, 500)
    time.sleep(1)
    fake.enqueue(*(Reply(fixture="message-basic.json", headers_delay=0.5) for _ in range(2)))
    before = len(fake.received)
    results: list[int] = []
    trials = [threading.Thread(target=lambda: results.append(post(gate).status_code)) for _ in range(2)]
    for thread in trials:
        thread.start()
    wait_for(lambda: len(fake.received) == before + 2, "both trial calls upstream")
    third = post(gate)
    assert third.status_code == 503 and third.headers["retry-after"] == "1"
    for thread in trials:
        thread.join(WAIT)
    assert results == [200, 200]
    assert breaker_state(gate) == "CLOSED"


def test_failing_trial_calls_open_it_again(breaker_gate: RunningGate, fake: FakeAnthropic) -> None:
    gate = breaker_gate
    open_breaker(gate, fake, 529)
    time.sleep(1)
    fake.enqueue(error_reply(529, "overloaded_error", "Overloaded"), error_reply(529, "overloaded_error", "Overloaded"))
    assert post(gate).status_code == 529
    assert post(gate).status_code == 529  # a 529 is passed through, never retried
    assert breaker_state(gate) == "OPEN"
    assert post(gate).status_code == 503


def test_client_errors_do_not_count(breaker_gate: RunningGate, fake: FakeAnthropic) -> None:
    gate = breaker_gate
    fake.enqueue(*(error_reply(400, "invalid_request_error", "bad") for _ in range(8)))
    fake.enqueue(*(error_reply(404, "not_found_error", "no such model") for _ in range(2)))
    statuses = [post(gate).status_code for _ in range(10)]
    assert statuses == [400] * 8 + [404] * 2
    assert breaker_state(gate) == "CLOSED"


def test_an_overloaded_error_inside_a_200_stream_counts_as_a_failure(
    breaker_gate: RunningGate, fake: FakeAnthropic
) -> None:
    gate = breaker_gate
    start = fixture("stream-basic.sse").split(b"\n\n")[0] + b"\n\n"
    overloaded = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    fake.enqueue(*(Reply(body=start + overloaded, stream=True) for _ in range(5)))
    for _ in range(5):
        with httpx.stream("POST", gate.url + "/v1/messages", content=json.dumps(STREAM).encode(), timeout=WAIT,
                          headers={"authorization": f"Bearer {gate.token()}"}) as response:
            assert response.status_code == 200
            assert b"overloaded_error" in response.read()
    assert breaker_state(gate) == "OPEN"
    data = events(gate, 5)
    assert {(e["status"], e["error_type"], e.get("http_status")) for e in data} == {("error", "overloaded_error", 200)}


def test_a_long_stream_is_not_a_slow_call_but_slow_headers_are(start_gate: StartGate, fake: FakeAnthropic) -> None:
    slow = {"circuit-breaker": {**BREAKER["circuit-breaker"], "slow-call-duration-threshold": "300ms",
                                "slow-call-rate-threshold": 50}}
    gate = start_gate(resilience=slow)
    paced = Reply(fixture="stream-basic.sse", cuts=[200] * 5, delay=0.1)  # about 0.5 s from headers to the end
    fake.enqueue(*(paced for _ in range(5)))
    run_concurrently(gate, 5, STREAM)
    assert breaker_state(gate) == "CLOSED"
    fake.enqueue(*(Reply(fixture="stream-basic.sse", headers_delay=0.4) for _ in range(5)))
    run_concurrently(gate, 5, STREAM)
    assert breaker_state(gate) == "OPEN"


def run_concurrently(gate: RunningGate, count: int, body: dict[str, Any]) -> list[int]:
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(post(gate, body).status_code)) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert statuses == [200] * count
    return statuses


def test_clients_leaving_half_open_trials_do_not_leak_permits(breaker_gate: RunningGate, fake: FakeAnthropic) -> None:
    gate = breaker_gate
    open_breaker(gate, fake, 500)
    time.sleep(1)
    fake.enqueue(*(Reply(fixture="stream-basic.sse", cuts=[300], delay=5) for _ in range(2)))
    for _ in range(2):  # both trial calls: the client takes the first bytes and leaves
        cancelled = fake.cancelled
        with httpx.stream("POST", gate.url + "/v1/messages", content=json.dumps(STREAM).encode(), timeout=WAIT,
                          headers={"authorization": f"Bearer {gate.token()}"}) as response:
            assert response.status_code == 200
            next(response.iter_raw())
        wait_for(lambda c=cancelled: fake.cancelled > c, "upstream cancelled")  # type: ignore[misc]
    # The trial was judged at the two heads (both 200): closed, whatever the clients did afterwards.
    assert breaker_state(gate) == "CLOSED"
    assert post(gate).status_code == 200
    assert post(gate).status_code == 200


def test_a_trial_stream_that_breaks_after_its_head_counts_as_a_failure(
    breaker_gate: RunningGate, fake: FakeAnthropic
) -> None:
    gate = breaker_gate
    open_breaker(gate, fake, 500)
    time.sleep(1)
    fake.enqueue(*(Reply(fixture="stream-basic.sse", cuts=[300], delay=0.5, drop_after=300) for _ in range(2)))
    headers = {"authorization": f"Bearer {gate.token()}"}
    with httpx.Client(timeout=WAIT) as one, httpx.Client(timeout=WAIT) as two:
        streams = [
            client.stream("POST", gate.url + "/v1/messages", content=json.dumps(STREAM).encode(), headers=headers)
            for client in (one, two)
        ]
        responses = [cm.__enter__() for cm in streams]  # both heads are in: the trial is judged
        try:
            assert breaker_state(gate) == "CLOSED"
            for response in responses:
                with pytest.raises(httpx.HTTPError):
                    response.read()  # the client has part of the answer, then the connection is cut
        finally:
            for cm in streams:
                cm.__exit__(None, None, None)
    # Closed at the heads; the two late failures then land in the fresh window, counted against Anthropic.
    details = health(gate)[1]["components"]["circuitBreaker"]["details"]
    assert details["state"] == "CLOSED" and details["failedCalls"] == 2 and details["bufferedCalls"] == 2


# ------------------------------------------------------------------------------------------------ key health


def test_a_429_is_retried_on_the_other_key(start_gate: StartGate, fake: FakeAnthropic) -> None:
    gate = start_gate()
    fake.enqueue(error_reply(429, "rate_limit_error", "slow down", {"retry-after": "30"}))
    message = sdk(gate).messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert message.usage.output_tokens == 6
    first, second = sent_aliases(fake)
    assert first != second  # the fake saw both keys
    data = events(gate, 2)
    assert [(e["status"], e["error_type"], e.get("http_status"), e["key_alias"]) for e in data] == [
        ("error", "rate_limit_error", 429, first),
        ("success", None, 200, second),
    ]
    keys = health(gate)[1]["components"]["apiKeys"]["details"]
    assert keys["count"] == 2 and keys["available"] == 1
    assert {k["alias"]: k["state"] for k in keys["keys"]} == {first: "cooling", second: "available"}
    # later calls skip the cooling key
    for _ in range(3):
        post(gate)
    assert sent_aliases(fake)[2:] == [second] * 3


def test_every_key_cooling_is_429_without_calling_upstream(start_gate: StartGate, fake: FakeAnthropic) -> None:
    gate = start_gate()
    fake.enqueue(
        error_reply(429, "rate_limit_error", "slow down", {"retry-after": "40"}),
        error_reply(429, "rate_limit_error", "slow down", {"retry-after": "20"}),
    )
    passed = post(gate)  # both keys tried: Anthropic's own 429 reaches the client
    assert passed.status_code == 429 and "x-gate-error" not in passed.headers
    assert len(fake.received) == 2

    with pytest.raises(anthropic.RateLimitError) as caught:
        sdk(gate).messages.create(**MESSAGE)  # type: ignore[call-overload]
    response = caught.value.response
    assert response.headers["x-gate-error"] == "rate_limit_error"
    assert 19 <= int(response.headers["retry-after"]) <= 20  # the soonest key's return
    assert len(fake.received) == 2  # upstream never called
    assert health(gate)[1]["components"]["apiKeys"]["status"] == "DOWN"
    assert health(gate, "/actuator/health/readiness")[0] == 200


def test_a_rejected_key_is_quarantined_with_an_alarm_naming_its_alias(
    start_gate: StartGate, fake: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    gate = start_gate(anthropic={"api": {"key-health": {"quarantine": "1h"}}})

    def revoked_primary(r: Received) -> Reply:
        if r.headers.get("x-api-key") == PRIMARY:
            return error_reply(401, "authentication_error", "invalid x-api-key")
        return Reply(fixture="message-basic.json")

    fake.responder = revoked_primary
    with caplog.at_level(logging.INFO):
        for _ in range(4):
            assert post(gate).status_code == 200  # the first retried on the other key before any byte was sent
    posts = [ALIAS_BY_VALUE[r.headers["x-api-key"]] for r in fake.received if r.method == "POST"]
    assert posts.count("primary") == 1  # later requests skip the quarantined key
    alarms = [r for r in caplog.records if r.name == "gate.keys" and r.levelno >= logging.ERROR]
    assert len(alarms) == 1
    assert "primary" in alarms[0].getMessage() and "401" in alarms[0].getMessage()
    assert PRIMARY not in caplog.text and SECONDARY not in caplog.text
    keys = health(gate)[1]["components"]["apiKeys"]["details"]["keys"]
    states = {k["alias"]: k for k in keys}
    assert states["primary"]["state"] == "quarantined" and states["primary"]["availableInSeconds"] > 3000


def test_a_lone_key_passes_a_403_through_and_stays_while_a_401_takes_it_out(
    start_gate: StartGate, fake: FakeAnthropic
) -> None:
    gate = start_gate(anthropic={"api": {"keys": [{"alias": "only", "value": PRIMARY}]}})
    fake.enqueue(error_reply(403, "permission_error", "not for this organisation"))
    response = post(gate)
    assert response.status_code == 403 and "x-gate-error" not in response.headers
    assert post(gate).status_code == 200  # a 403 is about the request: the key stays
    fake.responder = lambda r: error_reply(401, "authentication_error", "invalid x-api-key")
    response = post(gate)
    assert response.status_code == 401 and "x-gate-error" not in response.headers
    refused = post(gate)  # the only key was rejected: Gate answers itself, and not as a rate limit to wait out
    assert refused.status_code == 503 and refused.headers["x-gate-error"] == "overloaded_error"
    assert refused.json()["error"]["message"].startswith("Every Anthropic API key of the gateway was rejected")
    assert int(refused.headers["retry-after"]) > 0
    assert len([r for r in fake.received if r.method == "POST"]) == 3


# ------------------------------------------------------------------------------------------------ timeouts


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A loopback address that never completes a TCP handshake: a listener with a full backlog."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    for sock in (*fillers, listener):
        sock.close()


def test_connect_timeout_is_retried_once_then_504(start_gate: StartGate, blackhole: str) -> None:
    gate = start_gate(upstream_url=blackhole, anthropic={"api": {"timeouts": {"connect": "300ms"}}})
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(gate).messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert caught.value.status_code == 504
    assert caught.value.body["error"]["type"] == "timeout_error"  # type: ignore[index]
    data = events(gate, 2)  # one record per attempt: the first, and its one retry
    outcomes = [(e["status"], e["error_type"], e.get("http_status")) for e in data]
    assert outcomes == [("error", "timeout_error", None)] * 2


def test_response_header_timeout_is_504_and_cancels_upstream(start_gate: StartGate, fake: FakeAnthropic) -> None:
    gate = start_gate(anthropic={"api": {"timeouts": {"response-headers": "300ms"}}})
    fake.enqueue(Reply(headers_delay=30))
    response = post(gate)
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"
    wait_for(lambda: fake.cancelled == 1, "the upstream request to be cancelled")
    (data,) = events(gate, 1)
    assert (data["status"], data["error_type"], data.get("http_status")) == ("error", "timeout_error", None)


def test_stream_idle_timeout_truncates_the_stream_and_records_the_counts(
    start_gate: StartGate, fake: FakeAnthropic
) -> None:
    gate = start_gate(anthropic={"api": {"timeouts": {"stream-idle": "300ms"}}})
    full = fixture("stream-basic.sse")
    stall_at = full.index(b"event: ping")  # message_start and content_block_start sent, then silence
    fake.enqueue(Reply(fixture="stream-basic.sse", stall_after=stall_at))
    received = b""
    with pytest.raises(httpx.HTTPError), httpx.stream(  # the error comes while reading
        "POST", gate.url + "/v1/messages", content=json.dumps(STREAM).encode(), timeout=WAIT,
        headers={"authorization": f"Bearer {gate.token()}"},
    ) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += chunk
    assert received == full[:stall_at]  # the client has the bytes sent so far, and a broken stream
    wait_for(lambda: fake.cancelled == 1, "the upstream request to be cancelled")
    (data,) = events(gate, 1)
    assert (data["status"], data["error_type"], data.get("http_status")) == ("error", "timeout_error", 200)
    assert data["input_tokens"] == 25 and data["output_tokens"] == 1  # the counts so far, from message_start


# ------------------------------------------------------------------------------------------------ disconnects


def test_a_client_leaving_mid_stream_cancels_upstream(start_gate: StartGate, fake: FakeAnthropic) -> None:
    gate = start_gate()
    fake.enqueue(Reply(fixture="stream-basic.sse", cuts=[300, 100, 100], delay=5))
    with httpx.stream("POST", gate.url + "/v1/messages", content=json.dumps(STREAM).encode(), timeout=WAIT,
                      headers={"authorization": f"Bearer {gate.token()}"}) as response:
        assert next(response.iter_raw()).startswith(b"event: message_start")
    wait_for(lambda: fake.cancelled == 1, "the upstream request to be cancelled")
    assert fake.completed == 0
    (data,) = events(gate, 1)
    assert (data["status"], data["error_type"], data.get("http_status")) == ("client_disconnected", None, 200)
    assert data["input_tokens"] == 25


def test_a_client_leaving_before_upstream_answers_cancels_upstream(
    start_gate: StartGate, fake: FakeAnthropic
) -> None:
    gate = start_gate()
    fake.enqueue(Reply(headers_delay=30))
    with pytest.raises(httpx.ReadTimeout):
        post(gate, timeout=0.5)
    wait_for(lambda: fake.cancelled == 1, "the upstream request to be cancelled")
    (data,) = events(gate, 1)
    assert (data["status"], data.get("http_status"), data["key_alias"]) == ("client_disconnected", None, "primary")
    assert breaker_state(gate) == "CLOSED"
