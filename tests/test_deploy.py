"""The deployment files as Kubernetes and Cloud Run would take them: the Helm chart rendered and linted (Helm's
own library, through helm-python-sdk) for its default values and each example, every object checked against the
bundled Kubernetes schemas (kubernetes-validate, strict), the plain manifests and the Cloud Run service, and the
configuration they hand Gate loaded by Gate's own settings loader."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gate.settings import load_settings, parse_duration

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "gate"
EXAMPLES = sorted((CHART / "examples").glob("values-*.yaml"))
CONFIG = ROOT / "config"
ENVIRONMENTS = ("lab", "sit", "uat", "prod")
SEED_RESOURCES = {"requests": {"memory": "256Mi", "cpu": "200m"}, "limits": {"memory": "512Mi", "cpu": "1000m"}}
# Variables Gate reads that are not settings properties (profiles, placeholders, the image's health check, OTel).
NOT_PROPERTIES = {
    "GATE_PROFILES",
    "GATE_HOST",
    "GATE_PORT",
    "JWK_SET_URI",
    "JWT_ISSUER",
    "GATE_HEALTH_URL",
    "GOOGLE_CLOUD_PROJECT",
    "ANTHROPIC_KEY_SECONDARY",
}

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's library) is not installed: make install")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
KUBE_VERSION = kubernetes_validate.latest_version()


def load_values(path: Path | None) -> dict[str, Any]:
    return {} if path is None else yaml.safe_load(path.read_text())


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values=values or {}, name="gate", namespace="gate", is_install=True)
    objects: list[dict[str, Any]] = []
    for name, text in sorted(manifests.items()):
        if name.endswith(".txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = by_kind(objects, kind)
    return found


def workload(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    return found


def validate_strict(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def check_service_monitor(monitor: dict[str, Any], services: list[dict[str, Any]]) -> None:
    """The Prometheus Operator's CRD schema is not bundled with kubernetes-validate: check its shape instead."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    matching = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
    assert matching, "the ServiceMonitor selects no Service"
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scheme", "tlsConfig"}
        assert endpoint["path"] == "/actuator/prometheus"
        assert endpoint["scheme"] in ("http", "https")
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
        assert any(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in matching)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables; a secretKeyRef stands for a key value, as the kubelet would fill it in."""
    out: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            out[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item.get("valueFrom", {}):
            out[item["name"]] = SECRET_VALUES.get(item["name"], "sk-ant-from-a-secret-00000")
    return out


def settings_from(container: dict[str, Any], config_files: dict[str, str], tmp: Path) -> Any:
    """Gate's settings as the container would load them: its variables, and the ConfigMap as ./config/."""
    config_dir = tmp / "config"
    config_dir.mkdir(exist_ok=True)
    for name, text in config_files.items():
        (config_dir / name).write_text(text)
    env = env_of(container)
    env.setdefault("JWK_SET_URI", "https://idp.example.com/jwks")
    settings = load_settings(env=env, config_dir=config_dir)
    for name in env:
        if name not in NOT_PROPERTIES and not name.startswith("OTEL_"):
            assert f"environment variable {name}" in settings.sources, f"{name} names no Gate setting"
    return settings


# What the kubelet would fill in from a Secret, shaped as Gate validates each.
SECRET_VALUES = {
    "USAGE_RABBITMQ_URL": "amqp://gate:secret@rabbitmq:5672/",
    "STORE_POSTGRESURL": "postgresql://gate:secret@postgres:5432/gate",
    "STORE_ENCRYPTIONKEYS": "rR8M6pD7i0vK3m9a2d4Zb1ZfY8m2QzM1eF0qKx7wYtU=",
}

VALUE_SETS = [pytest.param(None, id="default-values"), *(pytest.param(p, id=p.stem) for p in EXAMPLES)]


# ------------------------------------------------------------------------------------------- the chart


def test_the_example_values_files_exist() -> None:
    assert {p.stem for p in EXAMPLES} >= {"values-lab", "values-prod", "values-tls"}


