"""The relying-party side against a scripted IdP: id_tokens verified by Gate's JWKS verifier (signature, iss, aud,
exp), then the nonce and, on refresh, the subject; the token endpoint's refusals and failures told apart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from gate.identity.signin.idp import IdentityProvider, IdpError, IdpRefused
from gate.settings import IdentityProviderSettings
from tests.jwks import JwksServer, tamper_payload, tamper_signature


class ScriptedIdp:
    """Discovery and a token endpoint whose next answer the test sets; the JWKS is a ``JwksServer``."""

    def __init__(self) -> None:
        self.reply: tuple[int, dict[str, Any]] = (200, {})
        self.forms: list[dict[str, str]] = []
        self.headers: list[dict[str, str]] = []
        self.base = ""
        self.jwks: JwksServer | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self.jwks = JwksServer(issuer=self.base)
        await self.jwks.start()
        self.jwks.add_key("RSA", "RS256", "rsa")

    async def stop(self) -> None:
        assert self.jwks is not None
        await self.jwks.stop()
        await self._runner.cleanup()

    async def _discovery(self, request: web.Request) -> web.Response:
        assert self.jwks is not None
        return web.json_response(
            {
                "issuer": self.base,
                "authorization_endpoint": f"{self.base}/authorize",
                "token_endpoint": f"{self.base}/token",
                "jwks_uri": self.jwks.url,
            }
        )

    async def _token(self, request: web.Request) -> web.Response:
        self.forms.append(dict(await request.post()))  # type: ignore[arg-type]
        self.headers.append(dict(request.headers))
        status, body = self.reply
        return web.json_response(body, status=status)

    def id_token(self, **kwargs: Any) -> str:
        assert self.jwks is not None
        claims = {"nonce": "n-1", "email": "alice@example.com", "groups": ["eng"], "email_verified": True}
        claims.update(kwargs.pop("claims", {}))
        return self.jwks.mint(kwargs.pop("sub", "alice"), aud=kwargs.pop("aud", "gate"), claims=claims, **kwargs)


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedIdp]:
    idp = ScriptedIdp()
    await idp.start()
    yield idp
    await idp.stop()


@pytest.fixture
async def provider(scripted: ScriptedIdp) -> AsyncIterator[IdentityProvider]:
    settings = IdentityProviderSettings(issuer=scripted.base, client_id="gate", client_secret="s:cret")  # type: ignore[arg-type]
    rp = IdentityProvider(settings, redirect_uri="http://127.0.0.1:1/oauth/callback", leeway=5)
    await rp.start()
    yield rp
    await rp.close()


async def test_a_good_id_token_names_the_user(scripted: ScriptedIdp, provider: IdentityProvider) -> None:
    scripted.reply = (200, {"id_token": scripted.id_token(), "refresh_token": "idp-rt", "access_token": "at"})
    user = await provider.exchange("code-1", "verifier-1", "n-1")
    assert (user.sub, user.email, user.groups, user.email_verified) == ("alice", "alice@example.com", {"eng"}, True)
    assert user.refresh_token == "idp-rt"
    form = scripted.forms[-1]
    assert form["grant_type"] == "authorization_code" and form["code_verifier"] == "verifier-1"
    assert form["redirect_uri"] == "http://127.0.0.1:1/oauth/callback" and "client_secret" not in form
    assert scripted.headers[-1]["Authorization"] == "Basic Z2F0ZTpzJTNBY3JldA=="  # form-encoded, then Basic


@pytest.mark.parametrize(
    ("token_kwargs", "reason"),
    [
        ({"ttl": -3600}, "expired"),
        ({"aud": "someone-else"}, "not meant for"),
        ({"iss": "https://elsewhere.example"}, "not issued by"),
        ({"claims": {"nonce": "n-other"}}, "nonce"),
        ({"claims": {"nonce": None}}, "nonce"),
    ],
)
async def test_bad_id_tokens_are_refused(
    scripted: ScriptedIdp, provider: IdentityProvider, token_kwargs: dict[str, Any], reason: str
) -> None:
    scripted.reply = (200, {"id_token": scripted.id_token(**token_kwargs)})
    with pytest.raises(IdpRefused, match=reason):
        await provider.exchange("code", "verifier", "n-1")


async def test_forged_id_tokens_are_refused(scripted: ScriptedIdp, provider: IdentityProvider) -> None:
    for forged in (tamper_signature(scripted.id_token()), tamper_payload(scripted.id_token(), sub="mallory")):
        scripted.reply = (200, {"id_token": forged})
        with pytest.raises(IdpRefused, match="signature"):
            await provider.exchange("code", "verifier", "n-1")
    scripted.reply = (200, {"access_token": "no id_token"})
    with pytest.raises(IdpRefused, match="no id_token"):
        await provider.exchange("code", "verifier", "n-1")


async def test_refresh_outcomes(scripted: ScriptedIdp, provider: IdentityProvider) -> None:
    scripted.reply = (200, {"id_token": scripted.id_token(claims={"nonce": None}), "refresh_token": "rt-2"})
    fresh = await provider.refresh("rt-1", "alice")
    assert fresh is not None and fresh.refresh_token == "rt-2" and scripted.forms[-1]["refresh_token"] == "rt-1"
    scripted.reply = (200, {"id_token": scripted.id_token(sub="bob", claims={"nonce": None})})
    with pytest.raises(IdpRefused, match="another subject"):
        await provider.refresh("rt-1", "alice")
    scripted.reply = (400, {"error": "invalid_grant"})
    with pytest.raises(IdpRefused, match="invalid_grant"):
        await provider.refresh("rt-1", "alice")
    scripted.reply = (500, {"error": "server_error"})
    with pytest.raises(IdpError, match="HTTP 500"):
        await provider.refresh("rt-1", "alice")
    scripted.reply = (200, {"access_token": "only"})
    assert await provider.refresh("rt-1", "alice") is None


async def test_authorization_request(scripted: ScriptedIdp, provider: IdentityProvider) -> None:
    url = await provider.authorization_url(state="st", nonce="nn", challenge="ch")
    assert url.startswith(f"{scripted.base}/authorize?response_type=code&client_id=gate&")
    for part in ("state=st", "nonce=nn", "code_challenge=ch", "code_challenge_method=S256", "scope=openid+profile"):
        assert part in url
    assert provider.origin == scripted.base


async def test_unreachable_idp_is_temporary() -> None:
    settings = IdentityProviderSettings(issuer="http://127.0.0.1:1", client_id="gate")
    rp = IdentityProvider(settings, redirect_uri="http://127.0.0.1:2/oauth/callback", leeway=5)
    await rp.start()  # logs, does not fail: the IdP may come up later
    with pytest.raises(IdpError, match="unreachable"):
        await rp.authorization_url(state="s", nonce="n", challenge="c")
    await rp.close()
