"""Keys from mounted secret files, re-read while Gate runs: the pool swap, the directory reader, and a real
``gate serve`` whose Kubernetes-style secret mount is rotated under it (poll and SIGHUP)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import yaml
from pydantic import SecretStr

from gate.identity.auth import mint_dev_token
from gate.settings import ApiKey, KeyHealthSettings, load_settings
from gate.upstreams.keyfiles import read_key_dir
from gate.upstreams.keys import KeyPool, NoKeyAvailable
from tests.fake_anthropic import FakeAnthropic, Reply, fixture
from tests.harness import free_port, read_events

GATE = Path(sys.executable).parent / "gate"
WAIT = 30.0  # a safety net for blocking waits, never an assertion
OLD = "sk-ant-test-rotation-old-00000000000000"
NEW = "sk-ant-test-rotation-new-11111111111111"
SECOND = "sk-ant-test-rotation-second-2222222222"


def api_key(alias: str, value: str) -> ApiKey:
    return ApiKey(alias=alias, value=SecretStr(value))


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


class SecretMount:
    """A directory laid out as the kubelet mounts a Secret: files are symlinks through ``..data``, which is
    swapped atomically to a new timestamped directory on every update."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.mkdir()
        self._generation = 0

    def write(self, keys: dict[str, str]) -> None:
        self._generation += 1
        version = self.path / f"..2026_12_03_{self._generation:04d}"
        version.mkdir()
        for alias, value in keys.items():
            (version / alias).write_text(value + "\n")
        link = self.path / "..data_tmp"
        link.symlink_to(version.name)
        os.replace(link, self.path / "..data")  # the atomic swap
        for alias in keys:
            entry = self.path / alias
            if not entry.is_symlink():
                entry.symlink_to(f"..data/{alias}")
        for entry in self.path.iterdir():  # the kubelet removes links of keys that left the Secret
            if entry.is_symlink() and not entry.name.startswith(".") and entry.name not in keys:
                entry.unlink()


# ------------------------------------------------------------------------------------------- unit


def test_replace_keys_adds_removes_and_rotates_keeping_the_health_of_unchanged_keys() -> None:
    clock = [100.0]
    pool = KeyPool(
        [api_key("a", "va"), api_key("b", "vb"), api_key("c", "vc")], KeyHealthSettings(), clock=lambda: clock[0]
    )
    pool.report_rate_limited("a", 60)  # unchanged below: stays cooling
    pool.report_rejected("b", 401)  # rotated below: back in rotation
    added, removed, rotated = pool.replace_keys([api_key("a", "va"), api_key("b", "vb2"), api_key("d", "vd")])
    assert (added, removed, rotated) == (["d"], ["c"], ["b"])
    snapshot = pool.snapshot()
    assert {k["alias"]: k["state"] for k in snapshot["keys"]} == {"a": "cooling", "b": "available", "d": "available"}
    chosen = [pool.acquire() for _ in range(6)]
    assert {k.alias for k in chosen} == {"b", "d"}
    assert {k.value for k in chosen} == {"vb2", "vd"}
    clock[0] += 61
    assert {pool.acquire().alias for _ in range(6)} == {"a", "b", "d"}  # c: never again


def test_replace_keys_to_none_and_back() -> None:
    pool = KeyPool([api_key("a", "va")], KeyHealthSettings())
    pool.replace_keys([])
    assert len(pool) == 0
    with pytest.raises(NoKeyAvailable):
        pool.acquire()
    pool.replace_keys([api_key("z", "vz")])
    assert pool.acquire().value == "vz"


def test_replace_keys_refuses_duplicate_aliases() -> None:
    pool = KeyPool([api_key("a", "va")], KeyHealthSettings())
    with pytest.raises(ValueError, match="unique"):
        pool.replace_keys([api_key("x", "1"), api_key("x", "2")])
    assert pool.acquire().value == "va"  # unchanged


def test_read_key_dir_follows_the_kubelet_layout(tmp_path: Path) -> None:
    mount = SecretMount(tmp_path / "keys")
    mount.write({"primary": OLD, "secondary": SECOND, "blank": "  "})
    (mount.path / ".hidden").write_text("sk-ant-hidden")
    (mount.path / "subdir").mkdir()
    keys = read_key_dir(mount.path)
    assert [(k.alias, k.value.get_secret_value()) for k in keys] == [("primary", OLD), ("secondary", SECOND)]
    mount.write({"primary": NEW})
    assert [(k.alias, k.value.get_secret_value()) for k in read_key_dir(mount.path)] == [("primary", NEW)]


def test_read_key_dir_raises_for_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        read_key_dir(tmp_path / "absent")


# ------------------------------------------------------------------------------------------- end to end


class GateWithKeyFiles:
    def __init__(self, process: subprocess.Popen[bytes], url: str, token: str, log: Path, events: Path) -> None:
        self.process, self.url, self.token, self.log, self.events = process, url, token, log, events

    def client(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, auth_token=self.token, max_retries=0, timeout=WAIT)

    asked = 0

    def ask(self) -> None:
        self.asked += 1
        self.client().messages.create(
            model="claude-opus-4-6", max_tokens=16, messages=[{"role": "user", "content": "Hi"}]
        )


