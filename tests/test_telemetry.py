"""Telemetry: spans, instruments, the Prometheus scrape, and export to a real OTLP/HTTP receiver."""

from __future__ import annotations

import asyncio
import gc
import gzip
import logging
import math
import warnings
from bisect import bisect_left
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import jwt
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, Metric
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from gate.accounting.usage import UsageRecord
from gate.ops.telemetry import OVERHEAD_BUCKETS, Telemetry, _Histogram, _otlp_wanted
from gate.settings import ObservabilitySettings

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
API_KEY = "sk-ant-api03-" + "A1b2C3d4" * 10 + "-xyzAA"
TOKEN = jwt.encode({"sub": "alice", "aud": "gate"}, "a-test-secret-that-is-long-enough-123", algorithm="HS256")
SECRET_MARKERS = ("sk-ant-", "eyJ", "Bearer", "A1b2C3d4", "a-test-secret")

ROUTE = "/v1/messages"
MODEL = "claude-sonnet-4-5"


def record(**changes: Any) -> UsageRecord:
    base = UsageRecord(
        subject="alice",
        model="claude-sonnet-4-5-20250929",
        message_id="msg_01XFDUDYJgAACzvnptvVoYEL",
        input_tokens=1200,
        output_tokens=350,
        cache_creation_tokens=40,
        cache_read_tokens=800,
        latency_ms=900,
        stream=True,
        stop_reason="end_turn",
        status="success",
        error_type=None,
        key_alias="primary",
        trace_id=None,
        anthropic_request_id="req_011CSHoEeqs5C35K2UUqR7Fy",
        http_status=200,
        time_to_first_token_ms=300,
    )
    return replace(base, **changes)


STREAMED = record()
NOT_STREAMED = record(
    stream=False,
    time_to_first_token_ms=None,
    cache_creation_tokens=0,
    cache_read_tokens=0,
    stop_reason="max_tokens",
    key_alias="secondary",
)


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def obs(**sections: Any) -> ObservabilitySettings:
    return ObservabilitySettings.model_validate(sections)


class Harness:
    def __init__(self, settings: ObservabilitySettings | None = None, *, exporter: bool = True) -> None:
        self.spans = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()
        self.tel = Telemetry(
            settings or obs(),
            service_version="9.9.9",
            span_exporter=self.spans if exporter else None,
            metric_readers=[self.reader],
        )

    def request(
        self,
        rec: UsageRecord | None = STREAMED,
        *,
        sub: str | None = "alice",
        headers: dict[str, str] | None = None,
        status: int = 200,
    ) -> tuple[Any, Any]:
        """What the relay does for one proxied request."""
        tel = self.tel
        with tel.server_span("POST", ROUTE, headers or {}) as server:
            client = None
            if rec is not None:
                tel.on_key_event("selected", rec.key_alias or "primary")
                with tel.client_span(MODEL, stream=rec.stream, server_address="api.anthropic.com") as client:
                    tel.finish_call(server, client, record=rec, sub=sub)
            tel.record_request(method="POST", route=ROUTE, status=status, duration=0.9, overhead=0.00012, sub=sub)
        return server, client

    def finished(self) -> dict[str, ReadableSpan]:
        return {span.name: span for span in self.spans.get_finished_spans()}

    def metrics(self) -> dict[str, Metric]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}

    def exercise_everything(self) -> None:
        """Touch every instrument once."""
        self.request(STREAMED)
        self.request(NOT_STREAMED, status=200)
        for kind in ("selected", "cooldown", "quarantine", "restored"):
            self.tel.on_key_event(kind, "primary")
        self.tel.on_jwks_refresh(True)
        self.tel.on_jwks_refresh(False)
        self.tel.on_auth_failure("expired")
        self.tel.on_breaker_change("closed", "open")
        self.tel.set_usage_source(UsageSource())


