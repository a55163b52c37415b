"""The Anthropic API upstream: the pooled client to Anthropic, header hygiene both ways, and its adapter.

One shared pool of keep-alive connections (``gate.http.client.Pool``) serves every request. Bodies are passed
through undecoded, so the client receives upstream's bytes exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import orjson
from multidict import CIMultiDict, istr
from yarl import URL

from gate.http.client import Pool, UpstreamResponse
from gate.settings import AnthropicApiSettings, UpstreamSettings
from gate.upstreams.adapter import COUNT_TOKENS, MESSAGES, Adapter, Outgoing, Prepared, egress_proxy
from gate.upstreams.breaker import CircuitBreaker
from gate.upstreams.keys import KeyPool

__all__ = [
    "HOP_BY_HOP",
    "AnthropicAdapter",
    "Upstream",
    "egress_proxy",
    "request_headers",
    "response_headers",
    "with_model",
]

HOP_BY_HOP = frozenset(
    istr(h)
    for h in (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    )
)
# Never forwarded upstream: the caller's credentials (Gate injects the company key), the address we listen on,
# and framing that the client recomputes for the body it sends.
_DROP_UPSTREAM = HOP_BY_HOP | {istr(h) for h in ("host", "authorization", "x-api-key", "content-length", "expect")}
_DROP_DOWNSTREAM = HOP_BY_HOP | {istr(h) for h in ("content-length",)}
_ACCEPT_ENCODING = istr("accept-encoding")
_ANTHROPIC_VERSION = istr("anthropic-version")
_X_API_KEY = istr("x-api-key")
_CONNECTION = istr("connection")


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get(_CONNECTION)
    if not value:
        return set()
    return {token.strip().lower() for token in value.split(",") if token.strip()}


def request_headers(
    incoming: Mapping[str, str],
    *,
    api_key: str,
    default_version: str,
    accept_encoding: str | None,
) -> CIMultiDict[str]:
    """Headers for the upstream request: the client's, minus credentials and hop-by-hop, plus the key."""
    listed = _connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    items: Iterable[tuple[str, str]] = incoming.items()
    for name, value in items:
        lowered = name.lower()
        if lowered in _DROP_UPSTREAM or lowered in listed or lowered == _ACCEPT_ENCODING:
            continue
        out.add(name, value)
    if accept_encoding:
        out[_ACCEPT_ENCODING] = accept_encoding
    if _ANTHROPIC_VERSION not in out:
        out[_ANTHROPIC_VERSION] = default_version
    out[_X_API_KEY] = api_key
    return out


def response_headers(upstream: Mapping[str, str], *, keep_length: bool) -> CIMultiDict[str]:
    """Upstream's response headers for the client, hop-by-hop aside."""
    listed = _connection_tokens(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in listed:
            continue
        if lowered == "content-length" and not keep_length:
            continue
        out.add(name, value)
    return out


class Upstream:
    """Owns the connection pool to Anthropic; ``request`` sends one call and returns the response headers."""

    def __init__(self, settings: AnthropicApiSettings) -> None:
        self.base_url = settings.base_url
        self.server_address = URL(settings.base_url).host or ""
        self.proxy = egress_proxy(settings.base_url) if settings.use_env_proxy else None
        self._settings = settings
        self._pool: Pool | None = None

    async def start(self) -> None:
        # ``connect`` bounds getting a connection: a pool slot, TCP, a proxy's CONNECT and TLS. Time to headers
        # and stream idleness are enforced by the relay, which knows which phase it is in.
        self._pool = Pool(
            self.base_url,
            limit=self._settings.pool_size,
            connect_timeout=self._settings.timeouts.connect,
            proxy=self.proxy,
            idle_timeout=self._settings.pool_idle_timeout,
            max_head_size=self._settings.max_response_header_size,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def request(
        self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes | None
    ) -> UpstreamResponse:
        if self._pool is None:
            raise RuntimeError("Upstream.start() has not run")
        return await self._pool.request(method, path_qs, headers.items(), body)


class AnthropicAdapter(Adapter):
    """The Anthropic API itself: the client's request as it came, with a company key from the pool. The body is
    sent as it came unless the model map names another id."""

    kind = "anthropic"
    routes = frozenset({MESSAGES, COUNT_TOKENS, "/v1/models", "/v1/models/{id}"})

    def __init__(
        self,
        settings: UpstreamSettings,
        api: AnthropicApiSettings,
        breaker: CircuitBreaker,
        *,
        upstream: Upstream,
        keys: KeyPool,
    ) -> None:
        super().__init__(settings, api, breaker)
        self.keys = keys
        self._upstream = upstream  # shares its pool with the key prober
        self._default_version = api.default_version

    async def start(self) -> None:
        pass  # the pool is Upstream's, started and closed with it

    async def close(self) -> None:
        pass

    @property
    def configured(self) -> bool:
        return self.keys is not None and len(self.keys) > 0

    async def prepare(self, call: Outgoing) -> Prepared:
        assert call.key is not None
        headers = request_headers(
            call.headers,
            api_key=call.key.value,
            default_version=self._default_version,
            accept_encoding=call.accept_encoding,
        )
        return Prepared(call.path_qs, headers, with_model(call))

    async def send(self, prepared: Prepared, method: str) -> UpstreamResponse:
        return await self._upstream.request(method, prepared.path_qs, prepared.headers, prepared.body)


def with_model(call: Outgoing) -> bytes | None:
    """The body with the model map's id in ``model``; the client's bytes unchanged when the id is the same."""
    parsed = call.parsed
    if parsed is None or call.upstream_model is None or parsed.get("model") == call.upstream_model:
        return call.body
    return orjson.dumps({**parsed, "model": call.upstream_model})
