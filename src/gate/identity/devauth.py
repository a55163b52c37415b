"""Development authentication: a local Ed25519 key pair with which Gate signs, and accepts, its own tokens.

Only ever used with the `local` profile and no JWKS configured (``GateSettings.dev_auth``).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import os
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gate.settings import ConfigError, GateSettings

__all__ = ["DEV_ALGORITHM", "DevKeyPair", "load_or_create_key_pair", "mint_dev_token", "resolve_data_dir"]

log = logging.getLogger(__name__)

DEV_ALGORITHM = "EdDSA"
PRIVATE_KEY_FILE = "dev-signing-key.pem"
_PLACEHOLDER = re.compile(r"\$\{([^}:]+)(?::([^}]*))?\}")


@dataclass(frozen=True, slots=True)
class DevKeyPair:
    """The development signing key, its key id (RFC 7638 thumbprint) and the file it lives in."""

    private_key: Ed25519PrivateKey
    kid: str
    path: Path

    def public_jwk(self) -> dict[str, str]:
        return {**_public_members(self.private_key), "kid": self.kid, "use": "sig", "alg": DEV_ALGORITHM}

    def jwks_document(self) -> bytes:
        return orjson.dumps({"keys": [self.public_jwk()]})

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(
            dict(claims), self.private_key, algorithm=DEV_ALGORITHM, headers={"kid": self.kid, "typ": "JWT"}
        )


def resolve_data_dir(configured: str, env: Mapping[str, str] | None = None) -> Path:
    """The directory for the key pair; resolves the default's ``${XDG_DATA_HOME:~/.local/share}``.

    The settings loader resolves placeholders only in YAML values, so the packaged default arrives verbatim.
    An empty variable counts as unset, as the XDG base directory specification says.
    """
    values = os.environ if env is None else env
    text = _PLACEHOLDER.sub(lambda m: values.get(m.group(1).strip()) or (m.group(2) or ""), configured)
    return Path(text).expanduser()


def load_or_create_key_pair(data_dir: str | Path) -> DevKeyPair:
    """Load the key pair from ``data_dir``, creating directory (0700) and private key file (0600) if absent.

    Creation is atomic (write a private temp file, then hard-link it into place), so two workers starting
    at once end up with the same key.
    """
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)  # mkdir's mode is narrowed by the umask only, never widened; be exact
    elif directory.stat().st_mode & 0o077:
        log.warning("development key directory %s is readable by other users; consider chmod 700", directory)
    path = directory / PRIVATE_KEY_FILE
    if not path.exists():
        _create_private_key_file(path)
    return _load(path)


def _create_private_key_file(path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
        log.info("created a development signing key at %s", path)
    except FileExistsError:
        pass  # another worker won the race; its key is the one everybody uses
    finally:
        temp.unlink()


def _load(path: Path) -> DevKeyPair:
    if path.stat().st_mode & 0o077:
        log.warning("development signing key %s was readable by other users; narrowing it to 0600", path)
        os.chmod(path, 0o600)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError:
        raise ConfigError(f"{path}: not a PEM private key (delete it to have Gate make a new one)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key (delete it to have Gate make a new one)")
    return DevKeyPair(private_key=key, kid=_thumbprint(key), path=path)


def _public_members(key: Ed25519PrivateKey) -> dict[str, str]:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}


def _thumbprint(key: Ed25519PrivateKey) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, without whitespace."""
    canonical = orjson.dumps(_public_members(key), option=orjson.OPT_SORT_KEYS)
    return _b64url(hashlib.sha256(canonical).digest())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_dev_token(settings: GateSettings, sub: str, ttl_seconds: float, *, now: float | None = None) -> str:
    """A token that Gate in development mode accepts (``gate token --sub alice --ttl 1h``)."""
    if not settings.dev_auth:
        raise ConfigError(
            "development tokens need development auth: the `local` profile, security.jwt.dev.enabled and no "
            "security.jwt.jwk-set-uri"
        )
    if not sub.strip():
        raise ValueError("the subject (--sub) must not be empty")
    if ttl_seconds <= 0:
        raise ValueError("the lifetime (--ttl) must be positive")
    jwt_settings = settings.security.jwt
    key_pair = load_or_create_key_pair(resolve_data_dir(jwt_settings.dev.data_dir))
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {
        "iss": jwt_settings.issuer or jwt_settings.dev.issuer,
        "sub": sub,
        "iat": int(issued),
        "exp": math.ceil(issued + ttl_seconds),
        "jti": uuid.uuid4().hex,
    }
    if jwt_settings.audiences:
        audiences = jwt_settings.audiences
        claims["aud"] = audiences[0] if len(audiences) == 1 else list(audiences)
    return key_pair.sign(claims)
