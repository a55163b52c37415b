"""Claude Code itself, the client this gateway exists for, answers through Gate (against the fake upstream)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fake_anthropic import FakeAnthropic
from tests.harness import RunningGate, read_events

pytestmark = pytest.mark.claude_code

CACHE = Path(os.environ.get("GATE_TEST_CACHE", Path.home() / ".cache" / "gate-tests")) / "claude-code"


def claude_binary() -> Path:
    """Install @anthropic-ai/claude-code into a cache folder once; skip only where npm is missing."""
    binary = CACHE / "node_modules" / ".bin" / "claude"
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot install Claude Code for this test")
    CACHE.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(CACHE), "@anthropic-ai/claude-code"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0 or not binary.exists():
        pytest.fail(f"npm install @anthropic-ai/claude-code failed: {result.stderr[-2000:]}")
    return binary


def run_claude(
    gate: RunningGate, tmp_path: Path, env_extra: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": gate.url,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "DISABLE_AUTOUPDATER": "1",
        **env_extra,
    }
    return subprocess.run(
        [str(claude_binary()), "-p", "say hi", "--allowedTools", ""],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
        check=False,
    )


@pytest.mark.parametrize("credential", ["ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_API_KEY"])
def test_claude_code_answers_through_gate(
    start_gate, fake: FakeAnthropic, tmp_path: Path, credential: str
) -> None:  # type: ignore[no-untyped-def]
    gate = start_gate()
    result = run_claude(gate, tmp_path, {credential: gate.token("claude-user")})
    assert result.returncode == 0, f"claude failed: {result.stdout[-2000:]} {result.stderr[-2000:]}"
    assert "Hello!" in result.stdout
    messages = [r for r in fake.received if r.path_qs.startswith("/v1/messages")]
    assert messages, "Claude Code made no call to /v1/messages"
    assert any(r.path_qs == "/v1/messages?beta=true" for r in messages)
    for received in messages:
        assert received.headers["x-api-key"].startswith("sk-ant-test-")
        assert "authorization" not in received.headers
    main_call = [json.loads(r.body) for r in messages if json.loads(r.body).get("stream")]
    assert main_call, "Claude Code did not stream"
    events = read_events(Path(gate.settings.usage.file.path), len(messages))
    assert {e["subject"] for e in events} == {"claude-user"}


def test_claude_code_without_token_is_refused(start_gate, fake: FakeAnthropic, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gate = start_gate()
    result = run_claude(gate, tmp_path, {"ANTHROPIC_AUTH_TOKEN": "not-a-jwt"})
    assert result.returncode != 0
    assert not [r for r in fake.received if r.path_qs.startswith("/v1/messages")]