class UsageSource:
    depth = 7
    dead_letters = 2
    publish_failures_total = 3
    last_delivery_lag_seconds = 0.25


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.tel._shutdown_sync()


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


# ---------------------------------------------------------------------------------------------- traces


def test_server_and_client_spans_are_parent_and_child(harness: Harness) -> None:
    harness.request()
    spans = harness.finished()
    server, client = spans[f"POST {ROUTE}"], spans[f"chat {MODEL}"]
    assert server.kind is SpanKind.SERVER and client.kind is SpanKind.CLIENT
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert client.context.trace_id == server.context.trace_id
    assert server.parent is None


def test_traceparent_from_the_client_is_honoured(harness: Harness) -> None:
    with harness.tel.server_span("POST", ROUTE, {"traceparent": TRACEPARENT}):
        trace_id, span_id = harness.tel.trace_ids()
    server = harness.finished()[f"POST {ROUTE}"]
    assert trace_id == TRACE_ID == _hex(server.context.trace_id, 32)
    assert server.parent is not None and _hex(server.parent.span_id, 16) == PARENT_SPAN_ID
    assert server.parent.is_remote
    assert span_id == _hex(server.context.span_id, 16)


@pytest.mark.parametrize("exporter", [True, False], ids=["recording", "ids-only"])
def test_traceparent_is_found_in_case_insensitive_aiohttp_headers(exporter: bool) -> None:
    h = Harness(exporter=exporter)
    with h.tel.server_span("POST", ROUTE, CIMultiDictProxy(CIMultiDict({"Traceparent": TRACEPARENT}))):
        assert h.tel.trace_ids()[0] == TRACE_ID
    h.tel._shutdown_sync()


def test_a_malformed_traceparent_starts_a_new_trace() -> None:
    h = Harness(exporter=False)
    for bad in (
        TRACEPARENT.upper(),
        f"ff-{TRACE_ID}-{PARENT_SPAN_ID}-01",
        f"00-{'0' * 32}-{PARENT_SPAN_ID}-01",
        "x",
    ):
        with h.tel.server_span("POST", ROUTE, {"traceparent": bad}):
            trace_id = h.tel.trace_ids()[0]
        assert trace_id is not None and trace_id not in (TRACE_ID, "0" * 32)


def test_trace_ids_outside_any_span(harness: Harness) -> None:
    assert harness.tel.trace_ids() == (None, None)


@pytest.mark.parametrize("rec", [STREAMED, NOT_STREAMED], ids=["streaming", "non-streaming"])
def test_span_attributes_follow_genai_and_http_conventions(harness: Harness, rec: UsageRecord) -> None:
    harness.request(rec)
    spans = harness.finished()
    server, client = (
        dict(spans[f"POST {ROUTE}"].attributes or {}),
        dict(spans[f"chat {MODEL}"].attributes or {}),
    )
    assert server == {
        "http.request.method": "POST",
        "http.route": ROUTE,
        "url.path": ROUTE,
        "http.response.status_code": 200,
        "gate.key_alias": rec.key_alias,
        "user.id": "alice",
    }
    expected = {
        "gen_ai.system": "anthropic",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": MODEL,
        "gen_ai.response.model": rec.model,
        "gen_ai.response.id": rec.message_id,
        "gen_ai.response.finish_reasons": (rec.stop_reason,),
        "gen_ai.usage.input_tokens": rec.input_tokens,
        "gen_ai.usage.output_tokens": rec.output_tokens,
        "gen_ai.usage.cache_creation.input_tokens": rec.cache_creation_tokens,
        "gen_ai.usage.cache_read.input_tokens": rec.cache_read_tokens,
        "gate.key_alias": rec.key_alias,
        "gate.stream": rec.stream,
        "gate.call.status": "success",
        "anthropic.request_id": rec.anthropic_request_id,
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "server.address": "api.anthropic.com",
    }
    assert client == expected
    assert spans[f"chat {MODEL}"].status.status_code is StatusCode.UNSET


