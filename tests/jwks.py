"""A real local identity provider for tests: an aiohttp JWKS endpoint (key rotation, outages, fetch counting,
Cache-Control) and token minting with joserfc, a different library from the PyJWT that Gate verifies with.

    async with JwksServer() as idp:
        kid = idp.add_key("EC", "ES256")
        token = idp.mint(sub="alice")            # signed by the newest key
        idp.mint(sub="bob", exp=OMIT)            # OMIT drops a claim or header
        idp.set_down(True)                       # 503 until set_down(False)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from aiohttp import web
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

__all__ = [
    "OMIT",
    "JwksServer",
    "KeyKind",
    "SigningKey",
    "b64url",
    "b64url_decode",
    "hmac_token",
    "tamper_payload",
    "tamper_signature",
    "unsigned_token",
]

KeyKind = Literal["RSA", "EC", "OKP"]


class _Omit(Enum):
    OMIT = "omit"


OMIT = _Omit.OMIT  # as a claim or header value: leave it out of the token

_DEFAULT_ALGORITHM: dict[str, str] = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}
_CURVE_BY_ALGORITHM = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


@dataclass
class SigningKey:
    """A private key the fake IdP signs with, and how its public half appears in the JWKS."""

    kid: str
    kind: KeyKind
    alg: str
    key: RSAKey | ECKey | OKPKey
    published: bool = True
    jwk_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"alg": "RS256"}, {"use": "enc"}

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = {**self.key.as_dict(private=False), "kid": self.kid, "use": "sig"}
        for name, value in self.jwk_overrides.items():
            if value is OMIT:
                jwk.pop(name, None)
            else:
                jwk[name] = value
        return jwk

    def public_pem(self) -> bytes:
        return self.key.as_pem(private=False)


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 (a free port), serving the published keys plus ``extra_entries``."""

    PATH = "/.well-known/jwks.json"

    def __init__(self, *, issuer: str = "https://idp.example.test", host: str = "127.0.0.1") -> None:
        self.issuer = issuer
        self.host = host
        self.keys: dict[str, SigningKey] = {}
        self.extra_entries: list[Any] = []  # raw JWKS entries appended as they are (unusable keys, junk)
        self.raw_document: bytes | None = None  # when set, served instead of the generated document
        self.cache_control: str | None = None
        self.delay = 0.0  # seconds before answering: a slow IdP (a hung one, beyond Gate's fetch timeout)
        self.fetch_count = 0  # requests received, answered or not
        self.down_status: int | None = None
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._counter = itertools.count(1)

    # -- lifecycle

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("JwksServer not started")
        return f"http://{self.host}:{self.port}{self.PATH}"

    async def start(self) -> None:
        """Listen; after a stop(), on the same port again (an IdP coming back)."""
        app = web.Application()
        app.router.add_get(self.PATH, self._serve)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port or 0, reuse_address=True)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening: connections are refused until start() (an unreachable IdP)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> JwksServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def set_down(self, down: bool, *, status: int = 503) -> None:
        """Answer every request with ``status`` (default 503) while down."""
        self.down_status = status if down else None

    # -- keys

    def add_key(
        self,
        kind: KeyKind = "EC",
        alg: str | None = None,
        kid: str | None = None,
        *,
        size: int = 2048,
        curve: str | None = None,
        publish: bool = True,
        jwk_overrides: Mapping[str, Any] | None = None,
    ) -> str:
        """Make a key pair and (unless ``publish=False``) publish its public half; returns the kid."""
        algorithm = alg or _DEFAULT_ALGORITHM[kind]
        key: RSAKey | ECKey | OKPKey
        if kind == "RSA":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SecurityWarning)  # tests make weak keys on purpose
                key = RSAKey.generate_key(size)
        elif kind == "EC":
            key = ECKey.generate_key(curve or _CURVE_BY_ALGORITHM[algorithm])
        else:
            key = OKPKey.generate_key(curve or "Ed25519")  # type: ignore[arg-type]
        name = kid or f"{kind.lower()}-{algorithm.lower()}-{next(self._counter)}"
        self.keys[name] = SigningKey(name, kind, algorithm, key, publish, dict(jwk_overrides or {}))
        return name

    def publish(self, kid: str, published: bool = True) -> None:
        self.keys[kid].published = published

    def remove_key(self, kid: str) -> None:
        del self.keys[kid]

    def key(self, kid: str | None = None) -> SigningKey:
        """The key named ``kid``, or the newest one."""
        if kid is not None:
            return self.keys[kid]
        if not self.keys:
            raise RuntimeError("add_key() first")
        return next(reversed(self.keys.values()))

    def document(self) -> dict[str, Any]:
        published = [k.public_jwk() for k in self.keys.values() if k.published]
        return {"keys": [*published, *self.extra_entries]}

    # -- tokens

    def mint(
        self,
        sub: Any = "alice",
        *,
        kid: str | None = None,
        alg: str | None = None,
        ttl: float = 300.0,
        now: float | None = None,
        exp: Any = None,
        nbf: Any = None,
        iat: Any = None,
        iss: Any = None,
        aud: Any = None,
        claims: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """A token signed by key ``kid`` (default: the newest) with joserfc.

        Defaults: ``iss`` = this IdP, ``iat`` = now, ``exp`` = now + ttl, no ``nbf``/``aud``. Pass OMIT to
        leave a claim out; ``claims`` and ``headers`` add or replace entries (OMIT removes: {"kid": OMIT}).
        """
        signer = self.key(kid)
        issued = time.time() if now is None else now
        payload: dict[str, Any] = {
            "iss": self.issuer if iss is None else iss,
            "sub": sub,
            "iat": int(issued) if iat is None else iat,
            "exp": int(issued + ttl) if exp is None else exp,
        }
        if nbf is not None:
            payload["nbf"] = nbf
        if aud is not None:
            payload["aud"] = aud
        payload.update(claims or {})
        header: dict[str, Any] = {"alg": alg or signer.alg, "kid": signer.kid, "typ": "JWT"}
        header.update(headers or {})
        payload = {name: value for name, value in payload.items() if value is not OMIT}
        return self.sign(json.dumps(payload).encode(), kid=signer.kid, headers=header)

    def sign(
        self, payload: bytes, *, kid: str | None = None, headers: Mapping[str, Any] | None = None
    ) -> str:
        """A compact JWS over any payload bytes (JSON or not) with any header values, signed by key ``kid``.

        joserfc computes the signature; the framing is done here, because joserfc (rightly) refuses to build
        tokens with malformed headers, which tests need.
        """
        signer = self.key(kid)
        header: dict[str, Any] = {"alg": signer.alg, "kid": signer.kid, **(headers or {})}
        header = {name: value for name, value in header.items() if value is not OMIT}
        signing_input = f"{_json_segment(header)}.{b64url(payload)}"
        algorithm = header["alg"] if isinstance(header.get("alg"), str) else signer.alg
        with warnings.catch_warnings():
            # joserfc warns that RFC 9864 prefers "Ed25519" to "EdDSA"; Gate accepts "EdDSA"
            warnings.simplefilter("ignore", SecurityWarning)
            signature = (
                JWSRegistry(algorithms=[algorithm])
                .get_alg(algorithm)
                .sign(signing_input.encode("ascii"), signer.key)
            )
        return f"{signing_input}.{b64url(signature)}"

    # -- the endpoint

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.fetch_count += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down_status is not None:
            return web.Response(status=self.down_status, text="identity provider unavailable")
        body = self.raw_document if self.raw_document is not None else json.dumps(self.document()).encode()
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        return web.Response(body=body, content_type="application/json", headers=headers)


# ---------------------------------------------------------------------------------------------- raw tokens


def b64url(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json_segment(value: Mapping[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")))


def unsigned_token(claims: Mapping[str, Any], header: Mapping[str, Any] | None = None) -> str:
    """An ``alg: none`` token (empty signature), which no verifier may accept."""
    return f"{_json_segment(header or {'alg': 'none', 'typ': 'JWT'})}.{_json_segment(claims)}."


def hmac_token(
    secret: bytes, claims: Mapping[str, Any], *, alg: str = "HS256", kid: str | None = None
) -> str:
    """An HMAC-signed token, built by hand: the algorithm-confusion attack signs with a public key's PEM."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{_json_segment(header)}.{_json_segment(claims)}"
    signature = hmac.new(secret, signing_input.encode("ascii"), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


def tamper_payload(token: str, **changes: Any) -> str:
    """The same header and signature over a changed payload."""
    header, payload, signature = token.split(".")
    claims = json.loads(b64url_decode(payload))
    claims.update(changes)
    return f"{header}.{_json_segment(claims)}.{signature}"


def tamper_signature(token: str) -> str:
    """The same header and payload with one bit of the signature flipped."""
    header, payload, signature = token.split(".")
    raw = bytearray(b64url_decode(signature))
    raw[len(raw) // 2] ^= 0x01
    return f"{header}.{payload}.{b64url(bytes(raw))}"
