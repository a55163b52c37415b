"""A real OpenID Connect provider for the sign-in tests (panva's oidc-provider in Node, tests/oidc_idp/idp.mjs),
Gates bound to ports chosen beforehand (the IdP must know their callback URLs), and the browser leg of the device
flow done over HTTP with httpx: Gate's /device form, then the IdP's devInteractions login and consent forms."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest

from tests.harness import RunningGate

IDP_DIR = Path(__file__).resolve().parent / "oidc_idp"
CLIENT_ID = "gate"
CLIENT_SECRET = "gate-test-secret"


def npm_install() -> None:
    """Install oidc-provider into tests/oidc_idp/node_modules (gitignored) once; skip where Node is missing."""
    if (IDP_DIR / "node_modules" / "oidc-provider" / "package.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("Node.js and npm are needed for the OIDC provider of the sign-in tests")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=IDP_DIR,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"npm install in tests/oidc_idp failed: {result.stderr[-2000:]}")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class OidcProvider:
    """``node idp.mjs`` on its own port; accounts alice, bob, carol, dave (deprovisioned by one test), mallory,
    unverified (see idp.mjs)."""

    def __init__(self, redirect_uris: list[str]) -> None:
        npm_install()
        self.port = free_ports(1)[0]
        self.issuer = f"http://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            ["node", str(IDP_DIR / "idp.mjs"), str(self.port), ",".join(redirect_uris)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith("ready"):
            self.stop()
            raise RuntimeError(f"the OIDC provider did not start: {line!r}")

    def deprovision(self, sub: str) -> None:
        httpx.post(f"{self.issuer}/test/deprovision", params={"sub": sub}).raise_for_status()

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()


class GateAt(RunningGate):
    """A RunningGate on a port chosen beforehand (its public URL is configured before it starts)."""

    def __init__(self, settings: Any, port: int) -> None:
        super().__init__(settings)
        self._fixed_port = port

    def start(self) -> GateAt:
        original = socket.socket.bind

        def bind(sock: socket.socket, address: Any) -> None:
            if address == (self.settings.server.host, 0):
                address = (self.settings.server.host, self._fixed_port)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the last test's Gate left TIME_WAITs
            original(sock, address)

        socket.socket.bind = bind  # type: ignore[method-assign]
        try:
            super().start()
        finally:
            socket.socket.bind = original  # type: ignore[method-assign]
        return self


def sign_in_section(public_url: str, issuer: str, **extra: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "enabled": True,
        "public-url": public_url,
        # oidc-provider grants offline_access (a refresh token) only with prompt=consent, as OIDC Core says
        "idp": {"issuer": issuer, "client-id": CLIENT_ID, "client-secret": CLIENT_SECRET, "prompt": "consent"},
        "device": {"poll-interval": 1},
        "allowed-email-domains": ["example.com"],
    }
    section.update(extra)
    return section


_FORM = re.compile(r'<form[^>]*action="([^"]+)"[^>]*>(.*?)</form>', re.S)
_HIDDEN = re.compile(r'<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"', re.S)


def start_device_flow(gate_url: str) -> dict[str, Any]:
    """``POST /oauth/device_authorization`` with an empty form, as Claude Code sends it."""
    response = httpx.post(
        f"{gate_url}/oauth/device_authorization",
        content=b"",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def poll(gate_url: str, device_code: str) -> httpx.Response:
    return httpx.post(
        f"{gate_url}/oauth/token",
        data={"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": device_code},
    )


def poll_until_done(gate_url: str, device_code: str, interval: float = 1.0) -> httpx.Response:
    """Poll as a well-behaved client does: wait ``interval`` between polls, longer after slow_down."""
    for _ in range(30):
        response = poll(gate_url, device_code)
        error = response.json().get("error") if response.status_code != 200 else None
        if error == "slow_down":
            interval += 1
        elif error != "authorization_pending":
            return response
        time.sleep(interval)
    raise AssertionError("the device flow never finished")


def follow_to_idp(browser: httpx.Client, gate_url: str, user_code: str) -> httpx.Response:
    """Open the verification page, confirm the code: Gate's 302 to the IdP's authorization endpoint."""
    page = browser.get(f"{gate_url}/device", params={"user_code": user_code})
    assert page.status_code == 200
    assert f'value="{user_code}"' in page.text  # pre-filled, never auto-submitted
    return browser.post(f"{gate_url}/device", data={"user_code": user_code}, headers={"Origin": gate_url})


def idp_login(browser: httpx.Client, location: str, user: str, callback_prefix: str) -> str:
    """Walk the IdP's interactions (login form, consent form) until it redirects to Gate's callback."""
    url = location
    for _ in range(12):
        if url.startswith(callback_prefix):
            return url
        response = browser.get(url)
        while response.is_redirect:
            url = urljoin(url, response.headers["location"])
            if url.startswith(callback_prefix):
                return url
            response = browser.get(url)
        match = _FORM.search(response.text)
        assert match, f"no form at {url}: {response.text[:300]}"
        action, inner = unescape(match.group(1)), match.group(2)
        fields = {name: unescape(value) for name, value in _HIDDEN.findall(inner)}
        if fields.get("prompt") == "login":
            fields.update(login=user, password="any")
        posted = browser.post(urljoin(url, action), data=fields)
        assert posted.is_redirect, f"the IdP form post answered {posted.status_code}: {posted.text[:300]}"
        url = urljoin(url, posted.headers["location"])
    raise AssertionError("the IdP never redirected back to Gate")


def browser_sign_in(gate_url: str, user_code: str, user: str, *, public_url: str | None = None) -> httpx.Response:
    """The whole browser leg; Gate's callback page is returned."""
    public_url = public_url or gate_url
    with httpx.Client(follow_redirects=False, timeout=15) as browser:
        confirmed = follow_to_idp(browser, gate_url, user_code)
        assert confirmed.status_code == 302, confirmed.text
        callback = idp_login(browser, confirmed.headers["location"], user, f"{public_url}/oauth/callback")
        return browser.get(callback.replace(public_url, gate_url, 1))
