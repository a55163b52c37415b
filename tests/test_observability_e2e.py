"""Observability through Gate: spans, metrics, the Prometheus scrape, OTLP export and access logs, as a client of
the running gateway sees and causes them (the official anthropic SDK and httpx over real sockets)."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import httpx
import pytest
import yaml
from aiohttp import web
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from gate import __version__
from gate.identity.auth import mint_dev_token
from gate.ops.logs import configure_logging
from gate.ops.telemetry import Telemetry
from gate.settings import load_settings
from tests.fake_anthropic import FakeAnthropic, error_reply, fixture
from tests.harness import BackgroundLoop, RunningGate, free_port, gate_settings, read_events
from tests.jwks import JwksServer, tamper_signature
from tests.test_telemetry import OtlpReceiver, _attrs

T = TypeVar("T")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
PROMPT = "Hello"
MESSAGE = {"model": "claude-opus-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": PROMPT}]}
KEYS = ("sk-ant-test-primary-0000000000000000", "sk-ant-test-secondary-000000000000000")
COMPLETIONS = (
    json.loads(fixture("message-basic.json"))["content"][0]["text"],  # "Hello!"
    '"text": "Hello"',  # the streamed text deltas as they appear on the wire
    "text_delta",
)
MESSAGES_ROUTE = "/v1/messages"

# What the README documents, as the Prometheus samples are named (counters carry _total).
PROMETHEUS_NAMES = (
    "http_server_request_duration_seconds_bucket",
    "gate_overhead_duration_seconds_bucket",
    "gen_ai_client_token_usage_bucket",
    "gen_ai_server_time_to_first_token_seconds_bucket",
    "gate_circuit_breaker_state",
    "gate_keys_selections_total",
    "gate_usage_outbox_depth",
    "gate_usage_publish_failures_total",
    "gate_usage_delivery_lag_seconds",
    "gate_jwks_refreshes_total",
    "gate_auth_failures_total",
)


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets itself: the shell's OTEL_* must not redirect or sample these Gates."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def eventually(check: Callable[[], T | None], timeout: float = 10.0) -> T:
    """Poll until ``check`` returns something truthy: spans and access lines are written just after the client
    has its answer (a JSON response is sent after the handler, and so its span, has finished)."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("not observed in time")
        time.sleep(0.02)


class Observed:
    """A Gate whose Telemetry records into memory: every finished span and every metric a reader collects."""

    def __init__(self, gate: RunningGate, spans: InMemorySpanExporter, reader: InMemoryMetricReader) -> None:
        self.gate, self.spans, self.reader = gate, spans, reader

    def sdk(self, token: str | None = None, **kwargs: Any) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.gate.url, api_key=token or self.gate.token(), max_retries=0, **kwargs)

    def finished(self, count: int) -> list[ReadableSpan]:
        """The finished spans, once there are at least ``count``."""

        def enough() -> list[ReadableSpan] | None:
            spans = list(self.spans.get_finished_spans())
            return spans if len(spans) >= count else None

        return eventually(enough)

    def metrics(self) -> dict[str, Metric]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}

    @property
    def events_path(self) -> Path:
        return Path(self.gate.settings.usage.file.path)


@pytest.fixture
def observe(tmp_path: Path, fake_session: FakeAnthropic) -> Iterator[Callable[..., Observed]]:
    """``observe(profiles=..., **sections)`` starts a Gate against the fake with in-memory telemetry."""
    started: list[RunningGate] = []

    def start(profiles: tuple[str, ...] = ("local",), **sections: Any) -> Observed:
        settings = gate_settings(tmp_path / f"gate{len(started)}", fake_session.url, profiles=profiles, **sections)
        spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
        telemetry = Telemetry(
            settings.observability, service_version=__version__, span_exporter=spans, metric_readers=[reader]
        )
        gate = RunningGate(settings, telemetry).start()
        started.append(gate)
        return Observed(gate, spans, reader)

    yield start
    for gate in started:
        gate.stop()


