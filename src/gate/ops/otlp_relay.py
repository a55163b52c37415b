"""``POST /v1/metrics``, ``/v1/logs``, ``/v1/traces``: Claude Code's own OpenTelemetry (OTLP/HTTP, protobuf or
JSON), accepted from a signed-in caller and relayed verbatim to the configured collectors, with the caller's
identity attached as ``x-gate-subject`` / ``x-gate-email`` / ``x-gate-groups`` headers. It is never used for
billing: Gate's usage events stay the record.

The answer (``200``, an empty OTLP export response) does not wait for the collectors: each relay is a background
task with a deadline, at most ``max-in-flight`` of them at once (past that a batch is dropped and counted), so
a slow collector can never hold Claude Code. Bodies may come chunked or without a ``Content-Length``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import aiohttp
from multidict import istr

from gate.http.server import BadBody, BodyTooLarge, Request, Response
from gate.identity.auth import Authenticator, AuthError, Identity, www_authenticate
from gate.ops.errors import error_response
from gate.settings import TelemetryRelaySettings

__all__ = ["TelemetryRelay"]

log = logging.getLogger(__name__)

_AUTHORIZATION = istr("authorization")
_X_API_KEY = istr("x-api-key")
_CONTENT_TYPE = istr("content-type")
_CONTENT_ENCODING = istr("content-encoding")
_SIGNALS: Final = {"/v1/metrics": "metrics", "/v1/logs": "logs", "/v1/traces": "traces"}
_JSON: Final = "application/json"
_PROTOBUF: Final = "application/x-protobuf"


class TelemetryRelay:
    def __init__(self, settings: TelemetryRelaySettings, auth: Authenticator, *, max_body: int, body_timeout: float):
        self._destinations = settings.forward_to
        self._timeout = settings.timeout
        self._max_in_flight = settings.max_in_flight
        self._auth = auth
        self._max_body = max_body
        self._body_timeout = body_timeout
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.relayed = 0
        self.dropped = 0
        self.failed = 0

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(_SIGNALS)

    async def start(self) -> None:
        if self._destinations:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout), trust_env=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def handle(self, request: Request) -> Response:
        try:
            identity = await self._auth.authenticate(
                request.headers.get(_AUTHORIZATION), request.headers.get(_X_API_KEY)
            )
        except AuthError as exc:
            return error_response(401, exc.message, headers={"WWW-Authenticate": www_authenticate(exc)})
        if request.content_length is not None and request.content_length > self._max_body:
            return error_response(413, f"Request body is larger than the gateway's limit of {self._max_body} bytes.")
        try:
            async with asyncio.timeout(self._body_timeout):
                body = await request.read()
        except BodyTooLarge:
            return error_response(413, f"Request body is larger than the gateway's limit of {self._max_body} bytes.")
        except BadBody:
            return error_response(400, "The request body's chunked framing is malformed.")
        except TimeoutError:
            return error_response(408, "The request body did not arrive in time.")
        content_type = request.headers.get(_CONTENT_TYPE, _PROTOBUF)
        signal = _SIGNALS[request.path]
        self._relay(signal, body, content_type, request.headers.get(_CONTENT_ENCODING), identity)
        if content_type.startswith(_JSON):
            return Response(body=b"{}", content_type=_JSON)
        return Response(body=b"", content_type=_PROTOBUF)  # an empty Export*ServiceResponse

    def _relay(self, signal: str, body: bytes, content_type: str, encoding: str | None, identity: Identity) -> None:
        if self._session is None or not body:
            return
        headers = {"Content-Type": content_type, "x-gate-subject": identity.sub}
        if encoding:
            headers["Content-Encoding"] = encoding
        if identity.email:
            headers["x-gate-email"] = identity.email
        if identity.groups:
            headers["x-gate-groups"] = ",".join(sorted(identity.groups))
        for destination in self._destinations:
            if signal not in destination.signals:
                continue
            if len(self._tasks) >= self._max_in_flight:
                self.dropped += 1
                continue
            extra = {name: value.get_secret_value() for name, value in destination.headers.items()}
            url = f"{destination.url}/v1/{signal}"
            task = asyncio.create_task(self._send(url, body, {**headers, **extra}), name="gate-otlp-relay")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        assert self._session is not None
        try:
            async with self._session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status >= 300:
                    self.failed += 1
                    log.warning("telemetry relay: the collector answered HTTP %d", response.status)
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.failed += 1
            log.warning("telemetry relay: the collector is unreachable (%s)", type(exc).__name__)
            return
        self.relayed += 1
