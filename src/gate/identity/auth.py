"""Who is calling: the JWT from ``Authorization: Bearer`` or ``x-api-key``, verified against the identity
provider's JWKS (fetched, kept in memory and refreshed here) or the development key pair; the result is the
caller's :class:`Identity`, or an :class:`AuthError` that says why not, without ever echoing the token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol

import aiohttp
import jwt
import orjson
from cachetools import TLRUCache
from cryptography.hazmat.primitives.asymmetric import rsa
from yarl import URL

from gate.identity.devauth import DevKeyPair, load_or_create_key_pair, mint_dev_token, resolve_data_dir
from gate.ops.redact import redact
from gate.settings import JwtSettings

__all__ = [
    "AuthError",
    "Authenticator",
    "Identity",
    "JwksError",
    "KeySet",
    "Reason",
    "mint_dev_token",
    "parse_jwks",
    "www_authenticate",
]

log = logging.getLogger(__name__)

Reason = Literal[
    "missing",
    "malformed",
    "expired",
    "missing_exp",
    "not_yet_valid",
    "signature",
    "unknown_key",
    "algorithm",
    "issuer",
    "audience",
    "missing_sub",
    "conflicting_credentials",
    "too_long",
    "jwks_unavailable",
]

# The accepted signature algorithms, by the key type (JWK `kty`) each one needs. HMAC and `none` are absent
# on purpose: a shared secret never belongs in a public JWKS, and `none` is no signature at all.
_RSA_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGORITHM_BY_CURVE: Final = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_CURVES: Final = ("Ed25519", "Ed448")
_FAMILY_BY_ALGORITHM: Final = {
    **dict.fromkeys(_RSA_ALGORITHMS, "RSA"),
    **dict.fromkeys(_EC_ALGORITHM_BY_CURVE.values(), "EC"),
    "EdDSA": "OKP",
}
_PRIVATE_MEMBERS: Final = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
MIN_RSA_BITS: Final = 2048

_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", re.IGNORECASE)
_NO_EXP_CACHE_SECONDS: Final = 300.0  # with require-exp off, a token without `exp` is re-verified this often
_HEADER_SLACK: Final = 64  # room for "Bearer " and stray whitespace around a token of the maximum length


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Identity:
    """The verified caller. ``expires_at`` is the token's ``exp`` (epoch seconds), None if it has none."""

    sub: str
    expires_at: float | None
    issuer: str | None = None
    key_id: str | None = None
    email: str | None = None
    name: str | None = None
    groups: frozenset[str] = frozenset()  # from the configured groups claim (a list of strings, or one string)


class AuthError(Exception):
    """A refused request: ``reason`` is a short code for metrics, ``message`` is for the caller."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"AuthError({self.reason!r}, {self.message!r})"


class JwksError(Exception):
    """The JWKS could not be fetched or holds no usable key; the message is safe for health and logs."""


def www_authenticate(error: AuthError) -> str:
    """The ``WWW-Authenticate`` value for a refusal (RFC 6750 section 3).

    A request without credentials gets the bare challenge, as the RFC asks; every other refusal is
    ``invalid_token`` with the message as ``error_description``, reduced to the characters the RFC allows.
    """
    if error.reason == "missing":
        return "Bearer"
    return f'Bearer error="invalid_token", error_description="{_description(error.message)}"'


_DESCRIPTION_CHARACTER: Final = {'"': "'", "\\": "/", "\t": " ", "\n": " ", "\r": " "}


def _description(message: str) -> str:
    # RFC 6750 allows %x20-21 / %x23-5B / %x5D-7E: printable ASCII without '"' and '\'.
    return "".join(_DESCRIPTION_CHARACTER.get(ch, ch if " " <= ch <= "~" else "?") for ch in message[:300])


# ---------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One usable public key from a JWKS, with a PyJWT key bound to each algorithm it may verify."""

    kid: str | None
    family: str  # the JWK `kty`: "RSA", "EC" or "OKP"
    label: str  # "RSA-2048", "EC P-256", "OKP Ed25519": for messages and logs
    algorithms: list[str]
    verifiers: Mapping[str, jwt.PyJWK]
    fingerprint: tuple[object, ...]  # kid and public material, to notice a key that disappears