@pytest.fixture
def idp(fake_loop: BackgroundLoop) -> Iterator[JwksServer]:
    """A real JWKS endpoint (the IdP) with one EC key, on the fake's loop."""
    server = JwksServer()
    server.add_key("EC")
    fake_loop.run(server.start())
    yield server
    fake_loop.run(server.stop())


def by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def points(metric: Metric) -> list[Any]:
    return list(metric.data.data_points)


def call(sdk: anthropic.Anthropic, *, stream: bool) -> None:
    if stream:
        events = list(sdk.messages.create(**MESSAGE, stream=True))  # type: ignore[call-overload]
        assert events[-1].type == "message_stop"
    else:
        assert sdk.messages.create(**MESSAGE).usage.output_tokens == 6  # type: ignore[call-overload]


# ---------------------------------------------------------------------------------------------- traces

EXPECTED_CALL = {
    False: {  # message-basic.json
        "gen_ai.response.model": "claude-opus-5",
        "gen_ai.response.id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 6,
    },
    True: {  # stream-basic.sse
        "gen_ai.response.model": "claude-opus-4-6",
        "gen_ai.response.id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
        "gen_ai.usage.input_tokens": 25,
        "gen_ai.usage.output_tokens": 15,
    },
}


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_server_and_client_spans_of_a_call_honour_the_clients_traceparent(
    observe: Callable[..., Observed], fake: FakeAnthropic, stream: bool
) -> None:
    obs = observe()
    call(obs.sdk(default_headers={"traceparent": TRACEPARENT}), stream=stream)
    spans = by_name(obs.finished(2))
    server, client = spans[f"POST {MESSAGES_ROUTE}"], spans["chat claude-opus-4-6"]

    assert server.kind is SpanKind.SERVER and client.kind is SpanKind.CLIENT
    assert hex_id(server.context.trace_id, 32) == TRACE_ID == hex_id(client.context.trace_id, 32)
    assert server.parent is not None and server.parent.is_remote
    assert hex_id(server.parent.span_id, 16) == PARENT_SPAN_ID
    assert client.parent is not None and client.parent.span_id == server.context.span_id

    attrs = dict(client.attributes or {})
    alias = attrs["gate.key_alias"]
    assert alias in ("primary", "secondary")
    assert {key: attrs.get(key) for key in EXPECTED_CALL[stream]} == EXPECTED_CALL[stream]
    assert attrs["gen_ai.system"] == attrs["gen_ai.provider.name"] == "anthropic"
    assert attrs["gen_ai.request.model"] == "claude-opus-4-6"
    assert attrs["gen_ai.response.finish_reasons"] == ("end_turn",)
    assert attrs["gate.stream"] is stream
    assert str(attrs["anthropic.request_id"]).startswith("req_fake_")
    server_attrs = dict(server.attributes or {})
    assert server_attrs["user.id"] == "alice"
    assert server_attrs["gate.key_alias"] == alias
    assert server_attrs["http.response.status_code"] == 200

    event = read_events(obs.events_path, 1)[-1]
    assert event["data"]["trace_id"] == TRACE_ID
    assert event["data"]["anthropic_request_id"] == attrs["anthropic.request_id"]


def test_without_traceparent_a_new_trace_starts_and_the_usage_event_carries_its_id(
    observe: Callable[..., Observed], fake: FakeAnthropic
) -> None:
    obs = observe()
    call(obs.sdk(), stream=True)
    spans = by_name(obs.finished(2))
    server, client = spans[f"POST {MESSAGES_ROUTE}"], spans["chat claude-opus-4-6"]
    assert server.parent is None
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    event = read_events(obs.events_path, 1)[-1]
    assert event["data"]["trace_id"] == hex_id(server.context.trace_id, 32)


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [(None, ["user.id"]), ("enduser.pseudo.id", ["enduser.pseudo.id"]), ("", [])],
    ids=["default", "configured", "off"],
)
def test_user_attribute_on_the_span_is_configurable(
    observe: Callable[..., Observed], fake: FakeAnthropic, attribute: str | None, expected: list[str]
) -> None:
    obs = observe(**({} if attribute is None else {"observability": {"tracing": {"user-attribute": attribute}}}))
    call(obs.sdk(obs.gate.token("bob")), stream=False)
    spans = obs.finished(2)
    holding_user = sorted(key for span in spans for key, value in (span.attributes or {}).items() if value == "bob")
    assert holding_user == expected