@pytest.fixture
def gate_with_key_files(tmp_path: Path, fake: FakeAnthropic) -> Iterator[Any]:
    started: list[GateWithKeyFiles] = []

    def start(mount: SecretMount, poll_interval: str) -> GateWithKeyFiles:
        port = free_port()
        config = {
            "server": {"host": "127.0.0.1", "port": port, "shutdown": {"drain-timeout": "10s"}},
            "security": {"jwt": {"dev": {"data-dir": str(tmp_path / "dev-keys")}}},
            "anthropic": {
                "api": {
                    "base-url": fake.url,
                    "keys": [],
                    "key-files": {"dir": str(mount.path), "poll-interval": poll_interval},
                }
            },
            "usage": {
                "publisher": "file",
                "file": {"path": str(tmp_path / "usage.jsonl")},
                "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
            },
            "observability": {"logging": {"format": "json"}},
        }
        config_path = tmp_path / "gate.yaml"
        config_path.write_text(yaml.safe_dump(config))
        settings = load_settings(config_files=[str(config_path)], profiles=["local"], env={})
        token = mint_dev_token(settings, "alice", 3600)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "GATE_PROFILES": "local"}
        log = tmp_path / "gate.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(GATE), "serve", "--config", str(config_path)], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        gate = GateWithKeyFiles(process, f"http://127.0.0.1:{port}", token, log, tmp_path / "usage.jsonl")
        started.append(gate)

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(log.read_text())
            try:
                return httpx.get(gate.url + "/actuator/health/readiness", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, "Gate to be ready")
        return gate

    yield start
    for gate in started:
        if gate.process.poll() is None:
            gate.process.terminate()
            gate.process.wait(WAIT)


def keys_seen(fake: FakeAnthropic) -> list[str]:
    return [r.headers.get("x-api-key", "") for r in fake.received]


def test_a_rotated_key_is_used_within_seconds_the_removed_one_never_again_and_streams_in_flight_finish(
    tmp_path: Path, fake: FakeAnthropic, gate_with_key_files: Any
) -> None:
    mount = SecretMount(tmp_path / "keys")
    mount.write({"primary": OLD, "secondary": SECOND})
    gate: GateWithKeyFiles = gate_with_key_files(mount, "200ms")
    for _ in range(4):
        gate.ask()
    assert sorted(set(keys_seen(fake))) == sorted({OLD, SECOND})

    # A slow stream is in flight on some key when the Secret changes under it: primary rotated, secondary removed.
    fake.reset()
    fake.enqueue(Reply(fixture="stream-basic.sse", cuts=[50] * 20, delay=0.1))  # ~2 s
    body: list[bytes] = []
    request = json.dumps(
        {"model": "claude-opus-4-6", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    ).encode()

    def stream() -> None:
        with httpx.stream(
            "POST",
            gate.url + "/v1/messages",
            content=request,
            timeout=WAIT,
            headers={"authorization": f"Bearer {gate.token}"},
        ) as response:
            body.append(b"".join(response.iter_raw()))

    in_flight = threading.Thread(target=stream)
    in_flight.start()
    wait_for(lambda: len(fake.received) == 1, "the stream to reach upstream")
    in_flight_key = keys_seen(fake)[0]
    mount.write({"primary": NEW})

    def new_key_in_use() -> bool:
        gate.ask()
        return keys_seen(fake)[-1] == NEW

    wait_for(new_key_in_use, "the rotated key to be used")
    fake.reset()
    for _ in range(10):
        gate.ask()
    in_flight.join(WAIT)

    assert keys_seen(fake) == [NEW] * 10  # neither the old value nor the removed key, ever again
    assert body == [fixture("stream-basic.sse")]  # the stream in flight finished, byte for byte
    assert in_flight_key in (OLD, SECOND)
    events = read_events(gate.events, gate.asked + 1)  # every call, the stream's included
    streamed = [e["data"] for e in events if e["data"]["stream"]]
    assert [(e["status"], e["output_tokens"]) for e in streamed] == [("success", 15)]
    log = gate.log.read_text()
    assert "rotated primary" in log and "removed secondary" in log
    for value in (OLD, NEW, SECOND):
        assert value not in log


def test_sighup_reloads_the_key_files_at_once(tmp_path: Path, fake: FakeAnthropic, gate_with_key_files: Any) -> None:
    mount = SecretMount(tmp_path / "keys")
    mount.write({"primary": OLD})
    gate: GateWithKeyFiles = gate_with_key_files(mount, "1h")  # polling would not notice within the test
    gate.ask()
    mount.write({"primary": NEW})
    gate.process.send_signal(signal.SIGHUP)

    def new_key_in_use() -> bool:
        gate.ask()
        return keys_seen(fake)[-1] == NEW

    wait_for(new_key_in_use, "the rotated key to be used after SIGHUP")
    assert keys_seen(fake)[0] == OLD
    assert gate.process.poll() is None  # SIGHUP reloads; it does not stop Gate


def test_an_unreadable_key_directory_keeps_the_keys_loaded(
    tmp_path: Path, fake: FakeAnthropic, gate_with_key_files: Any
) -> None:
    mount = SecretMount(tmp_path / "keys")
    mount.write({"primary": OLD})
    gate: GateWithKeyFiles = gate_with_key_files(mount, "100ms")
    moved = tmp_path / "keys-moved"
    mount.path.rename(moved)
    wait_for(lambda: "cannot read key directory" in gate.log.read_text(), "the warning about the directory")
    gate.ask()
    assert keys_seen(fake) == [OLD]
