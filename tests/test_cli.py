"""The ``gate`` command as a user runs it: real subprocesses of ``.venv/bin/gate`` and ``python -m gate``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gate import __version__
from gate.cli import render_config
from gate.settings import ConfigSources

ROOT = Path(__file__).resolve().parents[1]
GATE = [str(ROOT / ".venv" / "bin" / "gate")]
PYTHON_M_GATE = [str(ROOT / ".venv" / "bin" / "python"), "-m", "gate"]
ENTRY_POINTS = pytest.mark.parametrize("command", [GATE, PYTHON_M_GATE], ids=["gate", "python-m-gate"])
JWKS = "https://idp.example.com/.well-known/jwks.json"
SECRETS = {
    "ANTHROPIC_KEY_PRIMARY": "sk-ant-api03-primary-secret-value",
    "ANTHROPIC_API_KEYS_1_VALUE": "sk-ant-api03-secondary-secret-value",
    "USAGE_RABBITMQ_URL": "amqp://gate:rabbit-password-42@mq.internal:5672/",
}


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """No GATE_*/ANTHROPIC_* from the developer's shell; HOME and XDG inside the test's directory."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "XDG_DATA_HOME": str(tmp / "xdg"),
        "LANG": "C.UTF-8",
        **extra,
    }


def run(command: list[str], *args: str, tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, cwd=tmp, env=clean_env(tmp, **env), timeout=60, check=False
    )


# ---------------------------------------------------------------------------------------------- version, config


@ENTRY_POINTS
def test_version(command: list[str], tmp_path: Path) -> None:
    done = run(command, "--version", tmp=tmp_path)
    assert done.returncode == 0
    assert done.stdout.strip() == f"gate {__version__}"


def test_no_command_is_a_usage_error(tmp_path: Path) -> None:
    done = run(GATE, tmp=tmp_path)
    assert done.returncode == 2 and "usage: gate" in done.stderr


@ENTRY_POINTS
def test_config_prints_yaml_with_every_secret_masked(command: list[str], tmp_path: Path) -> None:
    secret_file = tmp_path / "idp-password"
    secret_file.write_text("idp-password-7\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "security:\n  jwt:\n    jwk-set-uri: https://reader:${file:" + str(secret_file) + "}@idp.example.com/jwks\n"
    )
    done = run(command, "config", "--config", str(extra), tmp=tmp_path, **SECRETS)
    assert done.returncode == 0, done.stderr
    everything = done.stdout + done.stderr
    for secret in [*SECRETS.values(), "rabbit-password-42", "idp-password-7", "sk-ant-api03"]:
        assert secret not in everything
    shown = yaml.safe_load(done.stdout)
    keys = shown["anthropic"]["api"]["keys"]
    assert keys[0] == {"alias": "primary", "value": "***"}
    assert keys[1] == {"alias": "secondary", "value": "***"}
    # Only the user info is masked: the host says which broker and which identity provider are meant.
    assert shown["usage"]["rabbitmq"]["url"] == "amqp://***@mq.internal:5672/"
    assert shown["security"]["jwt"]["jwk-set-uri"] == "https://***@idp.example.com/jwks"
    assert shown["profiles"] == ["local"]
    assert shown["server"]["port"] == 8080
    # Each value says where it came from, as a YAML comment.
    lines = done.stdout.splitlines()
    assert "    url: amqp://***@mq.internal:5672/  # environment variable USAGE_RABBITMQ_URL" in lines
    assert f"    jwk-set-uri: https://***@idp.example.com/jwks  # {extra}" in lines
    assert "        value: '***'  # packaged application-local.yaml via ${ANTHROPIC_KEY_PRIMARY}" in lines
    assert "  port: 8080  # packaged application.yaml, ${GATE_PORT} unset" in lines
    assert "    batch-size: 500  # default" in lines