def test_no_prompt_completion_key_or_token_in_any_span(observe: Callable[..., Observed], fake: FakeAnthropic) -> None:
    obs = observe()
    token = obs.gate.token()
    sdk = obs.sdk(token, default_headers={"traceparent": TRACEPARENT})
    call(sdk, stream=False)
    call(sdk, stream=True)
    fake.enqueue(error_reply(529, "overloaded_error", f"overloaded; you said {PROMPT}"))
    with pytest.raises(anthropic.InternalServerError):
        call(sdk, stream=False)
    forged = tamper_signature(token)
    with pytest.raises(anthropic.AuthenticationError):
        call(obs.sdk(forged), stream=False)
    spans = obs.finished(7)  # three calls (server + client span each) and the refused request

    forbidden = (*KEYS, "sk-ant-", token, forged, token.rsplit(".", 1)[1], PROMPT, *COMPLETIONS)
    values = [str(value) for span in spans for value in (span.attributes or {}).values()]
    values += [str(value) for span in spans for event in span.events for value in (event.attributes or {}).values()]
    values += [span.name for span in spans] + [span.status.description or "" for span in spans]
    for secret in forbidden:
        assert not [value for value in values if secret in value], secret
    for span in spans:  # the exported form too, resource and all
        dumped = span.to_json()
        for secret in forbidden:
            assert secret not in dumped, (span.name, secret)


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_of_calls_through_gate(observe: Callable[..., Observed], fake: FakeAnthropic) -> None:
    obs = observe()
    sdk = obs.sdk()
    call(sdk, stream=False)
    call(sdk, stream=True)
    refused = httpx.post(
        obs.gate.url + MESSAGES_ROUTE, json=MESSAGE, headers={"authorization": "Bearer not-a-jwt"}, timeout=10
    )
    assert refused.status_code == 401
    obs.finished(5)  # every request has been recorded

    metrics = obs.metrics()
    duration = {
        (p.attributes["http.route"], p.attributes["http.response.status_code"]): p.count
        for p in points(metrics["http.server.request.duration"])
    }
    assert duration == {(MESSAGES_ROUTE, 200): 2, (MESSAGES_ROUTE, 401): 1}
    tokens = {
        (p.attributes["gen_ai.token.type"], p.attributes["gen_ai.response.model"]): p.sum
        for p in points(metrics["gen_ai.client.token.usage"])
    }
    assert tokens == {
        ("input", "claude-opus-5"): 12,
        ("output", "claude-opus-5"): 6,
        ("input", "claude-opus-4-6"): 25,
        ("output", "claude-opus-4-6"): 15,
    }
    (ttft,) = points(metrics["gen_ai.server.time_to_first_token"])  # the streamed call only
    assert ttft.count == 1 and ttft.attributes["gen_ai.response.model"] == "claude-opus-4-6"
    (overhead,) = points(metrics["gate.overhead.duration"])
    assert overhead.count == 3 and overhead.attributes == {"http.route": MESSAGES_ROUTE}
    assert [p.value for p in points(metrics["gate.circuit_breaker.state"])] == [0]  # closed
    selections = {p.attributes["gate.key_alias"]: p.value for p in points(metrics["gate.keys.selections"])}
    assert selections == {"primary": 1, "secondary": 1}
    (depth,) = points(metrics["gate.usage.outbox.depth"])
    assert 0 <= depth.value <= 2
    failures = {p.attributes["reason"]: p.value for p in points(metrics["gate.auth.failures"])}
    assert failures == {"malformed": 1}
    for name, metric in metrics.items():
        for point in points(metric):
            attributes = point.attributes or {}
            assert "user.id" not in attributes and "alice" not in attributes.values(), name