def test_upstream_error_marks_the_client_span(harness: Harness) -> None:
    failed = record(
        status="error",
        http_status=529,
        error_type="overloaded_error",
        output_tokens=0,
        input_tokens=0,
        cache_creation_tokens=0,
        cache_read_tokens=0,
        stop_reason=None,
        message_id=None,
        time_to_first_token_ms=None,
    )
    harness.request(failed, status=529)
    spans = harness.finished()
    client, server = spans[f"chat {MODEL}"], spans[f"POST {ROUTE}"]
    assert client.status.status_code is StatusCode.ERROR
    assert client.attributes is not None and client.attributes["error.type"] == "overloaded_error"
    assert "gen_ai.response.finish_reasons" not in client.attributes
    assert server.status.status_code is StatusCode.ERROR  # a 5xx answer is a server error
    assert server.attributes is not None and server.attributes["error.type"] == "529"


def test_request_status_goes_on_the_server_span_only(harness: Harness) -> None:
    with (
        harness.tel.server_span("POST", ROUTE, {}),
        harness.tel.client_span(MODEL, stream=False, server_address="x"),
    ):
        harness.tel.record_request(method="POST", route=ROUTE, status=404, duration=0.1, overhead=0.1)
    spans = harness.finished()
    assert "http.response.status_code" not in (spans[f"chat {MODEL}"].attributes or {})
    assert (spans[f"POST {ROUTE}"].attributes or {}).get("http.response.status_code") is None
    with harness.tel.server_span("POST", ROUTE, {}):
        harness.tel.record_request(method="POST", route=ROUTE, status=404, duration=0.1, overhead=0.1)
    last = harness.spans.get_finished_spans()[-1]
    assert last.attributes is not None and last.attributes["http.response.status_code"] == 404
    assert last.status.status_code is StatusCode.UNSET  # a 4xx is the client's error, not the server's


def test_no_secret_reaches_any_span(harness: Harness) -> None:
    headers = {
        "traceparent": TRACEPARENT,
        "authorization": f"Bearer {TOKEN}",
        "x-api-key": API_KEY,
        "cookie": f"session={TOKEN}",
    }
    with (
        pytest.raises(RuntimeError),
        harness.tel.server_span("POST", ROUTE, headers) as server,
        harness.tel.client_span(MODEL, stream=True, server_address="api.anthropic.com") as client,
    ):
        harness.tel.finish_call(server, client, record=record(subject=TOKEN), sub="alice")
        raise RuntimeError(f"upstream said no to {API_KEY} / Bearer {TOKEN}")
    spans = harness.spans.get_finished_spans()
    assert len(spans) == 2
    for span in spans:
        dumped = span.to_json()
        for marker in SECRET_MARKERS:
            assert marker not in dumped, (span.name, marker)
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None and span.attributes["error.type"] == "RuntimeError"
        assert not span.events  # no exception event: its message and stack could carry anything


def test_cancelled_request_is_not_an_error(harness: Harness) -> None:
    with pytest.raises(asyncio.CancelledError), harness.tel.server_span("POST", ROUTE, {}):
        raise asyncio.CancelledError
    span = harness.finished()[f"POST {ROUTE}"]
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes is not None and span.attributes["error.type"] == "CancelledError"


@pytest.mark.parametrize(
    ("attribute", "expected_key"),
    [("enduser.pseudo.id", "enduser.pseudo.id"), (None, None), ("", None)],
)
def test_user_attribute_is_configurable(attribute: str | None, expected_key: str | None) -> None:
    h = Harness(obs(tracing={"user-attribute": attribute}))
    h.request(sub="bob")
    attrs = dict(h.finished()[f"POST {ROUTE}"].attributes or {})
    user_keys = [k for k, v in attrs.items() if v == "bob"]
    assert user_keys == ([expected_key] if expected_key else [])
    h.tel._shutdown_sync()


