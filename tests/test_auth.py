"""Authentication: JWT verification against a real local JWKS endpoint, tokens minted with joserfc."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from gate.identity.auth import Authenticator, AuthError, Identity, JwksError, _max_age, parse_jwks, www_authenticate
from gate.identity.devauth import PRIVATE_KEY_FILE, load_or_create_key_pair, mint_dev_token, resolve_data_dir
from gate.settings import ConfigError, GateSettings, JwtSettings
from tests.jwks import (
    OMIT,
    JwksServer,
    b64url,
    hmac_token,
    tamper_payload,
    tamper_signature,
    unsigned_token,
)

# Key ids of the shared IdP's keys.
RSA = "rsa"
RSA_RS256_ONLY = "rsa-rs256-only"  # its JWK carries "alg": "RS256"
EC256, EC384, EC521 = "ec-p256", "ec-p384", "ec-p521"
ED25519 = "ed25519"
EC_UNPUBLISHED = "ec-unpublished"  # a P-256 key the IdP signs with but does not publish
KNOWN_KIDS = [RSA, RSA_RS256_ONLY, EC256, EC384, EC521, ED25519]


class FakeClock:
    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


def jwt_settings(uri: str | None, **overrides: Any) -> JwtSettings:
    return JwtSettings.model_validate({"jwk_set_uri": uri, **overrides})


@asynccontextmanager
async def running(
    settings: JwtSettings, *, dev_auth: bool = False, clock: Callable[[], float] = time.time
) -> AsyncIterator[Authenticator]:
    auth = Authenticator(settings, dev_auth=dev_auth, clock=clock)
    await auth.start()
    try:
        yield auth
    finally:
        await auth.close()


@pytest_asyncio.fixture(scope="module")
async def idp() -> AsyncIterator[JwksServer]:
    """One IdP with every kind of key, shared by the tests that do not change it."""
    async with JwksServer() as server:
        server.add_key("RSA", "RS256", RSA)
        server.add_key("RSA", "RS256", RSA_RS256_ONLY, jwk_overrides={"alg": "RS256"})
        server.add_key("EC", "ES256", EC256)
        server.add_key("EC", "ES384", EC384)
        server.add_key("EC", "ES512", EC521)
        server.add_key("OKP", "EdDSA", ED25519)
        server.add_key("EC", "ES256", EC_UNPUBLISHED, publish=False)
        yield server


@pytest_asyncio.fixture(scope="module")
async def auth(idp: JwksServer) -> AsyncIterator[Authenticator]:
    async with running(jwt_settings(idp.url)) as authenticator:
        yield authenticator


@pytest_asyncio.fixture
async def own_idp() -> AsyncIterator[JwksServer]:
    """An IdP of its own, for tests that rotate keys, take it down or count its fetches."""
    async with JwksServer() as server:
        server.add_key("EC", "ES256", "first")
        yield server


async def refused(auth: Authenticator, authorization: str | None, x_api_key: str | None = None) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await auth.authenticate(authorization, x_api_key)
    error = caught.value
    for credential in (authorization, x_api_key):
        assert_not_echoed(error, credential)
    return error


def assert_not_echoed(error: AuthError, credential: str | None) -> None:
    """Neither the token nor any sizeable piece of it may appear in what the caller or the logs see."""
    if not credential:
        return
    visible = f"{error.message}\n{error}\n{error!r}\n{www_authenticate(error)}"
    pieces = [credential.strip(), *credential.replace(" ", ".").split(".")]
    for piece in pieces:
        if len(piece) >= 12:
            assert piece not in visible


# ---------------------------------------------------------------------------------------------- accepted


@pytest.mark.parametrize(
    ("kid", "alg"),
    [
        (RSA, "RS256"),
        (RSA, "RS384"),
        (RSA, "RS512"),
        (RSA, "PS256"),
        (RSA, "PS384"),
        (RSA, "PS512"),
        (RSA_RS256_ONLY, "RS256"),
        (EC256, "ES256"),
        (EC384, "ES384"),
        (EC521, "ES512"),
        (ED25519, "EdDSA"),
    ],
)
async def test_every_accepted_algorithm_verifies(
    auth: Authenticator, idp: JwksServer, kid: str, alg: str
) -> None:
    now = time.time()
    token = idp.mint(sub=f"user-{alg}", kid=kid, alg=alg, now=now, ttl=600)
    identity = await auth.authenticate(f"Bearer {token}", None)
    assert identity == Identity(
        sub=f"user-{alg}", expires_at=float(int(now + 600)), issuer=idp.issuer, key_id=kid
    )


@pytest.mark.parametrize(
    "place",
    ["Bearer", "bearer", "BEARER", "x-api-key", "both", "spaces"],
)
async def test_token_is_taken_from_either_header(auth: Authenticator, idp: JwksServer, place: str) -> None:
    token = idp.mint(sub="alice", kid=EC256)
    authorization, x_api_key = {
        "Bearer": (f"Bearer {token}", None),
        "bearer": (f"bearer {token}", None),
        "BEARER": (f"BEARER {token}", None),
        "x-api-key": (None, token),
        "both": (f"Bearer {token}", token),  # Claude Code's apiKeyHelper sends both
        "spaces": (f"  Bearer   {token}  ", f" {token} "),
    }[place]
    identity = await auth.authenticate(authorization, x_api_key)
    assert identity.sub == "alice"


async def test_token_without_kid_uses_the_only_key_of_its_type(own_idp: JwksServer) -> None:
    own_idp.add_key("RSA", "PS256", "rsa-only")
    async with running(jwt_settings(own_idp.url)) as auth:
        token = own_idp.mint(kid="rsa-only", headers={"kid": OMIT})
        assert (await auth.authenticate(f"Bearer {token}", None)).sub == "alice"
        # two EC keys: a token without kid is ambiguous
        own_idp.add_key("EC", "ES256", "second")
        async with running(jwt_settings(own_idp.url)) as auth2:
            ec_token = own_idp.mint(kid="second", headers={"kid": OMIT})
            error = await refused(auth2, f"Bearer {ec_token}")
            assert error.reason == "unknown_key"
            assert "2 EC keys" in error.message


async def test_expiry_and_not_before_allow_the_leeway(auth: Authenticator, idp: JwksServer) -> None:
    now = time.time()
    just_expired = idp.mint(kid=EC256, now=now - 600, exp=now - 30)
    almost_valid = idp.mint(kid=EC256, nbf=now + 30)
    assert (await auth.authenticate(f"Bearer {just_expired}", None)).sub == "alice"
    assert (await auth.authenticate(f"Bearer {almost_valid}", None)).sub == "alice"


async def test_issuer_and_audience_are_not_checked_unless_configured(
    auth: Authenticator, idp: JwksServer
) -> None:
    for token in (
        idp.mint(kid=EC256, iss="https://somebody.else", aud="another-api"),
        idp.mint(kid=EC256, iss=OMIT, aud=["x", "y"]),
    ):
        assert (await auth.authenticate(f"Bearer {token}", None)).sub == "alice"


async def test_issuer_and_audience_are_enforced_when_configured(idp: JwksServer) -> None:
    settings = jwt_settings(idp.url, issuer=idp.issuer, audiences=["gate", "llm-gateway"])
    async with running(settings) as auth:
        good = idp.mint(kid=EC256, aud=["other", "llm-gateway"])
        assert (await auth.authenticate(f"Bearer {good}", None)).issuer == idp.issuer
        cases = {
            "issuer": [
                idp.mint(kid=EC256, iss="https://evil.example", aud="gate"),
                idp.mint(kid=EC256, iss=OMIT, aud="gate"),
            ],
            "audience": [
                idp.mint(kid=EC256, aud="other"),
                idp.mint(kid=EC256),
                idp.mint(kid=EC256, aud=[1, 2]),
            ],
        }
        for reason, tokens in cases.items():
            for token in tokens:
                assert (await refused(auth, f"Bearer {token}")).reason == reason


# ---------------------------------------------------------------------------------------------- refused


def _refusal_cases(idp: JwksServer) -> dict[str, tuple[str, str | None, str | None]]:
    """name -> (reason, authorization, x-api-key)."""
    now = time.time()
    ec = idp.mint(kid=EC256)
    rsa_pem = idp.key(RSA).public_pem()
    claims = {"sub": "mallory", "iss": idp.issuer, "exp": int(now + 300)}
    es256k_header = b64url(json.dumps({"alg": "ES256K", "kid": EC256}))
    return {
        "nothing": ("missing", None, None),
        "empty headers": ("missing", "", "   "),
        "basic scheme": ("malformed", "Basic YWxpY2U6c2VjcmV0c2VjcmV0", None),
        "bearer without token": ("malformed", "Bearer", None),
        "bearer with junk": ("malformed", "Bearer definitely-not-a-jwt-at-all", None),
        "anthropic key": ("malformed", None, "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789"),
        "header not json": ("malformed", "Bearer bm90IGpzb24gYXQgYWxs.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", None),
        "header not object": ("malformed", f"Bearer {b64url('[1,2,3]')}.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", None),
        "non-ascii": ("malformed", f"Bearer {ec[:20]}\u00e9{ec[21:]}", None),
        "kid not string": ("malformed", f"Bearer {idp.mint(kid=EC256, headers={'kid': 7})}", None),
        "payload not json": ("malformed", f"Bearer {idp.sign(b'not json at all', kid=EC256)}", None),
        "exp not a number": ("malformed", f"Bearer {idp.mint(kid=EC256, exp='tomorrow')}", None),
        "exp huge": ("malformed", f"Bearer {idp.mint(kid=EC256, exp=10**400)}", None),
        "expired": ("expired", f"Bearer {idp.mint(kid=EC256, now=now - 3600, exp=now - 120)}", None),
        "not yet valid": ("not_yet_valid", f"Bearer {idp.mint(kid=EC256, nbf=now + 120)}", None),
        "tampered payload": ("signature", f"Bearer {tamper_payload(ec, sub='admin')}", None),
        "tampered signature": ("signature", f"Bearer {tamper_signature(ec)}", None),
        "tampered rsa": ("signature", f"Bearer {tamper_signature(idp.mint(kid=RSA, alg='PS256'))}", None),
        "tampered eddsa": (
            "signature",
            f"Bearer {tamper_payload(idp.mint(kid=ED25519), exp=int(now + 9e6))}",
            None,
        ),
        "signed by another key": (
            "signature",
            f"Bearer {idp.mint(kid=EC_UNPUBLISHED, headers={'kid': EC256})}",
            None,
        ),
        "truncated signature": ("signature", f"Bearer {ec[:-10]}", None),
        "alg none": ("algorithm", f"Bearer {unsigned_token(claims)}", None),
        "alg None with kid": (
            "algorithm",
            f"Bearer {unsigned_token(claims, {'alg': 'None', 'kid': EC256})}",
            None,
        ),
        "alg none signed": ("algorithm", f"Bearer {unsigned_token(claims)}c2ln", None),
        "hs256 with rsa pem": ("algorithm", f"Bearer {hmac_token(rsa_pem, claims, kid=RSA)}", None),
        "hs256 no kid": ("algorithm", f"Bearer {hmac_token(rsa_pem, claims)}", None),
        "hs512": ("algorithm", f"Bearer {hmac_token(b'secret', claims, alg='HS512', kid=RSA)}", None),
        "rs256 against ec key": ("algorithm", f"Bearer {idp.mint(kid=RSA, headers={'kid': EC256})}", None),
        "es384 against p-256 key": (
            "algorithm",
            f"Bearer {idp.mint(kid=EC384, headers={'kid': EC256})}",
            None,
        ),
        "ps256 against rs256-only jwk": (
            "algorithm",
            f"Bearer {idp.mint(kid=RSA_RS256_ONLY, alg='PS256')}",
            None,
        ),
        "eddsa against rsa key": ("algorithm", f"Bearer {idp.mint(kid=ED25519, headers={'kid': RSA})}", None),
        "unknown algorithm": ("algorithm", f"Bearer {es256k_header}.e30.c2ln", None),
        "unknown kid": ("unknown_key", f"Bearer {idp.mint(kid=EC256, headers={'kid': 'no-such-key'})}", None),
        "no sub": ("missing_sub", f"Bearer {idp.mint(OMIT, kid=EC256)}", None),
        "empty sub": ("missing_sub", f"Bearer {idp.mint('  ', kid=EC256)}", None),
        "sub not a string": ("missing_sub", f"Bearer {idp.mint(12345, kid=EC256)}", None),
        "conflicting": ("conflicting_credentials", f"Bearer {ec}", idp.mint("bob", kid=EC256)),
        "conflicting junk": (
            "conflicting_credentials",
            f"Bearer {ec}",
            "sk-ant-api03-something-else-entirely",
        ),
        "oversized authorization": ("too_long", "Bearer " + "a" * 40_000, None),
        "oversized x-api-key": ("too_long", None, "eyJ" * 10_000),
        "oversized token": ("too_long", "Bearer " + "a" * (16 * 1024 + 1), None),
    }


async def test_refusals_carry_the_right_reason_and_never_the_token(
    auth: Authenticator, idp: JwksServer
) -> None:
    failures = []
    for name, (reason, authorization, x_api_key) in _refusal_cases(idp).items():
        error = await refused(auth, authorization, x_api_key)
        if error.reason != reason:
            failures.append(f"{name}: expected {reason}, got {error.reason} ({error.message})")
        assert error.message
    assert not failures, "\n".join(failures)


async def test_refused_token_is_not_cached(auth: Authenticator, idp: JwksServer) -> None:
    token = idp.mint(kid=EC256, nbf=time.time() + 3600)
    for _ in range(3):
        assert (await refused(auth, f"Bearer {token}")).reason == "not_yet_valid"


def test_www_authenticate_follows_rfc_6750() -> None:
    assert www_authenticate(AuthError("missing", "no credentials")) == "Bearer"
    value = www_authenticate(AuthError("expired", 'the "token" expired \\ at caf\u00e9\ntime'))
    assert value == 'Bearer error="invalid_token", error_description="the \'token\' expired / at caf? time"'
    described = value.split("error_description=", 1)[1].strip('"')
    assert all(c in {" ", "!"} or "#" <= c <= "[" or "]" <= c <= "~" for c in described)


# ---------------------------------------------------------------------------------------------- the JWKS


async def test_key_rotation_at_the_idp_is_picked_up_without_restart(own_idp: JwksServer) -> None:
    async with running(jwt_settings(own_idp.url, min_refresh_interval=0)) as auth:
        old_token = own_idp.mint(kid="first")
        assert (await auth.authenticate(f"Bearer {old_token}", None)).key_id == "first"
        fetches = own_idp.fetch_count

        own_idp.add_key("OKP", "EdDSA", "second")
        new_token = own_idp.mint(kid="second")
        assert (await auth.authenticate(f"Bearer {new_token}", None)).key_id == "second"
        assert own_idp.fetch_count == fetches + 1  # one refresh, for the unknown kid

        # the old key is retired: its tokens, cached or not, stop working once Gate has seen the new JWKS
        own_idp.remove_key("first")
        own_idp.add_key("EC", "ES256", "third")
        assert (await auth.authenticate(f"Bearer {own_idp.mint(kid='third')}", None)).key_id == "third"
        assert (await refused(auth, f"Bearer {old_token}")).reason == "unknown_key"
        assert auth.health()["details"]["keys"] == 2  # type: ignore[index]


async def test_idp_down_after_start_keeps_the_keys_and_says_so(own_idp: JwksServer) -> None:
    refreshes: list[bool] = []
    async with running(jwt_settings(own_idp.url, min_refresh_interval=0)) as auth:
        auth.on_refresh = refreshes.append
        assert auth.health()["status"] == "UP"
        own_idp.set_down(True)
        # an unknown kid makes Gate try the IdP, which fails
        assert (
            await refused(auth, f"Bearer {own_idp.mint(kid='first', headers={'kid': 'new'})}")
        ).reason == ("unknown_key")
        health = auth.health()
        assert health["status"] == "UP"  # the key in hand still verifies
        details: dict[str, Any] = health["details"]  # type: ignore[assignment]
        assert details["refreshFailing"] is True
        assert details["keys"] == 1
        assert "503" in details["lastError"]
        assert details["source"] == own_idp.url
        assert refreshes == [False]
        # tokens signed by known keys still pass, whether cached or new
        fresh = own_idp.mint("carol", kid="first")
        assert (await auth.authenticate(f"Bearer {fresh}", None)).sub == "carol"

        # gone entirely (connection refused), then back
        await own_idp.stop()
        await refused(auth, f"Bearer {own_idp.mint(kid='first', headers={'kid': 'newer'})}")
        assert "cannot fetch" in str(auth.health()["details"]["lastError"])  # type: ignore[index]
        own_idp.set_down(False)
        await own_idp.start()
        await refused(auth, f"Bearer {own_idp.mint(kid='first', headers={'kid': 'newest'})}")
        assert auth.health()["status"] == "UP"
        assert auth.health()["details"]["lastError"] is None  # type: ignore[index]
        # (the background retry, 1 s after a failure, may add reports in between on a slow machine)
        assert refreshes[:2] == [False, False] and refreshes[-1] is True


async def test_start_without_idp_refuses_with_jwks_unavailable_then_recovers(own_idp: JwksServer) -> None:
    own_idp.set_down(True)
    auth = Authenticator(jwt_settings(own_idp.url, min_refresh_interval=0), dev_auth=False)
    auth._remote.START_RETRY_PAUSES = (0.01,)  # type: ignore[union-attr]
    await auth.start()
    try:
        assert own_idp.fetch_count == 2  # the first try and one brief retry
        assert auth.health()["status"] == "DOWN"
        assert auth.health()["details"]["keys"] == 0  # type: ignore[index]
        token = own_idp.mint(kid="first")
        assert (await refused(auth, f"Bearer {token}")).reason == "jwks_unavailable"
        own_idp.set_down(False)
        assert (await auth.authenticate(f"Bearer {token}", None)).sub == "alice"
        assert auth.health()["status"] == "UP"
    finally:
        await auth.close()


async def test_a_flood_of_unknown_kids_costs_the_idp_one_fetch(own_idp: JwksServer) -> None:
    async with running(jwt_settings(own_idp.url, min_refresh_interval=30)) as auth:
        auth._remote._last_attempt = float("-inf")  # type: ignore[union-attr]  # as if start-up was long ago
        before = own_idp.fetch_count
        own_idp.delay = 0.2  # the single refresh is still in flight while the flood arrives
        valid = own_idp.mint("valid", kid="first")
        forged = [own_idp.mint(kid="first", headers={"kid": f"forged-{i}"}) for i in range(1_000)]
        results = await asyncio.gather(
            *(auth.authenticate(f"Bearer {token}", None) for token in forged),
            auth.authenticate(f"Bearer {valid}", None),
            return_exceptions=True,
        )
        assert isinstance(results[-1], Identity)
        assert all(isinstance(r, AuthError) and r.reason == "unknown_key" for r in results[:-1])
        assert own_idp.fetch_count - before == 1
        # a second wave right after: rate-limited, no fetch at all
        results = await asyncio.gather(
            *(auth.authenticate(f"Bearer {token}", None) for token in forged[:200]), return_exceptions=True
        )
        assert all(isinstance(r, AuthError) for r in results)
        assert own_idp.fetch_count - before == 1


async def test_background_refresh_honours_cache_control_max_age() -> None:
    async with JwksServer() as short, JwksServer() as plain:
        short.add_key("EC", "ES256", "k")
        plain.add_key("EC", "ES256", "k")
        short.cache_control = "public, max-age=1, must-revalidate"
        async with (
            running(jwt_settings(short.url, refresh="5m", min_refresh_interval="10ms")),
            running(jwt_settings(plain.url, refresh="5m", min_refresh_interval="10ms")),
        ):
            assert short.fetch_count == plain.fetch_count == 1
            for _ in range(100):  # polling, generously: max-age=1 means a refresh about every second
                if short.fetch_count >= 3:
                    break
                await asyncio.sleep(0.1)
            assert short.fetch_count >= 3
            assert plain.fetch_count == 1  # refresh: 5m and no max-age


def test_max_age_parsing() -> None:
    assert _max_age(None) is None
    assert _max_age("no-cache") is None
    assert _max_age("public, max-age=120") == 120
    assert _max_age('MAX-AGE="30", private') == 30
    assert _max_age("s-maxage=5") is None


async def test_jwks_parsing_skips_unusable_keys(
    own_idp: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    own_idp.add_key("RSA", "RS256", "weak", size=1024)
    own_idp.add_key("RSA", "RS256", "encryption", jwk_overrides={"use": "enc"})
    own_idp.add_key("RSA", "RS256", "oaep", jwk_overrides={"alg": "RSA-OAEP"})
    own_idp.add_key("EC", "ES256", "ops", jwk_overrides={"key_ops": ["encrypt"]})
    own_idp.add_key("EC", "ES256", "mislabelled", jwk_overrides={"alg": "ES384"})
    own_idp.add_key("OKP", "EdDSA", "x25519", curve="X25519")
    own_idp.extra_entries += [
        "not an object",
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA", "kid": "k1"},
        {"kty": "RSA", "n": "abc", "kid": "no-exponent"},
        {"kty": "RSA", "n": 5, "e": [], "kid": "wrong-types"},
        {"kty": "PQC", "kid": "future"},
        {"kid": 42, "kty": "EC"},
        {**own_idp.key("first").public_jwk(), "d": "c2VjcmV0"},  # private material, and a repeated kid
        own_idp.key("first").public_jwk(),  # repeated kid
    ]
    with caplog.at_level("WARNING", logger="gate.auth"):
        async with running(jwt_settings(own_idp.url)) as auth:
            assert auth.health()["details"]["keys"] == 1  # type: ignore[index]
            assert (await auth.authenticate(f"Bearer {own_idp.mint(kid='first')}", None)).sub == "alice"
            for kid in ("weak", "encryption", "oaep", "ops", "mislabelled"):
                token = own_idp.mint(kid=kid)
                assert (await refused(auth, f"Bearer {token}")).reason == "unknown_key"
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 15


def test_parse_jwks_refuses_documents_without_usable_keys() -> None:
    for document in (
        b"<html>",
        b"[]",
        b'{"keys": {}}',
        b'{"keys": []}',
        b'{"keys": [{"kty": "oct", "k": "AA"}]}',
    ):
        with pytest.raises(JwksError):
            parse_jwks(document)


async def test_idp_serving_junk_leaves_health_down(own_idp: JwksServer) -> None:
    own_idp.raw_document = b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'
    auth = Authenticator(jwt_settings(own_idp.url), dev_auth=False)
    auth._remote.START_RETRY_PAUSES = ()  # type: ignore[union-attr]
    await auth.start()
    try:
        health = auth.health()
        assert health["status"] == "DOWN"
        assert "no usable signing key" in str(health["details"]["lastError"])  # type: ignore[index]
        assert (await refused(auth, f"Bearer {own_idp.mint(kid='first')}")).reason == "jwks_unavailable"
    finally:
        await auth.close()


async def test_health_reports_the_source_without_credentials(own_idp: JwksServer) -> None:
    uri = own_idp.url.replace("http://", "http://user:s3cr3t@") + "?token=abc"
    clock = FakeClock()
    async with running(jwt_settings(uri), clock=clock) as auth:
        clock.now += 42
        health = auth.health()
        details: dict[str, Any] = health["details"]  # type: ignore[assignment]
        assert health["status"] == "UP"
        # gate.ops.redact's rule: user info and secret query values masked, host and path kept
        assert details["source"] == own_idp.url.replace("http://", "http://***@") + "?token=***"
        assert details["ageSeconds"] == 42.0
        assert details["lastRefresh"].endswith("Z")
        assert details["lastError"] is None


async def test_a_token_without_exp_is_refused_unless_require_exp_is_off(idp: JwksServer) -> None:
    token = idp.mint(kid=EC256, exp=OMIT)
    async with running(jwt_settings(idp.url)) as auth:
        error = await refused(auth, f"Bearer {token}")
        assert error.reason == "missing_exp" and "exp" in error.message
        assert 'error="invalid_token"' in www_authenticate(error)
        assert (await auth.authenticate(f"Bearer {idp.mint(kid=EC256)}", None)).expires_at is not None
    async with running(jwt_settings(idp.url, require_exp=False)) as auth:
        identity = await auth.authenticate(f"Bearer {token}", None)
        assert identity.sub == "alice" and identity.expires_at is None


async def test_a_failing_refresh_hook_does_not_break_refresh(own_idp: JwksServer) -> None:
    def broken(ok: bool) -> None:
        raise RuntimeError("metrics are down")

    async with running(jwt_settings(own_idp.url, min_refresh_interval=0)) as auth:
        auth.on_refresh = broken
        own_idp.add_key("EC", "ES256", "later")
        assert (await auth.authenticate(f"Bearer {own_idp.mint(kid='later')}", None)).key_id == "later"


# ---------------------------------------------------------------------------------------------- the cache


async def test_verified_token_is_served_from_the_cache_until_exp(own_idp: JwksServer) -> None:
    clock = FakeClock()
    async with running(jwt_settings(own_idp.url), clock=clock) as auth:
        token = own_idp.mint(kid="first", now=clock.now, exp=clock.now + 100)
        for _ in range(5):
            assert (await auth.authenticate(f"Bearer {token}", token)).sub == "alice"
        assert (auth.verifications, auth.cache_hits) == (1, 4)

        # the cached path finishes without suspending: one step of the coroutine returns the identity
        step = auth.authenticate(None, token)
        with pytest.raises(StopIteration) as done:
            step.send(None)
        assert done.value.value.sub == "alice"

        clock.now += 99.5
        await auth.authenticate(f"Bearer {token}", None)
        assert (auth.verifications, auth.cache_hits) == (1, 6)

        clock.now += 1  # past exp: never from the cache; verified again, and accepted within the leeway
        await auth.authenticate(f"Bearer {token}", None)
        assert auth.verifications == 2
        await auth.authenticate(f"Bearer {token}", None)
        assert auth.verifications == 3

        clock.now += 60
        assert (await refused(auth, f"Bearer {token}")).reason == "expired"
        assert auth.cache_hits == 6


async def test_cache_size_zero_verifies_every_time(own_idp: JwksServer) -> None:
    async with running(jwt_settings(own_idp.url, cache_size=0)) as auth:
        token = own_idp.mint(kid="first")
        for _ in range(3):
            await auth.authenticate(f"Bearer {token}", None)
        assert (auth.verifications, auth.cache_hits) == (3, 0)


# ---------------------------------------------------------------------------------------------- any input

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)
_algorithms = st.sampled_from(
    ["RS256", "PS512", "ES256", "ES384", "ES512", "EdDSA", "HS256", "none", "NONE", "ES256K", ""]
)
_headers = st.fixed_dictionaries(
    {"alg": _algorithms | _json_values},
    optional={
        "kid": st.sampled_from(KNOWN_KIDS) | _json_values,
        "crit": _json_values,
        "b64": st.booleans(),
        "typ": _json_values,
        "jku": st.just("http://127.0.0.1:1/jwks.json"),
    },
)
_claim_names = st.sampled_from(["sub", "exp", "nbf", "iat", "iss", "aud", "jti"]) | st.text(max_size=4)
_payloads = st.dictionaries(_claim_names, _json_values, max_size=6)
_plausible_tokens = st.builds(
    lambda header, payload, signature: ".".join(
        (b64url(json.dumps(header)), b64url(json.dumps(payload)), b64url(signature))
    ),
    _headers,
    _payloads | _json_values,
    st.binary(max_size=600),
)
_header_values = (
    st.none()
    | st.text()
    | st.binary().map(lambda raw: raw.decode("latin-1"))
    | st.text().map(lambda text: f"Bearer {text}")
    | _plausible_tokens
    | _plausible_tokens.map(lambda token: f"bearer {token}")
)


@hypothesis_settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(authorization=_header_values, x_api_key=_header_values)
async def test_any_header_values_give_identity_or_auth_error(
    auth: Authenticator, authorization: str | None, x_api_key: str | None
) -> None:
    try:
        result = await auth.authenticate(authorization, x_api_key)
    except AuthError as error:
        assert_not_echoed(error, authorization)
        assert_not_echoed(error, x_api_key)
        www_authenticate(error)
    else:
        assert isinstance(result, Identity)


@hypothesis_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=_payloads.map(lambda claims: json.dumps(claims).encode())
    | _json_values.map(lambda value: json.dumps(value).encode())
    | st.binary(max_size=64),
    kid=st.sampled_from([EC256, ED25519]),
)
async def test_any_signed_payload_gives_identity_or_auth_error(
    auth: Authenticator, idp: JwksServer, payload: bytes, kid: str
) -> None:
    token = idp.sign(payload, kid=kid)
    try:
        identity = await auth.authenticate(f"Bearer {token}", None)
    except AuthError as error:
        assert error.reason in {"malformed", "expired", "missing_exp", "not_yet_valid", "missing_sub"}
    else:
        assert isinstance(identity.sub, str) and identity.sub.strip()


# ---------------------------------------------------------------------------------------------- development


def dev_settings(data_dir: Path, **jwt: Any) -> GateSettings:
    return GateSettings.model_validate(
        {"profiles": ("local",), "security": {"jwt": {"dev": {"data-dir": str(data_dir)}, **jwt}}}
    )


async def test_dev_mode_makes_a_private_key_pair_and_reuses_it(tmp_path: Path) -> None:
    settings = dev_settings(tmp_path / "share" / "gate")
    assert settings.dev_auth
    data_dir = tmp_path / "share" / "gate"
    async with running(settings.security.jwt, dev_auth=True) as auth:
        key_file = data_dir / PRIVATE_KEY_FILE
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key_bytes = key_file.read_bytes()
        document = auth.jwks_document()
        assert document is not None
        jwks = json.loads(document)
        (jwk,) = jwks["keys"]
        assert (
            jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519" and jwk["alg"] == "EdDSA" and jwk["use"] == "sig"
        )
        assert set(jwk) == {"kty", "crv", "x", "kid", "use", "alg"}  # the public key only
        health = auth.health()
        assert health["status"] == "UP"
        assert health["details"]["source"] == "development"  # type: ignore[index]
        token = mint_dev_token(settings, "alice", 3600)
        identity = await auth.authenticate(f"Bearer {token}", None)
        assert (identity.sub, identity.issuer, identity.key_id) == ("alice", "gate-dev", jwk["kid"])

    async with running(settings.security.jwt, dev_auth=True) as again:
        assert key_file.read_bytes() == key_bytes
        assert json.loads(again.jwks_document() or b"") == jwks
        assert (await again.authenticate(None, token)).sub == "alice"


async def test_dev_mode_refuses_foreign_and_expired_tokens(tmp_path: Path, idp: JwksServer) -> None:
    settings = dev_settings(tmp_path, audiences=["gate"])
    async with running(settings.security.jwt, dev_auth=True) as auth:
        token = mint_dev_token(settings, "bob", 60, now=time.time() - 3600)
        assert (await refused(auth, f"Bearer {token}")).reason == "expired"
        assert (await refused(auth, f"Bearer {idp.mint(kid=EC256, aud='gate')}")).reason == "unknown_key"
        assert (await auth.authenticate(None, mint_dev_token(settings, "bob", 60))).sub == "bob"


async def test_dev_mode_logs_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="gate.auth"):
        async with running(dev_settings(tmp_path).security.jwt, dev_auth=True):
            pass
    assert any("DEVELOPMENT AUTH IS ON" in r.getMessage() for r in caplog.records)


def test_dev_key_creation_ignores_the_umask_and_survives_a_race(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        data_dir = tmp_path / "race"
        with ThreadPoolExecutor(4) as pool:
            pairs = list(pool.map(lambda _: load_or_create_key_pair(data_dir), range(8)))
    finally:
        os.umask(old)
    assert len({pair.kid for pair in pairs}) == 1
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / PRIVATE_KEY_FILE).stat().st_mode) == 0o600
    assert sorted(p.name for p in data_dir.iterdir()) == [PRIVATE_KEY_FILE]  # no temp files left


def test_dev_key_file_with_loose_permissions_is_narrowed(tmp_path: Path) -> None:
    pair = load_or_create_key_pair(tmp_path)
    os.chmod(pair.path, 0o644)
    assert load_or_create_key_pair(tmp_path).kid == pair.kid
    assert stat.S_IMODE(pair.path.stat().st_mode) == 0o600


def test_dev_key_file_that_is_not_a_key_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / PRIVATE_KEY_FILE).write_text("garbage")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        load_or_create_key_pair(tmp_path)


def test_dev_data_dir_default_follows_xdg() -> None:
    default = GateSettings().security.jwt.dev.data_dir
    assert resolve_data_dir(default, {"XDG_DATA_HOME": "/srv/data"}) == Path("/srv/data/gate")
    assert resolve_data_dir(default, {"XDG_DATA_HOME": ""}) == Path("~/.local/share/gate").expanduser()
    assert resolve_data_dir("/plain/dir", {}) == Path("/plain/dir")


def test_dev_tokens_only_with_dev_auth(tmp_path: Path) -> None:
    settings = GateSettings.model_validate(
        {"profiles": ("prod",), "security": {"jwt": {"jwk-set-uri": "https://idp.example/jwks.json"}}}
    )
    with pytest.raises(ConfigError):
        mint_dev_token(settings, "alice", 60)
    with pytest.raises(ValueError):
        mint_dev_token(dev_settings(tmp_path), " ", 60)


def test_authenticator_refuses_contradictory_settings() -> None:
    with pytest.raises(ValueError):
        Authenticator(jwt_settings("https://idp.example/jwks.json"), dev_auth=True)
    with pytest.raises(ValueError):
        Authenticator(jwt_settings(None), dev_auth=False)
