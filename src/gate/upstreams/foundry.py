"""Claude on Microsoft Foundry: its Anthropic-compatible endpoint,
``https://{resource}.services.ai.azure.com/anthropic/v1/messages``.

The wire format is Anthropic's (paths, headers, ``anthropic-beta``, SSE), so the request goes as the client sent it
with the model map's deployment name in ``model``. Credentials: a resource key (sent as ``x-api-key``, which Foundry
accepts as ``api-key``), or an Entra ID bearer token, static or read from a file. azure-identity is not used (it
pulls in MSAL and much more): a workload-identity or sidecar-refreshed token file covers managed deployments, and
the file is read again whenever it changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from multidict import istr

from gate.upstreams.adapter import Adapter, Outgoing, Prepared, UpstreamUnavailable
from gate.upstreams.anthropic import request_headers, with_model

__all__ = ["FoundryAdapter"]

_X_API_KEY = istr("x-api-key")
_AUTHORIZATION = istr("authorization")


class FoundryAdapter(Adapter):
    kind = "foundry"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self.settings
        self._api_key = settings.api_key.get_secret_value().strip() if settings.api_key else ""
        self._token = settings.token.get_secret_value().strip() if settings.token else ""
        self._token_file = Path(settings.token_file) if settings.token_file else None
        self._token_stamp: tuple[int, int] | None = None

    def _bearer(self) -> str:
        if self._token_file is None:
            return self._token
        try:
            stat = os.stat(self._token_file)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._token_stamp:
                self._token = self._token_file.read_text(encoding="utf-8").strip()
                self._token_stamp = stamp
        except OSError as exc:
            raise UpstreamUnavailable(f"cannot read the Entra ID token file: {exc.strerror}") from None
        return self._token

    async def prepare(self, call: Outgoing) -> Prepared:
        headers = request_headers(
            call.headers,
            api_key=self._api_key,
            default_version=self._api.default_version,
            accept_encoding=call.accept_encoding,
        )
        if not self._api_key:
            del headers[_X_API_KEY]
            token = self._bearer()
            if not token:
                raise UpstreamUnavailable("the Entra ID token is empty")
            headers[_AUTHORIZATION] = f"Bearer {token}"
        return Prepared(call.path_qs, headers, with_model(call))
