"""Authentication through the gateway: real sockets, the official anthropic SDK and httpx against an in-process
Gate, a real local JWKS IdP (tokens minted with joserfc) and the fake Anthropic behind it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx
import httpx2
import pytest
import yaml
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from joserfc import jwt as jose_jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import KeySet as JoseKeySet

from gate.ops.logs import JsonFormatter
from gate.settings import ConfigError
from tests.fake_anthropic import FakeAnthropic
from tests.harness import BackgroundLoop, RunningGate, gate_settings, read_events
from tests.jwks import OMIT, JwksServer, b64url_decode, hmac_token, tamper_payload, tamper_signature, unsigned_token

ROOT = Path(__file__).resolve().parents[1]
GATE_BIN = ROOT / ".venv" / "bin" / "gate"
MESSAGE = {"model": "claude-opus-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]}
BODY = json.dumps(MESSAGE).encode()
KINDS = ["rsa", "ec", "ed25519"]  # the kids of the shared IdP's keys: RS256, ES256 and EdDSA
AUDIENCE = "gate-api"

StartGate = Callable[..., RunningGate]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def idp(fake_loop: BackgroundLoop) -> Iterator[JwksServer]:
    """One IdP with an RSA, an EC and an Ed25519 key, shared by the tests that do not change it."""
    server = JwksServer()
    fake_loop.run(server.start())
    server.add_key("RSA", "RS256", "rsa")
    server.add_key("EC", "ES256", "ec")
    server.add_key("OKP", "EdDSA", "ed25519")
    yield server
    fake_loop.run(server.stop())


def _prod_gate(tmp: Path, upstream: str, idp: JwksServer, **jwt: Any) -> RunningGate:
    settings = gate_settings(tmp, upstream, profiles=("prod",), security={"jwt": {"jwk-set-uri": idp.url, **jwt}})
    return RunningGate(settings).start()


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory, fake_session: FakeAnthropic, idp: JwksServer
) -> Iterator[RunningGate]:
    """Production profile, a JWKS, neither issuer nor audience checked."""
    running = _prod_gate(tmp_path_factory.mktemp("gate"), fake_session.url, idp)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def refusing_gate(
    tmp_path_factory: pytest.TempPathFactory, fake_session: FakeAnthropic, idp: JwksServer
) -> Iterator[RunningGate]:
    """Sees only refused requests, so its usage file and outbox must stay empty."""
    running = _prod_gate(tmp_path_factory.mktemp("refusing"), fake_session.url, idp)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def strict_gate(
    tmp_path_factory: pytest.TempPathFactory, fake_session: FakeAnthropic, idp: JwksServer
) -> Iterator[RunningGate]:
    """Checks the issuer and the audience."""
    running = _prod_gate(
        tmp_path_factory.mktemp("strict"), fake_session.url, idp, issuer=idp.issuer, audiences=[AUDIENCE]
    )
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _no_sdk_credentials_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK reads these when a credential is not passed; a developer's own key must not leak into a test.
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------------- helpers


def post(gate: RunningGate, headers: dict[str, Any], body: bytes = BODY) -> httpx.Response:
    return httpx.post(
        gate.url + "/v1/messages", content=body, headers={"content-type": "application/json", **headers}, timeout=10
    )


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def usage_lines(gate: RunningGate) -> list[bytes]:
    path = Path(gate.settings.usage.file.path)
    return [line for line in path.read_bytes().splitlines() if line.strip()] if path.exists() else []


def outbox_depth(gate: RunningGate) -> int:
    assert gate.gate is not None
    events = gate.gate.events
    return gate.bg.call(lambda: events.depth)


def assert_refused(response: httpx.Response, *secrets: str | bytes, says: str, presented: bool = True) -> None:
    """A 401 in Anthropic's shape with an RFC 6750 challenge that names what is wrong and echoes no credential."""
    assert response.status_code == 401, response.text
    body = response.json()
    assert list(body) == ["type", "error"] and body["type"] == "error"
    assert list(body["error"]) == ["type", "message"]
    assert body["error"]["type"] == "authentication_error"
    message = body["error"]["message"]
    assert isinstance(message, str) and says in message, message
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer")
    if presented:
        assert 'error="invalid_token"' in challenge
    else:
        assert challenge == "Bearer"
    visible = response.text + "\n" + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    for secret in secrets:
        text = secret.decode("latin-1") if isinstance(secret, bytes) else secret
        for piece in [text, *text.replace(" ", ".").split(".")]:
            if len(piece) >= 12:
                assert piece not in visible


