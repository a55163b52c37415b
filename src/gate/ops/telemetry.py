"""OpenTelemetry traces and metrics for Gate: request and upstream-call spans, instruments, Prometheus scrape.

Configured by ``observability`` settings plus the standard ``OTEL_*`` variables; providers belong to one
``Telemetry`` instance (never the global ones), so tests and several apps in one process do not collide.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import re
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    INVALID_SPAN,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gate.ops.bounds import MAX_FIELD_CHARS, bounded
from gate.settings import ObservabilitySettings

if TYPE_CHECKING:
    from gate.accounting.usage import UsageRecord

__all__ = ["BREAKER_STATE_VALUES", "Telemetry"]

SCOPE: Final = "gate"
GEN_AI_SYSTEM: Final = "anthropic"

# Gauge values for gate.circuit_breaker.state; forced states read as the state they force.
BREAKER_STATE_VALUES: Final[Mapping[str, int]] = {
    "closed": 0,
    "open": 1,
    "half_open": 2,
    "forced_open": 1,
    "disabled": 0,
    "metrics_only": 0,
}

# Bucket boundaries. Requests through Gate run from sub-millisecond rejections to ten-minute streams.
# fmt: off
REQUEST_DURATION_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
    300.0, 600.0,
)
# Gate's own share of a request: tens of microseconds when healthy, so the resolution is sub-millisecond.
OVERHEAD_BUCKETS: Final = (
    0.00001, 0.000025, 0.00005, 0.000075, 0.0001, 0.00015, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1,
)
# Semantic-convention advice (powers of four): from a one-token reply to a full 1M-token context.
TOKEN_BUCKETS: Final = (
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
)
TTFT_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
)
# fmt: on

# Distinct attribute sets kept per instrument; later ones fold into one overflow series (as the SDK does).
CARDINALITY_LIMIT: Final = 2000
_OVERFLOW: Final = (("otel.metric.overflow", True),)
_CACHE_LIMIT: Final = 4096

_log = logging.getLogger(__name__)
_PROPAGATOR: Final = TraceContextTextMapPropagator()
_TRACEPARENT: Final = re.compile(r"(?!ff)[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")

Attrs = tuple[tuple[str, Any], ...]  # an attribute set, hashable, in a fixed order


# ---------------------------------------------------------------------------------------------- set-up


def _sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def _otlp_wanted(signal: str) -> bool:
    """An OTLP endpoint is set for ``signal`` (TRACES/METRICS) and ``OTEL_{signal}_EXPORTER`` allows otlp."""
    exporters = os.environ.get(f"OTEL_{signal}_EXPORTER", "otlp").strip().lower()
    if "otlp" not in {name.strip() for name in exporters.split(",")}:
        return False
    endpoint = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not (endpoint and endpoint.strip()):
        return False
    protocol = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol.strip() != "http/protobuf":
        _log.warning(
            "OTLP %s go out over http/protobuf, the one protocol Gate ships: OTEL_EXPORTER_OTLP_PROTOCOL=%s "
            "is ignored (point the endpoint at the collector's HTTP port, usually 4318)",
            signal.lower(),
            protocol,
        )
    return True


def _resource(service_version: str) -> Resource:
    """SDK defaults + OTEL_RESOURCE_ATTRIBUTES/OTEL_SERVICE_NAME, with ``gate`` as the default name."""
    detected = Resource.create()
    attributes = dict(detected.attributes)
    if str(attributes.get("service.name", "")).startswith("unknown_service"):
        attributes["service.name"] = "gate"
    attributes.setdefault("service.version", service_version)
    return Resource(attributes, detected.schema_url)


# ---------------------------------------------------------------------------------------------- metrics
#
# The SDK spends about 7 us per synchronous measurement (attribute validation, hashing, a Measurement object),
# which at ~8 measurements a request is half of the 100 us a request may cost in all. Gate's synchronous
# instruments therefore aggregate here, cumulatively, for a fraction of a microsecond, and every metric reader
# of the SDK (Prometheus, OTLP, tests' in-memory one) gets them merged into what it collects.


class _HistogramPoint:
    __slots__ = ("counts", "high", "low", "start", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf
        self.start = time.time_ns()


class _Histogram:
    """A cumulative explicit-bucket histogram; values fall in (bound[i-1], bound[i]] as in OTel."""

    __slots__ = ("bounds", "description", "name", "points", "unit")

    def __init__(self, name: str, unit: str, description: str, bounds: Sequence[float]) -> None:
        self.name, self.unit, self.description = name, unit, description
        self.bounds = tuple(float(b) for b in bounds)
        self.points: dict[Attrs, _HistogramPoint] = {}

    def record(self, value: float, attrs: Attrs) -> None:
        if not 0.0 <= value < math.inf:  # also drops NaN
            return
        point = self.points.get(attrs)
        if point is None:
            point = self._new_point(attrs)
        point.counts[bisect_left(self.bounds, value)] += 1
        point.total += value
        if value < point.low:
            point.low = value
        if value > point.high:
            point.high = value

    def _new_point(self, attrs: Attrs) -> _HistogramPoint:
        if len(self.points) >= CARDINALITY_LIMIT:
            attrs = _OVERFLOW
        point = self.points.get(attrs)
        if point is None:
            point = self.points[attrs] = _HistogramPoint(len(self.bounds) + 1)
        return point

    def collect(self, now: int) -> Metric | None:
        # list() of a dict and of a list run without releasing the GIL: a consistent enough snapshot while
        # the event loop keeps recording (count is derived from the copied buckets, so they always agree).
        points = list(self.points.items())
        if not points:
            return None
        data = []
        for attrs, point in points:
            counts = list(point.counts)
            data.append(
                HistogramDataPoint(
                    attributes=dict(attrs),
                    start_time_unix_nano=point.start,
                    time_unix_nano=now,
                    count=sum(counts),
                    sum=point.total,
                    bucket_counts=counts,
                    explicit_bounds=self.bounds,
                    min=point.low,
                    max=point.high,
                )
            )
        return Metric(self.name, self.description, self.unit, Histogram(data, AggregationTemporality.CUMULATIVE))


class _Counter:
    """A cumulative monotonic counter per attribute set."""

    __slots__ = ("description", "name", "start", "unit", "values")

    def __init__(self, name: str, unit: str, description: str) -> None:
        self.name, self.unit, self.description = name, unit, description
        self.values: dict[Attrs, int] = {}
        self.start = time.time_ns()

    def add(self, attrs: Attrs, amount: int = 1) -> None:
        values = self.values
        if attrs not in values and len(values) >= CARDINALITY_LIMIT:
            attrs = _OVERFLOW
        values[attrs] = values.get(attrs, 0) + amount

    def collect(self, now: int) -> Metric | None:
        points = list(self.values.items())
        if not points:
            return None
        data = [NumberDataPoint(dict(attrs), self.start, now, value) for attrs, value in points]
        return Metric(self.name, self.description, self.unit, Sum(data, AggregationTemporality.CUMULATIVE, True))


def _merge(data: MetricsData | None, extra: list[Metric], scope: InstrumentationScope, resource: Resource) -> Any:
    """``data`` from the SDK with ``extra`` added to ``scope``'s metrics."""
    if not extra:
        return data
    if data is None or not data.resource_metrics:
        return MetricsData([ResourceMetrics(resource, [ScopeMetrics(scope, extra, "")], resource.schema_url)])
    first, *rest = data.resource_metrics
    scopes = list(first.scope_metrics)
    for index, scope_metrics in enumerate(scopes):
        if scope_metrics.scope == scope:
            scopes[index] = ScopeMetrics(scope, [*scope_metrics.metrics, *extra], scope_metrics.schema_url)
            break
    else:
        scopes.append(ScopeMetrics(scope, extra, ""))
    return MetricsData([ResourceMetrics(first.resource, scopes, first.schema_url), *rest])


