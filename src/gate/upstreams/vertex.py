"""Claude on Google Vertex AI: ``:rawPredict`` / ``:streamRawPredict`` (and ``count-tokens:rawPredict``) with
OAuth2 access tokens from a service-account file or Application Default Credentials (google-auth).

Vertex speaks Anthropic's body and answer (JSON, and the same SSE for streams) with three differences that this
adapter makes: the model goes in the URL, not the body; ``anthropic_version`` is ``vertex-2023-10-16`` in the
body; and ``anthropic-beta`` values travel in the body as ``anthropic_beta``. Its own errors (a bad project, a
denied role) come in Google's shape and are turned into Anthropic's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import quote

import orjson
from multidict import CIMultiDict

from gate.http.client import UpstreamResponse
from gate.upstreams.adapter import (
    COUNT_TOKENS,
    MESSAGES,
    Adapter,
    Answer,
    Outgoing,
    Prepared,
    TranslatedError,
    UpstreamUnavailable,
    beta_values,
)

__all__ = ["GoogleTokens", "VertexAdapter"]

log = logging.getLogger("gate.upstreams.vertex")

VERTEX_VERSION = "vertex-2023-10-16"
_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
_REQUEST_ID = "x-goog-request-id"  # on an error answer, kept as `request-id` when Google sends one


def _segment(value: str) -> str:
    # As the anthropic SDK's AnthropicVertex: a path segment, with ";" quoted too (some servers cut a segment at ";").
    return quote(value, safe="!$&'()*+,=:@")


class GoogleTokens:
    """Access tokens of one Google identity, refreshed before they expire (google-auth's ``valid`` turns False a few
    minutes early), one refresh at a time, in a thread: google-auth's transport is blocking."""

    def __init__(self, credentials_file: str | None) -> None:
        self._file = credentials_file
        self._credentials: Any = None
        self._lock = asyncio.Lock()
        self._request: Any = None

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import google.auth
        import google.auth.transport.requests
        from google.auth.exceptions import DefaultCredentialsError
        from google.oauth2 import service_account

        try:
            if self._file:
                self._credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                    self._file, scopes=_SCOPES
                )
            else:
                self._credentials, _project = google.auth.default(scopes=_SCOPES)
        except (DefaultCredentialsError, OSError, ValueError) as exc:
            source = f"credentials-file {self._file}" if self._file else "Application Default Credentials"
            raise UpstreamUnavailable(f"no Google credentials from {source}: {type(exc).__name__}") from None
        self._request = google.auth.transport.requests.Request()

    async def token(self) -> str:
        credentials = self._credentials
        if credentials is None:
            raise UpstreamUnavailable("Google credentials are not loaded")
        if not credentials.valid:
            async with self._lock:
                if not credentials.valid:  # another request may have refreshed while this one waited
                    await self._refresh(credentials)
        token: str = credentials.token
        return token

    async def _refresh(self, credentials: Any) -> None:
        from google.auth.exceptions import GoogleAuthError

        try:
            await asyncio.to_thread(credentials.refresh, self._request)
        except (GoogleAuthError, OSError) as exc:
            log.warning("Google access token refresh failed: %s", type(exc).__name__)
            raise UpstreamUnavailable("the Google access token could not be refreshed") from None


class VertexAdapter(Adapter):
    kind = "vertex"
    anthropic_format = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self.settings
        assert settings.project_id and settings.region
        self._parent = f"/v1/projects/{_segment(settings.project_id)}/locations/{_segment(settings.region)}"
        self.tokens = GoogleTokens(settings.credentials_file)

    async def start(self) -> None:
        await super().start()
        await self.tokens.start()

    async def prepare(self, call: Outgoing) -> Prepared:
        parsed = dict(call.parsed or {})
        if call.route == MESSAGES:
            parsed.pop("model", None)
            specifier = "streamRawPredict" if call.stream else "rawPredict"
            path = f"{self._parent}/publishers/anthropic/models/{_segment(call.upstream_model or '')}:{specifier}"
        elif call.route == COUNT_TOKENS:
            parsed["model"] = call.upstream_model
            path = f"{self._parent}/publishers/anthropic/models/count-tokens:rawPredict"
        else:
            raise UpstreamUnavailable(f"{call.route} is not served by Vertex AI")
        parsed.setdefault("anthropic_version", VERTEX_VERSION)
        betas = beta_values(call.headers)
        if betas:
            parsed.setdefault("anthropic_beta", betas)
        headers: CIMultiDict[str] = CIMultiDict()
        headers["content-type"] = "application/json"
        headers["authorization"] = f"Bearer {await self.tokens.token()}"
        return Prepared(path, headers, orjson.dumps(parsed))

    def answer(self, response: UpstreamResponse, call: Outgoing) -> Answer:
        if response.status >= 400:
            return TranslatedError(response, request_id_header=_REQUEST_ID)
        return response