def test_tracing_disabled_records_nothing_and_has_no_ids() -> None:
    h = Harness(obs(tracing={"enabled": False}))
    with h.tel.server_span("POST", ROUTE, {"traceparent": TRACEPARENT}) as server:
        assert not server.is_recording()
        assert h.tel.trace_ids() == (None, None)
        with h.tel.client_span(MODEL, stream=False, server_address="x") as client:
            h.tel.finish_call(server, client, record=STREAMED, sub="alice")
    assert h.spans.get_finished_spans() == ()
    assert "gen_ai.client.token.usage" in h.metrics()  # metrics are independent of tracing
    h.tel._shutdown_sync()


def test_otel_sdk_disabled_switches_everything_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    h = Harness()
    h.exercise_everything()
    assert h.spans.get_finished_spans() == ()
    assert h.tel.prometheus()[0] == b""
    assert not h.tel.tracing_enabled and not h.tel.metrics_enabled
    h.tel._shutdown_sync()


def test_sampler_from_env_drops_spans_but_keeps_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    h = Harness()
    with h.tel.server_span("POST", ROUTE, {}) as server:
        assert not server.is_recording()
        trace_id, span_id = h.tel.trace_ids()
        with h.tel.client_span(MODEL, stream=True, server_address="x") as client:
            assert not client.is_recording()
            h.tel.finish_call(server, client, record=STREAMED, sub="alice")
    assert trace_id is not None and len(trace_id) == 32 and span_id is not None and len(span_id) == 16
    assert h.spans.get_finished_spans() == ()
    h.tel._shutdown_sync()


