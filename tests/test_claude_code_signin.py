"""The real Claude Code 2.1.197 signs in to Gate with its interactive /login ("Cloud gateway"), in a pseudo-terminal:
managed settings put in place for that process only (a private mount namespace with an overlay over /etc), the
browser leg done over HTTP against a real OIDC provider, then ``claude -p`` answers through Gate with the session,
fetches managed settings, is refused a disallowed model and refreshes its session by itself."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.fake_anthropic import FakeAnthropic
from tests.harness import BackgroundLoop, gate_settings, read_events
from tests.pseudo_terminal import PseudoTerminal
from tests.signin_idp import GateAt, OidcProvider, browser_sign_in, free_ports, sign_in_section

pytestmark = [pytest.mark.claude_code, pytest.mark.slow]

VERSION = "2.1.197"
CACHE = Path(os.environ.get("GATE_TEST_CACHE", Path.home() / ".cache" / "gate-tests"))


def claude_binary() -> Path:
    """Claude Code 2.1.197 from the test cache (the plain Claude Code test's install if it is that version)."""
    for folder in (CACHE / "claude-code", CACHE / f"claude-code-{VERSION}"):
        package = folder / "node_modules" / "@anthropic-ai" / "claude-code" / "package.json"
        if package.exists() and json.loads(package.read_text())["version"] == VERSION:
            return folder / "node_modules" / ".bin" / "claude"
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot install Claude Code for this test")
    folder = CACHE / f"claude-code-{VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(folder), f"@anthropic-ai/claude-code@{VERSION}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"npm install @anthropic-ai/claude-code@{VERSION} failed: {result.stderr[-2000:]}")
    return folder / "node_modules" / ".bin" / "claude"


def private_mounts_work(tmp: Path) -> bool:
    (tmp / "probe-upper").mkdir(parents=True)
    (tmp / "probe-work").mkdir()
    probe = subprocess.run(
        [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={tmp}/probe-upper,workdir={tmp}/probe-work /etc",
        ],
        capture_output=True,
        check=False,
    )  # fmt: skip
    return probe.returncode == 0