@dataclass(frozen=True, slots=True)
class KeySet:
    """The usable keys of a JWKS, by key id."""

    keys: tuple[VerificationKey, ...] = ()

    def find(self, kid: str | None, family: str) -> VerificationKey | None:
        """The key named by ``kid``; without a kid, the only key of the token's key type."""
        if kid is not None:
            for key in self.keys:
                if key.kid == kid:
                    return key
            return None
        matching = [key for key in self.keys if key.family == family]
        return matching[0] if len(matching) == 1 else None

    def count(self, family: str) -> int:
        return sum(1 for key in self.keys if key.family == family)


class _UnusableKey(Exception):
    pass


def parse_jwks(document: bytes) -> tuple[KeySet, list[str]]:
    """The usable signing keys of a JWKS document, and a note for each key skipped.

    Raises :class:`JwksError` if the document is not a JWKS or holds no usable key at all.
    """
    try:
        data = orjson.loads(document)
    except orjson.JSONDecodeError:
        raise JwksError("the JWKS endpoint did not answer with JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError("the JWKS endpoint's answer has no 'keys' list")
    keys: list[VerificationKey] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for index, entry in enumerate(data["keys"]):
        kid = entry.get("kid") if isinstance(entry, dict) else None
        name = f"#{index}" + (f" (kid {_shown(kid)})" if isinstance(kid, str) else "")
        try:
            key = _verification_key(entry)
        except _UnusableKey as exc:
            skipped.append(f"key {name} skipped: {exc}")
            continue
        if key.kid is not None:
            if key.kid in seen:
                skipped.append(f"key {name} skipped: its kid repeats an earlier key's")
                continue
            seen.add(key.kid)
        keys.append(key)
    if not keys:
        detail = "; ".join(skipped[:3]) or "the 'keys' list is empty"
        raise JwksError(f"the JWKS holds no usable signing key ({detail})")
    return KeySet(tuple(keys)), skipped


def _verification_key(entry: Any) -> VerificationKey:
    if not isinstance(entry, dict):
        raise _UnusableKey("not a JSON object")
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _UnusableKey("its kid is not a string")
    use = entry.get("use")
    if use is not None and use != "sig":
        raise _UnusableKey(f"its use is {_shown(use)}, not 'sig'")
    operations = entry.get("key_ops")
    if operations is not None and (not isinstance(operations, list) or "verify" not in operations):
        raise _UnusableKey("its key_ops do not include 'verify'")
    kty = entry.get("kty")
    if kty == "oct":
        raise _UnusableKey("a symmetric (oct) key; Gate accepts only asymmetric signatures")
    if any(member in entry for member in _PRIVATE_MEMBERS):
        raise _UnusableKey("it holds private key material, which a JWKS must never publish")
    crv = entry.get("crv")
    algorithms: tuple[str, ...]
    if kty == "RSA":
        algorithms = _RSA_ALGORITHMS
    elif kty == "EC":
        curve_algorithm = _EC_ALGORITHM_BY_CURVE.get(crv) if isinstance(crv, str) else None
        if curve_algorithm is None:
            raise _UnusableKey(f"unsupported curve {_shown(crv)} (use P-256, P-384 or P-521)")
        algorithms = (curve_algorithm,)
    elif kty == "OKP":
        if crv not in _OKP_CURVES:
            raise _UnusableKey(f"unsupported curve {_shown(crv)} for signatures (use Ed25519 or Ed448)")
        algorithms = ("EdDSA",)
    else:
        raise _UnusableKey(f"unsupported key type {_shown(kty)}")
    declared = entry.get("alg")
    if declared is not None:
        if declared not in algorithms:
            raise _UnusableKey(f"its alg {_shown(declared)} is not an accepted algorithm for a {kty} key")
        algorithms = (declared,)
    try:
        verifiers = {algorithm: jwt.PyJWK(entry, algorithm=algorithm) for algorithm in algorithms}
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise _UnusableKey(f"cannot be read ({type(exc).__name__}: {str(exc)[:120]})") from None
    public_key = next(iter(verifiers.values())).key
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise _UnusableKey(f"an RSA key of {public_key.key_size} bits (at least {MIN_RSA_BITS} needed)")
        label = f"RSA-{public_key.key_size}"
    else:
        label = f"{kty} {crv}"
    fingerprint = (kid, kty, crv, entry.get("n"), entry.get("e"), entry.get("x"), entry.get("y"))
    return VerificationKey(
        kid=kid,
        family=kty,
        label=label,
        algorithms=list(algorithms),
        verifiers=verifiers,
        fingerprint=fingerprint,
    )


class RemoteJwks:
    """The identity provider's JWKS in memory: fetched at start, refreshed in the background (sooner when
    ``Cache-Control: max-age`` says so), and at most one fetch in flight, shared by everybody waiting.

    Failures keep the keys already loaded; the next try backs off from 1 s up to the refresh interval.
    """

    MAX_DOCUMENT_BYTES: Final = 1 << 20
    START_RETRY_PAUSES: tuple[float, ...] = (0.25, 0.75)  # brief retries before starting without keys
    MIN_INTERVAL: Final = 1.0  # however small max-age or the settings are

    def __init__(
        self,
        uri: str,
        *,
        refresh: float,
        min_refresh_interval: float,
        fetch_timeout: float,
        clock: Callable[[], float],
        on_result: Callable[[bool], None],
        on_keys_removed: Callable[[], None],
    ) -> None:
        self.uri = uri
        self.source = redact(uri)  # user info and secret query values masked, host and path kept
        self.keys = KeySet()
        self.last_success: float | None = None  # by ``clock``
        self.last_error: str | None = "not fetched yet"
        self.fetches = 0
        self._refresh = refresh
        self._min_refresh_interval = min_refresh_interval
        self._fetch_timeout = fetch_timeout
        self._clock = clock
        self._on_result = on_result
        self._on_keys_removed = on_keys_removed
        self._session: aiohttp.ClientSession | None = None
        self._fetch_task: asyncio.Task[bool] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._document_digest: bytes | None = None
        self._last_attempt = -math.inf  # monotonic
        self._next_due = math.inf  # monotonic
        self._failures = 0

    @property
    def healthy(self) -> bool:
        return bool(self.keys.keys) and self.last_error is None

    async def start(self) -> None:
        # trust_env: the IdP may sit behind the corporate proxy (HTTPS_PROXY / NO_PROXY) like everything else.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._fetch_timeout),
            headers={"Accept": "application/jwk-set+json, application/json"},
            trust_env=True,
        )
        ok = await self._fetch_shared()
        for pause in self.START_RETRY_PAUSES:
            if ok:
                break
            await asyncio.sleep(pause)
            ok = await self._fetch_shared()
        if not ok:
            log.error(
                "JWKS %s unreachable at start (%s): refusing every token until it answers; retrying in the background",
                self.source,
                self.last_error,
            )
        self._loop_task = asyncio.create_task(self._refresh_loop(), name="gate-jwks-refresh")

    async def close(self) -> None:
        for task in (self._loop_task, self._fetch_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._loop_task = self._fetch_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def refresh_for_unknown_key(self) -> None:
        """Join the fetch in flight, or start one unless the last began under ``min-refresh-interval`` ago:
        a flood of tokens with made-up key ids costs the IdP one fetch per interval at most."""
        if self._fetch_task is None and time.monotonic() - self._last_attempt < self._min_refresh_interval:
            return
        await self._fetch_shared()

    async def _fetch_shared(self) -> bool:
        if self._session is None:
            return False  # not started, or closed
        task = self._fetch_task
        if task is None:
            task = asyncio.create_task(self._fetch(), name="gate-jwks-fetch")
            self._fetch_task = task
        # shield: a waiting request that is cancelled (client gone) must not cancel everybody's fetch
        return await asyncio.shield(task)

    async def _refresh_loop(self) -> None:
        while self._session is not None:
            delay = self._next_due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await self._fetch_shared()

    async def _fetch(self) -> bool:
        self._last_attempt = time.monotonic()
        self.fetches += 1
        try:
            document, max_age = await self._download()
            self._install(document)
        except JwksError as exc:
            self._failed(str(exc))
            return False
        except Exception as exc:  # a bug here must not kill the refresh loop nor reach a request
            log.exception("unexpected error while refreshing the JWKS from %s", self.source)
            self._failed(f"unexpected {type(exc).__name__}")
            return False
        finally:
            self._fetch_task = None
        self._succeeded(max_age)
        return True

    async def _download(self) -> tuple[bytes, int | None]:
        assert self._session is not None
        try:
            async with self._session.get(self.uri) as response:
                if response.status != 200:
                    raise JwksError(f"the JWKS endpoint answered HTTP {response.status}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > self.MAX_DOCUMENT_BYTES:
                        raise JwksError(f"the JWKS is larger than {self.MAX_DOCUMENT_BYTES} bytes")
                return bytes(body), _max_age(response.headers.get("Cache-Control"))
        except TimeoutError:
            raise JwksError(f"the JWKS endpoint did not answer within {self._fetch_timeout:g} s") from None
        except aiohttp.ClientError as exc:
            reason = redact(str(exc), self._password)
            raise JwksError(f"cannot fetch the JWKS: {type(exc).__name__}: {reason}") from None

    @property
    def _password(self) -> str:
        return (URL(self.uri).password or "") if "@" in self.uri else ""

    def _install(self, document: bytes) -> None:
        digest = hashlib.sha256(document).digest()
        if digest == self._document_digest:
            return
        keys, skipped = parse_jwks(document)
        for note in skipped:
            log.warning("JWKS %s: %s", self.source, note)
        removed = {k.fingerprint for k in self.keys.keys} - {k.fingerprint for k in keys.keys}
        self.keys = keys
        self._document_digest = digest
        log.info(
            "JWKS %s: %d usable keys (%s)",
            self.source,
            len(keys.keys),
            ", ".join(f"{k.label} kid {_shown(k.kid)}" for k in keys.keys),
        )
        if removed:
            self._on_keys_removed()

    def _succeeded(self, max_age: int | None) -> None:
        if self._failures:
            log.warning("JWKS %s reachable again after %d failed attempts", self.source, self._failures)
        self._failures = 0
        self.last_success = self._clock()
        self.last_error = None
        interval = self._refresh if max_age is None else min(self._refresh, float(max_age))
        self._next_due = time.monotonic() + max(interval, self._min_refresh_interval, self.MIN_INTERVAL)
        self._on_result(True)

    def _failed(self, message: str) -> None:
        self._failures += 1
        self.last_error = message
        delay = max(min(self._refresh, 2.0 ** min(self._failures - 1, 16)), self.MIN_INTERVAL)
        self._next_due = time.monotonic() + delay
        log.warning(
            "JWKS refresh from %s failed: %s; keeping %d keys, next try in %g s",
            self.source,
            message,
            len(self.keys.keys),
            delay,
        )
        self._on_result(False)


def _max_age(cache_control: str | None) -> int | None:
    if not cache_control:
        return None
    match = _MAX_AGE.search(cache_control)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------- verifier


class SessionVerifier(Protocol):
    """Gate's own session tokens (``gate.identity.sessions.SessionTokens``), recognised by their key ids."""

    kids: frozenset[str]

    def verify(self, token: str, kid: str) -> Identity: ...


class Authenticator:
    """Turns a request's credentials into an :class:`Identity`, or refuses with :class:`AuthError`.

    Verified tokens are cached by a digest of the token until their ``exp`` (by ``clock``), so a client
    that sends the same token with every call pays for the signature check once; the cached path does not
    await anything. Refusals are never cached: most could flip (a key arriving, the clock moving).
    """

    on_refresh: Callable[[bool], None] | None

    def __init__(self, settings: JwtSettings, *, dev_auth: bool, clock: Callable[[], float] = time.time) -> None:
        if dev_auth and settings.jwk_set_uri:
            raise ValueError("development auth and a jwk-set-uri exclude each other")
        if not dev_auth and not settings.jwk_set_uri:
            raise ValueError("security.jwt.jwk-set-uri is required unless development auth is on")
        self.on_refresh = None
        self.sessions: SessionVerifier | None = None  # Gate's own session tokens, when sign-in is on
        self.verifications = 0  # signature checks done (cache misses that got as far as a key)
        self.cache_hits = 0
        self._settings = settings
        self._clock = clock
        self._leeway = settings.leeway
        self._require_exp = settings.require_exp
        self._claims = settings.claims
        self._max_length = settings.max_token_length
        self._issuer = settings.issuer or (settings.dev.issuer if dev_auth else None)
        self._audiences = list(settings.audiences) or None
        self._decoder = jwt.PyJWT(
            options={
                # exp and nbf are checked against ``clock`` below; iat is informational.
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_iss": self._issuer is not None,
                "verify_aud": self._audiences is not None,
                "verify_sub": False,
                "verify_jti": False,
            }
        )
        self._cache: TLRUCache[bytes, Identity] | None = (
            TLRUCache(maxsize=settings.cache_size, ttu=self._cache_until, timer=clock)
            if settings.cache_size > 0
            else None
        )
        self._remote: RemoteJwks | None = None
        if settings.jwk_set_uri:
            self._remote = RemoteJwks(
                settings.jwk_set_uri,
                refresh=settings.refresh,
                min_refresh_interval=settings.min_refresh_interval,
                fetch_timeout=settings.fetch_timeout,
                clock=clock,
                on_result=self._refreshed,
                on_keys_removed=self._forget_verified,
            )
        self._dev_key_pair: DevKeyPair | None = None
        self._dev_keys = KeySet()
        self._dev_loaded_at: float | None = None

    # -- lifecycle

    async def start(self) -> None:
        if self._remote is not None:
            await self._remote.start()
            return
        data_dir = resolve_data_dir(self._settings.dev.data_dir)
        key_pair = await asyncio.to_thread(load_or_create_key_pair, data_dir)
        self._dev_key_pair = key_pair
        self._dev_keys = KeySet((_verification_key(key_pair.public_jwk()),))
        self._dev_loaded_at = self._clock()
        log.warning(
            "DEVELOPMENT AUTH IS ON: Gate accepts tokens signed by its own key %s (kid %s) and publishes "
            "it at /.well-known/jwks.json; mint one with `gate token --sub alice`. Never run like this in "
            "production: set security.jwt.jwk-set-uri.",
            key_pair.path,
            key_pair.kid,
        )

    async def close(self) -> None:
        if self._remote is not None:
            await self._remote.close()

    # -- the request path

    async def authenticate(self, authorization: str | None, x_api_key: str | None) -> Identity:
        token = self._credentials(authorization, x_api_key)
        cache = self._cache
        if cache is None:
            return await self._verify(token)
        # The digest, not the token, is the key: no bearer credential sits in the cache. SHA-256 is the
        # fastest collision-resistant hash here (about 0.6 us for a 500-byte token with SHA-NI).
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        try:
            identity = cache[digest]
        except KeyError:
            identity = await self._verify(token)
            cache[digest] = identity
            return identity
        self.cache_hits += 1
        return identity

    def _credentials(self, authorization: str | None, x_api_key: str | None) -> str:
        limit = self._max_length
        bearer: str | None = None
        if authorization is not None:
            if len(authorization) > limit + _HEADER_SLACK:
                raise AuthError("too_long", f"the Authorization header is longer than {limit} bytes")
            parts = authorization.split(None, 1)
            if parts:
                if len(parts) != 2 or parts[0].lower() != "bearer":
                    raise AuthError("malformed", "the Authorization header must read 'Bearer <token>'")
                bearer = parts[1].strip()
        api_key: str | None = None
        if x_api_key is not None:
            if len(x_api_key) > limit + _HEADER_SLACK:
                raise AuthError("too_long", f"the x-api-key header is longer than {limit} bytes")
            api_key = x_api_key.strip() or None
        if bearer is not None and api_key is not None and bearer != api_key:
            raise AuthError(
                "conflicting_credentials",
                "the Authorization and x-api-key headers carry different tokens; send one, or the same twice",
            )
        token = bearer if bearer is not None else api_key
        if token is None:
            raise AuthError(
                "missing", "no credentials: send the JWT as 'Authorization: Bearer <token>' or as 'x-api-key'"
            )
        if len(token) > limit:
            raise AuthError("too_long", f"the token is longer than {limit} bytes")
        return token

    async def _verify(self, token: str) -> Identity:
        # The shape check waits for a cache miss: a cached token has passed it already.
        if not _COMPACT_JWS.fullmatch(token):
            hint = (
                "; an Anthropic API key is not accepted here, use a token from the identity provider"
                if token.startswith("sk-ant-")
                else ""
            )
            message = f"the credential is not a JWT (three base64url parts, dot-joined){hint}"
            raise AuthError("malformed", message)
        header = _decode_header(token)
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            raise AuthError("malformed", "the token's header names no algorithm (alg)")
        family = _FAMILY_BY_ALGORITHM.get(algorithm)
        if family is None:
            raise AuthError(
                "algorithm",
                f"the token's algorithm {_shown(algorithm)} is not accepted (RS*, PS*, ES* or EdDSA only)",
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed", "the token's key id (kid) is not a string")
        sessions = self.sessions
        if sessions is not None and kid in sessions.kids:  # Gate's own session token: its keys, no network
            self.verifications += 1
            return sessions.verify(token, kid)
        key = await self._find_key(kid, family)
        verifier = key.verifiers.get(algorithm)
        if verifier is None:
            raise AuthError(
                "algorithm",
                f"the token's algorithm {algorithm} does not fit its key ({key.label}, {'/'.join(key.algorithms)})",
            )
        self.verifications += 1
        try:
            payload = self._decoder.decode(
                token, verifier, algorithms=key.algorithms, issuer=self._issuer, audience=self._audiences
            )
        except jwt.InvalidSignatureError:
            raise AuthError("signature", "the token's signature does not verify") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("algorithm", f"the token's algorithm does not fit its key, {key.label}") from None
        except jwt.InvalidIssuerError:
            raise AuthError("issuer", f"the token was not issued by {self._issuer}") from None
        except jwt.InvalidAudienceError:
            raise AuthError("audience", f"the token is not meant for {self._audience_text()}") from None
        except jwt.MissingRequiredClaimError as exc:
            if exc.claim == "iss":
                raise AuthError("issuer", f"the token names no issuer; expected {self._issuer}") from None
            if exc.claim == "aud":
                message = f"the token names no audience; expected {self._audience_text()}"
                raise AuthError("audience", message) from None
            raise AuthError("malformed", f"the token lacks the {_shown(exc.claim)} claim") from None
        except jwt.PyJWTError:
            raise AuthError("malformed", "the token cannot be decoded") from None
        return self._identity(payload, kid)

    async def _find_key(self, kid: str | None, family: str) -> VerificationKey:
        keys = self._key_set()
        key = keys.find(kid, family)
        if key is None and self._remote is not None:
            await self._remote.refresh_for_unknown_key()
            keys = self._key_set()
            key = keys.find(kid, family)
        if key is not None:
            return key
        if not keys.keys:
            raise AuthError(
                "jwks_unavailable",
                "the identity provider's signing keys (JWKS) are unavailable; retry shortly",
            )
        if kid is not None:
            raise AuthError("unknown_key", f"the JWKS has no key {_shown(kid)}")
        count = keys.count(family)
        raise AuthError(
            "unknown_key",
            f"the token names no key (kid) and the JWKS has {count or 'no'} {family} key{'s' * (count != 1)}",
        )

    def _identity(self, payload: Mapping[str, Any], kid: str | None) -> Identity:
        now = self._clock()
        expires = _numeric_date(payload, "exp")
        if expires is None and self._require_exp:
            raise AuthError("missing_exp", "the token has no expiry (exp claim); ask the identity provider for one")
        if expires is not None and now >= expires + self._leeway:
            raise AuthError("expired", f"the token expired at {_iso(expires)}")
        not_before = _numeric_date(payload, "nbf")
        if not_before is not None and now + self._leeway < not_before:
            raise AuthError("not_yet_valid", f"the token is not valid before {_iso(not_before)}")
        sub = payload.get("sub")
        if not isinstance(sub, str) or not sub.strip():
            raise AuthError("missing_sub", "the token names no subject (sub), so the caller is unknown")
        issuer = payload.get("iss")
        claims = self._claims
        email = payload.get(claims.email)
        name = payload.get(claims.name)
        return Identity(
            sub=sub,
            expires_at=expires,
            issuer=issuer if isinstance(issuer, str) else None,
            key_id=kid,
            email=email if isinstance(email, str) else None,
            name=name if isinstance(name, str) else None,
            groups=_groups(payload.get(claims.groups)),
        )

    def _cache_until(self, _digest: bytes, identity: Identity, now: float) -> float:
        return identity.expires_at if identity.expires_at is not None else now + _NO_EXP_CACHE_SECONDS

    def _forget_verified(self) -> None:
        # A key left the JWKS (rotated out, or revoked): tokens it signed must be checked again.
        if self._cache is not None:
            self._cache.clear()

    def _key_set(self) -> KeySet:
        return self._remote.keys if self._remote is not None else self._dev_keys

    def _audience_text(self) -> str:
        return " or ".join(self._audiences or ())

    def _refreshed(self, ok: bool) -> None:
        hook = self.on_refresh
        if hook is None:
            return
        try:
            hook(ok)
        except Exception:  # metrics must never break key refresh
            log.exception("the on_refresh hook failed")

    # -- reporting

    def health(self) -> dict[str, object]:
        """Spring-style component: DOWN without keys; a failing JWKS endpoint (old keys work on) shows in details."""
        if self._remote is not None:
            remote = self._remote
            return _health(
                up=remote.healthy,
                keys=len(remote.keys.keys),
                last_success=remote.last_success,
                last_error=remote.last_error,
                source=remote.source,
                now=self._clock(),
            )
        loaded = self._dev_loaded_at
        return _health(
            up=loaded is not None,
            keys=len(self._dev_keys.keys),
            last_success=loaded,
            last_error=None if loaded is not None else "not started",
            source="development",
            now=self._clock(),
        )

    def jwks_document(self) -> bytes | None:
        """The development public JWKS (for ``/.well-known/jwks.json``); None when a real IdP is used."""
        return self._dev_key_pair.jwks_document() if self._dev_key_pair is not None else None


def _health(
    *, up: bool, keys: int, last_success: float | None, last_error: str | None, source: str, now: float
) -> dict[str, object]:
    # Keys in hand verify tokens whether or not the IdP answers now, so only "no keys" is DOWN; a failing
    # refresh is reported in the details (and in gate_jwks_refreshes_total{outcome="failed"}), not as an outage.
    return {
        "status": "UP" if keys > 0 else "DOWN",
        "details": {
            "keys": keys,
            "refreshFailing": not up,
            "lastRefresh": _iso(last_success) if last_success is not None else None,
            "ageSeconds": round(max(now - last_success, 0.0), 1) if last_success is not None else None,
            "lastError": last_error,
            "source": source,
        },
    }


# ---------------------------------------------------------------------------------------------- helpers


def _decode_header(token: str) -> dict[str, Any]:
    segment = token[: token.index(".")]
    try:
        header = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:  # binascii.Error and orjson.JSONDecodeError are ValueErrors
        raise AuthError("malformed", "the token's header is not base64url-encoded JSON") from None
    if not isinstance(header, dict):
        raise AuthError("malformed", "the token's header is not a JSON object")
    return header


def _groups(value: Any) -> frozenset[str]:
    """A groups claim as a set: a list of strings (others ignored) or one string; anything else is no group."""
    if isinstance(value, str):
        return frozenset((value,)) if value else frozenset()
    if isinstance(value, list):
        return frozenset(item for item in value if isinstance(item, str) and item)
    return frozenset()


def _numeric_date(payload: Mapping[str, Any], claim: str) -> float | None:
    if claim not in payload:
        return None
    value = payload[claim]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError("malformed", f"the token's {claim} claim is not a number of seconds")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise AuthError("malformed", f"the token's {claim} claim is not a finite number of seconds")
    return seconds


def _iso(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        return f"{seconds:.0f} s after the epoch"


def _shown(value: object) -> str:
    """A short, printable rendering of a value taken from a token or JWKS, safe for messages and logs."""
    text = value if isinstance(value, str) else repr(value)
    cleaned = "".join(ch if " " <= ch <= "~" else "?" for ch in text[:40])
    return f"'{cleaned}{'...' if len(text) > 40 else ''}'"
