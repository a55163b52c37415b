"""Claude Code's gateway sign-in against Gate, end to end over real sockets: a real OIDC provider (oidc-provider),
the device flow driven as Claude Code drives it, the browser leg done with httpx, then the anthropic SDK through
Gate with the session token, managed settings, model policy, refresh and deprovisioning."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.fake_anthropic import FakeAnthropic
from tests.harness import gate_settings, read_events
from tests.signin_idp import (
    GateAt,
    OidcProvider,
    browser_sign_in,
    follow_to_idp,
    free_ports,
    idp_login,
    poll,
    poll_until_done,
    sign_in_section,
    start_device_flow,
)

MESSAGE = {"model": "claude-opus-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]}
POLICIES = [
    {"name": "everyone", "models": ["claude-haiku-4-5"], "managed-settings": {"permissions": {"deny": ["WebFetch"]}}},
    {
        "name": "engineering",
        "match": {"groups": ["engineering"]},
        "models": ["claude-opus-4-6", "claude-haiku-4-5", "claude-sonnet-*"],
        "managed-settings": {"env": {"TEAM": "engineering"}, "model": "claude-opus-4-6"},
    },
]
PORTS = free_ports(4)


@pytest.fixture(scope="module")
def idp() -> Iterator[OidcProvider]:
    provider = OidcProvider([f"http://127.0.0.1:{port}/oauth/callback" for port in PORTS])
    yield provider
    provider.stop()


@pytest.fixture
def start_signin_gate(
    tmp_path: Path, fake_session: FakeAnthropic, idp: OidcProvider
) -> Iterator[Callable[..., GateAt]]:
    """``start(index, **sign_in_overrides)``: a Gate with sign-in on the index-th reserved port."""
    started: list[GateAt] = []

    def start(
        index: int = 0, *, store: dict[str, Any] | None = None, public_port: int | None = None, **overrides: Any
    ) -> GateAt:
        port = PORTS[index]
        public_url = f"http://127.0.0.1:{public_port or port}"
        settings = gate_settings(
            tmp_path / f"gate{index}",
            fake_session.url,
            **{
                "sign-in": sign_in_section(public_url, idp.issuer, **overrides),
                "store": store or {"sqlite-path": str(tmp_path / "store.sqlite3")},
                "policies": POLICIES,
            },
        )
        gate = GateAt(settings, port).start()
        started.append(gate)
        return gate

    yield start
    for gate in started:
        gate.stop()


def sign_in(gate_url: str, user: str = "alice", public_url: str | None = None) -> dict[str, Any]:
    grant = start_device_flow(gate_url)
    page = browser_sign_in(gate_url, grant["user_code"], user, public_url=public_url)
    assert page.status_code == 200, page.text
    response = poll_until_done(gate_url, grant["device_code"])
    assert response.status_code == 200, response.text
    return dict(response.json())


def refresh(gate_url: str, refresh_token: str) -> httpx.Response:
    return httpx.post(f"{gate_url}/oauth/token", data={"grant_type": "refresh_token", "refresh_token": refresh_token})


# ---------------------------------------------------------------------------------------------- discovery


def test_discovery_and_protocol(start_signin_gate: Callable[..., GateAt]) -> None:
    gate = start_signin_gate()
    metadata = httpx.get(f"{gate.url}/.well-known/oauth-authorization-server").json()
    assert metadata == {
        "issuer": gate.url,
        "device_authorization_endpoint": f"{gate.url}/oauth/device_authorization",
        "token_endpoint": f"{gate.url}/oauth/token",
        "grant_types_supported": ["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"],
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": ["none"],
        "scopes_supported": ["openid", "profile", "email"],
        "gateway_protocol_version": 1,
    }
    protocol = httpx.get(f"{gate.url}/protocol")
    assert protocol.headers["content-type"] == "text/markdown; charset=utf-8"
    assert "/oauth/device_authorization" in protocol.text
    grant = start_device_flow(gate.url)
    assert len(grant["device_code"]) >= 43
    assert grant["verification_uri"] == f"{gate.url}/device"
    assert grant["verification_uri_complete"] == f"{gate.url}/device?user_code={grant['user_code']}"
    assert (grant["expires_in"], grant["interval"]) == (600, 1)
    letters = grant["user_code"].replace("-", "")
    assert len(letters) == 8 and set(letters) <= set("BCDFGHJKLMNPQRSTVWXZ")


# ---------------------------------------------------------------------------------------------- the whole flow


def test_sign_in_then_messages_policy_settings_refresh_and_deprovisioning(
    start_signin_gate: Callable[..., GateAt], fake: FakeAnthropic, idp: OidcProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gate.audit")
    gate = start_signin_gate(session={"refresh-reuse-grace": "0s"})  # strictly single-use refresh tokens
    grant = start_device_flow(gate.url)
    assert poll(gate.url, grant["device_code"]).json()["error"] == "authorization_pending"
    page = browser_sign_in(gate.url, grant["user_code"], "dave")
    assert page.status_code == 200 and "Signed in as dave@example.com" in page.text
    assert "Max-Age=0" in page.headers["set-cookie"]  # the browser binding is spent
    tokens = poll_until_done(gate.url, grant["device_code"]).json()
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 3600 and tokens["refresh_token"]
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "dave" and claims["email"] == "dave@example.com"
    assert claims["groups"] == ["engineering"] and claims["iss"] == gate.url
    # The device code is single-use.
    assert poll(gate.url, grant["device_code"]).json()["error"] == "expired_token"

    client = anthropic.Anthropic(base_url=gate.url, auth_token=tokens["access_token"], max_retries=0)
    message = client.messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert message.content[0].text
    events = read_events(Path(gate.settings.usage.file.path), 1)
    assert events[-1]["subject"] == "dave"

    # A model outside the engineering allowlist: refused before any upstream call, no usage event.
    calls_before = len(fake.received)
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(**{**MESSAGE, "model": "claude-opus-4-1"})  # type: ignore[call-overload]
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "not available to you" in refused.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.count_tokens(model="claude-opus-4-1", messages=MESSAGE["messages"])  # type: ignore[arg-type]
    assert len(fake.received) == calls_before
    assert client.messages.count_tokens(model="claude-sonnet-4-5", messages=MESSAGE["messages"])  # type: ignore[arg-type]
    models = httpx.get(f"{gate.url}/v1/models", headers={"Authorization": f"Bearer {tokens['access_token']}"}).json()
    assert [m["id"] for m in models["data"]] == ["claude-opus-4-6", "claude-haiku-4-5"]
    assert models["data"][0]["display_name"] == "Claude Opus 4.6"
    time.sleep(0.3)
    assert len(read_events(Path(gate.settings.usage.file.path), 1)) == 1

    # Managed settings: engineering merged onto the catch-all, with ETag and 304.
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    managed = httpx.get(f"{gate.url}/managed/settings", headers=bearer)
    assert managed.status_code == 200
    body = managed.json()
    assert body["settings"] == {
        "permissions": {"deny": ["WebFetch"]},
        "env": {"TEAM": "engineering"},
        "model": "claude-opus-4-6",
    }
    assert body["checksum"].startswith("sha256:") and managed.headers["etag"] == f'"{body["checksum"]}"'
    again = httpx.get(f"{gate.url}/managed/settings", headers={**bearer, "If-None-Match": managed.headers["etag"]})
    assert again.status_code == 304 and not again.content

    # Refresh: a new session; the old refresh token is single-use.
    refreshed = refresh(gate.url, tokens["refresh_token"])
    assert refreshed.status_code == 200, refreshed.text
    fresh = refreshed.json()
    assert fresh["access_token"] != tokens["access_token"] and fresh["refresh_token"] != tokens["refresh_token"]
    replay = refresh(gate.url, tokens["refresh_token"])
    assert (replay.status_code, replay.json()["error"]) == (401, "invalid_grant")
    client2 = anthropic.Anthropic(base_url=gate.url, auth_token=fresh["access_token"], max_retries=0)
    assert client2.messages.create(**MESSAGE).content  # type: ignore[call-overload]

    # Deprovisioned at the IdP: the next refresh is refused, Claude Code must sign in again (and cannot).
    idp.deprovision("dave")  # nobody else signs in as dave
    gone = refresh(gate.url, fresh["refresh_token"])
    assert (gone.status_code, gone.json()["error"]) == (401, "invalid_grant")

    audit = [record for record in caplog.records if record.name == "gate.audit"]
    outcomes = [getattr(record, "audit", None) for record in audit]
    assert outcomes.count("signin") == 1 and outcomes.count("refresh") == 1 and outcomes.count("refusal") >= 2
    assert all(tokens["access_token"] not in record.getMessage() for record in audit)


def test_catch_all_policy_for_another_group(start_signin_gate: Callable[..., GateAt], fake: FakeAnthropic) -> None:
    gate = start_signin_gate()
    tokens = sign_in(gate.url, "bob")
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    settings = httpx.get(f"{gate.url}/managed/settings", headers=bearer).json()["settings"]
    assert settings == {"permissions": {"deny": ["WebFetch"]}}
    refused = httpx.post(f"{gate.url}/v1/messages", headers=bearer, json=MESSAGE)
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"
    allowed = httpx.post(f"{gate.url}/v1/messages", headers=bearer, json={**MESSAGE, "model": "claude-haiku-4-5"})
    assert allowed.status_code == 200


def test_no_policy_means_404_and_no_restriction(
    tmp_path: Path, fake: FakeAnthropic, fake_session: FakeAnthropic, idp: OidcProvider
) -> None:
    settings = gate_settings(
        tmp_path,
        fake_session.url,
        **{"sign-in": sign_in_section(f"http://127.0.0.1:{PORTS[3]}", idp.issuer)},
        store={"sqlite-path": str(tmp_path / "store.sqlite3")},
    )
    gate = GateAt(settings, PORTS[3]).start()
    try:
        tokens = sign_in(gate.url, "bob")
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
        missing = httpx.get(f"{gate.url}/managed/settings", headers=bearer)
        assert missing.status_code == 404 and missing.json()["type"] == "error"
        assert httpx.post(f"{gate.url}/v1/messages", headers=bearer, json=MESSAGE).status_code == 200
    finally:
        gate.stop()


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("user", "why"), [("mallory", "e-mail domain"), ("unverified", "not verified")])
def test_refused_people_get_access_denied(start_signin_gate: Callable[..., GateAt], user: str, why: str) -> None:
    gate = start_signin_gate()
    grant = start_device_flow(gate.url)
    page = browser_sign_in(gate.url, grant["user_code"], user)
    assert page.status_code == 403 and why in page.text
    outcome = poll_until_done(gate.url, grant["device_code"])
    assert (outcome.status_code, outcome.json()["error"]) == (400, "access_denied")


def test_allowed_groups(start_signin_gate: Callable[..., GateAt]) -> None:
    gate = start_signin_gate(**{"allowed-groups": ["admins"]})
    grant = start_device_flow(gate.url)
    assert browser_sign_in(gate.url, grant["user_code"], "alice").status_code == 403
    assert poll_until_done(gate.url, grant["device_code"]).json()["error"] == "access_denied"
    assert sign_in(gate.url, "carol")["access_token"]


def test_device_and_token_bad_inputs(start_signin_gate: Callable[..., GateAt]) -> None:
    gate = start_signin_gate()
    token_url = f"{gate.url}/oauth/token"

    def error(response: httpx.Response) -> tuple[int, str]:
        assert response.headers["cache-control"] == "no-store"
        return response.status_code, response.json()["error"]

    assert error(poll(gate.url, "not-a-code")) == (400, "invalid_grant")
    assert error(httpx.post(token_url, data={"grant_type": "urn:ietf:params:oauth:grant-type:device_code"})) == (
        400,
        "invalid_request",
    )
    assert error(httpx.post(token_url, data={})) == (400, "invalid_request")
    assert error(httpx.post(token_url, data={"grant_type": "password"})) == (400, "unsupported_grant_type")
    assert error(httpx.post(token_url, data={"grant_type": "refresh_token"})) == (400, "invalid_request")
    assert error(refresh(gate.url, "forged")) == (401, "invalid_grant")
    assert error(
        httpx.post(token_url, content=b'{"grant_type":"refresh_token"}', headers={"Content-Type": "application/json"})
    ) == (
        400,
        "invalid_request",
    )
    assert error(
        httpx.post(
            token_url,
            content=b"grant_type=a&grant_type=b",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    ) == (
        400,
        "invalid_request",
    )
    assert error(
        httpx.post(token_url, content=b"\xff\xfe=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
    ) == (
        400,
        "invalid_request",
    )
    # Polling faster than the interval: slow_down.
    grant = start_device_flow(gate.url)
    assert error(poll(gate.url, grant["device_code"])) == (400, "authorization_pending")
    assert error(poll(gate.url, grant["device_code"])) == (400, "slow_down")


def test_verification_page_refuses_bad_codes_and_cross_site_posts(start_signin_gate: Callable[..., GateAt]) -> None:
    gate = start_signin_gate()
    grant = start_device_flow(gate.url)
    page = httpx.get(f"{gate.url}/device", params={"user_code": grant["user_code"]})
    assert page.headers["x-frame-options"] == "DENY" and "form-action 'self'" in page.headers["content-security-policy"]
    assert httpx.get(f"{gate.url}/device", params={"user_code": "<script>"}).text.count("<script>") == 0
    same = {"Origin": gate.url}
    for bad in ("BCDF-GHJK", "nonsense", "", "A" * 5000):
        answer = httpx.post(f"{gate.url}/device", data={"user_code": bad}, headers=same)
        assert answer.status_code == 400 and "unknown, expired or already used" in answer.text
    for headers in (
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://evil.example"},
        {},
        {"Sec-Fetch-Site": "same-site"},
    ):
        blocked = httpx.post(f"{gate.url}/device", data={"user_code": grant["user_code"]}, headers=headers)
        assert blocked.status_code == 403 and "another site" in blocked.text
    accepted = httpx.post(
        f"{gate.url}/device", data={"user_code": grant["user_code"].lower()}, headers={"Sec-Fetch-Site": "same-origin"}
    )
    assert accepted.status_code == 302 and accepted.headers["location"].startswith("http://127.0.0.1:")
    assert "HttpOnly" in accepted.headers["set-cookie"] and "SameSite=Lax" in accepted.headers["set-cookie"]


def test_tampered_callbacks_are_refused(start_signin_gate: Callable[..., GateAt], idp: OidcProvider) -> None:
    gate = start_signin_gate()
    callback_prefix = f"{gate.url}/oauth/callback"
    # A state Gate never issued.
    forged = httpx.get(f"{gate.url}/oauth/callback", params={"code": "x", "state": "forged"})
    assert forged.status_code == 400 and "unknown, expired or already used" in forged.text
    assert httpx.get(f"{gate.url}/oauth/callback").status_code == 400

    # The callback URL carried to another browser (no binding cookie): refused, and the state is spent.
    grant = start_device_flow(gate.url)
    with httpx.Client(follow_redirects=False) as browser:
        location = follow_to_idp(browser, gate.url, grant["user_code"]).headers["location"]
        callback = idp_login(browser, location, "alice", callback_prefix)
    other = httpx.get(callback)
    assert other.status_code == 400 and "another browser" in other.text

    # A nonce changed on the way to the IdP: the id_token's nonce no longer matches, the sign-in is denied.
    grant = start_device_flow(gate.url)
    with httpx.Client(follow_redirects=False) as browser:
        location = follow_to_idp(browser, gate.url, grant["user_code"]).headers["location"]
        url = httpx.URL(location)
        tampered = str(url.copy_set_param("nonce", "attacker-chosen-nonce"))
        callback = idp_login(browser, tampered, "alice", callback_prefix)
        page = browser.get(callback)
        replayed = browser.get(callback)
    assert page.status_code == 400 and "could not be verified" in page.text
    assert replayed.status_code == 400  # the state is single-use
    assert poll_until_done(gate.url, grant["device_code"]).json()["error"] == "access_denied"

    # The IdP reporting an error (the person cancelled): access_denied.
    grant = start_device_flow(gate.url)
    with httpx.Client(follow_redirects=False) as browser:
        location = follow_to_idp(browser, gate.url, grant["user_code"]).headers["location"]
        state = httpx.URL(location).params["state"]
        cancelled = browser.get(f"{gate.url}/oauth/callback", params={"error": "access_denied", "state": state})
    assert cancelled.status_code == 400
    assert poll_until_done(gate.url, grant["device_code"]).json()["error"] == "access_denied"
    # A used user code cannot start a second sign-in.
    again = httpx.post(f"{gate.url}/device", data={"user_code": grant["user_code"]}, headers={"Origin": gate.url})
    assert again.status_code == 400


def test_expired_device_code(start_signin_gate: Callable[..., GateAt]) -> None:
    gate = start_signin_gate(device={"poll-interval": 1, "code-lifetime": "1s"})
    grant = start_device_flow(gate.url)
    time.sleep(1.2)
    assert poll(gate.url, grant["device_code"]).json()["error"] == "expired_token"
    answer = httpx.post(f"{gate.url}/device", data={"user_code": grant["user_code"]}, headers={"Origin": gate.url})
    assert answer.status_code == 400


def test_rate_limits_per_address(start_signin_gate: Callable[..., GateAt]) -> None:
    gate = start_signin_gate(limits={"device-authorizations": 2, "device-posts": 2, "token-requests": 3})
    start_device_flow(gate.url)
    start_device_flow(gate.url)
    limited = httpx.post(f"{gate.url}/oauth/device_authorization")
    assert (limited.status_code, limited.json()["error"]) == (429, "slow_down") and limited.headers["retry-after"]
    for _ in range(2):
        httpx.post(f"{gate.url}/device", data={"user_code": "BCDF-GHJK"}, headers={"Origin": gate.url})
    assert (
        httpx.post(f"{gate.url}/device", data={"user_code": "BCDF-GHJK"}, headers={"Origin": gate.url}).status_code
        == 429
    )
    for _ in range(3):
        poll(gate.url, "x")
    assert poll(gate.url, "x").status_code == 429


# ---------------------------------------------------------------------------------------------- session tokens


def test_forged_and_expired_session_tokens_are_refused(
    start_signin_gate: Callable[..., GateAt], fake: FakeAnthropic
) -> None:
    gate = start_signin_gate()
    assert gate.gate is not None and gate.gate.signin is not None
    sessions = gate.gate.signin.sessions
    kid = next(iter(sessions.kids))
    now = int(time.time())
    claims = {"iss": gate.url, "aud": "gate-session", "sub": "eve", "iat": now, "exp": now + 600, "groups": ["admins"]}
    forged = jwt.encode(claims, rsa.generate_private_key(65537, 2048), algorithm="RS256", headers={"kid": kid})
    wrong_algorithm = jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": kid})
    own_key = sessions._signing.private_key
    expired = jwt.encode({**claims, "exp": now - 3600}, own_key, algorithm="RS256", headers={"kid": kid})
    other_issuer = jwt.encode({**claims, "iss": "http://elsewhere"}, own_key, algorithm="RS256", headers={"kid": kid})
    not_session = jwt.encode({**claims, "aud": "something-else"}, own_key, algorithm="RS256", headers={"kid": kid})
    for token, reason in [
        (forged, "signature"),
        (wrong_algorithm, "algorithm"),
        (expired, "expired"),
        (other_issuer, "not issued by"),
        (not_session, "not a Gate session"),
    ]:
        for path, method in [("/v1/messages", "POST"), ("/managed/settings", "GET"), ("/v1/metrics", "POST")]:
            answer = httpx.request(
                method, f"{gate.url}{path}", headers={"Authorization": f"Bearer {token}"}, json=MESSAGE
            )
            assert answer.status_code == 401, (path, answer.text)
            assert answer.json()["error"]["type"] == "authentication_error"
            assert reason in answer.json()["error"]["message"]
    assert not fake.received
    # The company's own development JWTs keep working beside sessions.
    assert (
        httpx.post(
            f"{gate.url}/v1/messages",
            headers={"Authorization": f"Bearer {gate.token('ci-bot')}"},
            json={**MESSAGE, "model": "claude-haiku-4-5"},
        ).status_code
        == 200
    )


# ---------------------------------------------------------------------------------------------- telemetry relay


def test_otlp_relay_attaches_identity(start_signin_gate: Callable[..., GateAt], fake_loop: Any, tmp_path: Path) -> None:
    from aiohttp import web

    received: list[tuple[str, dict[str, str], bytes]] = []

    async def collect(request: web.Request) -> web.Response:
        received.append((request.path, dict(request.headers), await request.read()))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/{signal}", collect)
    runner = web.AppRunner(app)
    fake_loop.run(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    fake_loop.run(site.start())
    collector = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        gate = start_signin_gate(
            telemetry={
                "forward-to": [{"url": collector, "headers": {"x-collector-key": "k"}, "signals": ["metrics", "logs"]}]
            }
        )
        tokens = sign_in(gate.url, "alice")
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
        managed = httpx.get(f"{gate.url}/managed/settings", headers=bearer).json()["settings"]
        assert managed["env"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == gate.url and managed["env"]["TEAM"] == "engineering"

        def chunks() -> Iterator[bytes]:
            yield b"\x0a\x02"
            yield b"hi"

        metrics = httpx.post(
            f"{gate.url}/v1/metrics", headers={**bearer, "Content-Type": "application/x-protobuf"}, content=chunks()
        )
        assert metrics.status_code == 200
        logs = httpx.post(f"{gate.url}/v1/logs", headers=bearer, json={"resourceLogs": []})
        assert logs.status_code == 200 and logs.json() == {}
        traces = httpx.post(f"{gate.url}/v1/traces", headers=bearer, json={"resourceSpans": []})
        assert traces.status_code == 200  # accepted, not relayed: this collector takes no traces
        assert httpx.post(f"{gate.url}/v1/metrics", content=b"x").status_code == 401
        deadline = time.monotonic() + 10
        while len(received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        by_path = {path: (headers, body) for path, headers, body in received}
        assert set(by_path) == {"/v1/metrics", "/v1/logs"}
        headers, body = by_path["/v1/metrics"]
        assert body == b"\x0a\x02hi" and headers["x-gate-subject"] == "alice"
        assert headers["x-gate-email"] == "alice@example.com" and headers["x-collector-key"] == "k"
        assert "Authorization" not in headers
        assert json.loads(by_path["/v1/logs"][1]) == {"resourceLogs": []}
    finally:
        fake_loop.run(runner.cleanup())


# ---------------------------------------------------------------------------------------------- replicas


def test_replicas_sharing_postgres(
    tmp_path: Path, fake: FakeAnthropic, fake_session: FakeAnthropic, idp: OidcProvider
) -> None:
    """Sign in on one Gate process, poll and refresh on another (a separate `gate serve`): every step finds the
    state the other wrote, and a session minted by one is accepted by the other."""
    import subprocess

    import yaml
    from cryptography.fernet import Fernet

    from tests.postgres_db import throwaway_database

    with throwaway_database() as database:
        public_url = f"http://127.0.0.1:{PORTS[1]}"  # both stand behind one public URL, as behind a load balancer
        sections = {
            "sign-in": sign_in_section(public_url, idp.issuer),
            "store": {
                "backend": "postgres",
                "postgres-url": database,
                "encryption-keys": [Fernet.generate_key().decode()],
            },
            "policies": POLICIES,
        }
        first = GateAt(gate_settings(tmp_path / "a", fake_session.url, **sections), PORTS[1]).start()
        config = tmp_path / "b.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    **sections,
                    "anthropic": {
                        "api": {"base-url": fake_session.url, "keys": [{"alias": "b", "value": "sk-ant-test-b-0000"}]}
                    },
                    "usage": {
                        "publisher": "file",
                        "file": {"path": str(tmp_path / "b-usage.jsonl")},
                        "outbox": {"path": str(tmp_path / "b-outbox.sqlite3")},
                    },
                    "security": {"jwt": {"dev": {"data-dir": str(tmp_path / "b-keys")}}},
                }
            )
        )
        second_url = f"http://127.0.0.1:{PORTS[2]}"
        second = subprocess.Popen(
            [
                str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "gate"),
                "serve",
                "--config",
                str(config),
                "--port",
                str(PORTS[2]),
            ],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{second_url}/actuator/health/liveness").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert second.poll() is None and time.monotonic() < deadline, "the second Gate did not start"
                time.sleep(0.1)

            grant = start_device_flow(first.url)
            assert poll(second_url, grant["device_code"]).json()["error"] == "authorization_pending"
            assert browser_sign_in(first.url, grant["user_code"], "alice").status_code == 200
            tokens = poll_until_done(second_url, grant["device_code"]).json()
            assert tokens["access_token"]
            assert poll(first.url, grant["device_code"]).json()["error"] == "expired_token"

            refreshed = refresh(second_url, tokens["refresh_token"])
            assert refreshed.status_code == 200, refreshed.text
            assert refresh(first.url, tokens["refresh_token"]).json() == refreshed.json()  # the other's answer
            fresh = refreshed.json()
            for url in (first.url, second_url):
                client = anthropic.Anthropic(base_url=url, auth_token=fresh["access_token"], max_retries=0)
                assert client.messages.create(**MESSAGE).content  # type: ignore[call-overload]
            assert refresh(first.url, fresh["refresh_token"]).status_code == 200
        finally:
            second.terminate()
            second.wait(30)
            first.stop()


# ---------------------------------------------------------------------------------------------- IdP trouble


def test_idp_away_during_refresh_is_temporary(tmp_path: Path, fake: FakeAnthropic, fake_session: FakeAnthropic) -> None:
    """The IdP down: refresh answers 503 temporarily_unavailable and keeps the refresh token for the next try."""
    own_idp = OidcProvider([f"http://127.0.0.1:{PORTS[3]}/oauth/callback"])
    settings = gate_settings(
        tmp_path,
        fake_session.url,
        **{"sign-in": sign_in_section(f"http://127.0.0.1:{PORTS[3]}", own_idp.issuer)},
        store={"sqlite-path": str(tmp_path / "store.sqlite3")},
    )
    gate = GateAt(settings, PORTS[3]).start()
    try:
        tokens = sign_in(gate.url, "alice")
        health = httpx.get(f"{gate.url}/actuator/health").json()["components"]["signIn"]
        assert health["status"] == "UP" and health["details"]["auditEvents"] == {"signin": 1}
        own_idp.stop()
        for _ in range(2):  # still usable after the first failure
            away = refresh(gate.url, tokens["refresh_token"])
            assert (away.status_code, away.json()["error"]) == (503, "temporarily_unavailable")
        # The session itself needs no IdP: Gate verifies it with its own key.
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
        assert httpx.post(f"{gate.url}/v1/messages", headers=bearer, json=MESSAGE).status_code == 200
        # A device confirmation cannot reach the IdP either: a clear page, not a crash.
        grant = start_device_flow(gate.url)
        page = httpx.post(f"{gate.url}/device", data={"user_code": grant["user_code"]}, headers={"Origin": gate.url})
        assert page.status_code in (302, 503)  # discovery was cached: the redirect is built without the IdP
    finally:
        gate.stop()
        own_idp.stop()


def test_callback_naming_another_issuer_is_refused(start_signin_gate: Callable[..., GateAt]) -> None:
    gate = start_signin_gate()
    grant = start_device_flow(gate.url)
    with httpx.Client(follow_redirects=False) as browser:
        location = follow_to_idp(browser, gate.url, grant["user_code"]).headers["location"]
        callback = httpx.URL(idp_login(browser, location, "alice", f"{gate.url}/oauth/callback"))
        mixed_up = browser.get(str(callback.copy_set_param("iss", "https://attacker.example")))
    assert mixed_up.status_code == 400 and "another identity provider" in mixed_up.text
    assert poll_until_done(gate.url, grant["device_code"]).json()["error"] == "access_denied"


# ---------------------------------------------------------------------------------------------- hostile input


def test_hostile_bodies_and_queries_get_clear_answers(start_signin_gate: Callable[..., GateAt]) -> None:
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hypothesis_settings
    from hypothesis import strategies as st

    gate = start_signin_gate(limits={"token-requests": 10_000, "device-posts": 10_000, "device-authorizations": 10_000})
    form = {"Content-Type": "application/x-www-form-urlencoded"}

    @hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=600), st.text(max_size=200))
    def hostile(body: bytes, query: str) -> None:
        token = client.post(f"{gate.url}/oauth/token", content=body, headers=form)
        assert 400 <= token.status_code < 500 and isinstance(token.json()["error"], str)
        device = client.post(f"{gate.url}/device", content=body, headers={**form, "Origin": gate.url})
        assert device.status_code in (400, 413) and device.headers["content-type"].startswith("text/html")
        callback = client.get(f"{gate.url}/oauth/callback", params={"state": query, "code": query})
        assert callback.status_code == 400
        authorization = client.post(f"{gate.url}/oauth/device_authorization", content=body, headers=form)
        assert authorization.status_code in (200, 400, 413)

    with httpx.Client() as client:  # one client: building one per request costs more than Gate's answer
        hostile()


def test_concurrent_refreshes_share_one_answer(start_signin_gate: Callable[..., GateAt]) -> None:
    """Two Claude Code processes sharing one credentials file refresh at once: neither loses the session."""
    from concurrent.futures import ThreadPoolExecutor

    gate = start_signin_gate()
    tokens = sign_in(gate.url, "alice")
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: refresh(gate.url, tokens["refresh_token"]), range(4)))
    ok = [a.json() for a in answers if a.status_code == 200]
    busy = [a for a in answers if a.status_code != 200]
    assert ok and all(answer == ok[0] for answer in ok)
    assert all((a.status_code, a.json()["error"]) == (503, "temporarily_unavailable") for a in busy)
    assert refresh(gate.url, tokens["refresh_token"]).json() == ok[0]  # within the grace: the same answer
    assert gate.gate is not None and gate.gate.signin.counts["refresh"] == 1  # the IdP was asked once


# ---------------------------------------------------------------------------------------------- the contract


def test_answers_match_the_gateway_contract(start_signin_gate: Callable[..., GateAt], fake: FakeAnthropic) -> None:
    """Field by field against the shapes Anthropic's own gateway answers with (tests/fixtures)."""
    contract = json.loads((Path(__file__).parent / "fixtures" / "gateway-protocol-contract.json").read_text())
    gate = start_signin_gate()
    discovery = httpx.get(f"{gate.url}/.well-known/oauth-authorization-server").json()
    assert discovery == json.loads(json.dumps(contract["discovery"]).replace("{public_url}", gate.url))
    grant = start_device_flow(gate.url)
    assert sorted(grant) == contract["device_authorization_response_keys"]
    assert set(grant["user_code"].replace("-", "")) <= set(contract["user_code_alphabet"])
    assert poll(gate.url, grant["device_code"]).json()["error"] in contract["device_grant_errors"]
    assert browser_sign_in(gate.url, grant["user_code"], "alice").status_code == 200
    tokens = poll_until_done(gate.url, grant["device_code"]).json()
    assert sorted(tokens) == contract["token_response_keys"]
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    assert set(contract["session_claims"]) <= set(claims)
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert (
        sorted(httpx.get(f"{gate.url}/managed/settings", headers=bearer).json())
        == contract["managed_settings_response_keys"]
    )
    assert sorted(httpx.get(f"{gate.url}/v1/models", headers=bearer).json()) == contract["models_response_keys"]
    refused = refresh(gate.url, "not-a-refresh-token")
    assert {"status": refused.status_code, "error": refused.json()["error"]} == contract["refresh_refusal"]
