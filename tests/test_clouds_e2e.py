"""Gate in front of Claude's clouds: the official anthropic SDK through Gate to local fakes of Vertex AI, Bedrock
and Foundry that check each cloud's wire format and credentials, failover along the upstream list, and the SDK's
own ``AnthropicVertex`` / ``AnthropicBedrock`` clients against the same fakes as the reference of what each cloud
expects."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.lib.bedrock import AnthropicBedrock
from anthropic.lib.vertex import AnthropicVertex
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gate import relay
from tests.fake_anthropic import FakeAnthropic, error_reply, fixture
from tests.fake_clouds import (
    AWS_ACCESS_KEY,
    AWS_SECRET_KEY,
    BEDROCK_API_KEY,
    BEDROCK_VERSIONS,
    FOUNDRY_KEY,
    FOUNDRY_TOKEN,
    VERTEX_VERSIONS,
    FakeBedrock,
    FakeFoundry,
    FakeGoogleToken,
    FakeVertex,
    bedrock_stream,
    chunk_frame,
    exception_frame,
    sse_events,
)
from tests.harness import BackgroundLoop, RunningGate, read_events, stalled_stream_client

PROJECT, REGION, AWS_REGION = "gate-test", "us-east5", "us-west-2"
MESSAGE: dict[str, Any] = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Hello"}],
}
VERTEX_MODEL = "claude-sonnet-4-5@20250929"
BEDROCK_MODEL = "anthropic.claude-sonnet-4-5-20250929-v1:0"
FOUNDRY_MODEL = "claude-sonnet-4-5-deployment"


@dataclass
class Clouds:
    tokens: FakeGoogleToken
    vertex: FakeVertex
    bedrock: FakeBedrock
    foundry: FakeFoundry
    service_account: Path

    def reset(self) -> None:
        for fake in (self.vertex, self.bedrock, self.foundry):
            fake.received.clear()
            fake.fail.clear()
            fake.stream_body = None
            fake.cuts = None


@pytest.fixture(scope="module")
def clouds(fake_loop: BackgroundLoop, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clouds]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    tokens = FakeGoogleToken(public)
    fake_loop.run(tokens.start())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    account = tmp_path_factory.mktemp("gcp") / "service-account.json"
    account.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": PROJECT,
                "private_key_id": "key-1",
                "private_key": private,
                "client_email": f"gate@{PROJECT}.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": tokens.url + "/token",
            }
        )
    )
    found = Clouds(tokens, FakeVertex(tokens, PROJECT, REGION), FakeBedrock(AWS_REGION), FakeFoundry(), account)
    for fake in (found.vertex, found.bedrock, found.foundry):
        fake_loop.run(fake.start())
    yield found
    for fake in (tokens, found.vertex, found.bedrock, found.foundry):
        fake_loop.run(fake.close())


@pytest.fixture
def cloud(clouds: Clouds) -> Clouds:
    clouds.reset()
    return clouds


def vertex(clouds: Clouds, **extra: Any) -> dict[str, Any]:
    return {
        "name": "vertex-east",
        "type": "vertex",
        "base-url": clouds.vertex.url,
        "project-id": PROJECT,
        "region": REGION,
        "credentials-file": str(clouds.service_account),
        "models": {"claude-sonnet-4-5": VERTEX_MODEL, "claude-haiku-4-5*": "claude-haiku-4-5@20251001"},
        **extra,
    }


def bedrock(clouds: Clouds, **extra: Any) -> dict[str, Any]:
    return {
        "name": "bedrock-west",
        "type": "bedrock",
        "base-url": clouds.bedrock.url,
        "region": AWS_REGION,
        "access-key-id": AWS_ACCESS_KEY,
        "secret-access-key": AWS_SECRET_KEY,
        "models": {"claude-sonnet-4-5": BEDROCK_MODEL},
        **extra,
    }


def foundry(clouds: Clouds, **extra: Any) -> dict[str, Any]:
    return {
        "name": "foundry",
        "type": "foundry",
        "base-url": clouds.foundry.url + "/anthropic",
        "api-key": FOUNDRY_KEY,
        "models": {"claude-sonnet-4-5": FOUNDRY_MODEL},
        **extra,
    }


def sdk(gate: RunningGate) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gate.url, api_key=gate.token(), max_retries=0)


def stream_bytes(gate: RunningGate, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.stream(
        "POST",
        gate.url + "/v1/messages",
        content=json.dumps(body).encode(),
        timeout=10,
        headers={"authorization": f"Bearer {gate.token()}", "content-type": "application/json", **(headers or {})},
    ) as response:
        response.read()
    return response


def usage(gate: RunningGate, count: int) -> list[dict[str, Any]]:
    return [event["data"] for event in read_events(Path(gate.settings.usage.file.path), count)]


StartGate = Callable[..., RunningGate]


# ------------------------------------------------------------------------------------------------ Vertex AI


def test_vertex_messages_through_gate(start_gate: StartGate, cloud: Clouds) -> None:
    gate = start_gate(upstreams=[vertex(cloud)])
    message = sdk(gate).messages.create(**MESSAGE)
    assert message.usage.input_tokens == 12 and message.usage.output_tokens == 6
    seen = cloud.vertex.received[-1]
    assert (
        seen.path == f"/v1/projects/{PROJECT}/locations/{REGION}/publishers/anthropic/models/{VERTEX_MODEL}:rawPredict"
    )
    body = seen.json
    assert "model" not in body and body["anthropic_version"] == "vertex-2023-10-16"
    assert body["messages"] == MESSAGE["messages"] and body["max_tokens"] == 64
    assert seen.headers["authorization"] == f"Bearer {cloud.tokens.issued[-1]}"  # from the token endpoint
    assert "x-api-key" not in seen.headers
    [data] = usage(gate, 1)
    assert (data["upstream"], data["upstream_model"], data["status"]) == ("vertex-east", VERTEX_MODEL, "success")
    assert (data["input_tokens"], data["output_tokens"], data["key_alias"]) == (12, 6, None)


def test_vertex_stream_is_byte_identical_and_the_token_is_reused(start_gate: StartGate, cloud: Clouds) -> None:
    gate = start_gate(upstreams=[vertex(cloud)])
    issued = len(cloud.tokens.issued)
    cloud.vertex.cuts = [1, 7, 300, 2]
    response = stream_bytes(gate, {**MESSAGE, "stream": True})
    assert response.status_code == 200 and response.content == fixture("stream-basic.sse")
    assert cloud.vertex.received[-1].path.endswith(f"/models/{VERTEX_MODEL}:streamRawPredict")
    assert cloud.vertex.received[-1].json["stream"] is True
    sdk(gate).messages.create(**MESSAGE)
    assert len(cloud.tokens.issued) == issued + 1  # one token, refreshed only when it nears its expiry
    data = usage(gate, 2)
    assert (data[0]["output_tokens"], data[0]["stop_reason"], data[0]["stream"]) == (15, "end_turn", True)


def test_vertex_count_tokens_and_betas_in_the_body(start_gate: StartGate, cloud: Clouds) -> None:
    gate = start_gate(upstreams=[vertex(cloud)])
    count = sdk(gate).messages.count_tokens(model="claude-haiku-4-5-20251001", messages=MESSAGE["messages"])
    assert count.input_tokens == 14
    seen = cloud.vertex.received[-1]
    assert seen.path.endswith("/publishers/anthropic/models/count-tokens:rawPredict")
    assert seen.json["model"] == "claude-haiku-4-5@20251001"  # prefix mapping
    sdk(gate).messages.create(**MESSAGE, extra_headers={"anthropic-beta": "context-1m-2025-08-07, foo-beta"})
    seen = cloud.vertex.received[-1]
    assert seen.json["anthropic_beta"] == ["context-1m-2025-08-07", "foo-beta"]


def test_vertex_sdk_reference_sends_what_gate_sends(start_gate: StartGate, cloud: Clouds) -> None:
    gate = start_gate(upstreams=[vertex(cloud)])
    sdk(gate).messages.create(**MESSAGE, extra_headers={"anthropic-beta": "foo-beta"})
    through_gate = cloud.vertex.received[-1]
    reference = AnthropicVertex(
        region=REGION, project_id=PROJECT, access_token=cloud.tokens.issued[-1], base_url=cloud.vertex.url + "/v1"
    )
    reference.messages.create(**{**MESSAGE, "model": VERTEX_MODEL}, extra_headers={"anthropic-beta": "foo-beta"})
    direct = cloud.vertex.received[-1]
    assert direct.path == through_gate.path
    direct_body, gate_body = direct.json, through_gate.json
    assert direct_body.pop("anthropic_version") in VERTEX_VERSIONS  # the SDK's own; Gate's the documented one
    assert gate_body.pop("anthropic_version") == "vertex-2023-10-16"
    # The SDK sends betas to Vertex as the header; Gate as the body's list (Vertex takes both).
    assert direct.headers["anthropic-beta"] == "foo-beta" and gate_body.pop("anthropic_beta") == ["foo-beta"]
    assert direct_body == gate_body


def test_vertex_error_becomes_anthropic_error_shape(start_gate: StartGate, cloud: Clouds) -> None:
    gate = start_gate(upstreams=[vertex(cloud)])
    cloud.vertex.fail.append(429)
    with pytest.raises(anthropic.RateLimitError) as caught:
        sdk(gate).messages.create(**MESSAGE)
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Quota exceeded or service unavailable."},
    }
    [data] = usage(gate, 1)
    assert (data["status"], data["error_type"], data["http_status"]) == ("error", "rate_limit_error", 429)


def test_unmapped_model_is_a_clear_400(start_gate: StartGate, cloud: Clouds) -> None:
    gate = start_gate(upstreams=[vertex(cloud)])
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(gate).messages.create(**{**MESSAGE, "model": "claude-opus-4-6"})
    assert "not served" in caught.value.message
    assert cloud.vertex.received == []


# ------------------------------------------------------------------------------------------------ Bedrock


@pytest.mark.parametrize(
    "name", ["stream-tool-use.sse", "stream-prompt-caching-usage.sse", "stream-web-search-usage.sse"]
)
def test_bedrock_stream_becomes_anthropic_sse_byte_for_byte(start_gate: StartGate, cloud: Clouds, name: str) -> None:
    gate = start_gate(upstreams=[bedrock(cloud)])
    cloud.bedrock.stream_body = bedrock_stream(fixture(name))
    cloud.bedrock.cuts = [5, 1, 11, 200, 3]  # frames split anywhere, as TCP may
    response = stream_bytes(gate, {**MESSAGE, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.content == fixture(name)
    seen = cloud.bedrock.received[-1]
    assert seen.path == f"/model/{BEDROCK_MODEL}/invoke-with-response-stream"
    assert seen.headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={AWS_ACCESS_KEY}/")
    assert cloud.bedrock.signed >= 1
    assert "model" not in seen.json and "stream" not in seen.json
    [data] = usage(gate, 1)
    assert (data["upstream"], data["upstream_model"], data["status"]) == ("bedrock-west", BEDROCK_MODEL, "success")
    assert data["anthropic_request_id"] == "bedrock-req-0001"


def test_bedrock_sdk_stream_and_message_with_an_api_key(start_gate: StartGate, cloud: Clouds) -> None:
    gate = start_gate(upstreams=[bedrock(cloud, **{"api-key": BEDROCK_API_KEY})])
    with sdk(gate).messages.stream(**MESSAGE) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].type == "tool_use"
    message = sdk(gate).messages.create(**MESSAGE)
    assert message.usage.output_tokens == 6
    assert cloud.bedrock.received[-1].headers["authorization"] == f"Bearer {BEDROCK_API_KEY}"
    assert cloud.bedrock.received[-1].path == f"/model/{BEDROCK_MODEL}/invoke"


def test_bedrock_sdk_reference_sends_what_gate_sends(start_gate: StartGate, cloud: Clouds) -> None:
    gate = start_gate(upstreams=[bedrock(cloud)])
    beta = {"anthropic-beta": "foo-beta"}
    sdk(gate).messages.create(**MESSAGE, extra_headers=beta)
    through_gate = cloud.bedrock.received[-1]
    reference = AnthropicBedrock(
        aws_access_key=AWS_ACCESS_KEY,
        aws_secret_key=AWS_SECRET_KEY,
        aws_region=AWS_REGION,
        base_url=cloud.bedrock.url,
        max_retries=0,
    )
    signed = cloud.bedrock.signed
    events = list(reference.messages.create(**{**MESSAGE, "model": BEDROCK_MODEL}, stream=True, extra_headers=beta))
    assert events[-1].type == "message_stop" and cloud.bedrock.signed == signed + 1  # the fake's check is sound
    reference.messages.create(**{**MESSAGE, "model": BEDROCK_MODEL}, extra_headers=beta)
    direct = cloud.bedrock.received[-1]
    assert direct.path == through_gate.path
    direct_body, gate_body = direct.json, through_gate.json
    assert direct_body.pop("anthropic_version") in BEDROCK_VERSIONS
    assert gate_body.pop("anthropic_version") == "bedrock-2023-05-31"
    assert direct_body == gate_body


def test_bedrock_exception_frame_is_anthropic_error_event_and_no_failover(start_gate: StartGate, cloud: Clouds) -> None:
    gate = start_gate(upstreams=[bedrock(cloud), vertex(cloud)])
    first_two = b"".join(chunk_frame(data) for _name, data in sse_events(fixture("stream-tool-use.sse"))[:2])
    cloud.bedrock.stream_body = first_two + exception_frame("throttlingException", "Too many tokens")
    response = stream_bytes(gate, {**MESSAGE, "stream": True})
    expected = b"".join(fixture("stream-tool-use.sse").split(b"\n\n")[i] + b"\n\n" for i in range(2))
    error = {"type": "error", "error": {"type": "rate_limit_error", "message": "Too many tokens"}}
    assert (
        response.content
        == expected + b"event: error\ndata: " + json.dumps(error, separators=(",", ":")).encode() + b"\n\n"
    )
    assert cloud.vertex.received == []  # the client had bytes: never fail over then
    [data] = usage(gate, 1)
    assert (data["upstream"], data["status"], data["error_type"], data["input_tokens"]) == (
        "bedrock-west",
        "error",
        "rate_limit_error",
        472,
    )


def test_bedrock_corrupt_frame_cuts_the_stream_off(start_gate: StartGate, cloud: Clouds) -> None:
    gate = start_gate(upstreams=[bedrock(cloud)])
    frames = bytearray(bedrock_stream(fixture("stream-tool-use.sse")))
    frames[len(frames) // 2] ^= 0x01
    cloud.bedrock.stream_body = bytes(frames)
    with pytest.raises(httpx.RemoteProtocolError):  # cut off: the events before the bad frame, never an end
        stream_bytes(gate, {**MESSAGE, "stream": True})
    [data] = usage(gate, 1)
    assert (data["status"], data["error_type"]) == ("error", "api_error")


def test_a_bedrock_stream_to_a_client_that_never_reads_is_the_clients_timeout(
    start_gate: StartGate, cloud: Clouds, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A translated answer takes the relay's pulled source (its task reads each piece): the same loop, the same
    # back-pressure and the same two deadlines as a pass-through one.
    pulls: list[int] = []
    pull = relay._Pulled.next

    async def counted(self: relay._Pulled) -> None:
        pulls.append(1)
        await pull(self)

    monkeypatch.setattr(relay._Pulled, "next", counted)
    gate = start_gate(
        upstreams=[bedrock(cloud)],
        anthropic={"api": {"timeouts": {"stream-idle": "1s"}}},
        server={"limits": {"send-timeout": "2s"}},
    )
    sse = fixture("stream-basic.sse")
    head = sse.split(b"event: content_block_delta", 1)[0]
    delta = b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"' + b"x" * 1000 + b'"}}'
    event = b"event: content_block_delta\ndata: " + delta + b"\n\n"
    cloud.bedrock.stream_body = bedrock_stream(head + event * 4000)  # ~4 MB of frames: more than any buffer
    cloud.bedrock.cuts = [64 * 1024] * 100
    body = json.dumps({**MESSAGE, "stream": True}).encode()
    sock = stalled_stream_client(gate.port, gate.token(), body)
    try:
        [data] = usage(gate, 1)
    finally:
        sock.close()
    assert (data["status"], data["error_type"], data["http_status"]) == ("client_timeout", None, 200)
    assert data["upstream"] == "bedrock-west" and data["input_tokens"] == 25
    assert len(pulls) > 1  # the pulled source
    health = httpx.get(gate.url + "/actuator/health", timeout=5).json()
    assert health["components"]["circuitBreaker"]["details"]["failedCalls"] == 0


# ------------------------------------------------------------------------------------------------ Foundry


def test_foundry_with_a_key_and_with_a_token_file(start_gate: StartGate, cloud: Clouds, tmp_path: Path) -> None:
    gate = start_gate(upstreams=[foundry(cloud)])
    message = sdk(gate).messages.create(**MESSAGE)
    assert message.id == "msg_01XFDUDYJgAACzvnptvVoYEL"
    seen = cloud.foundry.received[-1]
    assert seen.path == "/anthropic/v1/messages" and seen.headers["x-api-key"] == FOUNDRY_KEY
    assert seen.json["model"] == FOUNDRY_MODEL and "authorization" not in seen.headers
    token_file = tmp_path / "entra-token"
    token_file.write_text(FOUNDRY_TOKEN + "\n")
    gate = start_gate(upstreams=[foundry(cloud, **{"api-key": None, "token-file": str(token_file)})])
    response = stream_bytes(gate, {**MESSAGE, "stream": True}, headers={"anthropic-beta": "foo-beta"})
    assert response.content == fixture("stream-basic.sse")
    seen = cloud.foundry.received[-1]
    assert seen.headers["authorization"] == f"Bearer {FOUNDRY_TOKEN}" and "x-api-key" not in seen.headers
    assert seen.headers["anthropic-beta"] == "foo-beta"  # Anthropic's wire format: the header as it came


# ------------------------------------------------------------------------------------------------ failover


@pytest.mark.parametrize("status", [503, 429, 403])
def test_failover_keeps_the_answer_whole_and_every_event_exact(
    start_gate: StartGate, cloud: Clouds, status: int
) -> None:
    gate = start_gate(upstreams=[bedrock(cloud), vertex(cloud)])
    cloud.bedrock.fail.append(status)
    response = stream_bytes(gate, {**MESSAGE, "stream": True})
    assert response.status_code == 200 and response.content == fixture("stream-basic.sse")
    first, second = usage(gate, 2)
    assert (first["upstream"], first["upstream_model"], first["status"], first["http_status"]) == (
        "bedrock-west",
        BEDROCK_MODEL,
        "error",
        status,
    )
    assert first["input_tokens"] == first["output_tokens"] == 0
    assert (second["upstream"], second["upstream_model"], second["status"]) == ("vertex-east", VERTEX_MODEL, "success")
    assert (second["input_tokens"], second["output_tokens"], second["stop_reason"]) == (25, 15, "end_turn")
    assert first["trace_id"] == second["trace_id"]


def test_failover_from_anthropic_on_overload_and_on_a_dead_upstream(
    start_gate: StartGate, cloud: Clouds, fake: FakeAnthropic
) -> None:
    anthropic_first = {"name": "anthropic", "type": "anthropic"}
    gate = start_gate(upstreams=[anthropic_first, foundry(cloud)])
    fake.enqueue(error_reply(529, "overloaded_error", "Overloaded"))
    message = sdk(gate).messages.create(**MESSAGE)
    assert message.usage.output_tokens == 6
    first, second = usage(gate, 2)
    assert (first["upstream"], first["error_type"], first["key_alias"]) == ("anthropic", "overloaded_error", "primary")
    assert (second["upstream"], second["upstream_model"], second["status"]) == ("foundry", FOUNDRY_MODEL, "success")
    # an upstream that cannot be reached at all (nothing listens on its port)
    dead = {**bedrock(cloud), "base-url": "http://127.0.0.1:9"}
    gate = start_gate(upstreams=[dead, vertex(cloud)])
    assert sdk(gate).messages.create(**MESSAGE).usage.input_tokens == 12
    data = usage(gate, 3)  # two connection attempts on bedrock, then vertex
    assert [(d["upstream"], d["status"], d.get("http_status")) for d in data] == [
        ("bedrock-west", "error", None),
        ("bedrock-west", "error", None),
        ("vertex-east", "success", 200),
    ]


def test_no_failover_on_a_bad_request_and_last_failure_reaches_the_client(start_gate: StartGate, cloud: Clouds) -> None:
    gate = start_gate(upstreams=[bedrock(cloud), vertex(cloud)])
    cloud.bedrock.fail.append(503)
    cloud.vertex.fail.append(503)
    with pytest.raises(anthropic.InternalServerError) as caught:
        sdk(gate).messages.create(**MESSAGE)
    assert caught.value.status_code == 503 and caught.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert [d["upstream"] for d in usage(gate, 2)] == ["bedrock-west", "vertex-east"]


def test_betas_an_upstream_cannot_honour_skip_it_or_are_refused(start_gate: StartGate, cloud: Clouds) -> None:
    gate = start_gate(upstreams=[bedrock(cloud, betas=[]), vertex(cloud, betas=["foo-beta"])])
    sdk(gate).messages.create(**MESSAGE, extra_headers={"anthropic-beta": "foo-beta"})
    assert cloud.bedrock.received == [] and len(cloud.vertex.received) == 1
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(gate).messages.create(**MESSAGE, extra_headers={"anthropic-beta": "bar-beta"})
    assert "bar-beta" in caught.value.message


def test_health_has_a_component_per_upstream(start_gate: StartGate, cloud: Clouds) -> None:
    gate = start_gate(upstreams=[bedrock(cloud), vertex(cloud)])
    health = httpx.get(gate.url + "/actuator/health", timeout=5).json()
    parts = health["components"]["upstreams"]["components"]
    assert set(parts) == {"bedrock-west", "vertex-east"}
    assert parts["bedrock-west"]["status"] == "UP" and parts["bedrock-west"]["details"]["type"] == "bedrock"
    assert AWS_SECRET_KEY not in json.dumps(health)


def test_vertex_token_is_refreshed_before_it_expires(start_gate: StartGate, cloud: Clouds) -> None:
    cloud.tokens.expires_in = 120  # inside google-auth's refresh margin (3 min 45 s): stale as soon as issued
    try:
        gate = start_gate(upstreams=[vertex(cloud)])
        issued = len(cloud.tokens.issued)
        sdk(gate).messages.create(**MESSAGE)
        sdk(gate).messages.create(**MESSAGE)
        assert len(cloud.tokens.issued) == issued + 2
        assert cloud.vertex.received[-1].headers["authorization"] == f"Bearer {cloud.tokens.issued[-1]}"
    finally:
        cloud.tokens.expires_in = 3600


def test_bedrock_credentials_from_the_standard_aws_chain(
    start_gate: StartGate, cloud: Clouds, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET_KEY)
    entry = bedrock(cloud)
    del entry["access-key-id"], entry["secret-access-key"]
    gate = start_gate(upstreams=[entry])
    signed = cloud.bedrock.signed
    assert sdk(gate).messages.create(**MESSAGE).usage.output_tokens == 6
    assert cloud.bedrock.signed == signed + 1


def test_an_open_breaker_sends_calls_to_the_next_upstream(start_gate: StartGate, cloud: Clouds) -> None:
    breaker = {"minimum-number-of-calls": 1, "sliding-window-size": 1, "wait-duration-in-open-state": "1h"}
    gate = start_gate(upstreams=[bedrock(cloud, **{"circuit-breaker": breaker}), vertex(cloud)])
    cloud.bedrock.fail.append(500)
    sdk(gate).messages.create(**MESSAGE)  # bedrock fails (its breaker opens), vertex answers
    sdk(gate).messages.create(**MESSAGE)  # bedrock is not even tried
    assert len(cloud.bedrock.received) == 1 and len(cloud.vertex.received) == 2
    health = httpx.get(gate.url + "/actuator/health", timeout=5).json()["components"]["upstreams"]
    assert health["status"] == "UP" and health["components"]["bedrock-west"]["status"] == "DOWN"
    assert [d["upstream"] for d in usage(gate, 3)] == ["bedrock-west", "vertex-east", "vertex-east"]
    metrics = httpx.get(gate.url + "/actuator/prometheus", timeout=5).text
    assert 'gate_upstream="vertex-east"' in metrics  # token usage per upstream


@pytest.mark.claude_code
def test_claude_code_through_gate_to_bedrock_failing_over_to_vertex(
    start_gate: StartGate, cloud: Clouds, tmp_path: Path
) -> None:
    from tests.test_claude_code import run_claude

    any_model_bedrock = {**bedrock(cloud), "models": {}}  # every model, under its own id
    any_model_vertex = {**vertex(cloud), "models": {}}
    gate = start_gate(upstreams=[any_model_bedrock, any_model_vertex])
    cloud.bedrock.fail.extend([503] * 20)  # every Bedrock call of this session fails: Vertex answers them
    result = run_claude(gate, tmp_path, {"ANTHROPIC_AUTH_TOKEN": gate.token("claude-user")})
    assert result.returncode == 0, f"claude failed: {result.stdout[-2000:]} {result.stderr[-2000:]}"
    assert "Hello!" in result.stdout
    streamed = [r for r in cloud.vertex.received if r.path.endswith(":streamRawPredict")]
    assert streamed, "Claude Code's streamed call did not reach Vertex"
    assert all("anthropic_beta" in r.json for r in streamed)  # Claude Code's betas, carried in the body
    assert len(cloud.bedrock.received) == len(cloud.vertex.received)  # each call tried Bedrock first
    events = read_events(Path(gate.settings.usage.file.path), 2 * len(cloud.vertex.received))
    assert {e["subject"] for e in events} == {"claude-user"}
    assert {e["data"]["upstream"] for e in events if e["data"]["status"] == "success"} == {"vertex-east"}


def test_a_stream_that_breaks_before_its_first_byte_fails_over(start_gate: StartGate, cloud: Clouds) -> None:
    gate = start_gate(upstreams=[bedrock(cloud), vertex(cloud)])
    frames = bytearray(bedrock_stream(fixture("stream-tool-use.sse")))
    frames[20] ^= 0xFF  # the first frame is corrupt: nothing can reach the client from Bedrock
    cloud.bedrock.stream_body = bytes(frames)
    response = stream_bytes(gate, {**MESSAGE, "stream": True})
    assert response.status_code == 200 and response.content == fixture("stream-basic.sse")
    first, second = usage(gate, 2)
    assert (first["upstream"], first["status"], first["error_type"], first["http_status"]) == (
        "bedrock-west",
        "error",
        "api_error",
        200,
    )
    assert (second["upstream"], second["status"], second["output_tokens"]) == ("vertex-east", "success", 15)


def test_credentials_that_cannot_be_loaded_stop_the_start(cloud: Clouds, tmp_path: Path) -> None:
    from gate.settings import ConfigError
    from tests.harness import gate_settings

    missing = vertex(cloud, **{"credentials-file": str(tmp_path / "nope.json")})
    running = RunningGate(gate_settings(tmp_path, "http://127.0.0.1:9", upstreams=[missing]))
    try:
        with pytest.raises(ConfigError, match="upstreams: vertex-east: no Google credentials from credentials-file"):
            running.start()
    finally:
        running.bg.close()