def test_parent_based_sampler_follows_an_unsampled_traceparent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    h = Harness()
    with h.tel.server_span("POST", ROUTE, {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-00"}) as server:
        assert not server.is_recording()
        assert h.tel.trace_ids()[0] == TRACE_ID
    assert h.spans.get_finished_spans() == ()
    h.tel._shutdown_sync()


async def test_without_an_endpoint_nothing_is_exported_and_nothing_complains(
    capfd: pytest.CaptureFixture[str],
) -> None:
    gc.collect()  # earlier tests' garbage (a transport's ResourceWarning at collection) is not this test's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tel = Telemetry(obs(), service_version="1")
        with tel.server_span("POST", ROUTE, {"traceparent": TRACEPARENT}) as server:
            assert not server.is_recording()
            assert tel.trace_ids()[0] == TRACE_ID  # ids still flow into logs and usage events
            with tel.client_span(MODEL, stream=True, server_address="x") as client:
                assert not client.is_recording()
                tel.finish_call(server, client, record=STREAMED, sub="alice")
            tel.record_request(method="POST", route=ROUTE, status=200, duration=0.1, overhead=0.0001)
        with tel.server_span("POST", ROUTE, {}):
            fresh = tel.trace_ids()
        tel.prometheus()
        await tel.shutdown()
    assert fresh[0] is not None and fresh[0] != TRACE_ID and fresh[1] is not None
    assert tel._tracer_provider is None
    assert caught == [], [str(w.message)[:200] for w in caught]
    out, err = capfd.readouterr()
    assert err == "" and out == ""


def test_resource_names_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Telemetry(obs(), service_version="1.2.3").resource.attributes["service.name"] == "gate"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gate-eu")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=prod,service.version=7")
    attrs = Telemetry(obs(), service_version="1.2.3").resource.attributes
    assert attrs["service.name"] == "gate-eu"
    assert attrs["deployment.environment.name"] == "prod"
    assert attrs["service.version"] == "7"  # the operator's word wins over the build's
    assert attrs["service.instance.id"]  # one series per worker process


# ---------------------------------------------------------------------------------------------- metrics

INSTRUMENTS = {
    "http.server.request.duration": "s",
    "gen_ai.client.token.usage": "{token}",
    "gen_ai.server.time_to_first_token": "s",
    "gate.overhead.duration": "s",
    "gate.circuit_breaker.state": "{state}",
    "gate.circuit_breaker.transitions": "{transition}",
    "gate.keys.selections": "{selection}",
    "gate.keys.cooldowns": "{cooldown}",
    "gate.keys.quarantines": "{quarantine}",
    "gate.keys.restorations": "{restoration}",
    "gate.usage.outbox.depth": "{event}",
    "gate.usage.outbox.dead_letters": "{event}",
    "gate.usage.publish.failures": "{failure}",
    "gate.usage.delivery.lag": "s",
    "gate.jwks.refreshes": "{refresh}",
    "gate.auth.failures": "{failure}",
}


def points(metric: Metric) -> list[Any]:
    return list(metric.data.data_points)


def by_attrs(metric: Metric) -> dict[frozenset[tuple[str, Any]], Any]:
    return {frozenset((point.attributes or {}).items()): point for point in points(metric)}


def test_every_instrument_reaches_the_reader(harness: Harness) -> None:
    harness.exercise_everything()
    metrics = harness.metrics()
    assert {name: metrics[name].unit for name in INSTRUMENTS} == INSTRUMENTS
    for name, metric in metrics.items():
        for point in points(metric):
            assert "user.id" not in (point.attributes or {}), name  # no user label by default


def test_request_duration_and_overhead(harness: Harness) -> None:
    harness.request(status=200)
    harness.tel.record_request(method="POST", route=ROUTE, status=401, duration=0.0004, overhead=0.0004)
    metrics = harness.metrics()
    duration = by_attrs(metrics["http.server.request.duration"])
    ok = duration[
        frozenset({("http.request.method", "POST"), ("http.route", ROUTE), ("http.response.status_code", 200)})
    ]
    assert (ok.count, ok.sum) == (1, 0.9)
    denied = duration[
        frozenset({("http.request.method", "POST"), ("http.route", ROUTE), ("http.response.status_code", 401)})
    ]
    assert denied.count == 1 and denied.bucket_counts[0] == 1  # 0.4 ms is under the first bound (1 ms)
    overhead = by_attrs(metrics["gate.overhead.duration"])[frozenset({("http.route", ROUTE)})]
    assert overhead.count == 2 and tuple(overhead.explicit_bounds) == OVERHEAD_BUCKETS
    assert overhead.explicit_bounds[0] < 0.0001  # sub-millisecond resolution
    assert overhead.bucket_counts[bisect_left(OVERHEAD_BUCKETS, 0.00012)] == 1


def test_token_usage_by_type_model_and_key(harness: Harness) -> None:
    harness.request(STREAMED)
    harness.request(NOT_STREAMED)
    usage = harness.metrics()["gen_ai.client.token.usage"]
    sums = {(p.attributes["gen_ai.token.type"], p.attributes["gate.key_alias"]): p.sum for p in points(usage)}
    assert sums == {
        ("input", "primary"): 1200,
        ("output", "primary"): 350,
        ("cache_creation", "primary"): 40,
        ("cache_read", "primary"): 800,
        ("input", "secondary"): 1200,
        ("output", "secondary"): 350,
    }
    for point in points(usage):
        assert point.attributes["gen_ai.response.model"] == STREAMED.model
        assert point.attributes["gen_ai.system"] == "anthropic"
    ttft = points(harness.metrics()["gen_ai.server.time_to_first_token"])
    assert len(ttft) == 1 and ttft[0].count == 1 and ttft[0].sum == pytest.approx(0.3)


def test_a_call_without_usage_records_no_tokens(harness: Harness) -> None:
    harness.request(
        record(
            input_tokens=0,
            output_tokens=0,
            cache_creation_tokens=0,
            cache_read_tokens=0,
            time_to_first_token_ms=None,
            status="error",
            http_status=429,
        )
    )
    metrics = harness.metrics()
    assert "gen_ai.client.token.usage" not in metrics
    assert "gen_ai.server.time_to_first_token" not in metrics


def test_user_label_only_when_switched_on() -> None:
    h = Harness(obs(metrics={"user-label": True}))
    h.exercise_everything()
    labelled = {
        name
        for name, metric in h.metrics().items()
        if any((p.attributes or {}).get("user.id") == "alice" for p in points(metric))
    }
    assert labelled == {"http.server.request.duration", "gen_ai.client.token.usage"}
    h.tel._shutdown_sync()


def test_key_events_count_by_alias(harness: Harness) -> None:
    for _ in range(3):
        harness.tel.on_key_event("selected", "primary")
    harness.tel.on_key_event("selected", "secondary")
    harness.tel.on_key_event("cooldown", "secondary")
    harness.tel.on_key_event("no-such-kind", "secondary")
    metrics = harness.metrics()
    selections = {p.attributes["gate.key_alias"]: p.value for p in points(metrics["gate.keys.selections"])}
    assert selections == {"primary": 3, "secondary": 1}
    assert [p.value for p in points(metrics["gate.keys.cooldowns"])] == [1]
    assert getattr(metrics["gate.keys.selections"].data, "is_monotonic", False)


def test_auth_and_jwks_counters(harness: Harness) -> None:
    for reason in ("expired", "expired", "bad_signature"):
        harness.tel.on_auth_failure(reason)
    harness.tel.on_jwks_refresh(True)
    harness.tel.on_jwks_refresh(False)
    harness.tel.on_jwks_refresh(True)
    metrics = harness.metrics()
    assert {p.attributes["reason"]: p.value for p in points(metrics["gate.auth.failures"])} == {
        "expired": 2,
        "bad_signature": 1,
    }
    assert {p.attributes["outcome"]: p.value for p in points(metrics["gate.jwks.refreshes"])} == {
        "ok": 2,
        "failed": 1,
    }


def test_breaker_state_gauge(harness: Harness) -> None:
    def state() -> float:
        (point,) = points(harness.metrics()["gate.circuit_breaker.state"])
        return float(point.value)

    assert state() == 0
    harness.tel.on_breaker_change("closed", "OPEN")
    assert state() == 1
    harness.tel.on_breaker_change("open", "half-open")
    assert state() == 2
    current = ["closed"]
    harness.tel.set_breaker_state_source(lambda: current[0])
    assert state() == 0
    current[0] = "half_open"
    assert state() == 2
    transitions = {
        (p.attributes["from"], p.attributes["to"]): p.value
        for p in points(harness.metrics()["gate.circuit_breaker.transitions"])
    }
    assert transitions == {("closed", "open"): 1, ("open", "half_open"): 1}


def test_usage_gauges_follow_their_source(harness: Harness) -> None:
    assert "gate.usage.outbox.depth" not in harness.metrics()  # no source yet: no series
    source = UsageSource()
    harness.tel.set_usage_source(source)
    metrics = harness.metrics()
    assert points(metrics["gate.usage.outbox.depth"])[0].value == 7
    assert points(metrics["gate.usage.outbox.dead_letters"])[0].value == 2
    assert points(metrics["gate.usage.publish.failures"])[0].value == 3
    assert getattr(metrics["gate.usage.publish.failures"].data, "is_monotonic", False)
    assert points(metrics["gate.usage.delivery.lag"])[0].value == 0.25
    source.last_delivery_lag_seconds = None  # type: ignore[assignment]
    source.depth = 0
    metrics = harness.metrics()
    assert points(metrics["gate.usage.outbox.depth"])[0].value == 0
    assert "gate.usage.delivery.lag" not in metrics or not points(metrics["gate.usage.delivery.lag"])


def test_metrics_disabled_costs_nothing_and_scrapes_empty() -> None:
    h = Harness(obs(metrics={"enabled": False}))
    h.exercise_everything()
    assert h.tel.prometheus()[0] == b""
    assert h.reader.get_metrics_data() is None or not h.metrics()
    assert len(h.spans.get_finished_spans()) == 4  # tracing is independent of metrics
    h.tel._shutdown_sync()


def test_cardinality_is_bounded() -> None:
    hist = _Histogram("h", "s", "", (1.0,))
    for i in range(2100):
        hist.record(0.5, (("user.id", f"u{i}"),))
    assert len(hist.points) == 2001
    overflow = hist.points[(("otel.metric.overflow", True),)]
    assert overflow.counts == [100, 0]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.floats(min_value=-1.0, max_value=1e9) | st.sampled_from([math.nan, math.inf, 0.5, 1.0, 250.0]),
        max_size=60,
    )
)
def test_histogram_agrees_with_a_naive_count(values: list[float]) -> None:
    bounds = (0.001, 0.5, 1.0, 250.0, 1e6)
    hist = _Histogram("h", "s", "", bounds)
    for value in values:
        hist.record(value, ())
    kept = [v for v in values if 0.0 <= v < math.inf]
    metric = hist.collect(1)
    if not kept:
        assert metric is None
        return
    assert metric is not None
    point = metric.data.data_points[0]
    assert isinstance(point, HistogramDataPoint)
    expected = [
        sum(1 for v in kept if (i == 0 or v > bounds[i - 1]) and (i == len(bounds) or v <= bounds[i]))
        for i in range(len(bounds) + 1)
    ]
    assert list(point.bucket_counts) == expected
    assert point.count == len(kept)
    assert point.sum == pytest.approx(sum(kept))
    assert (point.min, point.max) == (min(kept), max(kept))