def test_config_follows_profiles_files_and_env(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "application-eu.yaml").write_text("usage:\n  destination: from-eu\n")
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("usage:\n  destination: from-a\n  publisher: log\n")
    second.write_text("usage:\n  destination: from-b\n")
    env = {"JWK_SET_URI": JWKS}
    shown = yaml.safe_load(run(GATE, "config", "--profile", "prod,eu", tmp=tmp_path, **env).stdout)
    assert shown["profiles"] == ["prod", "eu"] and shown["usage"]["destination"] == "from-eu"
    shown = yaml.safe_load(run(GATE, "config", tmp=tmp_path, GATE_PROFILES="eu", **env).stdout)
    assert shown["profiles"] == ["eu"] and shown["usage"]["publisher"] == "rabbitmq"
    done = run(GATE, "config", "--profile", "eu", "--config", str(first), "--config", str(second), tmp=tmp_path, **env)
    shown = yaml.safe_load(done.stdout)
    assert (shown["usage"]["destination"], shown["usage"]["publisher"]) == ("from-b", "log")
    shown = yaml.safe_load(run(GATE, "config", "--profile", "eu", tmp=tmp_path, SERVER_PORT="7001", **env).stdout)
    assert shown["server"]["port"] == 7001


@pytest.mark.parametrize("subcommand", ["serve", "config", "token"])
def test_bad_config_exits_2_with_the_message_on_stderr(subcommand: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: 8080\n  prot: 1\n")
    extra = ["--sub", "alice"] if subcommand == "token" else []
    done = run(GATE, subcommand, "--config", str(bad), *extra, tmp=tmp_path)
    assert done.returncode == 2
    if subcommand == "config":  # what it could merge, each value with its source, beside the errors
        assert f"  prot: 1  # {bad}" in done.stdout.splitlines()
        assert yaml.safe_load(done.stdout)["server"]["prot"] == 1
    else:
        assert done.stdout == ""
    assert "server.prot: unknown key" in done.stderr and str(bad) in done.stderr
    assert "Traceback" not in done.stderr


def test_config_shows_what_it_can_when_validation_fails(tmp_path: Path) -> None:
    done = run(GATE, "config", "--profile", "prod", tmp=tmp_path, USAGE_RABBITMQ_URL="amqp://gate:pw-9@mq:5672/")
    assert done.returncode == 2
    assert "security.jwt.jwk-set-uri is not set" in done.stderr and "Traceback" not in done.stderr
    shown = yaml.safe_load(done.stdout)
    assert shown["profiles"] == ["prod"] and shown["usage"]["rabbitmq"]["url"] == "amqp://***@mq:5672/"
    assert "pw-9" not in done.stdout + done.stderr
    assert "  jwk-set-uri: ''  # packaged application.yaml, ${JWK_SET_URI} unset" in done.stdout


UNUSABLE = {
    # variable: (value, key)
    "USAGE_RABBITMQ_URL": ("localhost:5672", "usage.rabbitmq.url"),
    "SECURITY_JWT_JWKSETURI": ("not-a-url", "security.jwt.jwk-set-uri"),
    "ANTHROPIC_API_BASEURL": ("https://api.anthropic.com/v1", "anthropic.api.base-url"),
    "ANTHROPIC_API_TIMEOUTS_STREAMIDLE": ("0", "anthropic.api.timeouts.stream-idle"),
    "USAGE_OUTBOX_COMMITINTERVAL": ("0", "usage.outbox.commit-interval"),
}


@pytest.mark.parametrize("subcommand", ["serve", "config"])
@pytest.mark.parametrize("variable", list(UNUSABLE))
def test_unusable_values_stop_gate_with_one_line_naming_key_and_source(
    subcommand: str, variable: str, tmp_path: Path
) -> None:
    value, key = UNUSABLE[variable]
    args = ["--port", "0"] if subcommand == "serve" else []
    done = run(GATE, subcommand, *args, tmp=tmp_path, **{variable: value})
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = [line for line in done.stderr.splitlines() if key in line]
    assert f"[from environment variable {variable}]" in line
    assert "Traceback" not in done.stderr and "listening" not in done.stdout


def test_environment_values_are_used_literally(tmp_path: Path) -> None:
    done = run(GATE, "config", tmp=tmp_path, USAGE_DESTINATION="usage-${x:Z}", USAGE_RABBITMQ_URL="amqp://g:p${q@mq/")
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout)
    assert shown["usage"]["destination"] == "usage-${x:Z}" and shown["usage"]["rabbitmq"]["url"] == "amqp://***@mq/"