def _add_to_collection(
    reader: MetricReader, produce: Callable[[], list[Metric]], scope: InstrumentationScope, resource: Resource
) -> None:
    """Make ``reader`` collect Gate's own aggregates along with the SDK's instruments."""
    # set by MeterProvider: the one seam between a reader and the data it collects (the SDK mistypes it)
    sdk_collect: Any = reader._collect
    if sdk_collect is None:
        raise RuntimeError("the metric reader is not registered with a MeterProvider")

    def collect(metric_reader: MetricReader, timeout_millis: float = 10_000) -> Any:
        return _merge(sdk_collect(metric_reader, timeout_millis=timeout_millis), produce(), scope, resource)

    reader._set_collect_callback(collect)


# ---------------------------------------------------------------------------------------------- spans


class _NoSpan:
    """The context manager handed out when tracing is off: no allocation, no context switch."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return INVALID_SPAN

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


_NO_SPAN: Final = _NoSpan()


class _ActiveSpan:
    """Makes ``span`` current for the block and ends it after; cheaper than the SDK's generator-based one.

    An exception marks the span with its type only: messages and tracebacks can carry request content.
    """

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span) -> None:
        self._span = span
        self._token: object = None

    def __enter__(self) -> Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span = self._span
        if exc_type is not None and span.is_recording():
            span.set_attribute("error.type", exc_type.__qualname__)
            if issubclass(exc_type, Exception):  # a cancelled (disconnected) request is not a failure
                span.set_status(Status(StatusCode.ERROR, exc_type.__qualname__))
        span.end()
        otel_context.detach(self._token)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- the room


class Telemetry:
    """Spans and instruments for one Gate app. Hot-path methods do nothing costly when their signal is off.

    Metrics are recorded without locks: call the recording methods from the event loop's thread. Collection
    (a scrape, the OTLP exporter's thread) may run on any thread.
    """

    def __init__(
        self,
        settings: ObservabilitySettings,
        *,
        service_version: str,
        span_exporter: SpanExporter | None = None,
        metric_readers: Sequence[MetricReader] = (),
    ) -> None:
        """``span_exporter`` (tests) gets each span synchronously as it ends. Without it, spans go to an
        OTLP/HTTP exporter in batches off the request path when an OTLP endpoint is configured. With neither,
        no span is recorded, but requests still get trace ids (the client's, from ``traceparent``, or new
        ones) for logs and usage events."""
        sdk_disabled = _sdk_disabled()
        self.resource = _resource(service_version)
        self._user_attribute = settings.tracing.user_attribute or None
        self._user_label = settings.metrics.user_label
        self.tracing_enabled = settings.tracing.enabled and not sdk_disabled
        self.metrics_enabled = settings.metrics.enabled and not sdk_disabled

        self._tracer_provider: TracerProvider | None = None
        self._tracer: trace.Tracer | None = None
        self._ids_only = False
        if self.tracing_enabled:
            self._tracer_provider = self._make_tracer_provider(span_exporter)
            if self._tracer_provider is None:
                self._ids_only = True
            else:
                self._tracer = self._tracer_provider.get_tracer(SCOPE, service_version)

        self._make_instruments()
        self._breaker_state = "closed"
        self._breaker_source: Callable[[], str] | None = None
        self._usage_source: Any = None
        self._request_keys: dict[tuple[str, str, int], Attrs] = {}
        self._route_keys: dict[str, Attrs] = {}
        self._alias_keys: dict[str, Attrs] = {}
        self._token_keys: dict[tuple[str | None, str | None, str | None], tuple[Attrs, ...]] = {}

        self._meter_provider: MeterProvider | None = None
        self._prometheus_registry: Any = None
        if self.metrics_enabled:
            self._meter_provider = self._make_meter_provider(metric_readers, service_version)
        self._shut_down = False

    def _make_tracer_provider(self, span_exporter: SpanExporter | None) -> TracerProvider | None:
        """A provider (sampler from OTEL_TRACES_SAMPLER[_ARG]) when spans have somewhere to go, else None."""
        if span_exporter is not None:
            provider = TracerProvider(resource=self.resource, shutdown_on_exit=False)
            provider.add_span_processor(SimpleSpanProcessor(span_exporter))
            return provider
        if _otlp_wanted("TRACES"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider = TracerProvider(resource=self.resource, shutdown_on_exit=False)
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            return provider
        return None

    def _make_meter_provider(self, extra_readers: Sequence[MetricReader], service_version: str) -> MeterProvider:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        self._prometheus_registry = CollectorRegistry(auto_describe=False)
        readers: list[MetricReader] = [
            PrometheusMetricReader(registry=self._prometheus_registry),
            *extra_readers,
        ]
        if _otlp_wanted("METRICS"):
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            # interval from OTEL_METRIC_EXPORT_INTERVAL (default 60 s)
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        provider = MeterProvider(metric_readers=readers, resource=self.resource, shutdown_on_exit=False)
        meter = provider.get_meter(SCOPE, service_version)
        meter.create_observable_gauge(
            "gate.circuit_breaker.state",
            callbacks=[self._observe_breaker],
            unit="{state}",
            description="Circuit breaker state: 0 closed, 1 open, 2 half-open.",
        )
        meter.create_observable_gauge(
            "gate.usage.outbox.depth",
            callbacks=[self._observe_outbox_depth],
            unit="{event}",
            description="Usage events waiting in the outbox.",
        )
        meter.create_observable_gauge(
            "gate.usage.outbox.dead_letters",
            callbacks=[self._observe_dead_letters],
            unit="{event}",
            description="Usage events a destination refused for good, kept in the outbox's dead-letter table.",
        )
        meter.create_observable_counter(
            "gate.usage.publish.failures",
            callbacks=[self._observe_publish_failures],
            unit="{failure}",
            description="Failed attempts to publish usage events to the broker.",
        )
        meter.create_observable_gauge(
            "gate.usage.delivery.lag",
            callbacks=[self._observe_delivery_lag],
            unit="s",
            description="Age of the last usage event when the broker confirmed it.",
        )
        scope = InstrumentationScope(SCOPE, service_version)
        for reader in readers:
            _add_to_collection(reader, self._collect_aggregates, scope, self.resource)
        return provider

    def _make_instruments(self) -> None:
        self._request_duration = _Histogram(
            "http.server.request.duration", "s", "Duration of HTTP server requests.", REQUEST_DURATION_BUCKETS
        )
        self._overhead = _Histogram(
            "gate.overhead.duration",
            "s",
            "Time spent in Gate for a request, excluding the wait for upstream.",
            OVERHEAD_BUCKETS,
        )
        self._token_usage = _Histogram(
            "gen_ai.client.token.usage", "{token}", "Tokens used per upstream call, by type.", TOKEN_BUCKETS
        )
        self._ttft = _Histogram(
            "gen_ai.server.time_to_first_token",
            "s",
            "Time from sending the upstream request to the first streamed token.",
            TTFT_BUCKETS,
        )
        self._key_counters = {
            "selected": _Counter("gate.keys.selections", "{selection}", "Anthropic key selections."),
            "cooldown": _Counter("gate.keys.cooldowns", "{cooldown}", "Keys put in cooldown (429, 5xx)."),
            "quarantine": _Counter("gate.keys.quarantines", "{quarantine}", "Keys quarantined (401/403)."),
            "restored": _Counter(
                "gate.keys.restorations",
                "{restoration}",
                "Keys back in rotation after a cooldown or quarantine.",
            ),
        }
        self._breaker_transitions = _Counter(
            "gate.circuit_breaker.transitions", "{transition}", "Circuit breaker state changes."
        )
        self._jwks_refreshes = _Counter("gate.jwks.refreshes", "{refresh}", "JWKS fetches by outcome.")
        self._auth_failures = _Counter("gate.auth.failures", "{failure}", "Rejected requests by reason.")
        self._aggregates: tuple[_Histogram | _Counter, ...] = (
            self._request_duration,
            self._overhead,
            self._token_usage,
            self._ttft,
            *self._key_counters.values(),
            self._breaker_transitions,
            self._jwks_refreshes,
            self._auth_failures,
        )

    def _collect_aggregates(self) -> list[Metric]:
        now = time.time_ns()
        return [metric for agg in self._aggregates if (metric := agg.collect(now)) is not None]

    # ------------------------------------------------------------------------------------------ spans

    def server_span(self, method: str, route: str, headers: Mapping[str, str]) -> AbstractContextManager[Span]:
        """A SERVER span for one request, child of the client's W3C ``traceparent`` if it sent one.

        Gate's routes are literal paths, so ``route`` is also the ``url.path``.
        """
        tracer = self._tracer
        if tracer is None:
            return _id_only_span(headers) if self._ids_only else _NO_SPAN
        parent = _PROPAGATOR.extract(headers) if "traceparent" in headers else None
        span = tracer.start_span(
            f"{method} {route}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route, "url.path": route},
        )
        return _ActiveSpan(span)

    def client_span(self, model: str | None, *, stream: bool, server_address: str) -> AbstractContextManager[Span]:
        """A CLIENT span for the upstream call, named ``chat {model}`` (GenAI semantic conventions).

        Call ``finish_call`` inside this block: the span ends when the block exits. Without a span exporter
        this is a no-op (the server span's ids stay current).
        """
        tracer = self._tracer
        if tracer is None:
            return _NO_SPAN
        if not trace.get_current_span().is_recording():
            # an unsampled request: the standard samplers decide the same for its child, so skip the SDK
            return _NO_SPAN
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": GEN_AI_SYSTEM,
            "gen_ai.provider.name": GEN_AI_SYSTEM,
            "http.request.method": "POST",
            "server.address": server_address,
            "gate.stream": stream,
        }
        if model:
            model = bounded(model)  # the client's string: an unbounded one would make a span no exporter sends
            attributes["gen_ai.request.model"] = model
        span = tracer.start_span(f"chat {model}" if model else "chat", kind=SpanKind.CLIENT, attributes=attributes)
        return _ActiveSpan(span)

    def trace_ids(self) -> tuple[str | None, str | None]:
        """The current (trace id as 32 hex, span id as 16 hex), or (None, None) outside any span."""
        ctx = trace.get_current_span().get_span_context()
        if not ctx.is_valid:
            return None, None
        return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")

    def finish_call(self, server: Span, client: Span | None, *, record: UsageRecord, sub: str | None) -> None:
        """Put the upstream response and usage on the spans, record token usage and time to first token.

        Call it before the client span's block exits (an ended span takes no more attributes).
        """
        if server.is_recording():
            server_attrs: dict[str, Any] = {}
            if record.key_alias:
                server_attrs["gate.key_alias"] = record.key_alias
            if self._user_attribute and sub:
                server_attrs[self._user_attribute] = bounded(sub)
            server.set_attributes(server_attrs)
        if client is not None and client.is_recording():
            _annotate_call(client, record)
        if self.metrics_enabled:
            self._record_tokens(record, sub)

    def _record_tokens(self, record: UsageRecord, sub: str | None) -> None:
        user = sub if self._user_label else None
        cache_key = (record.model, record.key_alias, user)
        keys = self._token_keys.get(cache_key)
        if keys is None:
            keys = _token_keys(record.model, record.key_alias, user)
            if len(self._token_keys) < _CACHE_LIMIT:
                self._token_keys[cache_key] = keys
        ttft_key, input_key, output_key, creation_key, read_key = keys
        if record.time_to_first_token_ms is not None:
            self._ttft.record(record.time_to_first_token_ms / 1000.0, ttft_key)
        if record.total_tokens == 0:
            return
        usage = self._token_usage
        usage.record(record.input_tokens, input_key)
        usage.record(record.output_tokens, output_key)
        if record.cache_creation_tokens:
            usage.record(record.cache_creation_tokens, creation_key)
        if record.cache_read_tokens:
            usage.record(record.cache_read_tokens, read_key)

    # ------------------------------------------------------------------------------------------ metrics

    def record_request(
        self,
        *,
        method: str,
        route: str,
        status: int,
        duration: float,
        overhead: float,
        sub: str | None = None,
    ) -> None:
        """One finished request: its duration and Gate's own share of it (``overhead``), in seconds.

        Called inside ``server_span`` it also puts the response status on that span.
        """
        if self._tracer is not None:
            span = trace.get_current_span()
            if span.is_recording() and getattr(span, "kind", None) is SpanKind.SERVER:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_attribute("error.type", str(status))
                    span.set_status(Status(StatusCode.ERROR))
        if not self.metrics_enabled:
            return
        key = self._request_keys.get((method, route, status))
        if key is None:
            key = (
                ("http.request.method", method),
                ("http.route", route),
                ("http.response.status_code", status),
            )
            if len(self._request_keys) < _CACHE_LIMIT:
                self._request_keys[(method, route, status)] = key
        if self._user_label and sub:
            key = (*key, ("user.id", sub))
        self._request_duration.record(duration, key)
        route_key = self._route_keys.get(route)
        if route_key is None:
            route_key = (("http.route", route),)
            if len(self._route_keys) < _CACHE_LIMIT:
                self._route_keys[route] = route_key
        self._overhead.record(overhead, route_key)

    def on_breaker_change(self, old: str, new: str) -> None:
        self._breaker_state = new
        if self.metrics_enabled:
            self._breaker_transitions.add((("from", _state_name(old)), ("to", _state_name(new))))

    def set_breaker_state_source(self, fn: Callable[[], str]) -> None:
        """The breaker's current state, read when metrics are collected (wins over ``on_breaker_change``)."""
        self._breaker_source = fn

    def on_key_event(self, kind: str, alias: str) -> None:
        """``kind`` is one of selected, cooldown, quarantine, restored; others are ignored."""
        if not self.metrics_enabled:
            return
        counter = self._key_counters.get(kind)
        if counter is None:
            return
        key = self._alias_keys.get(alias)
        if key is None:
            key = (("gate.key_alias", alias),)
            if len(self._alias_keys) < _CACHE_LIMIT:
                self._alias_keys[alias] = key
        counter.add(key)

    def on_jwks_refresh(self, ok: bool) -> None:
        if self.metrics_enabled:
            self._jwks_refreshes.add((("outcome", "ok" if ok else "failed"),))

    def on_auth_failure(self, reason: str) -> None:
        if self.metrics_enabled:
            self._auth_failures.add((("reason", reason),))

    def set_usage_source(self, events: Any) -> None:
        """An object with ``depth``, ``dead_letters``, ``publish_failures_total`` and ``last_delivery_lag_seconds``."""
        self._usage_source = events

    def _observe_breaker(self, options: CallbackOptions) -> Iterable[Observation]:
        state = self._breaker_source() if self._breaker_source is not None else self._breaker_state
        value = BREAKER_STATE_VALUES.get(_state_name(state))
        return () if value is None else (Observation(value),)

    def _observe_outbox_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        return _observe(self._usage_source, "depth")

    def _observe_dead_letters(self, options: CallbackOptions) -> Iterable[Observation]:
        return _observe(self._usage_source, "dead_letters")

    def _observe_publish_failures(self, options: CallbackOptions) -> Iterable[Observation]:
        return _observe(self._usage_source, "publish_failures_total")

    def _observe_delivery_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        return _observe(self._usage_source, "last_delivery_lag_seconds")

    def prometheus(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every instrument (empty when metrics are off)."""
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        if self._prometheus_registry is None:
            return b"", CONTENT_TYPE_LATEST
        return generate_latest(self._prometheus_registry), CONTENT_TYPE_LATEST

    async def shutdown(self) -> None:
        """Flush pending spans and metrics and stop the exporters; safe to call twice."""
        if self._shut_down:
            return
        self._shut_down = True
        await asyncio.to_thread(self._shutdown_sync)

    def _shutdown_sync(self) -> None:
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()


def _id_only_span(headers: Mapping[str, str]) -> _ActiveSpan:
    """A non-recording span that only carries ids: the client's trace id if it sent one, else a new one.

    A tenth of what the SDK spends on an unsampled span, for the same ids in logs and usage events.
    """
    traceparent = headers.get("traceparent")
    match = _TRACEPARENT.match(traceparent) if traceparent else None
    trace_id = int(match.group(1), 16) if match else 0
    context = SpanContext(trace_id or random.getrandbits(128) or 1, random.getrandbits(64) or 1, is_remote=False)
    return _ActiveSpan(NonRecordingSpan(context))


def _token_keys(model: str | None, alias: str | None, user: str | None) -> tuple[Attrs, ...]:
    """Attribute sets for (time to first token, input, output, cache_creation, cache_read)."""
    base: Attrs = (("gen_ai.operation.name", "chat"), ("gen_ai.system", GEN_AI_SYSTEM))
    if model:
        base = (*base, ("gen_ai.response.model", bounded(model)))
    usage = base
    if alias:
        usage = (*usage, ("gate.key_alias", alias))
    if user:
        usage = (*usage, ("user.id", bounded(user)))
    return (
        base,
        *((*usage, ("gen_ai.token.type", kind)) for kind in ("input", "output", "cache_creation", "cache_read")),
    )


def _annotate_call(client: Span, record: UsageRecord) -> None:
    attrs: dict[str, Any] = {
        "gen_ai.usage.input_tokens": record.input_tokens,
        "gen_ai.usage.output_tokens": record.output_tokens,
        "gen_ai.usage.cache_creation.input_tokens": record.cache_creation_tokens,
        "gen_ai.usage.cache_read.input_tokens": record.cache_read_tokens,
        "gate.call.status": record.status,
    }
    if record.model:
        attrs["gen_ai.response.model"] = record.model
    if record.message_id:
        attrs["gen_ai.response.id"] = record.message_id
    if record.stop_reason:
        attrs["gen_ai.response.finish_reasons"] = (record.stop_reason,)
    if record.key_alias:
        attrs["gate.key_alias"] = record.key_alias
    if record.anthropic_request_id:
        attrs["anthropic.request_id"] = record.anthropic_request_id
    if record.http_status is not None:
        attrs["http.response.status_code"] = record.http_status
    if record.error_type:
        attrs["error.type"] = record.error_type
    for name, value in attrs.items():  # strings a client or an upstream chose: cut as in events and logs
        if type(value) is str and len(value) > MAX_FIELD_CHARS:
            attrs[name] = bounded(value)
    if record.stop_reason and len(record.stop_reason) > MAX_FIELD_CHARS:
        attrs["gen_ai.response.finish_reasons"] = (bounded(record.stop_reason),)
    client.set_attributes(attrs)
    if record.status == "error" or (record.http_status is not None and record.http_status >= 400):
        client.set_status(Status(StatusCode.ERROR, attrs.get("error.type") or str(record.http_status)))


def _state_name(state: str) -> str:
    return str(state).strip().lower().replace("-", "_")


def _observe(source: Any, attribute: str) -> Iterable[Observation]:
    value = None if source is None else getattr(source, attribute, None)
    return () if value is None else (Observation(value),)