def test_user_label_on_metrics_when_switched_on(observe: Callable[..., Observed], fake: FakeAnthropic) -> None:
    obs = observe(observability={"metrics": {"user-label": True}})
    call(obs.sdk(), stream=True)
    obs.finished(2)
    labelled = {
        name
        for name, metric in obs.metrics().items()
        if any((p.attributes or {}).get("user.id") == "alice" for p in points(metric))
    }
    assert labelled == {"http.server.request.duration", "gen_ai.client.token.usage"}


def scrape(url: str) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Families by name and samples by name from a Prometheus text exposition fetched over HTTP."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    samples: dict[str, list[Any]] = {}
    for family in families.values():
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return families, samples


def test_prometheus_scrape_of_a_gate_verifying_against_a_real_jwks(
    observe: Callable[..., Observed], fake: FakeAnthropic, idp: JwksServer
) -> None:
    obs = observe(profiles=("prod",), security={"jwt": {"jwk-set-uri": idp.url}})
    sdk = obs.sdk(idp.mint(sub="carol"))
    call(sdk, stream=False)
    call(sdk, stream=True)
    with pytest.raises(anthropic.AuthenticationError):
        call(obs.sdk(tamper_signature(idp.mint(sub="mallory"))), stream=False)
    assert {e["subject"] for e in read_events(obs.events_path, 2)} == {"carol"}

    def delivered() -> tuple[dict[str, Any], dict[str, list[Any]]] | None:
        families, samples = scrape(obs.gate.url + "/actuator/prometheus")
        return (families, samples) if "gate_usage_delivery_lag_seconds" in samples else None

    families, samples = eventually(delivered)
    assert [name for name in PROMETHEUS_NAMES if name not in samples] == []
    assert families["gate_keys_selections"].type == "counter"
    assert families["http_server_request_duration_seconds"].type == "histogram"
    refreshes = {s.labels["outcome"]: s.value for s in samples["gate_jwks_refreshes_total"]}
    assert refreshes["ok"] >= 1  # the fetch at start-up
    assert {s.labels["reason"]: s.value for s in samples["gate_auth_failures_total"]} == {"signature": 1}
    ok = [
        s
        for s in samples["http_server_request_duration_seconds_count"]
        if s.labels["http_route"] == MESSAGES_ROUTE and s.labels["http_response_status_code"] == "200"
    ]
    assert [s.value for s in ok] == [2]
    assert [s.value for s in samples["gate_usage_publish_failures_total"]] == [0]
    text = httpx.get(obs.gate.url + "/actuator/prometheus", timeout=10).text
    assert "carol" not in text and "mallory" not in text  # no user label by default


def test_management_port_serves_actuator_and_the_main_port_does_not(
    observe: Callable[..., Observed], fake: FakeAnthropic
) -> None:
    port = free_port()
    obs = observe(management={"server": {"port": port}})
    call(obs.sdk(), stream=False)
    obs.finished(2)
    management = f"http://127.0.0.1:{port}"
    families, _ = scrape(management + "/actuator/prometheus")
    assert "http_server_request_duration_seconds" in families
    assert httpx.get(management + "/actuator/health", timeout=10).status_code == 200
    for path in ("/actuator/prometheus", "/actuator/health", "/actuator/health/liveness"):
        assert httpx.get(obs.gate.url + path, timeout=10).status_code == 404, path
    assert httpx.post(management + MESSAGES_ROUTE, json=MESSAGE, timeout=10).status_code == 404


# ---------------------------------------------------------------------------------------------- OTLP


