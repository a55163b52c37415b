"""Per-request cost of Gate's telemetry calls alone (what the relay does around one call), three configurations."""

# Run: .venv/bin/python benchmarks/micro/otlp_sink.py --port 4319 &  then  taskset -c 0 .venv/bin/python benchmarks/micro/telemetry_cost.py
import os
import sys
import timeit

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src"))
from gate.accounting.usage import UsageRecord
from gate.ops.telemetry import Telemetry
from gate.settings import ObservabilitySettings

rec = UsageRecord(
    subject="alice",
    model="claude-sonnet-4-5",
    message_id="msg_1",
    input_tokens=1200,
    output_tokens=350,
    cache_creation_tokens=0,
    cache_read_tokens=0,
    latency_ms=900,
    stream=False,
    stop_reason="end_turn",
    status="success",
    error_type=None,
    key_alias="a",
    trace_id=None,
    anthropic_request_id="req_1",
    http_status=200,
    time_to_first_token_ms=None,
)


def per_request(tel):
    def run():
        with tel.server_span("POST", "/v1/messages", {}) as server:
            tel.on_key_event("selected", "a")
            with tel.client_span("claude-sonnet-4-5", stream=False, server_address="x") as client:
                tel.trace_ids()
                tel.finish_call(server, client, record=rec, sub="alice")
            tel.record_request(
                method="POST", route="/v1/messages", status=200, duration=0.01, overhead=0.0001, sub="alice"
            )
            tel.trace_ids()

    return run


def obs(on):
    return ObservabilitySettings.model_validate({"tracing": {"enabled": on}, "metrics": {"enabled": on}})


for name, on, env in (
    ("off", False, {}),
    ("on, no endpoint", True, {}),
    (
        "on, OTLP, 10% sampled",
        True,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4319",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        },
    ),
    ("on, OTLP, 100% sampled", True, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4319"}),
):
    for k in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[k]
    os.environ.update(env)
    tel = Telemetry(obs(on), service_version="bench")
    fn = per_request(tel)
    n = 20000
    best = min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6
    print(f"{name:26s} {best:6.1f} us per request")
    tel._shutdown_sync()