# ---------------------------------------------------------------------------------------------- prometheus

PROMETHEUS_FAMILIES = {
    "http_server_request_duration_seconds": "histogram",
    "gen_ai_client_token_usage": "histogram",
    "gen_ai_server_time_to_first_token_seconds": "histogram",
    "gate_overhead_duration_seconds": "histogram",
    "gate_circuit_breaker_state": "gauge",
    "gate_circuit_breaker_transitions": "counter",
    "gate_keys_selections": "counter",
    "gate_keys_cooldowns": "counter",
    "gate_keys_quarantines": "counter",
    "gate_keys_restorations": "counter",
    "gate_usage_outbox_depth": "gauge",
    "gate_usage_outbox_dead_letters": "gauge",
    "gate_usage_publish_failures": "counter",
    "gate_usage_delivery_lag_seconds": "gauge",
    "gate_jwks_refreshes": "counter",
    "gate_auth_failures": "counter",
}


def test_prometheus_exposition_parses(harness: Harness) -> None:
    harness.exercise_everything()
    body, content_type = harness.tel.prometheus()
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {name: families[name].type for name in PROMETHEUS_FAMILIES} == PROMETHEUS_FAMILIES
    samples = {s.name: s for f in families.values() for s in f.samples}
    assert "gate_keys_selections_total" in samples
    count = [
        s
        for s in families["http_server_request_duration_seconds"].samples
        if s.name.endswith("_count") and s.labels["http_response_status_code"] == "200"
    ]
    assert count[0].value == 2
    assert families["target_info"].samples[0].labels["service_name"] == "gate"
    assert "alice" not in body.decode()  # no user label by default
    # the scrape and the in-memory reader both see Gate's own aggregates
    assert harness.metrics()["gate.keys.selections"]


