"""What the relay needs of an upstream, whatever cloud it is: the interface every adapter implements, the model
map, the ordered list the relay fails over along, and the answer that turns a cloud's error body back into
Anthropic's error shape.

An adapter builds the request (``prepare``: path, headers with credentials, body rewrite) and turns the answer
back into what Anthropic's API would have sent (``answer``). The relay sees every answer through ``Answer``,
the part of ``gate.http.client.UpstreamResponse`` it reads, so a translated stream (Bedrock's event-stream frames)
is relayed and metered exactly like Anthropic's own.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

from gate.http.client import Pool, UpstreamResponse
from gate.ops.errors import error_type_for
from gate.settings import AnthropicApiSettings, UpstreamSettings
from gate.upstreams.breaker import CircuitBreaker
from gate.upstreams.keys import Key, KeyPool

__all__ = [
    "Adapter",
    "Answer",
    "ModelMap",
    "Outgoing",
    "Prepared",
    "TranslatedError",
    "UpstreamUnavailable",
    "Upstreams",
    "beta_values",
]

log = logging.getLogger("gate.upstreams")

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
_ANTHROPIC_BETA = istr("anthropic-beta")
_CONTENT_TYPE = istr("content-type")
_REQUEST_ID = istr("request-id")
_MAX_ERROR_BODY = 64 * 1024


class Answer(Protocol):
    """An upstream answer whose head has arrived, as the relay reads it (``UpstreamResponse`` is one).

    The relay streams an ``UpstreamResponse`` (a pass-through answer) by having its connection push the bytes
    (``UpstreamResponse.push_to``), with no task woken per chunk; any other answer, one that transforms what
    upstream sends, is read through ``readany``. So an answer that forwards upstream's bytes unchanged is best
    returned as the ``UpstreamResponse`` itself rather than wrapped."""

    status: int
    headers: CIMultiDictProxy[str]
    content_length: int | None

    def complete(self) -> bool: ...

    async def readany(self) -> bytes: ...

    async def read(self) -> bytes: ...

    def release(self) -> None: ...


class UpstreamUnavailable(Exception):
    """The adapter could not build the call (credentials could not be had): nothing was sent."""


@dataclass(slots=True, frozen=True)
class Outgoing:
    """One client request as an adapter needs it to build the upstream call."""

    method: str
    route: str  # "/v1/messages", "/v1/messages/count_tokens", "/v1/models", "/v1/models/{id}"
    path_qs: str
    headers: Mapping[str, str]  # the client's
    body: bytes | None
    parsed: dict[str, Any] | None  # the body as JSON, when it is a JSON object
    upstream_model: str | None  # the model id this upstream is sent (the model map's answer)
    stream: bool
    accept_encoding: str | None
    key: Key | None  # the company key, for the anthropic upstream


@dataclass(slots=True, frozen=True)
class Prepared:
    """The upstream call to send."""

    path_qs: str
    headers: CIMultiDict[str]
    body: bytes | None


class ModelMap:
    """Anthropic model id -> this upstream's id: exact ids first, then the longest ``prefix*``. Empty: every model
    is served under its own id."""

    __slots__ = ("_exact", "_prefixes")

    def __init__(self, models: Mapping[str, str]) -> None:
        self._exact = {k: v for k, v in models.items() if not k.endswith("*")}
        self._prefixes = sorted(((k[:-1], v) for k, v in models.items() if k.endswith("*")), key=lambda p: -len(p[0]))

    def __bool__(self) -> bool:
        return bool(self._exact or self._prefixes)

    def lookup(self, model: str | None) -> str | None:
        """This upstream's id for ``model``, or None when it does not serve it."""
        if not self:
            return model
        if model is None:
            return None
        found = self._exact.get(model)
        if found is not None:
            return found
        for prefix, target in self._prefixes:
            if model.startswith(prefix):
                return target
        return None


