"""Claude Code's gateway sign-in, served by Gate: discovery (RFC 8414), the device flow (RFC 8628) with its
verification page, the IdP callback, and the token endpoint (device-code and refresh grants).

The device flow's browser leg is the IdP's authorization code flow: ``POST /device`` checks the user code and the
request's origin, then sends the browser to the IdP with PKCE, a nonce and a random ``state`` that names a
single-use login record in the store, bound to this browser by a cookie. ``/oauth/callback`` exchanges the code,
verifies the id_token (JWKS: signature, iss, aud, exp; then nonce), applies the allowed domains and groups, mints a
Gate session and marks the device grant approved; Claude Code's next poll gets the tokens, once.

The refresh token Claude Code holds is Gate's own, random and single-use (used again within
``session.refresh-reuse-grace`` it gets the same answer, for two processes refreshing at once; after that,
``invalid_grant``); the IdP's refresh token stays in the store, encrypted. Each refresh is done at the IdP, so a
user the IdP no longer knows (or who left the allowed groups) is refused with ``401 invalid_grant`` and must sign
in again. Every sign-in, refresh and refusal writes one line on the ``gate.audit`` logger. Per-address limits
(device authorizations, ``/device`` posts, token requests) are counted in the store, so they hold across replicas.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections import Counter
from collections.abc import Mapping
from importlib import resources
from typing import Any, Final
from urllib.parse import parse_qsl

import orjson
from multidict import istr

from gate.http.server import BadBody, BodyTooLarge, Request, Response, Router
from gate.identity.auth import Authenticator
from gate.identity.sessions import SessionTokens
from gate.identity.signin.grants import DeviceGrants, Poll, normalise_user_code
from gate.identity.signin.idp import IdentityProvider, IdpError, IdpRefused, SignedInUser, pkce_pair
from gate.identity.signin.pages import message_page, user_code_page
from gate.settings import SignInSettings
from gate.store.kv import KeyValueStore, StoreError

__all__ = ["PROTOCOL_VERSION", "SignIn"]

log = logging.getLogger(__name__)
audit = logging.getLogger("gate.audit")

PROTOCOL_VERSION: Final = 1
DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
_COOKIE: Final = "gate_signin"
_MAX_FORM: Final = 8192
_CONTENT_TYPE = istr("content-type")
_COOKIE_HEADER = istr("cookie")
_ORIGIN = istr("origin")
_SEC_FETCH_SITE = istr("sec-fetch-site")
_NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _oauth_error(status: int, error: str, description: str, headers: Mapping[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": error, "error_description": description})
    return Response(status=status, body=body, content_type="application/json", headers={**_NO_STORE, **(headers or {})})


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def client_address(request: Request) -> str:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"


class SignIn:
    """The sign-in routes and their state; ``auth`` learns to accept the sessions minted here."""

    def __init__(self, settings: SignInSettings, store: KeyValueStore, auth: Authenticator, *, leeway: float) -> None:
        assert settings.public_url is not None
        self._settings = settings
        self.public_url = settings.public_url
        self._store = store
        self.sessions = SessionTokens(settings.session, issuer=self.public_url, leeway=leeway)
        self._idp = IdentityProvider(settings.idp, redirect_uri=f"{self.public_url}/oauth/callback", leeway=leeway)
        self._grants = DeviceGrants(
            store, lifetime=settings.device.code_lifetime, interval=settings.device.poll_interval
        )
        self._auth = auth
        self._secure_cookie = self.public_url.startswith("https://")
        self._cookie = f"__Host-{_COOKIE}" if self._secure_cookie else _COOKIE
        self._domains = {d.lower().lstrip("@") for d in settings.allowed_email_domains}
        self._groups = frozenset(settings.allowed_groups)
        self._metadata = orjson.dumps(
            {
                "issuer": self.public_url,
                "device_authorization_endpoint": f"{self.public_url}/oauth/device_authorization",
                "token_endpoint": f"{self.public_url}/oauth/token",
                "grant_types_supported": [DEVICE_GRANT, "refresh_token"],
                "response_types_supported": [],
                "token_endpoint_auth_methods_supported": ["none"],
                "scopes_supported": ["openid", "profile", "email"],
                "gateway_protocol_version": PROTOCOL_VERSION,
            }
        )
        self.counts: Counter[str] = Counter()  # audit events by kind: signin, refresh, refusal (tests, metrics)
        self._protocol = resources.files("gate.identity.signin").joinpath("protocol.md").read_bytes()

    def add_routes(self, router: Router) -> None:
        router.add("GET", "/.well-known/oauth-authorization-server", self.metadata)
        router.add("GET", "/protocol", self.protocol)
        router.add("POST", "/oauth/device_authorization", self.device_authorization)
        router.add("GET", "/device", self.device_page)
        router.add("POST", "/device", self.device_confirm)
        router.add("GET", "/oauth/callback", self.callback)
        router.add("POST", "/oauth/token", self.token)

    async def start(self) -> None:
        await self._store.start()
        await self.sessions.load(self._store)
        self._auth.sessions = self.sessions
        await self._idp.start()
        log.info(
            "sign-in for Claude Code at %s (IdP %s, store %s)", self.public_url, self._idp.issuer, self._store.name
        )

    async def close(self) -> None:
        await self._idp.close()
        await self._store.close()

    def health(self) -> dict[str, object]:
        """DOWN while the store's periodic sweep fails (sign-in, refresh and rate limits need it)."""
        error = self._store.last_error
        details = {"store": self._store.name, "lastError": error, "auditEvents": dict(self.counts)}
        return {"status": "DOWN" if error else "UP", "details": details}

    # ------------------------------------------------------------------------------------------- discovery

    async def metadata(self, request: Request) -> Response:
        return Response(body=self._metadata, content_type="application/json")

    async def protocol(self, request: Request) -> Response:
        return Response(body=self._protocol, content_type="text/markdown; charset=utf-8")

    # ------------------------------------------------------------------------------------------- device flow

    async def device_authorization(self, request: Request) -> Response:
        address = client_address(request)
        limited = await self._limited("devauth", address, self._settings.limits.device_authorizations)
        if limited is not None:
            return limited
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        device_code, user_code = await self._grants.issue(address)
        verification = f"{self.public_url}/device"
        body = {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": verification,
            "verification_uri_complete": f"{verification}?user_code={user_code}",
            "expires_in": int(self._grants.lifetime),
            "interval": self._grants.interval,
        }
        return Response(body=orjson.dumps(body), content_type="application/json", headers=_NO_STORE)

    async def device_page(self, request: Request) -> Response:
        query = dict(parse_qsl(request.path_qs.partition("?")[2][:_MAX_FORM]))
        prefill = normalise_user_code(query.get("user_code", "")) or ""
        return user_code_page(prefill, idp_origin=self._idp.origin)

    async def device_confirm(self, request: Request) -> Response:
        address = client_address(request)
        if not self._same_origin(request):
            self._audit("refusal", address, reason="cross-site /device post")
            return message_page(
                "Request blocked",
                "This request came from another site and was blocked. Open the link Claude Code "
                "shows you and enter the code there.",
                status=403,
            )
        if await self._limited("device", address, self._settings.limits.device_posts) is not None:
            return message_page(
                "Too many attempts", "Too many codes were tried from your address; wait a few minutes.", status=429
            )
        form = await self._form(request)
        if isinstance(form, Response):
            return message_page("Bad request", "The form could not be read.", status=400)
        user_code = normalise_user_code(form.get("user_code", ""))
        grant = await self._grants.by_user_code(user_code) if user_code else None
        if grant is None:
            self._audit("refusal", address, reason="unknown or expired user code")
            return user_code_page(
                "",
                idp_origin=self._idp.origin,
                status=400,
                error="That code is unknown, expired or already used. Check it, or run /login again.",
            )
        state, nonce, binding = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        verifier, challenge = pkce_pair()
        try:
            location = await self._idp.authorization_url(state=state, nonce=nonce, challenge=challenge)
        except IdpError as exc:
            log.error("sign-in: the IdP is unavailable: %s", exc)
            return message_page(
                "Sign-in unavailable", "The company sign-in service cannot be reached; try again shortly.", status=503
            )
        login = {"grant": grant.key, "verifier": verifier, "nonce": nonce, "binding": _hash(binding), "ip": address}
        await self._store.put(f"login:{_hash(state)}", orjson.dumps(login), self._grants.lifetime)
        cookie = f"{self._cookie}={binding}; Path=/; Max-Age={int(self._grants.lifetime)}; HttpOnly; SameSite=Lax" + (
            "; Secure" if self._secure_cookie else ""
        )
        return Response(status=302, headers={"Location": location, "Set-Cookie": cookie, **_NO_STORE})

    async def callback(self, request: Request) -> Response:
        response = await self._callback(request, client_address(request))
        # The browser binding served its one use, whatever the outcome.
        response.headers["Set-Cookie"] = f"{self._cookie}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax" + (
            "; Secure" if self._secure_cookie else ""
        )
        return response

    async def _callback(self, request: Request, address: str) -> Response:
        query = dict(parse_qsl(request.path_qs.partition("?")[2][:_MAX_FORM]))
        state = query.get("state", "")
        raw = await self._store.take(f"login:{_hash(state)}") if state else None
        if raw is None:
            self._audit("refusal", address, reason="unknown, used or tampered callback state")
            return message_page(
                "Sign-in failed",
                "This sign-in link is unknown, expired or already used. Run /login in Claude Code again.",
                status=400,
            )
        login = orjson.loads(raw)
        binding = self._cookie_value(request)
        if binding is None or not secrets.compare_digest(_hash(binding), login["binding"]):
            self._audit("refusal", address, reason="callback from another browser")
            return message_page(
                "Sign-in failed", "This sign-in was started in another browser. Run /login again.", status=400
            )
        grant = await self._grants.by_key(login["grant"])
        if grant is None or grant.status != "pending":
            return message_page(
                "Sign-in failed", "This sign-in has expired. Run /login in Claude Code again.", status=400
            )
        issuer = query.get("iss")
        if issuer is not None and issuer.rstrip("/") != self._idp.issuer:  # RFC 9207: a mix-up attack
            await self._grants.deny(grant, "the callback names another issuer")
            self._audit("refusal", address, reason="callback from another issuer")
            return message_page("Sign-in failed", "The answer came from another identity provider.", status=400)
        if "error" in query:
            reason = f"the IdP answered {query['error'][:40]}"
            await self._grants.deny(grant, reason)
            self._audit("refusal", address, reason=reason)
            return message_page("Sign-in cancelled", "The sign-in was not completed. Run /login again.", status=400)
        code = query.get("code")
        if not code:
            return message_page("Sign-in failed", "The IdP sent no authorization code.", status=400)
        try:
            user = await self._idp.exchange(code, login["verifier"], login["nonce"])
        except IdpError as exc:
            log.error("sign-in: IdP error during the code exchange: %s", exc)
            return message_page(
                "Sign-in unavailable", "The company sign-in service failed; run /login again.", status=503
            )
        except IdpRefused as exc:
            await self._grants.deny(grant, str(exc))
            self._audit("refusal", address, reason=str(exc))
            return message_page("Sign-in failed", "Your sign-in could not be verified. Run /login again.", status=400)
        refusal = self._refusal(user)
        if refusal is not None:
            await self._grants.deny(grant, refusal)
            self._audit("refusal", address, user=user, reason=refusal)
            return message_page("Not allowed", f"You are signed in, but {refusal}. Ask your administrator.", status=403)
        tokens = await self._mint(user)
        if not await self._grants.approve(grant, tokens, user.sub):
            return message_page("Sign-in failed", "This sign-in was already completed or has expired.", status=400)
        self._audit("signin", address, user=user)
        who = user.email or user.name or user.sub
        return message_page(
            "Signed in", f"Signed in as {who}. You can close this window and return to Claude Code.", status=200
        )

    # ------------------------------------------------------------------------------------------- token endpoint

    async def token(self, request: Request) -> Response:
        address = client_address(request)
        limited = await self._limited("token", address, self._settings.limits.token_requests)
        if limited is not None:
            return limited
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        grant_type = form.get("grant_type")
        if not grant_type:
            return _oauth_error(400, "invalid_request", "grant_type is required")
        if grant_type == DEVICE_GRANT:
            return await self._device_grant(form, address)
        if grant_type == "refresh_token":
            return await self._refresh_grant(form, address)
        return _oauth_error(400, "unsupported_grant_type", "only the device_code and refresh_token grants are served")

    async def _device_grant(self, form: Mapping[str, str], address: str) -> Response:
        device_code = form.get("device_code")
        if not device_code:
            return _oauth_error(400, "invalid_request", "device_code is required")
        outcome, tokens = await self._grants.poll(device_code[:256])
        if outcome is Poll.ISSUED and tokens is not None:
            return Response(body=orjson.dumps(tokens), content_type="application/json", headers=_NO_STORE)
        descriptions = {
            Poll.PENDING: "the user has not finished signing in yet",
            Poll.SLOW_DOWN: f"poll at most every {self._grants.interval} s",
            Poll.DENIED: "the sign-in was refused",
            Poll.EXPIRED: "the device code has expired or was already used; run /login again",
            Poll.UNKNOWN: "the device code is unknown",
        }
        return _oauth_error(400, outcome.value, descriptions.get(outcome, "error"))

    async def _refresh_grant(self, form: Mapping[str, str], address: str) -> Response:
        refresh_token = form.get("refresh_token")
        if not refresh_token:
            return _oauth_error(400, "invalid_request", "refresh_token is required")
        key = f"refresh:{_hash(refresh_token[:512])}"
        entry = await self._store.get(key)
        if entry is None:
            self._audit("refusal", address, reason="unknown, expired or replayed refresh token")
            return _oauth_error(
                401, "invalid_grant", "the refresh token is unknown, expired or already used; run /login"
            )
        record = orjson.loads(entry.value)
        successor = record.get("successor")
        if successor is not None:  # refreshed a moment ago, by another process of the same person: same answer
            return Response(body=orjson.dumps(successor), content_type="application/json", headers=_NO_STORE)
        # Claim the token (compare-and-set), so that one replica, once, asks the IdP.
        now = self._store.clock()
        lifetime = self._settings.session.refresh_lifetime
        claim = {**record, "refreshing_until": now + self._settings.idp.timeout + 1}
        busy = record.get("refreshing_until", 0) > now
        if busy or not await self._store.replace(key, orjson.dumps(claim), entry.version, lifetime):
            return _oauth_error(503, "temporarily_unavailable", "this session is being refreshed; retry shortly")
        try:
            fresh = await self._idp.refresh(record["idp_refresh_token"], record["sub"])
        except IdpError as exc:
            # The IdP is away, not refusing: keep the refresh token usable for the client's next try.
            await self._store.put(key, entry.value, lifetime)
            log.error("sign-in: refresh at the IdP failed: %s", exc)
            return _oauth_error(503, "temporarily_unavailable", "the identity provider is unavailable; retry shortly")
        except IdpRefused as exc:
            await self._store.delete(key)
            self._audit("refusal", address, sub=record["sub"], reason=f"refresh refused: {exc}")
            return _oauth_error(
                401, "invalid_grant", "the identity provider no longer accepts this sign-in; run /login"
            )
        user = SignedInUser(
            sub=record["sub"],
            email=(fresh.email if fresh and fresh.email else record.get("email")),
            name=(fresh.name if fresh and fresh.name else record.get("name")),
            groups=(fresh.groups if fresh and fresh.groups else frozenset(record.get("groups", ()))),
            email_verified=fresh.email_verified if fresh else None,
            refresh_token=(fresh.refresh_token if fresh and fresh.refresh_token else record["idp_refresh_token"]),
        )
        refusal = self._refusal(user)
        if refusal is not None:
            await self._store.delete(key)
            self._audit("refusal", address, user=user, reason=f"refresh refused: {refusal}")
            return _oauth_error(401, "invalid_grant", f"{refusal}; run /login")
        tokens = await self._mint(user)
        grace = self._settings.session.refresh_reuse_grace
        if grace > 0:  # the old token answers the same for a moment, then never again
            await self._store.put(key, orjson.dumps({"successor": tokens}), grace)
        else:
            await self._store.delete(key)
        self._audit("refresh", address, user=user)
        return Response(body=orjson.dumps(tokens), content_type="application/json", headers=_NO_STORE)

    # ------------------------------------------------------------------------------------------- helpers

    async def _mint(self, user: SignedInUser) -> dict[str, Any]:
        access_token, lifetime = self.sessions.mint(sub=user.sub, email=user.email, name=user.name, groups=user.groups)
        tokens: dict[str, Any] = {"access_token": access_token, "token_type": "Bearer", "expires_in": lifetime}
        if user.refresh_token:
            refresh_token = secrets.token_urlsafe(32)
            record = {
                "sub": user.sub,
                "email": user.email,
                "name": user.name,
                "groups": sorted(user.groups),
                "idp_refresh_token": user.refresh_token,
            }
            await self._store.put(
                f"refresh:{_hash(refresh_token)}", orjson.dumps(record), self._settings.session.refresh_lifetime
            )
            tokens["refresh_token"] = refresh_token
        return tokens

    def _refusal(self, user: SignedInUser) -> str | None:
        if self._settings.idp.require_verified_email and user.email_verified is False:
            return "your e-mail address is not verified"
        if self._domains:
            domain = user.email.rpartition("@")[2].lower() if user.email and "@" in user.email else None
            if domain not in self._domains:
                return "your e-mail domain may not sign in here"
        if self._groups and not (user.groups & self._groups):
            return "none of your groups may sign in here"
        return None

    async def _limited(self, what: str, address: str, limit: int) -> Response | None:
        window = self._settings.limits.window
        try:
            count = await self._store.hit(f"rl:{what}:{address}", window)
        except StoreError as exc:
            log.error("sign-in: the store is unavailable: %s", exc)
            return _oauth_error(503, "temporarily_unavailable", "the gateway's store is unavailable; retry shortly")
        if count <= limit:
            return None
        if count == limit + 1:
            self._audit("refusal", address, reason=f"rate limit: {what}")
        return _oauth_error(429, "slow_down", "too many requests from your address", {"Retry-After": str(int(window))})

    async def _form(self, request: Request) -> dict[str, str] | Response:
        content_type = request.headers.get(_CONTENT_TYPE, "")
        if request.content_length is not None and request.content_length > _MAX_FORM:
            return _oauth_error(413, "invalid_request", "the form is too large")
        try:
            body = await request.read()
        except (BodyTooLarge, BadBody):
            return _oauth_error(400, "invalid_request", "the request body cannot be read")
        if len(body) > _MAX_FORM:
            return _oauth_error(413, "invalid_request", "the form is too large")
        if body and not content_type.lower().startswith("application/x-www-form-urlencoded"):
            return _oauth_error(400, "invalid_request", "send an application/x-www-form-urlencoded form")
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=32)
        except (UnicodeDecodeError, ValueError):
            return _oauth_error(400, "invalid_request", "the form is not valid url-encoded UTF-8")
        form: dict[str, str] = {}
        for name, value in pairs:
            if name in form:  # RFC 6749 section 3.1: parameters must not repeat
                return _oauth_error(400, "invalid_request", f"the parameter {name[:32]} is repeated")
            form[name] = value
        return form

    def _same_origin(self, request: Request) -> bool:
        """A /device post must come from Gate's own page (or be typed in): Fetch Metadata, else Origin."""
        site = request.headers.get(_SEC_FETCH_SITE)
        if site is not None:
            return site in ("same-origin", "none")
        origin = request.headers.get(_ORIGIN)
        return origin is not None and origin.rstrip("/") == self.public_url

    def _cookie_value(self, request: Request) -> str | None:
        for header in request.headers.getall(_COOKIE_HEADER, ()):
            for part in header.split(";"):
                name, _, value = part.strip().partition("=")
                if name == self._cookie and value:
                    return value
        return None

    def _audit(
        self,
        event: str,
        address: str,
        *,
        user: SignedInUser | None = None,
        sub: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.counts[event] += 1
        fields: dict[str, Any] = {"audit": event, "client_ip": address}
        if user is not None:
            fields.update(sub=user.sub, email=user.email, groups=sorted(user.groups))
        elif sub is not None:
            fields["sub"] = sub
        if reason is not None:
            fields["reason"] = reason
        audit.info("%s%s", event, f": {reason}" if reason else "", extra=fields)
