"""The company IdP, as an OpenID Connect relying party: discovery, the authorization request (code flow with PKCE
S256 and a nonce), the code exchange and the refresh grant at its token endpoint, and the id_token verified by
Gate's own JWKS verifier (``gate.identity.auth.Authenticator``: signature, ``iss``, ``aud``, ``exp``), then the
nonce here. Claims the id_token lacks (some IdPs put e-mail and groups only in userinfo) are read from userinfo.

Written on aiohttp rather than taken from an OIDC client library because Gate already owns the hard part (JWKS
fetching and JWT verification with algorithm pinning) and the rest is three form posts.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jwt
import orjson

from gate.identity.auth import Authenticator, AuthError, Identity
from gate.settings import IdentityProviderSettings, JwtSettings

__all__ = ["IdentityProvider", "IdpError", "IdpRefused", "SignedInUser", "pkce_pair"]

log = logging.getLogger(__name__)


class IdpError(Exception):
    """The IdP could not be reached or answered nonsense: retry later (503 / temporarily_unavailable)."""


class IdpRefused(Exception):
    """The IdP (or its id_token) says no: a bad code, a revoked refresh token, a failed check."""


@dataclass(frozen=True, slots=True)
class SignedInUser:
    sub: str
    email: str | None
    name: str | None
    groups: frozenset[str]
    email_verified: bool | None
    refresh_token: str | None = field(default=None, repr=False)


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge) per RFC 7636."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


class IdentityProvider:
    def __init__(self, settings: IdentityProviderSettings, *, redirect_uri: str, leeway: float) -> None:
        assert settings.issuer is not None
        self.issuer = settings.issuer.rstrip("/")
        self._settings = settings
        self._redirect_uri = redirect_uri
        self._leeway = leeway
        self._session: aiohttp.ClientSession | None = None
        self._metadata: dict[str, Any] | None = None
        self._verifier: Authenticator | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout), trust_env=True
        )
        try:
            await self._discover()
        except IdpError as exc:  # the IdP may come up after Gate: the first sign-in tries again
            log.error("sign-in: IdP discovery at %s failed (%s); retrying on the first sign-in", self.issuer, exc)

    async def close(self) -> None:
        if self._verifier is not None:
            await self._verifier.close()
        if self._session is not None:
            await self._session.close()

    @property
    def origin(self) -> str | None:
        """The authorization endpoint's origin (for the verification page's CSP ``form-action``)."""
        if self._metadata is None:
            return None
        endpoint = str(self._metadata["authorization_endpoint"])
        scheme, _, rest = endpoint.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}"

    async def _discover(self) -> dict[str, Any]:
        async with self._lock:
            if self._metadata is not None:
                return self._metadata
            metadata = await self._get_json(f"{self.issuer}/.well-known/openid-configuration")
            if str(metadata.get("issuer", "")).rstrip("/") != self.issuer:
                raise IdpError("the discovery document names another issuer")
            for member in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(metadata.get(member), str):
                    raise IdpError(f"the discovery document has no {member}")
            verifier = Authenticator(
                JwtSettings(
                    jwk_set_uri=metadata["jwks_uri"],
                    issuer=metadata["issuer"],
                    audiences=[self._settings.client_id],
                    cache_size=0,
                    leeway=self._leeway,
                    claims=self._settings.claims,
                ),
                dev_auth=False,
            )
            await verifier.start()
            self._verifier = verifier
            self._metadata = metadata
            log.info("sign-in: IdP %s discovered", self.issuer)
            return metadata

    async def authorization_url(self, *, state: str, nonce: str, challenge: str) -> str:
        metadata = await self._discover()
        params = {
            "response_type": "code",
            "client_id": self._settings.client_id,
            "redirect_uri": self._redirect_uri,
            "scope": " ".join(self._settings.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "response_mode": "query",
        }
        if self._settings.prompt:
            params["prompt"] = self._settings.prompt
        endpoint = str(metadata["authorization_endpoint"])
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{urlencode(params)}"

    async def exchange(self, code: str, verifier: str, nonce: str) -> SignedInUser:
        """The code exchanged for tokens; the id_token verified (nonce included); the user it names."""
        tokens = await self._token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self._redirect_uri,
                "code_verifier": verifier,
            }
        )
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise IdpRefused("the IdP returned no id_token")
        return await self._user(id_token, tokens, nonce=nonce, expected_sub=None)

    async def refresh(self, refresh_token: str, sub: str) -> SignedInUser | None:
        """Refresh at the IdP. The user as the IdP now describes them (None: its answer carried no claims)."""
        tokens = await self._token_request({"grant_type": "refresh_token", "refresh_token": refresh_token})
        id_token = tokens.get("id_token")
        if isinstance(id_token, str):
            return await self._user(id_token, tokens, nonce=None, expected_sub=sub)
        new_refresh = tokens.get("refresh_token")
        if isinstance(new_refresh, str):
            return SignedInUser(sub, None, None, frozenset(), None, refresh_token=new_refresh)
        return None

    async def _user(
        self, id_token: str, tokens: Mapping[str, Any], *, nonce: str | None, expected_sub: str | None
    ) -> SignedInUser:
        assert self._verifier is not None
        try:
            identity = await self._verifier.authenticate(f"Bearer {id_token}", None)
        except AuthError as exc:
            raise IdpRefused(f"the id_token was refused: {exc.message}") from None
        # Verified above; read again only for the members Identity does not carry.
        payload = jwt.decode(id_token, options={"verify_signature": False})
        if nonce is not None and not (
            isinstance(payload.get("nonce"), str) and secrets.compare_digest(payload["nonce"], nonce)
        ):
            raise IdpRefused("the id_token's nonce does not match this sign-in")
        if expected_sub is not None and identity.sub != expected_sub:
            raise IdpRefused("the refreshed id_token names another subject")
        claims = self._settings.claims
        access_token = tokens.get("access_token")
        if (identity.email is None or claims.groups not in payload) and isinstance(access_token, str):
            userinfo = await self._userinfo(access_token)
            if userinfo.get("sub") == identity.sub:
                payload = {**userinfo, **{k: v for k, v in payload.items() if k in (claims.email, claims.groups) and v}}
                identity = _with_claims(identity, payload, claims.email, claims.name, claims.groups)
        verified = payload.get("email_verified")
        refresh = tokens.get("refresh_token")
        return SignedInUser(
            sub=identity.sub,
            email=identity.email,
            name=identity.name,
            groups=identity.groups,
            email_verified=verified if isinstance(verified, bool) else None,
            refresh_token=refresh if isinstance(refresh, str) else None,
        )

    async def _userinfo(self, access_token: str) -> dict[str, Any]:
        metadata = await self._discover()
        endpoint = metadata.get("userinfo_endpoint")
        if not isinstance(endpoint, str):
            return {}
        try:
            return await self._get_json(endpoint, headers={"Authorization": f"Bearer {access_token}"})
        except IdpError as exc:
            log.warning("sign-in: userinfo failed (%s); using the id_token's claims only", exc)
            return {}

    async def _token_request(self, form: dict[str, str]) -> dict[str, Any]:
        metadata = await self._discover()
        settings = self._settings
        secret = settings.client_secret.get_secret_value()
        headers = {"Accept": "application/json"}
        if settings.auth_method == "client_secret_basic" and secret:
            pair = f"{_form_escape(settings.client_id)}:{_form_escape(secret)}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        else:
            form = {**form, "client_id": settings.client_id}
            if secret:
                form["client_secret"] = secret
        assert self._session is not None
        try:
            async with self._session.post(str(metadata["token_endpoint"]), data=form, headers=headers) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise IdpError(f"the IdP's token endpoint is unreachable ({type(exc).__name__})") from None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if status == 200 and isinstance(data, dict):
            return data
        error = data.get("error") if isinstance(data, dict) else None
        if 400 <= status < 500 and isinstance(error, str):
            raise IdpRefused(f"the IdP refused: {error[:60]}")
        raise IdpError(f"the IdP's token endpoint answered HTTP {status}")

    async def _get_json(self, url: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        if self._session is None:
            raise IdpError("not started")
        try:
            async with self._session.get(url, headers={"Accept": "application/json", **(headers or {})}) as response:
                body = await response.read()
                if response.status != 200:
                    raise IdpError(f"{url.split('?')[0]} answered HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise IdpError(f"{url.split('?')[0]} is unreachable ({type(exc).__name__})") from None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise IdpError(f"{url.split('?')[0]} did not answer with JSON") from None
        if not isinstance(data, dict):
            raise IdpError(f"{url.split('?')[0]} did not answer with a JSON object")
        return data


def _form_escape(value: str) -> str:
    # RFC 6749 section 2.3.1: client id and secret are form-encoded before they go into Basic auth.
    from urllib.parse import quote_plus

    return quote_plus(value)


def _with_claims(identity: Identity, payload: Mapping[str, Any], email: str, name: str, groups: str) -> Identity:
    from gate.identity.auth import _groups

    found_email, found_name = payload.get(email), payload.get(name)
    return Identity(
        sub=identity.sub,
        expires_at=identity.expires_at,
        issuer=identity.issuer,
        key_id=identity.key_id,
        email=found_email if isinstance(found_email, str) else identity.email,
        name=found_name if isinstance(found_name, str) else identity.name,
        groups=_groups(payload.get(groups)) or identity.groups,
    )
