"""``GET /managed/settings``: the Claude Code managed-settings document chosen by the caller's groups and e-mail
domain (``policy.groups``), as Anthropic's gateway serves it: ``{"uuid","checksum","settings"}`` with an ETag
and ``304`` for ``If-None-Match`` (Claude Code polls about hourly), ``404`` when no policy applies.

When Gate relays Claude Code's telemetry, the OTLP settings that point Claude Code at Gate are pushed in ``env``
(a policy's own ``env`` wins).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson
from multidict import istr

from gate.http.server import Request, Response
from gate.identity.auth import Authenticator, AuthError, Identity, www_authenticate
from gate.ops.errors import error_response
from gate.policy.groups import PolicyBook, deep_merge

__all__ = ["ManagedSettings", "document"]

_AUTHORIZATION = istr("authorization")
_X_API_KEY = istr("x-api-key")
_IF_NONE_MATCH = istr("if-none-match")


def document(settings: Mapping[str, Any]) -> tuple[bytes, str]:
    """The response body and its checksum (``sha256:<hex>`` of the settings with sorted keys)."""
    canonical = orjson.dumps(settings, option=orjson.OPT_SORT_KEYS)
    checksum = "sha256:" + hashlib.sha256(canonical).hexdigest()
    body = orjson.dumps({"uuid": checksum, "checksum": checksum, "settings": orjson.Fragment(canonical)})
    return body, checksum


class ManagedSettings:
    def __init__(self, book: PolicyBook, auth: Authenticator, *, pushed_env: Mapping[str, str] | None = None) -> None:
        self._book = book
        self._auth = auth
        self._pushed = {"env": dict(pushed_env)} if pushed_env else None
        self._documents: dict[tuple[str, ...], tuple[bytes, str]] = {}
        self.served = 0  # answers given (200 or 304)

    def resolve(self, identity: Identity) -> tuple[bytes, str] | None:
        resolved = self._book.resolve(identity)
        if resolved is None or resolved.managed_settings is None:
            return None
        cached = self._documents.get(resolved.names)
        if cached is None:
            settings = dict(resolved.managed_settings)
            if self._pushed is not None:
                settings = deep_merge(self._pushed, settings)
            cached = self._documents[resolved.names] = document(settings)
        return cached

    async def handle(self, request: Request) -> Response:
        try:
            identity = await self._auth.authenticate(
                request.headers.get(_AUTHORIZATION), request.headers.get(_X_API_KEY)
            )
        except AuthError as exc:
            return error_response(401, exc.message, headers={"WWW-Authenticate": www_authenticate(exc)})
        found = self.resolve(identity)
        if found is None:
            return error_response(404, "No managed settings apply to you on this gateway.")
        body, checksum = found
        self.served += 1
        etag = f'"{checksum}"'
        headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
        wanted = request.headers.get(_IF_NONE_MATCH)
        if wanted is not None and (
            wanted.strip() == "*" or etag in [t.strip().removeprefix("W/") for t in wanted.split(",")]
        ):
            return Response(status=304, headers=headers)
        return Response(body=body, content_type="application/json", headers=headers)