def assert_nothing_recorded(gate: RunningGate, fake: FakeAnthropic) -> None:
    """No upstream call, nothing in the outbox and, after a moment, nothing in the usage file."""
    assert fake.received == []
    assert outbox_depth(gate) == 0
    time.sleep(0.05)
    assert outbox_depth(gate) == 0
    assert usage_lines(gate) == []


def capturing_client(gate: RunningGate, sent: list[httpx2.Request], **credentials: str) -> anthropic.Anthropic:
    """An SDK client whose outgoing requests land in ``sent`` (anthropic 2.x runs on httpx2, not httpx)."""
    http = httpx2.Client(event_hooks={"request": [sent.append]}, timeout=10)
    return anthropic.Anthropic(base_url=gate.url, max_retries=0, http_client=http, **credentials)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("credential", ["auth_token", "api_key"])
@pytest.mark.parametrize("kid", KINDS)
def test_sdk_credentials_pass_through(
    gate: RunningGate, idp: JwksServer, fake: FakeAnthropic, kid: str, credential: str
) -> None:
    token = idp.mint(sub=f"sdk-{kid}", kid=kid)
    sent: list[httpx2.Request] = []
    message = capturing_client(gate, sent, **{credential: token}).messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert message.usage.output_tokens == 6
    # What anthropic 2.x really sends: `Authorization: Bearer` for api_key= as well as for auth_token=.
    assert sent[-1].headers["authorization"] == f"Bearer {token}"
    assert "x-api-key" not in sent[-1].headers
    upstream = fake.received[-1].headers
    assert upstream["x-api-key"].startswith("sk-ant-test-")
    assert "authorization" not in upstream
    assert token not in str(upstream)


@pytest.mark.parametrize("kid", KINDS)
def test_raw_x_api_key_and_both_headers_agreeing(
    gate: RunningGate, idp: JwksServer, fake: FakeAnthropic, kid: str
) -> None:
    token = idp.mint(kid=kid)
    assert post(gate, {"x-api-key": token}).status_code == 200
    assert post(gate, {"x-api-key": token, **bearer(token)}).status_code == 200
    assert post(gate, {"x-api-key": token, "authorization": f"bearer\t {token}"}).status_code == 200
    assert len(fake.received) == 3


def test_issuer_and_audience_pass_when_right_and_are_ignored_when_unset(
    gate: RunningGate, strict_gate: RunningGate, idp: JwksServer, fake: FakeAnthropic
) -> None:
    right = idp.mint(aud=AUDIENCE)
    for wrong in (idp.mint(iss="https://evil.example"), idp.mint(aud="someone-else"), idp.mint()):
        assert post(gate, bearer(wrong)).status_code == 200
    assert post(strict_gate, bearer(right)).status_code == 200
    assert post(strict_gate, bearer(idp.mint(aud=["other", AUDIENCE]))).status_code == 200
    assert len(fake.received) == 5


# ---------------------------------------------------------------------------------------------- refused

Case = Callable[[JwksServer, str], tuple[dict[str, Any], str]]  # (headers, what the message says)


def _signed_claims(idp: JwksServer, kid: str, **claims: Any) -> dict[str, Any]:
    token = idp.mint(kid=kid, **claims)
    return dict(json.loads(b64url_decode(token.split(".")[1])))


REFUSALS: dict[str, Case] = {
    "expired": lambda idp, kid: (bearer(idp.mint(kid=kid, now=time.time() - 7200, ttl=600)), "expired"),
    "not-yet-valid": lambda idp, kid: (bearer(idp.mint(kid=kid, nbf=int(time.time()) + 3600)), "not valid before"),
    "tampered-payload": lambda idp, kid: (bearer(tamper_payload(idp.mint(kid=kid), sub="mallory")), "signature"),
    "tampered-signature": lambda idp, kid: (bearer(tamper_signature(idp.mint(kid=kid))), "signature"),
    "missing-sub": lambda idp, kid: (bearer(idp.mint(sub=OMIT, kid=kid)), "subject"),
    "no-exp": lambda idp, kid: (bearer(idp.mint(kid=kid, exp=OMIT)), "no expiry"),  # security.jwt.require-exp
    "blank-sub": lambda idp, kid: (bearer(idp.mint(sub="  ", kid=kid)), "subject"),
    "alg-none": lambda idp, kid: (
        bearer(unsigned_token(_signed_claims(idp, kid), {"alg": "none", "kid": kid, "typ": "JWT"})),
        "algorithm",
    ),
    "unknown-kid": lambda idp, kid: (bearer(idp.mint(kid=kid, headers={"kid": f"{kid}-retired"})), "no key"),
    "x-api-key-expired": lambda idp, kid: ({"x-api-key": idp.mint(kid=kid, exp=int(time.time()) - 3600)}, "expired"),
}