def beta_values(headers: Mapping[str, str]) -> list[str]:
    """The ``anthropic-beta`` values of a request, in order (the header may repeat and holds a comma list)."""
    values: list[str] = []
    getall = getattr(headers, "getall", None)
    raw = getall(_ANTHROPIC_BETA, []) if getall is not None else [headers.get(_ANTHROPIC_BETA) or ""]
    for value in raw:
        values.extend(part.strip() for part in value.split(",") if part.strip())
    return values


def egress_proxy(url: str) -> str | None:
    """The proxy from HTTPS_PROXY / HTTP_PROXY / NO_PROXY (curl's conventions, via urllib) for ``url``, or None."""
    target = URL(url)
    if target.host is None or urllib.request.proxy_bypass(target.host):
        return None
    return urllib.request.getproxies().get(target.scheme)


class Adapter:
    """One upstream: its name, breaker, model map, pool and wire format. Subclasses implement ``prepare`` and, when
    the answer needs it, ``answer``."""

    kind = "anthropic"
    routes: frozenset[str] = frozenset({MESSAGES, COUNT_TOKENS})
    keys: KeyPool | None = None  # only the anthropic upstream rotates company keys
    request_id_header = "request-id"  # the header of an answer that names the call to the upstream's support
    anthropic_format = True  # the upstream takes Anthropic's own paths and bodies

    def __init__(self, settings: UpstreamSettings, api: AnthropicApiSettings, breaker: CircuitBreaker) -> None:
        self.name = settings.name
        self.settings = settings
        self.breaker = breaker
        self.models = ModelMap(settings.models)
        self.betas = None if settings.betas is None else frozenset(settings.betas)
        self.base_url = settings.endpoint() if settings.type != "anthropic" else (settings.base_url or api.base_url)
        self.server_address = urlsplit(self.base_url).hostname or ""
        self._api = api
        self._pool: Pool | None = None

    # ------------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        api = self._api
        self._pool = Pool(
            self.base_url,
            limit=api.pool_size,
            connect_timeout=api.timeouts.connect,
            proxy=egress_proxy(self.base_url) if api.use_env_proxy else None,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # ------------------------------------------------------------------------------------------- calls

    def serves(self, route: str, model: str | None) -> str | bool | None:
        """This upstream's model id for a call (or True for a call without one), False when it cannot serve it."""
        if route not in self.routes:
            return False
        if route in (MESSAGES, COUNT_TOKENS):
            if model is None:
                # Anthropic's wire format carries the body as it is (upstream answers the missing model); a cloud
                # puts the model in its URL, so it cannot take the call at all.
                return self.anthropic_format
            mapped = self.models.lookup(model)
            return False if mapped is None else mapped
        return True

    def refuses_betas(self, betas: Iterable[str]) -> list[str]:
        """The requested ``anthropic-beta`` values this upstream cannot honour (``betas`` in its settings)."""
        if self.betas is None:
            return []
        return [beta for beta in betas if beta not in self.betas]

    @property
    def label(self) -> str:
        """How answers to the client name this upstream."""
        return "Anthropic" if self.kind == "anthropic" else f"upstream {self.name}"

    @property
    def configured(self) -> bool:
        """Whether this upstream has credentials to call with."""
        return True

    async def prepare(self, call: Outgoing) -> Prepared:
        raise NotImplementedError

    async def send(self, prepared: Prepared, method: str) -> UpstreamResponse:
        if self._pool is None:
            raise RuntimeError(f"upstream {self.name} has not been started")
        return await self._pool.request(method, prepared.path_qs, prepared.headers.items(), prepared.body)

    def answer(self, response: UpstreamResponse, call: Outgoing) -> Answer:
        """The answer as Anthropic's API would have sent it; an Anthropic-compatible upstream's is unchanged."""
        return response

    def health(self) -> dict[str, Any]:
        snapshot = self.breaker.snapshot()
        status = {"CLOSED": "UP", "HALF_OPEN": "UNKNOWN", "OPEN": "DOWN"}.get(str(snapshot.get("state")), "UNKNOWN")
        return {
            "status": status,
            "details": {"type": self.kind, "address": self.server_address, "circuitBreaker": snapshot},
        }


class Upstreams:
    """The ordered upstreams of a Gate; ``candidates`` is the failover order for one call."""

    def __init__(self, adapters: list[Adapter]) -> None:
        if not adapters:
            raise ValueError("at least one upstream")
        self.adapters = adapters

    def __iter__(self) -> Iterator[Adapter]:
        return iter(self.adapters)

    def __len__(self) -> int:
        return len(self.adapters)

    def candidates(
        self, route: str, model: str | None, betas: list[str]
    ) -> tuple[list[tuple[Adapter, str | None]], str | None]:
        """(adapter, upstream model id) in failover order, or no candidate and the reason for the client."""
        found: list[tuple[Adapter, str | None]] = []
        refused: dict[str, list[str]] = {}
        for adapter in self.adapters:
            served = adapter.serves(route, model)
            if served is False:
                continue
            refusing = adapter.refuses_betas(betas)
            if refusing:
                refused[adapter.name] = refusing
                continue
            found.append((adapter, model if served is True else served))
        if found:
            return found, None
        if refused:
            named = "; ".join(f"{name}: {', '.join(values)}" for name, values in refused.items())
            return [], f"anthropic-beta not available on any upstream that serves this model ({named})."
        if route in (MESSAGES, COUNT_TOKENS):
            if not any(route in adapter.routes for adapter in self.adapters):
                return [], f"{route} is not offered by this gateway's upstreams."
            return [], f"model: {model!r} is not served by this gateway." if model else "model: is required."
        return [], None


class TranslatedError:
    """A cloud's error answer with its body turned into Anthropic's error shape, read whole on first read.

    Clouds answer their own errors (a bad route, a throttle, a denied role) in their own JSON; an Anthropic client
    (and the usage meter) expects ``{"type":"error","error":{"type":..,"message":..}}``. A body that already has
    Anthropic's shape (the model's own errors, relayed by the cloud) is passed through unchanged.
    """

    __slots__ = ("_done", "_request_id_header", "_response", "content_length", "headers", "status")

    def __init__(self, response: UpstreamResponse, *, request_id_header: str) -> None:
        self._response = response
        self.status = response.status
        self.content_length: int | None = None
        self.headers = cloud_headers(response.headers, request_id_header, "application/json")
        self._request_id_header = request_id_header
        self._done = False

    def complete(self) -> bool:
        return False

    async def read(self) -> bytes:
        if self._done:
            return b""
        self._done = True
        body = b""
        while len(body) <= _MAX_ERROR_BODY and (chunk := await self._response.readany()):
            body += chunk  # an error body larger than this is not an error message: its rest is not read
        return anthropic_error_body(self.status, body[: _MAX_ERROR_BODY + 1])

    async def readany(self) -> bytes:
        return await self.read()

    def release(self) -> None:
        self._response.release()


def cloud_headers(upstream: Mapping[str, str], request_id_header: str, content_type: str) -> CIMultiDictProxy[str]:
    """The headers an Anthropic client gets from a cloud: the content type and the cloud's request id as
    ``request-id`` (what support asks for); the cloud's own headers are not Anthropic's API and stay behind."""
    out: CIMultiDict[str] = CIMultiDict()
    out[_CONTENT_TYPE] = content_type
    request_id = upstream.get(request_id_header)
    if request_id:
        out[_REQUEST_ID] = request_id
    return CIMultiDictProxy(out)


def anthropic_error_body(status: int, body: bytes) -> bytes:
    """``body`` if it is an Anthropic error already, else an Anthropic error carrying the cloud's message."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, list) and parsed:  # Google's REST errors may come as a one-element list
        parsed = parsed[0]
    if isinstance(parsed, dict) and parsed.get("type") == "error" and isinstance(parsed.get("error"), dict):
        return body
    message = None
    if isinstance(parsed, dict):
        inner = parsed.get("error")
        if isinstance(inner, dict):
            message = inner.get("message")
        message = message or parsed.get("message") or parsed.get("Message")
    if not isinstance(message, str) or not message:
        message = f"The upstream answered with HTTP {status}."
    return orjson.dumps({"type": "error", "error": {"type": error_type_for(status), "message": message[:1024]}})
