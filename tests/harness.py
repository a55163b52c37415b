"""Runs Gate and the fake upstream on their own event loops in threads, so tests can be plain clients."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import orjson
import yaml

from gate.app import Gate, serve
from gate.identity.auth import mint_dev_token
from gate.ops.telemetry import Telemetry
from gate.settings import GateSettings, load_settings

T = TypeVar("T")


class BackgroundLoop:
    """An event loop in a daemon thread; ``run`` executes a coroutine there and waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="bg-loop")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stalled_stream_client(port: int, token: str, body: bytes) -> socket.socket:
    """A client that sends ``POST /v1/messages`` with a tiny receive buffer, takes the head and a first piece, and
    then reads nothing more: Gate's writes back up. The caller closes the socket."""
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: gate\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        sock.recv(1024)
    except BaseException:
        sock.close()
        raise
    return sock


def _base_config(tmp: Path, upstream_url: str) -> dict[str, Any]:
    """A test Gate's configuration: dev auth, two keys, file publisher, JSON logs, everything under ``tmp``."""
    return {
        "server": {
            "host": "127.0.0.1",
            "port": 0,
            "shutdown": {"drain-timeout": "5s", "flush-timeout": "3s"},
        },
        "security": {"jwt": {"dev": {"data-dir": str(tmp / "dev-keys")}}},
        "anthropic": {
            "api": {
                "base-url": upstream_url,
                "keys": [
                    {"alias": "primary", "value": "sk-ant-test-primary-0000000000000000"},
                    {"alias": "secondary", "value": "sk-ant-test-secondary-000000000000000"},
                ],
            }
        },
        "usage": {
            "publisher": "file",
            "file": {"path": str(tmp / "usage.jsonl")},
            "outbox": {"path": str(tmp / "outbox.sqlite3")},
        },
        "observability": {"logging": {"format": "json"}},
    }


def gate_settings(
    tmp: Path, upstream_url: str, *, profiles: tuple[str, ...] = ("local",), **sections: Any
) -> GateSettings:
    """Settings for a test Gate: two keys, file publisher, everything under ``tmp``; ``sections`` override."""
    base = _base_config(tmp, upstream_url)
    _deep_merge(base, sections)
    return load_settings(profiles=list(profiles), env={}, config_dir=tmp / "no-config", overrides=base)


def serve_config(tmp: Path, upstream_url: str, **sections: Any) -> tuple[Path, str, dict[str, str]]:
    """For ``gate serve`` in a process of its own: the config file (as ``gate_settings``, ``sections`` merged in),
    a dev token for user ``alice`` that it accepts, and the environment to start it in (profile ``local``)."""
    config = _base_config(tmp, upstream_url)
    _deep_merge(config, sections)
    path = tmp / "gate.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load_settings(config_files=[str(path)], profiles=["local"], env={})
    token = mint_dev_token(settings, "alice", 3600)  # also creates the dev key pair Gate will load
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp), "GATE_PROFILES": "local"}
    return path, token, env


def _deep_merge(target: dict[str, Any], incoming: dict[str, Any]) -> None:
    for key, value in incoming.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = value


class RunningGate:
    """One in-process Gate on its own loop and port; ``telemetry`` replaces the one built from settings."""

    def __init__(self, settings: GateSettings, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.bg = BackgroundLoop()
        self.gate: Gate | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.port = 0
        self._task: concurrent.futures.Future[None] | None = None

    def start(self) -> RunningGate:
        sock = socket.socket()
        sock.bind((self.settings.server.host, 0))
        self.port = sock.getsockname()[1]

        async def main() -> None:
            self._stop = asyncio.Event()
            await serve(
                self.settings,
                sock=sock,
                stop=self._stop,
                on_gate=self._set_gate,
                ready=lambda _port: self._ready.set(),
                handle_signals=False,
                telemetry=self.telemetry,
            )

        task = self._task = asyncio.run_coroutine_threadsafe(main(), self.bg.loop)
        deadline = time.monotonic() + 20
        while not self._ready.wait(0.05):
            if task.done():
                task.result()
            if time.monotonic() > deadline:
                raise TimeoutError("Gate did not start")
        return self

    def _set_gate(self, gate: Gate) -> None:
        self.gate = gate

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._stop is not None:
            self.bg.loop.call_soon_threadsafe(self._stop.set)
        if self._task is not None:
            self._task.result(30)
        self.bg.close()

    def token(self, sub: str = "alice", ttl: float = 3600) -> str:
        from gate.identity.auth import mint_dev_token

        return mint_dev_token(self.settings, sub, ttl)


def read_events(path: Path, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The CloudEvents written by the file publisher, waiting until at least ``count`` arrived."""
    deadline = time.monotonic() + timeout
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if path.exists():
            events = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
            if len(events) >= count:
                return events
        time.sleep(0.02)
    raise AssertionError(f"expected {count} usage events, found {len(events)}")
