"""Claude on Amazon Bedrock: ``InvokeModel`` (``/model/{id}/invoke``) and ``InvokeModelWithResponseStream``
(``/model/{id}/invoke-with-response-stream``), signed with SigV4 (botocore, the standard AWS credential chain or
static keys) or sent with a Bedrock API key (``Authorization: Bearer``).

The body is Anthropic's without ``model`` (it is in the URL) and ``stream`` (it is the operation), with
``anthropic_version: bedrock-2023-05-31`` and the ``anthropic-beta`` values as ``anthropic_beta``. A streamed answer
is turned back into Anthropic's SSE by ``gate.upstreams.eventstream``; errors into Anthropic's error shape.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import orjson
from botocore.exceptions import BotoCoreError
from botocore.exceptions import ClientError as AwsClientError
from multidict import CIMultiDict

from gate.http.client import UpstreamResponse
from gate.upstreams.adapter import (
    MESSAGES,
    Adapter,
    Answer,
    Outgoing,
    Prepared,
    TranslatedError,
    UpstreamUnavailable,
    beta_values,
)
from gate.upstreams.eventstream import EventStreamAnswer

__all__ = ["BedrockAdapter"]

BEDROCK_VERSION = "bedrock-2023-05-31"
_REQUEST_ID = "x-amzn-requestid"


class BedrockAdapter(Adapter):
    kind = "bedrock"
    anthropic_format = False
    routes = frozenset({MESSAGES})  # Bedrock's CountTokens takes another body shape: not offered (yet)
    request_id_header = _REQUEST_ID

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self.settings
        self._region = settings.region or ""
        self._api_key = settings.api_key.get_secret_value().strip() if settings.api_key else ""
        self._credentials: Any = None

    async def start(self) -> None:
        await super().start()
        if not self._api_key:
            self._credentials = await asyncio.to_thread(self._load_credentials)

    def _load_credentials(self) -> Any:
        import botocore.session
        from botocore.credentials import Credentials

        settings = self.settings
        if settings.access_key_id and settings.secret_access_key:
            token = settings.session_token.get_secret_value() if settings.session_token else None
            return Credentials(
                settings.access_key_id.get_secret_value(), settings.secret_access_key.get_secret_value(), token or None
            )
        session = botocore.session.Session(profile=settings.profile)
        credentials = session.get_credentials()
        if credentials is None:
            raise UpstreamUnavailable(
                f"bedrock upstream {self.name!r}: no AWS credentials (set access-key-id and secret-access-key, "
                "api-key, or the standard AWS chain: environment, profile, web identity, container or instance role)"
            )
        return credentials

    async def _frozen(self) -> Any:
        credentials = self._credentials
        refresh_needed = getattr(credentials, "refresh_needed", None)
        try:
            if refresh_needed is not None and refresh_needed():
                return await asyncio.to_thread(credentials.get_frozen_credentials)  # may call STS or IMDS
            return credentials.get_frozen_credentials()
        except (BotoCoreError, AwsClientError) as exc:
            raise UpstreamUnavailable(f"AWS credentials could not be refreshed: {type(exc).__name__}") from None

    async def prepare(self, call: Outgoing) -> Prepared:
        if call.route != MESSAGES:
            raise UpstreamUnavailable(f"{call.route} is not served by Bedrock")
        parsed = dict(call.parsed or {})
        parsed.pop("model", None)
        parsed.pop("stream", None)
        parsed.setdefault("anthropic_version", BEDROCK_VERSION)
        betas = beta_values(call.headers)
        if betas:
            parsed.setdefault("anthropic_beta", betas)
        body = orjson.dumps(parsed)
        operation = "invoke-with-response-stream" if call.stream else "invoke"
        path = f"/model/{quote(call.upstream_model or '', safe=':')}/{operation}"
        headers: CIMultiDict[str] = CIMultiDict()
        headers["content-type"] = "application/json"
        headers["accept"] = "application/vnd.amazon.eventstream" if call.stream else "application/json"
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
            return Prepared(path, headers, body)
        return Prepared(path, await self._signed(path, headers, body), body)

    async def _signed(self, path: str, headers: CIMultiDict[str], body: bytes) -> CIMultiDict[str]:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method="POST", url=self.base_url + path, data=body, headers=dict(headers))
        SigV4Auth(await self._frozen(), "bedrock", self._region).add_auth(request)
        return CIMultiDict(request.headers.items())

    def answer(self, response: UpstreamResponse, call: Outgoing) -> Answer:
        if response.status >= 400:
            return TranslatedError(response, request_id_header=_REQUEST_ID)
        if call.stream:
            return EventStreamAnswer(response, request_id_header=_REQUEST_ID)
        return response
