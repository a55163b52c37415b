"""The pooled HTTP client to Anthropic and header hygiene, both ways.

One shared pool of keep-alive connections (``gate.http.client.Pool``) serves every request. Bodies are passed
through undecoded, so the client receives upstream's bytes exactly.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable, Mapping

from multidict import CIMultiDict, istr
from yarl import URL

from gate.http.client import Pool, UpstreamResponse
from gate.settings import AnthropicApiSettings

__all__ = ["HOP_BY_HOP", "Upstream", "request_headers", "response_headers"]

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


def egress_proxy(url: str) -> str | None:
    """The proxy from HTTPS_PROXY / HTTP_PROXY / NO_PROXY (curl's conventions, via urllib) for ``url``, or None."""
    target = URL(url)
    if target.host is None or urllib.request.proxy_bypass(target.host):
        return None
    return urllib.request.getproxies().get(target.scheme)


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
