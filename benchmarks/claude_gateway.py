"""Anthropic's own gateway (``claude gateway`` of Claude Code) as a contender: install, database, config, bearer.

``claude gateway --config gateway.yaml`` is in the npm package ``@anthropic-ai/claude-code`` (a native Bun
binary). It needs PostgreSQL (device grants and, with ``admin:``, spend caps; the request path reads none of it)
and an OIDC provider, whose discovery document it fetches at start; the rig's JWKS server serves one. Clients
sign in with the device flow and then send the gateway's own session token, an HS256 JWT signed with
``session.jwt_secret`` (claims sub/email/name, ``aud: claude-gateway``, ``iss: listen.public_url``, ``kid``: the
first 8 bytes of sha256(secret) in hex; see the wire contract in tests/fixtures and shared/reference). The
benchmark does not drive the browser leg: it mints that token with the secret it configured, as the gateway's
callback would, and checks that the gateway accepts it and refuses a token it did not sign.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import jwt
import yaml

VERSION = "2.1.197"
# The install the tests use (tests/test_claude_code_signin.py), so one download serves both.
CACHE = Path(os.environ.get("GATE_TEST_CACHE", Path.home() / ".cache" / "gate-tests"))
POSTGRES = "postgresql://postgres@127.0.0.1:5432"
AUDIENCE = "claude-gateway"
UPSTREAM_KEY = "sk-ant-bench-cgw"  # the fake counts keys by their last characters: "...gw"


def binary(install: bool) -> tuple[Path | None, str]:
    """(the ``claude`` command, "") or (None, why not); installs Claude Code from npm if ``install``."""
    for folder in (CACHE / "claude-code", CACHE / f"claude-code-{VERSION}"):
        package = folder / "node_modules" / "@anthropic-ai" / "claude-code" / "package.json"
        try:
            if json.loads(package.read_text())["version"] == VERSION:
                return folder / "node_modules" / ".bin" / "claude", ""
        except (OSError, ValueError, KeyError):
            continue
    if not install:
        return None, f"Claude Code {VERSION} is not in {CACHE} and --quick/--skip-install forbids installing it"
    npm = shutil.which("npm")
    if npm is None:
        return None, "npm is not installed (apt-get install npm): cannot install Claude Code"
    folder = CACHE / f"claude-code-{VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"installing @anthropic-ai/claude-code@{VERSION} into {folder} (once)", flush=True)
    cmd = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(folder), f"@anthropic-ai/claude-code@{VERSION}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        return None, f"npm install @anthropic-ai/claude-code@{VERSION} failed: {done.stderr.strip()[-300:]}"
    return folder / "node_modules" / ".bin" / "claude", ""


def check_binary(claude: Path) -> str:
    """'' if ``claude gateway`` exists in this build, else why not."""
    try:
        done = subprocess.run(
            [str(claude), "gateway", "--help"], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError as exc:
        return f"{claude} does not run: {exc}"
    if done.returncode != 0 or "--config" not in done.stdout:
        return f"`claude gateway --help` failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-200:]}"
    return ""


def fresh_database(name: str) -> str:
    """Drop and create database ``name``; '' or why not (no asyncpg, no PostgreSQL on 127.0.0.1:5432)."""
    try:
        import asyncpg
    except ImportError:
        return "asyncpg is not installed in this venv: cannot prepare its PostgreSQL database"

    async def run() -> None:
        conn = await asyncpg.connect(f"{POSTGRES}/postgres", timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    except (TimeoutError, OSError) as exc:
        return f"no PostgreSQL at {POSTGRES} (trust auth) for its store: {exc}"
    except Exception as exc:  # asyncpg's own errors: authentication, permissions
        return f"cannot create database {name} at {POSTGRES}: {type(exc).__name__}: {exc}"
    return ""


def drop_database(name: str) -> None:
    try:
        import asyncpg
    except ImportError:
        return

    async def run() -> None:
        conn = await asyncpg.connect(f"{POSTGRES}/postgres", timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    except Exception as exc:
        print(f"  (could not drop database {name}: {exc})", flush=True)


def write_config(path: Path, *, port: int, upstream: str, issuer: str, secret: str, database: str) -> Path:
    config = {
        "listen": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}"},
        "upstreams": [{"provider": "anthropic", "base_url": upstream, "auth": {"api_key": UPSTREAM_KEY}}],
        "oidc": {"issuer": issuer, "client_id": "gate-bench", "client_secret": "gate-bench-client-secret"},
        "session": {"jwt_secret": secret, "ttl_hours": 24},
        "store": {"postgres_url": f"{POSTGRES}/{database}"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# generated by benchmarks/claude_gateway.py\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def new_secret() -> str:
    return secrets.token_urlsafe(48)  # session.jwt_secret must be at least 32 characters


def session_token(secret: str, public_url: str, hours: int = 24) -> str:
    """The session token the gateway mints after a sign-in, minted here with the same secret and claims."""
    now = int(time.time())
    claims = {
        "sub": "bench-user",
        "email": "bench@example.com",
        "name": "Bench User",
        "aud": AUDIENCE,
        "iss": public_url,
        "iat": now,
        "exp": now + hours * 3600,
    }
    kid = hashlib.sha256(secret.encode()).digest()[:8].hex()
    return jwt.encode(claims, secret.encode(), algorithm="HS256", headers={"kid": kid, "typ": "JWT"})