def test_a_profile_typo_is_warned_about(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "application-eu.yaml").write_text("usage:\n  destination: from-eu\n")
    done = run(GATE, "config", "--profile", "prdo", tmp=tmp_path, JWK_SET_URI=JWKS)
    assert done.returncode == 0
    (warning,) = done.stderr.splitlines()
    assert warning.startswith("gate: warning: unknown profile 'prdo'")
    for known in ("eu", "gcp", "lab", "local", "prod", "sit", "uat"):
        assert known in warning
    assert yaml.safe_load(done.stdout)["profiles"] == ["prdo"]
    assert run(GATE, "config", "--profile", "prod,eu", tmp=tmp_path, JWK_SET_URI=JWKS).stderr == ""


def test_bad_env_value_exits_2_naming_the_variable(tmp_path: Path) -> None:
    done = run(GATE, "serve", tmp=tmp_path, SERVER_PORT="http")
    assert done.returncode == 2
    assert "server.port" in done.stderr and "environment variable SERVER_PORT" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------- token


@ENTRY_POINTS
def test_token_in_dev_mode(command: list[str], tmp_path: Path) -> None:
    done = run(command, "token", "--sub", "alice", "--ttl", "30m", tmp=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+\n", done.stdout)
    assert (tmp_path / "xdg" / "gate" / "dev-signing-key.pem").exists()


def test_token_outside_dev_mode_refuses(tmp_path: Path) -> None:
    done = run(GATE, "token", "--sub", "alice", tmp=tmp_path, JWK_SET_URI=JWKS)
    assert done.returncode == 2 and done.stdout == ""
    assert "development tokens only" in done.stderr and "identity provider" in done.stderr
    done = run(GATE, "token", "--sub", "alice", "--profile", "prod", tmp=tmp_path)
    assert done.returncode == 2 and "security.jwt.jwk-set-uri" in done.stderr
    assert not (tmp_path / "xdg" / "gate").exists()  # no key pair made by a refused call


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--sub", "alice", "--ttl", "soon"], "--ttl"),
        (["--sub", "alice", "--ttl", "0s"], "lifetime"),
        (["--sub", " "], "subject"),
        ([], "required"),
    ],
    ids=["bad-ttl", "zero-ttl", "blank-sub", "no-sub"],
)
def test_token_usage_errors(tmp_path: Path, args: list[str], says: str) -> None:
    done = run(GATE, "token", *args, tmp=tmp_path)
    assert done.returncode == 2 and says in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------- serve


class Served:
    """A ``gate serve`` subprocess whose output is collected line by line."""

    def __init__(self, command: list[str], tmp: Path, *args: str, **env: str) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [*command, "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp,
            env=clean_env(tmp, **env),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.process.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"gate exited with {self.process.returncode}:\n{self.output}")
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen in:\n{self.output}")

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def served() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for process in started:
        process.stop()


