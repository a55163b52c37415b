"""The local stack files: a valid docker-compose.yaml and a Grafana dashboard that asks for real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from gate.accounting.usage import UsageRecord
from gate.ops.telemetry import Telemetry
from gate.settings import ObservabilitySettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yaml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "gate.json"
PROVIDER = GRAFANA / "provisioning" / "dashboards" / "gate.yaml"


def compose_command() -> list[str] | None:
    """`docker compose` (the plugin) or the standalone `docker-compose`; both validate without a daemon."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def test_compose_file_is_valid() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


def test_compose_runs_the_stack_gate_needs() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    images = {name: service["image"] for name, service in services.items()}
    assert images["lgtm"].startswith("grafana/otel-lgtm")
    assert images["rabbitmq"].startswith("rabbitmq:") and "management" in images["rabbitmq"]
    assert images["pubsub"].startswith("gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators")

    def host_ports(service: str) -> set[int]:
        return {int(str(port).split(":")[-2]) for port in services[service]["ports"]}

    assert host_ports("lgtm") == {3000, 4317, 4318}
    assert host_ports("rabbitmq") == {5672, 15672}
    assert host_ports("pubsub") == {8085}
    for service in services.values():  # Grafana has no login here: nothing listens beyond loopback
        assert all(str(port).startswith("127.0.0.1:") for port in service["ports"])


def test_dashboard_is_provisioned_from_the_mounted_folder() -> None:
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in _service("lgtm")["volumes"])
    provider = yaml.safe_load(PROVIDER.read_text())["providers"][0]
    mounted_provider = mounts["./deploy/grafana/provisioning/dashboards/gate.yaml"]
    assert mounted_provider.startswith("/otel-lgtm/grafana/conf/provisioning/dashboards/")
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    for source in mounts:
        assert (ROOT / source).exists(), source


def _service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"][name]
    return service


# ---------------------------------------------------------------------------------------------- dashboard

# PromQL words that look like identifiers but are not metric names.
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name in _PROMQL_WORDS:
            continue
        names.add(name)
    return names


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(gate_overhead_duration_seconds_bucket{job=~"$job", '
        'http_route="/v1/messages"}[$__rate_interval]))) / clamp_min(sum(rate(x_total[5m])), 1e-9)'
    )
    assert metric_names(expr) == {"gate_overhead_duration_seconds_bucket", "x_total"}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            queries.append(re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", query["query"]))
    return queries


def exported_sample_names() -> set[str]:
    """Every sample name Telemetry's Prometheus scrape shows once each instrument has been used."""
    tel = Telemetry(ObservabilitySettings(), service_version="0", span_exporter=InMemorySpanExporter())
    usage = UsageRecord(
        subject="alice", model="claude-sonnet-4-5", message_id="msg_1", input_tokens=10, output_tokens=5,
        cache_creation_tokens=1, cache_read_tokens=2, latency_ms=100, stream=True, stop_reason="end_turn",
        status="success", error_type=None, key_alias="primary", trace_id=None, anthropic_request_id="req_1",
        http_status=200, time_to_first_token_ms=50,
    )  # fmt: skip

    class Usage:
        depth, publish_failures_total, last_delivery_lag_seconds = 1, 1, 0.5

    with tel.server_span("POST", "/v1/messages", {}) as server:
        with tel.client_span("claude-sonnet-4-5", stream=True, server_address="api.anthropic.com") as client:
            tel.finish_call(server, client, record=usage, sub="alice")
        tel.record_request(method="POST", route="/v1/messages", status=200, duration=0.1, overhead=0.0001)
    for kind in ("selected", "cooldown", "quarantine", "restored"):
        tel.on_key_event(kind, "primary")
    tel.on_breaker_change("closed", "open")
    tel.on_jwks_refresh(True)
    tel.on_auth_failure("expired")
    tel.set_usage_source(Usage())
    body, _ = tel.prometheus()
    tel._shutdown_sync()
    return {sample.name for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def test_dashboard_queries_only_metrics_gate_exports() -> None:
    queries = dashboard_queries()
    assert queries
    used = set().union(*(metric_names(query) for query in queries))
    exported = exported_sample_names()
    assert used, "no metric names found in the dashboard"
    assert used <= exported, sorted(used - exported)


def test_dashboard_covers_the_panels_operators_need() -> None:
    used = set().union(*(metric_names(query) for query in dashboard_queries()))
    wanted = {
        "http_server_request_duration_seconds_count",  # request rate and status
        "http_server_request_duration_seconds_bucket",  # latency percentiles
        "gate_overhead_duration_seconds_bucket",
        "gen_ai_client_token_usage_sum",  # tokens by model and key alias
        "gate_circuit_breaker_state",
        "gate_usage_outbox_depth",
        "gate_usage_publish_failures_total",
        "gate_auth_failures_total",
    }
    assert wanted <= used, sorted(wanted - used)


def test_dashboard_uses_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert datasource["query"] == "prometheus" and datasource["current"]["value"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
