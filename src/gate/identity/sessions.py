"""Gate's own session tokens: the short-lived bearer that Claude Code holds after signing in through Gate.

JWTs carrying ``sub``, ``email``, ``name`` and ``groups``, issued by Gate's public URL for the
audience :data:`AUDIENCE`, signed RS256 (RSA keys) or EdDSA (Ed25519 keys). The generated default is RSA-2048:
verifying it is the cheapest asymmetric check there is (about a quarter of Ed25519's in OpenSSL 3 on this rig,
see ``benchmarks/micro/session_verify.py``), and verification, not signing, is on the request path. The first
signing key signs; every key verifies, by ``kid`` (rotation: add the new key
first, drop the old one after a session lifetime). Keys come from settings, or, when none is configured, one is
generated once and kept encrypted in the shared store so that every replica signs with the same key.
``Authenticator`` hands a token whose ``kid`` is one of these keys here: no network, one signature check, then
cached like any other verified token.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gate.identity.auth import AuthError, Identity
from gate.settings import SessionSettings
from gate.store.kv import KeyValueStore

__all__ = ["AUDIENCE", "SessionKey", "SessionTokens"]

log = logging.getLogger(__name__)

AUDIENCE: Final = "gate-session"
_STORED_KEY: Final = "session-signing-key:v2"
_RSA_BITS: Final = 2048

PrivateKey = rsa.RSAPrivateKey | Ed25519PrivateKey
_MAX_GROUPS: Final = 256


@dataclass(frozen=True, slots=True)
class SessionKey:
    kid: str
    private_key: PrivateKey

    @property
    def algorithm(self) -> str:
        return "EdDSA" if isinstance(self.private_key, Ed25519PrivateKey) else "RS256"

    @property
    def public_key(self) -> Any:
        return self.private_key.public_key()


def _generated_kid(key: PrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "gate-" + base64.urlsafe_b64encode(hashlib.sha256(der).digest()[:9]).decode()


def _load_pem(pem: bytes, kid: str | None) -> SessionKey:
    name = f"key {kid!r}" if kid else "the stored key"
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"sign-in.session.signing-keys: {name} is not a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < _RSA_BITS:
            raise ValueError(f"sign-in.session.signing-keys: {name} is an RSA key under {_RSA_BITS} bits")
    elif not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"sign-in.session.signing-keys: {name} is neither an RSA nor an Ed25519 key")
    return SessionKey(kid or _generated_kid(key), key)


class SessionTokens:
    """Mints and verifies session tokens; ``kids`` tells ``Authenticator`` which tokens are Gate's own."""

    def __init__(
        self, settings: SessionSettings, *, issuer: str, leeway: float, clock: Callable[[], float] = time.time
    ):
        self.issuer = issuer
        self.lifetime = int(settings.lifetime)
        self._configured = [_load_pem(k.private_key.get_secret_value().encode(), k.kid) for k in settings.signing_keys]
        self._leeway = leeway
        self._clock = clock
        self._signing: SessionKey | None = None
        self._verifying: dict[str, tuple[Any, list[str]]] = {}
        self.kids: frozenset[str] = frozenset()
        self._decoder = jwt.PyJWT(
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_sub": False}
        )

    async def load(self, store: KeyValueStore) -> None:
        """Use the configured keys, or the store's generated key (made now by whichever replica comes first)."""
        keys = self._configured
        if not keys:
            generated = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
            pem = generated.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            if await store.add(_STORED_KEY, pem, None):
                log.info("sign-in: generated the session signing key (kept encrypted in store %s)", store.name)
            entry = await store.get(_STORED_KEY)  # whichever replica came first made the one everybody uses
            assert entry is not None
            keys = [_load_pem(entry.value, None)]
        self.install(keys)

    def install(self, keys: Iterable[SessionKey]) -> None:
        keys = list(keys)
        self._signing = keys[0]
        self._verifying = {k.kid: (k.public_key, [k.algorithm]) for k in keys}
        self.kids = frozenset(self._verifying)

    def mint(self, *, sub: str, email: str | None, name: str | None, groups: Iterable[str]) -> tuple[str, int]:
        """A signed session token and its lifetime in seconds."""
        assert self._signing is not None, "load() first"
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": sub,
            "iat": now,
            "exp": now + self.lifetime,
            "jti": secrets.token_urlsafe(12),  # two sessions minted in one second differ
            "groups": sorted(groups)[:_MAX_GROUPS],
        }
        if email:
            claims["email"] = email
        if name:
            claims["name"] = name
        key = self._signing
        token = jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid, "typ": "JWT"})
        return token, self.lifetime

    def verify(self, token: str, kid: str) -> Identity:
        """The identity a session token carries; :class:`AuthError` if it is forged, expired or not for Gate."""
        found = self._verifying.get(kid)
        if found is None:
            raise AuthError("unknown_key", "the session token's key is not one of Gate's")
        key, algorithms = found
        try:
            payload = self._decoder.decode(token, key, algorithms=algorithms, issuer=self.issuer, audience=AUDIENCE)
        except jwt.InvalidSignatureError:
            raise AuthError("signature", "the session token's signature does not verify") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("algorithm", "the session token is not signed with its key's algorithm") from None
        except (jwt.InvalidIssuerError, jwt.MissingRequiredClaimError):
            raise AuthError("issuer", f"the session token was not issued by {self.issuer}") from None
        except jwt.InvalidAudienceError:
            raise AuthError("audience", "the session token is not a Gate session") from None
        except jwt.PyJWTError:
            raise AuthError("malformed", "the session token cannot be decoded") from None
        return self._identity(payload, kid)

    def _identity(self, payload: Mapping[str, Any], kid: str) -> Identity:
        expires = payload.get("exp")
        if isinstance(expires, bool) or not isinstance(expires, int | float) or not math.isfinite(expires):
            raise AuthError("malformed", "the session token has no valid exp")
        if self._clock() >= expires + self._leeway:
            raise AuthError("expired", "the session has expired; Claude Code refreshes it, or run /login again")
        sub = payload.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("missing_sub", "the session token names no subject")
        email, name, groups = payload.get("email"), payload.get("name"), payload.get("groups")
        return Identity(
            sub=sub,
            expires_at=float(expires),
            issuer=self.issuer,
            key_id=kid,
            email=email if isinstance(email, str) else None,
            name=name if isinstance(name, str) else None,
            groups=frozenset(g for g in groups if isinstance(g, str)) if isinstance(groups, list) else frozenset(),
        )
