"""The proxy as a client sees it: the official anthropic SDK through Gate to a fake Anthropic, over sockets."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx
import pytest

from tests.fake_anthropic import FakeAnthropic, Reply, error_reply, fixture
from tests.harness import RunningGate, read_events

MESSAGE = {"model": "claude-opus-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]}


def client(gate: RunningGate, **kwargs: object) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gate.url, api_key=gate.token(), max_retries=0, **kwargs)  # type: ignore[arg-type]


def events_path(gate: RunningGate) -> Path:
    return Path(gate.settings.usage.file.path)


def raw_post(
    gate: RunningGate, body: bytes, headers: dict[str, str] | None = None, path: str = "/v1/messages"
) -> httpx.Response:
    all_headers = {
        "authorization": f"Bearer {gate.token()}",
        "content-type": "application/json",
        **(headers or {}),
    }
    return httpx.post(gate.url + path, content=body, headers=all_headers, timeout=10)


# ------------------------------------------------------------------------------------------------ happy paths


def test_create_non_streaming(module_gate: RunningGate, fake: FakeAnthropic) -> None:
    message = client(module_gate).messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert message.id == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert message.usage.input_tokens == 12 and message.usage.output_tokens == 6
    sent = fake.received[-1]
    assert sent.path_qs == "/v1/messages"
    assert json.loads(sent.body) == MESSAGE
    assert sent.headers["x-api-key"].startswith("sk-ant-test-")
    assert "authorization" not in sent.headers


def test_stream_true_and_stream_helper(module_gate: RunningGate, fake: FakeAnthropic) -> None:
    sdk = client(module_gate)
    fake.enqueue(Reply(fixture="stream-tool-use.sse", cuts=[7, 1, 300, 2, 2, 50]))
    events = list(sdk.messages.create(**MESSAGE, stream=True))  # type: ignore[call-overload]
    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    fake.enqueue(Reply(fixture="stream-basic.sse", cuts=[1] * 40))
    with sdk.messages.stream(**MESSAGE) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello!"
    assert final.usage.output_tokens == 15


@pytest.mark.parametrize("name", ["stream-basic.sse", "stream-tool-use.sse", "stream-web-search-usage.sse"])
@pytest.mark.parametrize("cuts", [None, [1] * 64, [3, 500, 17, 1, 1, 2048]])
def test_streamed_bytes_equal_upstream_bytes(
    module_gate: RunningGate, fake: FakeAnthropic, name: str, cuts: list[int] | None
) -> None:
    fake.enqueue(Reply(fixture=name, cuts=cuts))
    body = json.dumps({**MESSAGE, "stream": True}).encode()
    with httpx.stream(
        "POST",
        module_gate.url + "/v1/messages",
        content=body,
        timeout=10,
        headers={"authorization": f"Bearer {module_gate.token()}", "content-type": "application/json"},
    ) as response:
        received = b"".join(response.iter_raw())
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["request-id"].startswith("req_fake_")
    assert received == fixture(name)


def test_count_tokens_and_models(module_gate: RunningGate, fake: FakeAnthropic) -> None:
    sdk = client(module_gate)
    count = sdk.messages.count_tokens(model="claude-opus-4-6", messages=[{"role": "user", "content": "Hi"}])
    assert count.input_tokens == 14
    page = sdk.models.list()
    assert [m.id for m in page.data] == ["claude-opus-4-6", "claude-haiku-4-5"]
    model = sdk.models.retrieve("claude-haiku-4-5")
    assert model.id == "claude-haiku-4-5"
    assert [r.path_qs.split("?")[0] for r in fake.received] == [
        "/v1/messages/count_tokens",
        "/v1/models",
        "/v1/models/claude-haiku-4-5",
    ]


# ------------------------------------------------------------------------------------------------ header rules


def test_keys_rotate_round_robin(module_gate: RunningGate, fake: FakeAnthropic) -> None:
    sdk = client(module_gate)
    for _ in range(4):
        sdk.messages.create(**MESSAGE)  # type: ignore[call-overload]
    keys = [r.headers["x-api-key"] for r in fake.received]
    assert keys[0] != keys[1] and keys[0] == keys[2] and keys[1] == keys[3]
    assert set(keys) == {"sk-ant-test-primary-0000000000000000", "sk-ant-test-secondary-000000000000000"}


def test_headers_forwarded_and_credentials_dropped(module_gate: RunningGate, fake: FakeAnthropic) -> None:
    token = module_gate.token()
    response = httpx.post(
        module_gate.url + "/v1/messages?beta=true",
        content=json.dumps(MESSAGE).encode(),
        headers={
            "authorization": f"Bearer {token}",
            "x-api-key": token,
            "content-type": "application/json",
            "anthropic-version": "2026-10-21",
            "anthropic-beta": "interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14",
            "anthropic-dangerous-direct-browser-access": "true",
            "user-agent": "claude-cli/2.1.0 (external, cli)",
            "x-stainless-lang": "js",
            "x-claude-code-session-id": "5f1c-session",
            "x-custom-team": "platform",
            "connection": "keep-alive, x-hop",
            "x-hop": "must-not-pass",
            "keep-alive": "timeout=5",
            "te": "trailers",
        },
        timeout=10,
    )
    assert response.status_code == 200
    sent = fake.received[-1]
    assert sent.path_qs == "/v1/messages?beta=true"
    h = sent.headers
    assert h["anthropic-version"] == "2026-10-21"
    assert h["anthropic-beta"] == "interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14"
    assert h["anthropic-dangerous-direct-browser-access"] == "true"
    assert h["user-agent"] == "claude-cli/2.1.0 (external, cli)"
    assert h["x-stainless-lang"] == "js"
    assert h["x-claude-code-session-id"] == "5f1c-session"
    assert h["x-custom-team"] == "platform"
    assert h["x-api-key"].startswith("sk-ant-test-")
    assert token not in str(h)
    for dropped in ("authorization", "x-hop", "keep-alive", "te"):
        assert dropped not in h
    # response headers from upstream reach the client
    assert response.headers["anthropic-organization-id"] == "org-fake"
    assert response.headers["x-custom-upstream"] == "kept"
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "3999"


def test_anthropic_version_added_only_when_absent(module_gate: RunningGate, fake: FakeAnthropic) -> None:
    assert raw_post(module_gate, json.dumps(MESSAGE).encode()).status_code == 200
    assert fake.received[-1].headers["anthropic-version"] == "2023-06-01"


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("status", "error_type", "sdk_error"),
    [
        (400, "invalid_request_error", anthropic.BadRequestError),
        (529, "overloaded_error", anthropic.InternalServerError),
        (500, "api_error", anthropic.InternalServerError),
    ],
)
def test_upstream_errors_reach_the_sdk_unchanged(
    module_gate: RunningGate, fake: FakeAnthropic, status: int, error_type: str, sdk_error: type[Exception]
) -> None:
    fake.enqueue(error_reply(status, error_type, f"upstream says {error_type}", {"x-should-retry": "false"}))
    with pytest.raises(sdk_error) as caught:
        client(module_gate).messages.create(**MESSAGE)  # type: ignore[call-overload]
    error = caught.value
    assert isinstance(error, anthropic.APIStatusError)
    assert error.status_code == status
    assert error.body == {
        "type": "error",
        "error": {"type": error_type, "message": f"upstream says {error_type}"},
        "request_id": "req_error_1",
    }
    assert error.response.headers["x-should-retry"] == "false"
    assert "x-gate-error" not in error.response.headers


def test_upstream_429_passes_through_when_every_key_is_limited(
    module_gate: RunningGate, fake: FakeAnthropic
) -> None:
    fake.enqueue(
        error_reply(
            429, "rate_limit_error", "Number of requests has exceeded your rate limit", {"retry-after": "1"}
        ),
        error_reply(
            429, "rate_limit_error", "Number of requests has exceeded your rate limit", {"retry-after": "1"}
        ),
    )
    with pytest.raises(anthropic.RateLimitError) as caught:
        client(module_gate).messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert caught.value.status_code == 429
    assert caught.value.body["error"]["message"] == "Number of requests has exceeded your rate limit"  # type: ignore[index]
    assert caught.value.response.headers["retry-after"] == "1"


def test_invalid_json_is_400_without_upstream_call(module_gate: RunningGate, fake: FakeAnthropic) -> None:
    for body in (b"{not json", b"[1,2]", b"", b"\xff\xfe"):
        response = raw_post(module_gate, body)
        assert response.status_code == 400
        payload = response.json()
        assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"
    assert fake.received == []


def test_oversized_body_is_413(start_gate, fake: FakeAnthropic) -> None:  # type: ignore[no-untyped-def]
    gate = start_gate(server={"limits": {"max-body-size": "1KB"}})
    response = raw_post(gate, json.dumps({**MESSAGE, "pad": "x" * 2000}).encode())
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"
    # a chunked body without a length is held to the same limit
    chunks = iter([b'{"model":"m","pad":"', b"x" * 4000, b'"}'])
    response = httpx.post(
        gate.url + "/v1/messages",
        content=chunks,
        timeout=10,
        headers={"authorization": f"Bearer {gate.token()}", "content-type": "application/json"},
    )
    assert response.status_code == 413
    assert fake.received == []


def test_unknown_paths_and_root_probe(module_gate: RunningGate, fake: FakeAnthropic) -> None:
    assert httpx.head(module_gate.url + "/").status_code == 200
    assert httpx.get(module_gate.url + "/").status_code == 200
    response = httpx.get(module_gate.url + "/v2/whatever")
    assert response.status_code == 404
    assert response.json() == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "Not found: GET /v2/whatever"},
    }
    response = httpx.get(module_gate.url + "/v1/messages")
    assert response.status_code == 405 and response.json()["error"]["type"] == "invalid_request_error"


def test_upstream_unreachable_is_502(start_gate, fake: FakeAnthropic) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    gate = start_gate(upstream_url=dead)
    with pytest.raises(anthropic.APIStatusError) as caught:
        client(gate).messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert caught.value.status_code == 502
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]


def test_upstream_header_timeout_is_504(start_gate, fake: FakeAnthropic) -> None:  # type: ignore[no-untyped-def]
    gate = start_gate(anthropic={"api": {"timeouts": {"response-headers": "300ms"}}})
    fake.enqueue(Reply(headers_delay=5))
    with pytest.raises(anthropic.APIStatusError) as caught:
        client(gate).messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert caught.value.status_code == 504
    assert caught.value.body["error"]["type"] == "timeout_error"  # type: ignore[index]


def test_gzip_answer_passes_through_and_is_metered(start_gate, fake: FakeAnthropic) -> None:  # type: ignore[no-untyped-def]
    gate = start_gate()
    fake.enqueue(Reply(fixture="stream-tool-use.sse", gzip=True, stream=True, cuts=[5, 9, 100]))
    body = json.dumps({**MESSAGE, "stream": True}).encode()
    with httpx.stream(
        "POST",
        gate.url + "/v1/messages",
        content=body,
        timeout=10,
        headers={"authorization": f"Bearer {gate.token()}", "accept-encoding": "gzip, br, zstd"},
    ) as response:
        assert response.headers["content-encoding"] == "gzip"
        assert b"".join(response.iter_bytes()) == fixture("stream-tool-use.sse")
    assert "zstd" not in fake.received[-1].headers["accept-encoding"]
    event = read_events(events_path(gate), 1)[-1]
    assert event["data"]["input_tokens"] == 472 and event["data"]["output_tokens"] == 89


def test_usage_record_per_call(start_gate, fake: FakeAnthropic) -> None:  # type: ignore[no-untyped-def]
    gate = start_gate()
    sdk = client(gate)
    sdk.messages.create(**MESSAGE)  # type: ignore[call-overload]
    fake.enqueue(Reply(fixture="stream-web-search-usage.sse", cuts=[11] * 100))
    list(sdk.messages.create(**MESSAGE, stream=True))  # type: ignore[call-overload]
    events = read_events(events_path(gate), 2)
    by_stream = {e["data"]["stream"]: e["data"] for e in events}
    assert by_stream[False]["input_tokens"] == 12 and by_stream[False]["output_tokens"] == 6
    assert by_stream[True]["input_tokens"] == 10682 and by_stream[True]["output_tokens"] == 510
    assert all(e["subject"] == "alice" for e in events)


def test_an_answer_larger_than_the_buffer_is_relayed_with_its_length_once(
    start_gate: Callable[..., RunningGate], fake: FakeAnthropic
) -> None:
    gate = start_gate()  # its own: the module's Gate may have its keys rate limited by an earlier test
    # Past 8 MB the relay streams a Content-Length answer instead of buffering it: the client must get one
    # Content-Length (upstream's) and no chunked framing beside it, and every byte.
    text = "x" * (9 * 1024 * 1024)
    answer = json.dumps(
        {
            "id": "msg_big",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 4},
        }
    ).encode()
    fake.enqueue(Reply(body=answer, stream=False, cuts=[65536] * 8))
    with socket.create_connection(("127.0.0.1", gate.port), timeout=10) as sock:
        body = json.dumps(MESSAGE).encode()
        sock.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: gate\r\nAuthorization: Bearer %b\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
            % (gate.token().encode(), len(body), body)
        )
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head, _, rest = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        names = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]]
        assert names.count(b"content-length") == 1 and b"transfer-encoding" not in names
        while len(rest) < len(answer):
            chunk = sock.recv(1 << 20)
            assert chunk, "the answer was cut short"
            rest += chunk
    assert rest == answer