# ---------------------------------------------------------------------------------------------- OTLP


class OtlpReceiver:
    """A real OTLP/HTTP endpoint: it keeps every protobuf body posted to /v1/traces and /v1/metrics."""

    def __init__(self) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.paths: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert request.content_type == "application/x-protobuf"
        self.paths.append(request.path)
        if request.path.endswith("/v1/traces"):
            self.traces.append(ExportTraceServiceRequest.FromString(body))
        elif request.path.endswith("/v1/metrics"):
            self.metrics.append(ExportMetricsServiceRequest.FromString(body))
        else:
            return web.Response(status=404)
        return web.Response(body=b"", content_type="application/x-protobuf")


@pytest.fixture
async def otlp() -> AsyncIterator[tuple[OtlpReceiver, str]]:
    receiver = OtlpReceiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield receiver, f"http://127.0.0.1:{port}"
    await runner.cleanup()


def _attrs(key_values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in key_values:
        value = kv.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = tuple(getattr(v, v.WhichOneof("value")) for v in value.array_value.values)
        else:
            out[kv.key] = getattr(value, kind)
    return out


async def test_traces_and_metrics_reach_a_real_otlp_receiver(
    otlp: tuple[OtlpReceiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, endpoint = otlp
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "3600000")  # only the flush at shutdown exports
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test")
    tel = Telemetry(obs(), service_version="9.9.9")
    with tel.server_span("POST", ROUTE, {"traceparent": TRACEPARENT}) as server:
        with tel.client_span(MODEL, stream=True, server_address="api.anthropic.com") as client:
            tel.finish_call(server, client, record=STREAMED, sub="alice")
        tel.record_request(method="POST", route=ROUTE, status=200, duration=0.9, overhead=0.0001, sub="alice")
    tel.on_key_event("selected", "primary")
    await tel.shutdown()

    assert set(receiver.paths) == {"/v1/traces", "/v1/metrics"}
    spans = {}
    for request in receiver.traces:
        for resource_spans in request.resource_spans:
            resource = _attrs(resource_spans.resource.attributes)
            assert resource["service.name"] == "gate"
            assert resource["deployment.environment.name"] == "test"
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans[span.name] = span
    server_span, client_span = spans[f"POST {ROUTE}"], spans[f"chat {MODEL}"]
    assert server_span.trace_id.hex() == TRACE_ID and server_span.parent_span_id.hex() == PARENT_SPAN_ID
    assert client_span.parent_span_id == server_span.span_id
    client_attrs = _attrs(client_span.attributes)
    assert client_attrs["gen_ai.response.finish_reasons"] == ("end_turn",)
    assert client_attrs["gen_ai.usage.input_tokens"] == 1200
    assert client_attrs["gen_ai.response.id"] == STREAMED.message_id
    assert _attrs(server_span.attributes)["http.response.status_code"] == 200

    names = {
        metric.name
        for request in receiver.metrics
        for resource_metrics in request.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
    }
    assert {
        "http.server.request.duration",
        "gen_ai.client.token.usage",
        "gate.overhead.duration",
        "gen_ai.server.time_to_first_token",
        "gate.keys.selections",
        "gate.circuit_breaker.state",
    } <= names


async def test_signal_specific_endpoint_and_exporter_none(
    otlp: tuple[OtlpReceiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, endpoint = otlp
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{endpoint}/custom/v1/traces")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    tel = Telemetry(obs(), service_version="1")
    with tel.server_span("GET", "/actuator/health", {}):
        pass
    tel.record_request(method="GET", route="/actuator/health", status=200, duration=0.001, overhead=0.001)
    await tel.shutdown()
    assert receiver.paths == ["/custom/v1/traces"]
    assert [s.name for r in receiver.traces for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans] == [
        "GET /actuator/health"
    ]


async def test_a_grpc_protocol_setting_is_named_not_obeyed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with caplog.at_level(logging.WARNING, logger="gate.telemetry"):
        assert _otlp_wanted("TRACES")  # (a whole Telemetry would flush to a port where nothing listens)
    assert "http/protobuf" in caplog.text and "grpc" in caplog.text


async def test_shutdown_twice_is_harmless() -> None:
    tel = Harness().tel
    await tel.shutdown()
    await tel.shutdown()