@pytest.fixture
def otlp_receiver(fake_loop: BackgroundLoop) -> Iterator[tuple[OtlpReceiver, str]]:
    receiver = OtlpReceiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    fake_loop.run(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    fake_loop.run(site.start())
    yield receiver, f"http://127.0.0.1:{runner.addresses[0][1]}"
    fake_loop.run(runner.cleanup())


def test_spans_of_a_call_reach_a_real_otlp_receiver(
    start_gate: Callable[..., RunningGate],
    fake: FakeAnthropic,
    otlp_receiver: tuple[OtlpReceiver, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver, endpoint = otlp_receiver
    # read when Gate builds its Telemetry from settings, at start; monkeypatch restores them afterwards
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "3600000")  # metrics go out with the flush at shutdown
    gate = start_gate()
    sdk = anthropic.Anthropic(
        base_url=gate.url, api_key=gate.token(), max_retries=0, default_headers={"traceparent": TRACEPARENT}
    )
    call(sdk, stream=True)
    read_events(Path(gate.settings.usage.file.path), 1)
    gate.stop()  # shutdown flushes the batch span processor and the metric reader (a second stop is harmless)

    spans = {
        span.name: span
        for request in receiver.traces
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    }
    server, client = spans[f"POST {MESSAGES_ROUTE}"], spans["chat claude-opus-4-6"]
    assert server.trace_id.hex() == TRACE_ID == client.trace_id.hex()
    assert server.parent_span_id.hex() == PARENT_SPAN_ID and client.parent_span_id == server.span_id
    attrs = _attrs(client.attributes)
    assert attrs["gen_ai.usage.input_tokens"] == 25 and attrs["gen_ai.usage.output_tokens"] == 15
    assert attrs["gen_ai.response.finish_reasons"] == ("end_turn",)
    assert _attrs(server.attributes)["user.id"] == "alice"
    resource = _attrs(receiver.traces[0].resource_spans[0].resource.attributes)
    assert resource["service.name"] == "gate"
    metric_names = {
        metric.name
        for request in receiver.metrics
        for resource_metrics in request.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
    }
    assert {"http.server.request.duration", "gen_ai.client.token.usage", "gate.keys.selections"} <= metric_names
    for request in receiver.traces:
        body = request.SerializeToString()
        for secret in (*KEYS, PROMPT):
            assert secret.encode() not in body


# ---------------------------------------------------------------------------------------------- logs


@pytest.fixture
def capture_logs() -> Iterator[Callable[[str], io.StringIO]]:
    """``capture_logs(format)`` routes every log record into a buffer; the root logger is put back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    knobs = {name: getattr(logging, name) for name in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")}

    def setup(fmt: str) -> io.StringIO:
        buffer = io.StringIO()
        configure_logging(fmt, "INFO", stream=buffer)  # type: ignore[arg-type]
        return buffer

    yield setup
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    for name, value in knobs.items():
        setattr(logging, name, value)


def access_lines(buffer: io.StringIO, count: int) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]] | None:
        records = [json.loads(line) for line in buffer.getvalue().splitlines() if line.startswith("{")]
        access = [r for r in records if r["logger"] == "gate.access"]
        return access if len(access) >= count else None

    return eventually(found)


def test_one_json_access_line_per_request_and_no_secret_in_any_line(
    observe: Callable[..., Observed], fake: FakeAnthropic, capture_logs: Callable[[str], io.StringIO]
) -> None:
    out = capture_logs("json")
    obs = observe()
    token = obs.gate.token()
    sdk = obs.sdk(token, default_headers={"traceparent": TRACEPARENT})
    call(sdk, stream=False)
    call(sdk, stream=True)
    fake.enqueue(error_reply(529, "overloaded_error", f"overloaded; you said {PROMPT}"))
    with pytest.raises(anthropic.InternalServerError):
        call(sdk, stream=False)
    forged = tamper_signature(token)
    with pytest.raises(anthropic.AuthenticationError):
        call(obs.sdk(forged, default_headers={"traceparent": TRACEPARENT}), stream=False)
    lines = access_lines(out, 4)
    assert len(lines) == 4

    plain, streamed, failed, refused = lines
    obs.finished(7)
    for line in (plain, streamed, failed):
        assert line["method"] == "POST" and line["path"] == MESSAGES_ROUTE
        assert line["trace_id"] == TRACE_ID and len(line["span_id"]) == 16
        assert line["sub"] == "alice" and line["key_alias"] in ("primary", "secondary")
        assert line["model"] == "claude-opus-4-6"
        assert isinstance(line["latency_ms"], float) and isinstance(line["overhead_ms"], float)
        assert line["time"].endswith("Z") and line["level"] == "INFO"
    assert line_fields(plain) == (200, False, 12, 6, "end_turn", "success")
    assert line_fields(streamed) == (200, True, 25, 15, "end_turn", "success")
    assert line_fields(failed) == (529, False, 0, 0, None, "error")
    assert refused["status"] == 401 and "sub" not in refused and "key_alias" not in refused
    assert refused["trace_id"] == TRACE_ID  # the refused request's span still continues the client's trace
    server_span_ids = {
        hex_id(s.context.span_id, 16) for s in obs.spans.get_finished_spans() if s.kind is SpanKind.SERVER
    }
    assert [line["span_id"] in server_span_ids for line in lines] == [True] * 4  # each line names its request's span

    obs.gate.stop()  # the shutdown lines too
    text = out.getvalue()
    for secret in (*KEYS, token, forged, token.rsplit(".", 1)[1], forged.rsplit(".", 1)[1], PROMPT, *COMPLETIONS):
        assert secret not in text, secret
    assert f"you said {PROMPT}" not in text  # no upstream body either
    assert '"content"' not in text and '"messages"' not in text


def line_fields(line: dict[str, Any]) -> tuple[Any, ...]:
    return (
        line["status"],
        line["stream"],
        line["input_tokens"],
        line["output_tokens"],
        line.get("stop_reason"),
        line["usage_status"],
    )


def test_console_log_format_is_readable(
    observe: Callable[..., Observed], fake: FakeAnthropic, capture_logs: Callable[[str], io.StringIO]
) -> None:
    out = capture_logs("console")
    obs = observe()
    call(obs.sdk(default_headers={"traceparent": TRACEPARENT}), stream=False)

    def access() -> list[str]:
        return [line for line in out.getvalue().splitlines() if " gate.access: " in line]

    (line,) = eventually(access)
    assert not line.startswith("{")
    assert " INFO    gate.access: POST /v1/messages 200 " in line
    assert "sub=alice" in line and "output_tokens=6" in line and "stop_reason=end_turn" in line
    assert f"trace_id={TRACE_ID}" in line or f"[{TRACE_ID} " in line


def test_gate_serve_log_format_console_from_the_command_line(tmp_path: Path, fake: FakeAnthropic) -> None:
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown": {"drain-timeout": "2s", "flush-timeout": "2s"}},
        "security": {"jwt": {"dev": {"data-dir": str(tmp_path / "dev-keys")}}},
        "anthropic": {"api": {"base-url": fake.url, "keys": [{"alias": "primary", "value": KEYS[0]}]}},
        "usage": {
            "publisher": "file",
            "file": {"path": str(tmp_path / "usage.jsonl")},
            "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
        },
        "observability": {"logging": {"format": "json"}},  # the flag wins over the file
    }
    config_file = tmp_path / "gate.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GATE_", "ANTHROPIC_", "SECURITY_"))}
    command = [sys.executable, "-m", "gate", "serve", "--config", str(config_file), "--log-format", "console"]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert process.poll() is None, "gate serve exited"
            try:
                return httpx.get(url + "/", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        eventually(up, timeout=60)
        settings = load_settings(config_files=[str(config_file)], env={}, config_dir=tmp_path / "no-config")
        token = mint_dev_token(settings, "alice", 600)
        response = httpx.post(
            url + MESSAGES_ROUTE, json=MESSAGE, headers={"authorization": f"Bearer {token}"}, timeout=10
        )
        assert response.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    lines = output.splitlines()
    access = [line for line in lines if " gate.access: " in line]
    assert len(access) == 1, output
    assert " INFO    gate.access: POST /v1/messages 200 " in access[0]
    assert "key_alias=primary" in access[0] and "sub=alice" in access[0]
    assert not any(line.startswith("{") for line in lines), output
    assert KEYS[0] not in output and token not in output
