"""``/actuator/health`` and its liveness and readiness groups, as an operator or Kubernetes sees them."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.fake_anthropic import FakeAnthropic, error_reply
from tests.harness import RunningGate, free_port

MESSAGE = {"model": "claude-opus-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]}
BREAKER = {
    "circuit-breaker": {
        "sliding-window-size": 10,
        "minimum-number-of-calls": 5,
        "wait-duration-in-open-state": "60s",
        "permitted-number-of-calls-in-half-open-state": 2,
    }
}


def get(url: str) -> tuple[int, dict[str, Any], str]:
    response = httpx.get(url, timeout=10)
    return response.status_code, response.json(), response.text


def post(gate: RunningGate) -> httpx.Response:
    headers = {"authorization": f"Bearer {gate.token()}", "content-type": "application/json"}
    return httpx.post(gate.url + "/v1/messages", content=json.dumps(MESSAGE).encode(), headers=headers, timeout=10)


def assert_no_secret(gate: RunningGate, text: str) -> None:
    for key in gate.settings.anthropic.api.keys:
        assert key.value.get_secret_value() not in text
    assert "sk-ant" not in text and "eyJ" not in text


def test_health_components_in_spring_boots_shape(module_gate: RunningGate, fake: FakeAnthropic) -> None:
    assert post(module_gate).status_code == 200
    status, body, text = get(module_gate.url + "/actuator/health")
    assert status == 200 and body["status"] == "UP"
    components = body["components"]
    assert components["circuitBreaker"]["status"] == "UP"
    assert components["circuitBreaker"]["details"]["state"] == "CLOSED"
    pubsub = components["pubsub"]
    assert pubsub["status"] == "UP" and pubsub["details"]["publisher"] == "file"
    assert isinstance(pubsub["details"]["outboxDepth"], int)
    keys = components["apiKeys"]
    assert keys["status"] == "UP"
    assert keys["details"]["count"] == 2 and keys["details"]["available"] == 2
    assert {k["alias"] for k in keys["details"]["keys"]} == {"primary", "secondary"}
    jwks = components["jwks"]
    assert jwks["status"] == "UP" and jwks["details"]["keys"] >= 1
    assert jwks["details"]["lastRefresh"] is not None and jwks["details"]["ageSeconds"] >= 0
    assert_no_secret(module_gate, text)


def test_liveness_and_readiness(module_gate: RunningGate) -> None:
    status, body, text = get(module_gate.url + "/actuator/health/liveness")
    assert status == 200 and body["status"] == "UP"
    status, body, text = get(module_gate.url + "/actuator/health/readiness")
    assert status == 200 and body["status"] == "UP"
    assert body["details"] == {"jwksLoaded": True, "apiKeyConfigured": True, "notDraining": True}
    assert_no_secret(module_gate, text)


def test_an_overload_storm_opens_the_breaker_and_health_says_so_but_readiness_stays_up(
    start_gate: Callable[..., RunningGate], fake: FakeAnthropic
) -> None:
    gate = start_gate(resilience=BREAKER)
    fake.enqueue(*(error_reply(529, "overloaded_error", "Overloaded") for _ in range(5)))
    for _ in range(5):
        assert post(gate).status_code == 529
    status, body, text = get(gate.url + "/actuator/health")
    assert status == 503 and body["status"] == "DOWN"
    breaker = body["components"]["circuitBreaker"]
    assert breaker["status"] == "DOWN"
    assert breaker["details"]["state"] == "OPEN"
    assert breaker["details"]["failedCalls"] == 5 and breaker["details"]["failureRate"] == 100.0
    assert 0 < breaker["details"]["retryAfterSeconds"] <= 60
    assert body["components"]["apiKeys"]["status"] == "UP"  # a 529 is not the key's fault
    assert get(gate.url + "/actuator/health/readiness")[0] == 200
    assert get(gate.url + "/actuator/health/liveness")[0] == 200
    assert_no_secret(gate, text)


def test_readiness_is_down_without_a_key_and_while_draining(start_gate: Callable[..., RunningGate]) -> None:
    gate = start_gate(anthropic={"api": {"keys": []}})
    status, body, _ = get(gate.url + "/actuator/health/readiness")
    assert status == 503 and body["details"]["apiKeyConfigured"] is False
    assert post(gate).status_code == 503

    gate = start_gate()
    assert gate.gate is not None
    gate.gate.draining = True  # what SIGTERM sets (test_shutdown.py drives the real signal)
    status, body, _ = get(gate.url + "/actuator/health/readiness")
    assert status == 503 and body["details"]["notDraining"] is False
    gate.gate.draining = False


def test_management_port_serves_the_actuator_apart(start_gate: Callable[..., RunningGate]) -> None:
    port = free_port()
    gate = start_gate(management={"server": {"port": port}})
    management = f"http://127.0.0.1:{port}"
    assert get(management + "/actuator/health")[0] == 200
    assert get(management + "/actuator/health/readiness")[0] == 200
    assert httpx.get(management + "/actuator/prometheus", timeout=10).status_code == 200
    assert httpx.get(gate.url + "/actuator/health", timeout=10).status_code == 404  # not on the public port
    assert httpx.get(management + "/v1/models", timeout=10).status_code == 404  # and no API on the management one


@pytest.mark.parametrize(
    "leak",
    [
        "sk-ant-api03-leaked-in-an-error-text",
        "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl",
        "amqp://gate:s3cret-password@rabbit:5672/",
    ],
)
def test_a_secret_quoted_in_a_component_detail_is_masked(start_gate: Callable[..., RunningGate], leak: str) -> None:
    gate = start_gate()
    assert gate.gate is not None
    events = gate.gate.events
    events.health = lambda: {"status": "UP", "details": {"lastError": f"connect failed: {leak}"}}  # type: ignore[method-assign]
    status, body, text = get(gate.url + "/actuator/health")
    assert status == 200
    assert "lastError" in body["components"]["pubsub"]["details"]
    for secret in ("api03-leaked", "eyJzdWIiOiJhIn0", "s3cret-password"):
        assert secret not in text