class ClaudeCode:
    """Claude Code run with /etc/claude-code/managed-settings.json seen by it alone, a temporary HOME and no
    traffic but to Gate; the "browser" is a script that writes the URL it was asked to open into a file."""

    def __init__(self, tmp: Path, gate_url: str) -> None:
        if shutil.which("unshare") is None or not private_mounts_work(tmp):
            pytest.skip("needs unshare and an overlay mount in a private mount namespace (root)")
        self.binary = str(claude_binary())
        self.tmp = tmp
        self.home = tmp / "home"
        self.project = tmp / "project"
        for folder in (self.home, self.project, tmp / "upper", tmp / "work", tmp / "settings"):
            folder.mkdir()
        (self.home / ".claude.json").write_text(json.dumps({"hasCompletedOnboarding": True, "theme": "dark"}))
        managed = {"forceLoginMethod": "gateway", "forceLoginGatewayUrl": gate_url}
        (tmp / "settings" / "managed-settings.json").write_text(json.dumps(managed))
        self.opened = tmp / "opened-urls.txt"
        browser = tmp / "browser.sh"
        browser.write_text(f'#!/bin/sh\necho "$1" >> {self.opened}\n')
        browser.chmod(0o755)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "TERM": "xterm-256color",
            "BROWSER": str(browser),
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_AUTOUPDATER": "1",
        }

    def argv(self, *args: str) -> list[str]:
        tmp = self.tmp
        script = (
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={tmp}/upper,workdir={tmp}/work /etc"
            f" && mkdir -p /etc/claude-code && cp {tmp}/settings/managed-settings.json /etc/claude-code/"
            ' && exec "$0" "$@"'
        )
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, self.binary, *args]

    def interactive(self) -> PseudoTerminal:
        return PseudoTerminal(self.argv(), self.env, str(self.project))

    def print_mode(self, prompt: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv("-p", prompt, *args),
            env={**self.env, "CLAUDE_CODE_MAX_RETRIES": "0"},
            cwd=self.project,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    def opened_url(self) -> str:
        deadline = time.monotonic() + 30
        while not self.opened.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.opened.read_text().splitlines()[-1]

    @property
    def credentials(self) -> dict[str, object]:
        return dict(json.loads((self.home / ".claude" / ".credentials.json").read_text()))


class Collector:
    """An OTLP/HTTP collector on loopback that records what Gate relays to it."""

    def __init__(self, loop: BackgroundLoop) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self._loop = loop
        app = web.Application()
        app.router.add_post("/v1/{signal}", self._collect)
        self._runner = web.AppRunner(app)
        loop.run(self._runner.setup())
        loop.run(web.TCPSite(self._runner, "127.0.0.1", 0).start())
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def _collect(self, request: web.Request) -> web.Response:
        self.received.append((request.path, dict(request.headers), await request.read()))
        return web.Response()

    def close(self) -> None:
        self._loop.run(self._runner.cleanup())


@pytest.fixture
def collector(fake_loop: BackgroundLoop) -> Iterator[Collector]:
    running = Collector(fake_loop)
    yield running
    running.close()


@pytest.fixture
def signin_gate(
    tmp_path: Path, fake_session: FakeAnthropic, collector: Collector
) -> Iterator[tuple[GateAt, OidcProvider]]:
    port = free_ports(1)[0]
    idp = OidcProvider([f"http://127.0.0.1:{port}/oauth/callback"])
    settings = gate_settings(
        tmp_path / "gate",
        fake_session.url,
        **{
            # A 1-minute session: inside Claude Code's 5-minute refresh margin from the start, so every run of
            # `claude -p` has to refresh it first, silently.
            "sign-in": sign_in_section(
                f"http://127.0.0.1:{port}",
                idp.issuer,
                session={"lifetime": "1m"},
                telemetry={"forward-to": [{"url": collector.url}]},
            ),
            "store": {"sqlite-path": str(tmp_path / "store.sqlite3")},
            "policies": [
                {
                    "name": "everyone",
                    "models": ["claude-opus-*", "claude-sonnet-*", "claude-haiku-*"],
                    # Short export intervals, so Claude Code's telemetry reaches Gate within one `claude -p`.
                    "managed-settings": {
                        "env": {"OTEL_METRIC_EXPORT_INTERVAL": "1000", "OTEL_LOGS_EXPORT_INTERVAL": "1000"}
                    },
                }
            ],
        },
    )
    gate = GateAt(settings, port).start()
    yield gate, idp
    gate.stop()
    idp.stop()


def test_claude_code_signs_in_with_login_and_answers_through_gate(
    signin_gate: tuple[GateAt, OidcProvider], fake: FakeAnthropic, tmp_path: Path, collector: Collector
) -> None:
    gate, _idp = signin_gate
    assert gate.gate is not None and gate.gate.signin is not None
    claude = ClaudeCode(tmp_path / "claude", gate.url)

    terminal = claude.interactive()
    try:
        terminal.expect("trust this folder", 60)
        terminal.send("\r")
        terminal.expect("Run /login", 60)
        time.sleep(1)  # the prompt takes keys once it has drawn itself
        terminal.send("/login")
        time.sleep(1)
        terminal.send("\r")
        terminal.expect("Cloud gateway", 30)
        terminal.expect(gate.url.replace(".", r"\."), 30)  # the URL from managed settings, filled in
        terminal.expect("Press Enter to connect", 30)
        terminal.send("\r")
        terminal.expect("Yes, trust this gateway", 30)
        terminal.expect("Esc to cancel", 30)
        user_code = ""
        for _ in range(4):  # on a busy machine a key typed as the menu draws itself is lost: type it again
            time.sleep(1)  # the menu takes keys once it has drawn itself
            terminal.send("1")
            with contextlib.suppress(AssertionError):
                user_code = terminal.expect(r"\b([B-DF-HJ-NP-TV-XZ]{4}-[B-DF-HJ-NP-TV-XZ]{4})\b", 10).group(1)
                break
        assert user_code, "the device code never showed after trusting the gateway"
        assert claude.opened_url() == f"{gate.url}/device?user_code={user_code}"
        page = browser_sign_in(gate.url, user_code, "alice")
        assert page.status_code == 200, page.text
        terminal.expect("Connected to Cloud gateway", 60)
    finally:
        terminal.close()
    stored = claude.credentials["enterpriseGateway"]
    assert isinstance(stored, dict) and stored["url"] == gate.url
    assert stored["tokenEndpoint"] == f"{gate.url}/oauth/token"
    assert gate.gate.signin.counts["signin"] == 1

    answered = claude.print_mode("say hi")
    assert answered.returncode == 0, f"claude -p failed: {answered.stdout[-2000:]} {answered.stderr[-2000:]}"
    assert "Hello!" in answered.stdout
    messages = [r for r in fake.received if r.path_qs.startswith("/v1/messages")]
    assert messages and all(r.headers["x-api-key"].startswith("sk-ant-test-") for r in messages)
    events = read_events(Path(gate.settings.usage.file.path), len(messages))
    assert {event["subject"] for event in events} == {"alice"}
    assert gate.gate.managed.served >= 1  # Claude Code fetched its managed settings at start
    assert gate.gate.signin.counts["refresh"] >= 1  # the 1-minute session was refreshed without anybody asked

    # Claude Code's own telemetry came to Gate (pushed by managed settings) and was relayed with the identity.
    relayed = [(path, headers) for path, headers, _body in collector.received]
    assert relayed, (
        f"no telemetry relayed; Gate's relay: {gate.gate.otlp.relayed} relayed, {gate.gate.otlp.failed} failed"
    )
    assert all(headers["x-gate-subject"] == "alice" for _path, headers in relayed)

    calls = len(fake.received)
    refused = claude.print_mode("say hi", "--model", "claude-3-opus-20240229")
    assert refused.returncode != 0
    assert "not available to you" in refused.stdout + refused.stderr
    assert not [r for r in fake.received[calls:] if b"claude-3-opus-20240229" in r.body]