@ENTRY_POINTS
def test_serve_answers_and_stops_cleanly_on_sigterm(command: list[str], tmp_path: Path, served: list[Served]) -> None:
    gate = Served(command, tmp_path, "--port", "0", "--log-format", "json")
    served.append(gate)
    port = int(gate.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
    assert port > 0
    gate.wait_for(r" ready: ")
    ready = next(i for i, line in enumerate(gate.lines) if " ready: " in line)
    assert any("listening on" in line for line in gate.lines[:ready])  # "ready" only once the port is bound
    url = f"http://127.0.0.1:{port}"
    assert httpx.head(url + "/", timeout=5).status_code == 200
    assert httpx.get(url + "/actuator/health/liveness", timeout=5).json()["status"] == "UP"
    gate.process.send_signal(signal.SIGTERM)
    assert gate.process.wait(30) == 0, gate.output
    gate._reader.join(5)
    assert "stopped" in gate.output
    assert "Traceback" not in gate.output
    assert (tmp_path / "xdg" / "gate" / "dev-signing-key.pem").exists()  # dev auth used the XDG data dir


def test_serve_on_a_busy_port_fails_cleanly(tmp_path: Path, served: list[Served]) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        gate = Served(GATE, tmp_path, "--port", str(port))
        served.append(gate)
        code = gate.process.wait(30)
    gate._reader.join(5)
    assert code != 0
    assert str(port) in gate.output
    assert "Traceback" not in gate.output, gate.output


# ---------------------------------------------------------------------------------------------- --workers


def test_workers_on_a_busy_port_exit_non_zero_with_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run(GATE, "serve", "--workers", "2", "--port", str(port), tmp=tmp_path)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("gate: cannot start: worker ") and str(port) in line
    assert "Traceback" not in done.stdout + done.stderr and " ready: " not in done.stdout


def _free_port_pair() -> int:
    import socket

    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            base = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
            return base
    raise AssertionError("no two consecutive free ports")


def _auth_failures(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/actuator/prometheus", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gate_auth_failures_total"
    )


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def test_workers_each_have_a_management_port_and_stop_together(tmp_path: Path, served: list[Served]) -> None:
    base = _free_port_pair()
    gate = Served(
        GATE, tmp_path, "--workers", "2", "--port", "0", "--log-format", "json", MANAGEMENT_SERVER_PORT=str(base)
    )
    served.append(gate)
    port = int(gate.wait_for(r"ready: 2 workers listening on http://127\.0\.0\.1:(\d+)").group(1))
    gate.wait_for(rf"worker 0 http://127\.0\.0\.1:{base}, worker 1 http://127\.0\.0\.1:{base + 1}")
    # Ready means listening: every worker answers at once. New connections spread over the workers.
    for _ in range(30):
        with httpx.Client() as client:
            assert client.post(f"http://127.0.0.1:{port}/v1/messages", json={}).status_code == 401
    # Each worker's metrics on its own port: together they count every request, whichever worker took it.
    assert _auth_failures(f"http://127.0.0.1:{base}") + _auth_failures(f"http://127.0.0.1:{base + 1}") == 30
    for management in (base, base + 1):
        assert httpx.get(f"http://127.0.0.1:{management}/actuator/health/liveness", timeout=5).status_code == 200
    # A worker that dies takes the others down with it, and the exit code says so: the orchestrator restarts.
    workers = [
        pid for pid in _children(gate.process.pid) if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text()
    ]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    assert gate.process.wait(60) == 1
    gate._reader.join(5)
    assert "exited with code -9: stopping the other workers" in gate.output
    assert "Traceback" not in gate.output


def test_workers_stop_cleanly_on_sigterm(tmp_path: Path, served: list[Served]) -> None:
    gate = Served(GATE, tmp_path, "--workers", "2", "--port", "0")
    served.append(gate)
    gate.wait_for(r"ready: 2 workers listening on")
    gate.wait_for(r"set management\.server\.port to reach each worker")  # the shared-port caveat, said once
    gate.process.send_signal(signal.SIGTERM)
    assert gate.process.wait(60) == 0, gate.output
    gate._reader.join(5)
    assert gate.output.count("stopped") == 2 and "Traceback" not in gate.output


# ---------------------------------------------------------------------------------------------- render_config

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_names = st.text(min_size=1)
_sections = st.recursive(
    st.dictionaries(_names, _scalars | st.lists(_scalars), max_size=4),
    lambda inner: st.dictionaries(_names, inner | st.lists(inner.filter(bool), max_size=3), max_size=4),
    max_leaves=20,
)


@given(_sections)
def test_gate_configs_commented_yaml_loads_back_as_the_data(data: dict[str, Any]) -> None:
    text = render_config(data, ConfigSources(data, {}))
    assert yaml.safe_load(text) == (data or None)