@pytest.mark.parametrize("kid", KINDS)
@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_tokens_are_refused(
    refusing_gate: RunningGate, idp: JwksServer, fake: FakeAnthropic, case: str, kid: str
) -> None:
    headers, says = REFUSALS[case](idp, kid)
    response = post(refusing_gate, headers)
    assert_refused(response, *headers.values(), says=says)
    assert_nothing_recorded(refusing_gate, fake)


def _confusion(idp: JwksServer, attack: str) -> str:
    claims = _signed_claims(idp, "rsa")
    payload = json.dumps(claims).encode()
    public_pem = idp.key("rsa").public_pem()
    if attack == "hs256-with-public-pem":  # the classic: the RSA public key's PEM as an HMAC secret
        return hmac_token(public_pem, claims, kid="rsa")
    if attack == "hs256-with-public-pem-no-kid":
        return hmac_token(public_pem, claims)
    if attack == "rs256-against-ec":  # a real RS256 signature that names the EC key
        return idp.sign(payload, kid="rsa", headers={"kid": "ec"})
    if attack == "es256-against-rsa":
        return idp.sign(payload, kid="ec", headers={"kid": "rsa"})
    assert attack == "alg-NONE"
    return unsigned_token(claims, {"alg": "NONE", "kid": "rsa"})


@pytest.mark.parametrize(
    "attack",
    ["hs256-with-public-pem", "hs256-with-public-pem-no-kid", "rs256-against-ec", "es256-against-rsa", "alg-NONE"],
)
def test_algorithm_confusion_is_refused(
    refusing_gate: RunningGate, idp: JwksServer, fake: FakeAnthropic, attack: str
) -> None:
    token = _confusion(idp, attack)
    assert_refused(post(refusing_gate, bearer(token)), token, says="algorithm")
    assert_nothing_recorded(refusing_gate, fake)


def test_issuer_and_audience_are_enforced_when_set(
    strict_gate: RunningGate, idp: JwksServer, fake: FakeAnthropic
) -> None:
    cases = [
        (idp.mint(iss="https://evil.example", aud=AUDIENCE), "issued by"),
        (idp.mint(iss=OMIT, aud=AUDIENCE), "issuer"),
        (idp.mint(aud="someone-else"), "meant for"),
        (idp.mint(), "audience"),
    ]
    for token, says in cases:
        assert_refused(post(strict_gate, bearer(token)), token, says=says)
    assert fake.received == []


