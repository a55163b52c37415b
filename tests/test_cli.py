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

import httpx
import pytest
import yaml

from gate import __version__

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
    assert keys[0] == {"alias": "primary", "value": "******", "organization": None}
    assert keys[1] == {"alias": "secondary", "value": "******", "organization": None}
    assert shown["usage"]["rabbitmq"]["url"] == "******"
    assert shown["security"]["jwt"]["jwk-set-uri"] == "https://reader:******@idp.example.com/jwks"
    assert shown["profiles"] == ["local"]
    assert shown["server"]["port"] == 8080


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
    assert done.stdout == ""
    assert "server.prot: unknown key" in done.stderr and str(bad) in done.stderr
    assert "Traceback" not in done.stderr


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
