"""The one rule for masking secrets, used by logs, health, sink errors, auth's messages and ``gate config``.

A secret is an Anthropic key (``sk-ant-...``), a JWT (``eyJ...``), a ``Bearer`` credential, the user info of a
URL (``scheme://user:password@host``: all of it, since a user name can itself be a token, as in GitHub's
``https://<token>:x-oauth-basic@...``), the value of a URL query parameter whose name says secret (``?token=``,
``?sig=``), and, in configuration, any value whose key names a secret (``value``, ``password``, ``secret``,
``token``). Each becomes ``***`` with its recognisable prefix kept; hosts, ports and paths stay visible, since an
operator needs them to tell which broker or identity provider is meant.

Written here rather than taken from a library: the scanners (detect-secrets, trufflehog) work on files and
report rather than rewrite, and logging libraries leave redaction to the application. It is one regex pass.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from pydantic import SecretStr

__all__ = ["MASK", "is_secret_key", "mask_config", "mask_url", "redact"]

MASK: Final = "***"

# One alternation, one pass. A JWT is three base64url segments whose header starts `{"` (eyJ). URL user info runs
# from `://` to the last `@` before the host (a raw `@` in a password is masked with it) and never crosses a
# quote, space or bracket, so a URL inside JSON or prose masks only its own user info.
_SECRET: Final = re.compile(
    r"(?P<key>sk-ant-)[A-Za-z0-9_-]+"
    r"|(?P<jwt>eyJ)[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
    r"|(?P<bearer>\b(?i:bearer))\s+[^\s\"',;]+"
    r"|(?P<url>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#\"'<>\[\]]*@"
    r"|(?P<param>[?&][\w.-]*(?i:token|secret|password|passwd|sig|signature|key|auth|credential)[\w.-]*=)"
    r"[^&#\s\"'<>]+"
)
_SECRET_KEY: Final = re.compile(r"(^|[-_])(value|password|secret|token)$")
_URL_KEY: Final = re.compile(r"(^|[-_])(url|uri)$")
# For values known to be URLs: the user info even without a scheme (`guest:secret@broker:5672`).
_URL_USERINFO: Final = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?[^\s/?#]*@")


def _masked(match: re.Match[str]) -> str:
    kind = match.lastgroup
    prefix = match.group(kind) if kind else ""
    if kind == "bearer":
        return f"{prefix} {MASK}"  # the scheme as written
    if kind == "url":
        return f"{prefix}{MASK}@"
    return f"{prefix}{MASK}"


def redact(text: str, *known: str) -> str:
    """``text`` with every secret masked, and each of ``known`` (a password, a whole URL) replaced outright.

    Clean text costs four substring scans and returns ``text`` itself: a regex alternation defeats the engine's
    literal-prefix search and is about five times slower on the usual log line.
    """
    for secret in known:
        if secret:
            text = text.replace(secret, MASK)
    if "sk-ant-" in text or "eyJ" in text or "://" in text or "bearer" in text.lower():
        return _SECRET.sub(_masked, text)
    return text


def mask_url(url: str) -> str:
    """A URL with its user info (with or without a scheme) and secret query values masked, host kept."""
    return redact(_URL_USERINFO.sub(lambda m: f"{m.group('scheme') or ''}{MASK}@", url, count=1))


def is_secret_key(name: str) -> bool:
    """Whether a configuration key names a secret (``value``, ``password``, ``secret``, ``token``)."""
    return bool(_SECRET_KEY.search(name))


def mask_config(data: Any, key: str = "") -> Any:
    """Configuration data (mappings, lists, scalars, ``SecretStr``) with every secret masked.

    Values under a secret key are masked whole; a ``SecretStr`` elsewhere (a broker URL), a value under a
    ``url``/``uri`` key and anything with ``://`` show what :func:`mask_url` leaves of them (user info even
    without a scheme: ``guest:secret@broker`` is a mistake ``gate config`` must show safely); every other
    string goes through :func:`redact`.
    """
    if isinstance(data, Mapping):
        return {k: mask_config(v, str(k)) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [mask_config(v, key) for v in data]
    if isinstance(data, SecretStr):
        value = data.get_secret_value()
        if not value:
            return value
        return MASK if is_secret_key(key) or "://" not in value else mask_url(value)
    if not isinstance(data, str) or not data:
        return data
    if is_secret_key(key):
        return MASK
    return mask_url(data) if _URL_KEY.search(key) or "://" in data else redact(data)