@pytest.mark.parametrize(
    ("headers", "says", "presented"),
    [
        ({}, "no credentials", False),
        ({"x-api-key": ""}, "no credentials", False),
        ({"authorization": "Bearer garbage"}, "not a JWT", True),
        ({"authorization": "Bearer a.b.c"}, "header", True),
        ({"authorization": "Basic dXNlcjpwYXNzd29yZDEyMzQ="}, "Bearer <token>", True),
        ({"authorization": "Bearer"}, "Bearer <token>", True),
        ({"x-api-key": "sk-ant-api03-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}, "Anthropic API key is not accepted", True),
        ({"authorization": b"Bearer \xe9\xff\x80\xa0caf\xe9"}, "not a JWT", True),
        ({"x-api-key": b"\xe9\xff.\x80.\xa0"}, "not a JWT", True),
    ],
    ids=[
        "none",
        "empty-x-api-key",
        "garbage",
        "not-json",
        "basic",
        "bare-scheme",
        "anthropic-key",
        "latin1-auth",
        "latin1-x-api-key",
    ],
)
def test_missing_and_garbage_credentials_are_refused(
    refusing_gate: RunningGate, fake: FakeAnthropic, headers: dict[str, Any], says: str, presented: bool
) -> None:
    response = post(refusing_gate, headers)
    assert_refused(response, *headers.values(), says=says, presented=presented)
    assert_nothing_recorded(refusing_gate, fake)


def test_latin1_bytes_around_a_valid_token_are_refused(
    refusing_gate: RunningGate, idp: JwksServer, fake: FakeAnthropic
) -> None:
    token = idp.mint().encode()
    for raw in (b"Bearer " + token + b"\xe9", b"Bearer \xff" + token):
        assert_refused(post(refusing_gate, {"authorization": raw}), raw, token, says="not a JWT")
    assert_nothing_recorded(refusing_gate, fake)


def test_disagreeing_headers_are_refused(refusing_gate: RunningGate, idp: JwksServer, fake: FakeAnthropic) -> None:
    alice, bob = idp.mint(sub="alice", kid="ec"), idp.mint(sub="bob", kid="rsa")
    response = post(refusing_gate, {**bearer(alice), "x-api-key": bob})
    assert_refused(response, alice, bob, says="different tokens")
    assert_nothing_recorded(refusing_gate, fake)


@pytest.mark.parametrize("size", [20_000, 40_000])  # tokens of ~27 KB and ~53 KB once base64url-encoded
@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_oversized_credentials_get_the_same_clean_401(
    refusing_gate: RunningGate, idp: JwksServer, fake: FakeAnthropic, header: str, size: int
) -> None:
    """Over security.jwt.max-token-length (16 KB) but within server.limits.max-header-size (64 KB): auth refuses
    the token like any other, with a 401 that says it is too long and echoes nothing."""
    token = idp.mint(claims={"pad": "x" * size})
    value = f"Bearer {token}" if header == "authorization" else token
    response = post(refusing_gate, {header: value})
    assert_refused(response, token, says="longer than")
    assert_nothing_recorded(refusing_gate, fake)


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_credentials_over_the_header_limit_get_a_clean_431(
    refusing_gate: RunningGate, idp: JwksServer, fake: FakeAnthropic, header: str
) -> None:
    """Over server.limits.max-header-size the HTTP parser refuses the request before auth sees it: an
    Anthropic-shaped 431 that echoes nothing, rather than aiohttp's text/plain 400 quoting the header."""
    token = idp.mint(claims={"pad": "x" * 100_000})
    value = f"Bearer {token}" if header == "authorization" else token
    response = post(refusing_gate, {header: value})
    assert response.status_code == 431
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "request_too_large"
    assert token[:24] not in response.text
    assert_nothing_recorded(refusing_gate, fake)


# ---------------------------------------------------------------------------------------------- the IdP over time


@pytest.fixture
def own_idp(fake_loop: BackgroundLoop) -> Iterator[JwksServer]:
    server = JwksServer()
    fake_loop.run(server.start())
    server.add_key("EC", "ES256", "first")
    yield server
    fake_loop.run(server.stop())


def test_key_rotation_at_the_idp_needs_no_restart(
    start_gate: StartGate, own_idp: JwksServer, fake_loop: BackgroundLoop, fake: FakeAnthropic
) -> None:
    running = start_gate(
        profiles=("prod",), security={"jwt": {"jwk-set-uri": own_idp.url, "min-refresh-interval": "100ms"}}
    )
    old = own_idp.mint(kid="first")
    assert post(running, bearer(old)).status_code == 200
    fake_loop.call(lambda: own_idp.add_key("RSA", "RS256", "second"))
    time.sleep(0.15)  # past min-refresh-interval, so the unknown kid may fetch
    assert post(running, bearer(own_idp.mint(kid="second"))).status_code == 200
    # the IdP retires the first key; the next unknown kid refreshes, and the first key's tokens stop working
    fake_loop.call(lambda: own_idp.remove_key("first"))
    fake_loop.call(lambda: own_idp.add_key("OKP", "EdDSA", "third"))
    time.sleep(0.15)
    assert post(running, bearer(own_idp.mint(kid="third"))).status_code == 200
    assert_refused(post(running, bearer(old)), old, says="no key")
    assert len(fake.received) == 3


def test_idp_down_after_start_keeps_serving_known_keys(
    start_gate: StartGate, own_idp: JwksServer, fake_loop: BackgroundLoop, fake: FakeAnthropic
) -> None:
    own_idp.add_key("OKP", "EdDSA", "second")
    running = start_gate(
        profiles=("prod",), security={"jwt": {"jwk-set-uri": own_idp.url, "min-refresh-interval": "100ms"}}
    )
    cached = own_idp.mint(sub="cached", kid="first")
    assert post(running, bearer(cached)).status_code == 200
    fake_loop.call(lambda: own_idp.set_down(True))
    time.sleep(0.15)
    # an unknown kid makes Gate ask the (now failing) IdP, which records the error
    ghost = own_idp.mint(kid="first", headers={"kid": "ghost"})
    assert_refused(post(running, bearer(ghost)), ghost, says="no key")
    health = _wait_for(
        lambda: httpx.get(running.url + "/actuator/health").json(),
        lambda h: h["components"]["jwks"]["details"]["lastError"],
    )
    jwks = health["components"]["jwks"]
    # the keys in hand still verify: the component stays UP and says the refresh is failing
    assert jwks["status"] == "UP" and jwks["details"]["refreshFailing"] is True
    assert "503" in jwks["details"]["lastError"]
    assert jwks["details"]["keys"] == 2
    readiness = httpx.get(running.url + "/actuator/health/readiness")
    assert readiness.status_code == 200 and readiness.json()["status"] == "UP"
    assert readiness.json()["details"]["jwksLoaded"] is True
    # cached and never-seen tokens of known keys still pass
    assert post(running, bearer(cached)).status_code == 200
    assert post(running, bearer(own_idp.mint(sub="fresh", kid="second"))).status_code == 200
    assert len(fake.received) == 3


def _wait_for(fetch: Callable[[], Any], ready: Callable[[Any], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if ready(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


async def test_a_flood_of_unknown_kids_is_refused_with_few_idp_fetches(
    start_gate: StartGate, own_idp: JwksServer, fake: FakeAnthropic
) -> None:
    interval = 2.0
    running = start_gate(
        profiles=("prod",), security={"jwt": {"jwk-set-uri": own_idp.url, "min-refresh-interval": f"{interval}s"}}
    )
    await asyncio.sleep(interval + 0.1)  # past min-refresh-interval: the flood may cost the IdP a fetch, not 500
    own_idp.delay = 0.2  # a slow IdP, so requests pile up behind the one fetch in flight
    before = own_idp.fetch_count
    tokens = [own_idp.mint(sub=f"u{i}", kid="first", headers={"kid": f"ghost-{i}"}) for i in range(500)]

    async def send(session: aiohttp.ClientSession, token: str) -> tuple[int, str]:
        async with session.post("/v1/messages", data=BODY, headers=bearer(token)) as response:
            return response.status, (await response.json())["error"]["message"]

    started = time.monotonic()
    async with aiohttp.ClientSession(
        base_url=running.url,
        connector=aiohttp.TCPConnector(limit=50),  # at most 50 in flight
    ) as session:
        answers = await asyncio.gather(*(send(session, token) for token in tokens))
    elapsed = time.monotonic() - started
    assert [status for status, _ in answers] == [401] * 500
    assert all("no key" in message for _, message in answers)
    fetched = own_idp.fetch_count - before
    # At most one fetch per min-refresh-interval, however many unknown kids arrive (single flight in between).
    assert 1 <= fetched <= 1 + elapsed // interval, (fetched, elapsed)
    assert fetched <= 3, (fetched, elapsed)
    assert fake.received == []


# ---------------------------------------------------------------------------------------------- arbitrary input

_PRINTABLE_LATIN1 = "\t" + "".join(chr(c) for c in range(0x20, 0x7F)) + "".join(chr(c) for c in range(0xA0, 0x100))
# h11 (under httpx) refuses leading and trailing whitespace in a header value: no client can send it
_text = st.text(alphabet=_PRINTABLE_LATIN1, max_size=120).map(lambda s: s.strip(" \t"))
_token_choice = st.sampled_from(["rsa", "ec", "ed25519", "tampered"])
_authorization = st.one_of(
    st.none(),
    _text,
    _text.map(lambda s: f"Bearer {s}"),
    st.tuples(st.sampled_from(["Bearer ", "bearer ", "BEARER\t", "Bearer   ", ""]), _token_choice),
)
_x_api_key = st.one_of(st.none(), _text, st.tuples(st.just(""), _token_choice))


@pytest.fixture(scope="module")
def fuzz_tokens(idp: JwksServer) -> dict[str, str]:
    tokens = {kind: idp.mint(sub=f"fuzz-{kind}", kid=kind, ttl=3600) for kind in KINDS}
    tokens["tampered"] = tamper_signature(tokens["ec"])
    return tokens


@hypothesis_settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(authorization=_authorization, x_api_key=_x_api_key)
def test_any_header_values_give_200_or_401_and_only_valid_tokens_go_upstream(
    gate: RunningGate, fuzz_tokens: dict[str, str], fake: FakeAnthropic, authorization: Any, x_api_key: Any
) -> None:
    tokens = fuzz_tokens

    def render(value: Any) -> str | None:
        if isinstance(value, tuple):
            prefix, choice = value
            return f"{prefix}{tokens[choice]}"
        return value  # type: ignore[no-any-return]

    headers: dict[str, bytes] = {}
    for name, value in (("authorization", render(authorization)), ("x-api-key", render(x_api_key))):
        if value is not None:
            headers[name] = value.strip(" \t").encode("latin-1")  # as any client sends it (h11 insists)
    before = len(fake.received)
    response = post(gate, headers)
    assert response.status_code in {200, 401}, response.text
    went_upstream = len(fake.received) - before
    if response.status_code == 401:
        assert went_upstream == 0
        assert response.json()["error"]["type"] == "authentication_error"
    else:
        assert went_upstream == 1
        valid = {tokens[kind] for kind in KINDS}
        carried = {v.decode("latin-1").split()[-1] for v in headers.values() if v.split()}
        assert carried & valid
        assert not any(token in str(fake.received[-1].headers) for token in valid)


# ---------------------------------------------------------------------------------------------- who called


def test_sub_is_the_event_subject_and_in_the_access_log(
    start_gate: StartGate, idp: JwksServer, fake: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gate.access")
    running = start_gate(profiles=("prod",), security={"jwt": {"jwk-set-uri": idp.url}})
    token = idp.mint(sub="carol@example.com", kid="ed25519")
    assert post(running, bearer(token)).status_code == 200
    event = read_events(Path(running.settings.usage.file.path), 1)[0]
    assert event["subject"] == "carol@example.com"
    lines = [JsonFormatter().format(r) for r in caplog.records if r.name == "gate.access"]
    assert lines, "no access log line"
    access = json.loads(lines[-1])
    assert access["sub"] == "carol@example.com"
    assert token not in "\n".join(lines)
    assert token not in json.dumps(event)


# ---------------------------------------------------------------------------------------------- development auth


def _cli_env(tmp: Path) -> dict[str, str]:
    """A clean environment: no profile, no JWKS, no keys, and HOME/XDG inside the test's directory."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp), "XDG_DATA_HOME": str(tmp / "xdg")}


def test_dev_mode_publishes_its_key_and_accepts_cli_tokens(
    start_gate: StartGate, fake: FakeAnthropic, tmp_path: Path
) -> None:
    running = start_gate()  # profile local, no jwk-set-uri: development auth
    response = httpx.get(running.url + "/.well-known/jwks.json")
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert len(document["keys"]) == 1
    jwk = document["keys"][0]
    assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519" and jwk["alg"] == "EdDSA" and jwk["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & set(jwk)

    config = tmp_path / "dev.yaml"
    config.write_text(
        yaml.safe_dump({"security": {"jwt": {"dev": {"data-dir": running.settings.security.jwt.dev.data_dir}}}})
    )
    done = subprocess.run(
        [str(GATE_BIN), "token", "--config", str(config), "--sub", "alice", "--ttl", "1h"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_cli_env(tmp_path),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.count(".") == 2
    # a different library agrees that the published key signed it, for an hour
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        claims = jose_jwt.decode(token, JoseKeySet.import_key_set(document), algorithms=["EdDSA"]).claims
    assert claims["sub"] == "alice" and 3590 <= claims["exp"] - claims["iat"] <= 3601

    sent: list[httpx2.Request] = []
    message = capturing_client(running, sent, auth_token=token).messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert message.id and len(fake.received) == 1
    assert read_events(Path(running.settings.usage.file.path), 1)[0]["subject"] == "alice"


def test_prod_profile_without_jwks_refuses_to_start(tmp_path: Path, fake: FakeAnthropic) -> None:
    with pytest.raises(ConfigError, match=r"security\.jwt\.jwk-set-uri"):
        gate_settings(tmp_path, fake.url, profiles=("prod",))
    done = subprocess.run(
        [str(GATE_BIN), "serve", "--profile", "prod", "--port", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_cli_env(tmp_path),
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "security.jwt.jwk-set-uri" in done.stderr
    assert "Traceback" not in done.stderr