@pytest.mark.parametrize("values_file", VALUE_SETS)
def test_the_chart_lints_clean(values_file: Path | None) -> None:
    report = helm.lint(str(CHART), load_values(values_file), strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert problems == []


@pytest.mark.parametrize("values_file", VALUE_SETS)
def test_every_rendered_object_passes_the_kubernetes_schemas_strictly(values_file: Path | None) -> None:
    objects = render(load_values(values_file))
    kinds = {o["kind"] for o in objects}
    assert {"ConfigMap", "Service", "ServiceAccount"} <= kinds
    assert kinds & {"Deployment", "StatefulSet"}
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            check_service_monitor(obj, by_kind(objects, "Service"))
        else:
            validate_strict(obj)


@pytest.mark.parametrize("values_file", VALUE_SETS)
def test_the_workload_carries_probes_resources_grace_volumes_and_a_non_root_user(
    values_file: Path | None, tmp_path: Path
) -> None:
    values = load_values(values_file)
    objects = render(values)
    pod = workload(objects)["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("startupProbe", "liveness"), ("livenessProbe", "liveness"), ("readinessProbe", "readiness")):
        get = container[probe]["httpGet"]
        assert get["path"] == f"/actuator/health/{path}"
        assert get["port"] in ports
    assert container["resources"] == values.get("resources", SEED_RESOURCES)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/app/data"] == "data" and mounts["/app/config"] == "config"

    config = one(objects, "ConfigMap")["data"]
    settings = settings_from(container, config, tmp_path)
    shutdown = settings.server.shutdown
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert spec["terminationGracePeriodSeconds"] > pre_stop + shutdown.drain_timeout + shutdown.flush_timeout
    assert settings.usage.outbox.path.startswith("/app/data/")
    assert settings.server.host == "0.0.0.0" and settings.server.port == ports["http"]
    if "management" in ports:
        assert settings.management.server.port == ports["management"]
        assert container["readinessProbe"]["httpGet"]["port"] == "management"
    else:
        assert settings.management.server.port is None
    assert settings.server.ssl.enabled == bool(values.get("tls", {}).get("enabled"))
    assert settings.store.backend == (values.get("store", {}).get("backend") or "sqlite")

    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    if values.get("anthropicKeys", {}).get("mode", "files") == "files":
        assert settings.anthropic.api.key_files.dir == mounts_of(container, "anthropic-keys")
        assert "secret" in volumes["anthropic-keys"]
        assert not any("subPath" in m for m in container["volumeMounts"])  # subPath mounts are never updated
    else:
        refs = [e for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
        assert any(e["name"].startswith("ANTHROPIC_API_KEYS_") for e in refs)
        assert settings.anthropic.api.key_files.dir is None
        assert [k.alias for k in settings.anthropic.api.usable_keys] == [
            k["alias"] for k in values["anthropicKeys"]["env"]
        ]


def mounts_of(container: dict[str, Any], volume: str) -> str:
    (path,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    return str(path)


@pytest.mark.parametrize("values_file", VALUE_SETS)
def test_service_hpa_pdb_and_network_policy_select_the_pods(values_file: Path | None) -> None:
    objects = render(load_values(values_file))
    work = workload(objects)
    pod_labels = work["spec"]["template"]["metadata"]["labels"]
    (container,) = work["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"] for p in container["ports"]}
    for service in by_kind(objects, "Service"):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for obj in by_kind(objects, kind):
            key = "selector" if kind == "PodDisruptionBudget" else "podSelector"
            assert obj["spec"][key]["matchLabels"].items() <= pod_labels.items()
    for hpa in by_kind(objects, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == (work["kind"], work["metadata"]["name"])
        assert "replicas" not in work["spec"]  # the HPA owns the replica count
    for policy in by_kind(objects, "NetworkPolicy"):
        for rule in policy["spec"]["ingress"]:
            assert {p["port"] for p in rule["ports"]} <= container_ports


def test_the_default_values_give_a_deployment_with_an_empty_dir_outbox() -> None:
    objects = render()
    work = workload(objects)
    assert work["kind"] == "Deployment"
    volumes = {v["name"]: v for v in work["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["data"]
    assert not by_kind(objects, "ServiceMonitor")  # off by default: it needs the Prometheus Operator's CRDs


def test_persistence_makes_a_stateful_set_with_one_claim_per_pod() -> None:
    objects = render(load_values(CHART / "examples" / "values-prod.yaml"))
    work = workload(objects)
    assert work["kind"] == "StatefulSet"
    (claim,) = work["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert work["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert "data" not in {v["name"] for v in work["spec"]["template"]["spec"]["volumes"]}
    headless = [s for s in by_kind(objects, "Service") if s["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == [work["spec"]["serviceName"]]


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_the_config_map_carries_the_environments_application_yaml(environment: str) -> None:
    objects = render({"environment": environment})
    data = one(objects, "ConfigMap")["data"]
    assert data == {f"application-{environment}.yaml": (CONFIG / f"application-{environment}.yaml").read_text()}


def test_application_config_replaces_the_bundled_file() -> None:
    data = one(render({"applicationConfig": "usage:\n  destination: mine\n"}), "ConfigMap")["data"]
    assert data == {"application-prod.yaml": "usage:\n  destination: mine\n"}


def test_a_changed_config_rolls_the_pods() -> None:
    def checksum(values: dict[str, Any]) -> str:
        return str(workload(render(values))["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum({}) != checksum({"applicationConfig": "usage:\n  destination: other\n"})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"shutdown": {"terminationGracePeriodSeconds": 30}}, "must exceed preStop \\+ drain \\+ flush"),
        ({"tls": {"enabled": True, "secretName": "t", "clientAuth": "need"}}, "requires management.port"),
        ({"tls": {"enabled": True}}, "needs tls.secretName"),
        ({"anthropicKeys": {"mode": "vault"}}, "must be files or env"),
        ({"environment": "staging"}, "application-staging.yaml"),
        ({"store": {"backend": "postgres"}}, "needs store.postgresUrlSecret.name"),
    ],
)
def test_values_that_cannot_work_fail_the_render_with_a_reason(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(values)


def test_the_charts_config_files_are_the_repositorys() -> None:
    for environment in ENVIRONMENTS:
        name = f"application-{environment}.yaml"
        assert (CHART / "files" / name).read_text() == (CONFIG / name).read_text(), f"copy config/{name} into files/"


def test_every_top_level_value_is_documented_in_the_charts_readme() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def keys(data: dict[str, Any], prefix: str = "") -> Iterator[str]:
        for key, value in data.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                yield from keys(value, f"{path}.")
            else:
                yield path

    missing = [key for key in keys(values) if f"`{key}`" not in readme]
    assert missing == []


# ------------------------------------------------------------------------------------------- config/


@pytest.mark.parametrize("environment", ENVIRONMENTS)
@pytest.mark.parametrize("infrastructure", ["local", "gcp"])
def test_each_environment_profile_loads_with_each_infrastructure_profile(environment: str, infrastructure: str) -> None:
    settings = load_settings(
        profiles=[f"{infrastructure},{environment}"],
        env={"JWK_SET_URI": "https://idp.example.com/jwks"},
        config_dir=CONFIG,
    )
    assert f"{CONFIG / f'application-{environment}.yaml'}" in settings.sources
    assert settings.security.jwt.jwk_set_uri is not None and not settings.dev_auth
    assert settings.usage.publisher == ("pubsub" if infrastructure == "gcp" else "file")


def test_prod_refuses_to_start_without_a_jwks() -> None:
    from gate.settings import ConfigError

    with pytest.raises(ConfigError, match="JWK_SET_URI"):
        load_settings(profiles=["gcp,prod"], env={}, config_dir=CONFIG)


# ------------------------------------------------------------------------------------------- deploy/k8s


def k8s_objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        objects.extend(d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / name).read_text()) if d)
    return objects


def test_the_plain_manifests_pass_the_kubernetes_schemas_strictly() -> None:
    objects = k8s_objects()
    assert {o["kind"] for o in objects} == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    for obj in objects:
        validate_strict(obj)


def test_the_plain_deployment_is_the_seeds_and_gate_loads_what_it_sets(tmp_path: Path) -> None:
    objects = k8s_objects()
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert deployment["spec"]["replicas"] == 3
    assert container["resources"] == SEED_RESOURCES
    assert container["livenessProbe"]["httpGet"] == {"path": "/actuator/health/liveness", "port": 8080}
    assert container["readinessProbe"]["httpGet"] == {"path": "/actuator/health/readiness", "port": 8080}
    config = one(objects, "ConfigMap")["data"]
    assert config == {"application-prod.yaml": (CONFIG / "application-prod.yaml").read_text()}
    settings = settings_from(container, config, tmp_path)
    assert [k.alias for k in settings.anthropic.api.usable_keys] == ["primary", "secondary"]  # the seed's names
    assert settings.anthropic.api.key_files.dir is None
    shutdown = settings.server.shutdown
    assert spec["terminationGracePeriodSeconds"] > 5 + shutdown.drain_timeout + shutdown.flush_timeout


# ------------------------------------------------------------------------------------------- deploy/cloudrun


def cloud_run_service() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "deploy" / "cloudrun" / "service.yaml").read_text()))


def test_the_cloud_run_service_is_a_knative_service_with_the_collector_started_first() -> None:
    """No Knative schema is bundled anywhere we can reach: check the structure Cloud Run documents."""
    service = cloud_run_service()
    assert service["apiVersion"] == "serving.knative.dev/v1" and service["kind"] == "Service"
    assert set(service) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(service["spec"]) == {"template"}
    template = service["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    containers = {c["name"]: c for c in template["spec"]["containers"]}
    assert annotations["run.googleapis.com/container-dependencies"] == "{app:[collector]}"
    assert set(containers) == {"app", "collector"}
    assert [name for name, c in containers.items() if "ports" in c] == ["app"]  # one ingress container
    app = containers["app"]
    env = env_of(app)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://localhost:4318"
    drain, flush = (parse_duration(env[f"SERVER_SHUTDOWN_{name}"]) for name in ("DRAINTIMEOUT", "FLUSHTIMEOUT"))
    assert drain + flush < 10  # Cloud Run's grace after SIGTERM
    assert app["ports"][0]["containerPort"] == 8080
    assert template["spec"]["timeoutSeconds"] > 600
    assert annotations["run.googleapis.com/cpu-throttling"] == "false"


def test_the_cloud_run_containers_pass_the_kubernetes_pod_schema_strictly(tmp_path: Path) -> None:
    """A Knative revision's spec is a subset of a PodSpec plus a few fields of its own: validate the PodSpec part."""
    spec = copy.deepcopy(cloud_run_service()["spec"]["template"]["spec"])
    for knative_only in ("containerConcurrency", "timeoutSeconds"):
        spec.pop(knative_only)
    validate_strict({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gate"}, "spec": spec})
    app = next(c for c in spec["containers"] if c["name"] == "app")
    settings = settings_from(app, {}, tmp_path)
    assert settings.usage.publisher == "pubsub"
    assert settings.anthropic.api.key_files.dir == "/etc/gate/keys"
    assert settings.usage.outbox.path == "./data/usage-outbox.sqlite3"  # /app/data in the image (WORKDIR /app)
