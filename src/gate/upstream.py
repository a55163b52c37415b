"""The pooled HTTP client to Anthropic and header hygiene, both ways.

One shared ``aiohttp.ClientSession`` serves every request: measured, it is the client that scales to many open
streams (httpx's pool degrades as it grows). Bodies are passed through undecoded (``auto_decompress=False``)
so the client receives upstream's bytes exactly.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable, Mapping

import aiohttp
from multidict import CIMultiDict, istr
from yarl import URL

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
# and framing that aiohttp recomputes for the body it sends.
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
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Upstream.start() has not run")
        return self._session

    async def start(self) -> None:
        timeouts = self._settings.timeouts
        connector = aiohttp.TCPConnector(
            limit=self._settings.pool_size,
            limit_per_host=0,
            ttl_dns_cache=300,
            keepalive_timeout=30,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # ``connect`` bounds getting a connection: a pool slot, TCP, a proxy's CONNECT and TLS (``sock_connect``
            # alone would leave a stuck TLS handshake to the 600 s header timeout). Time to headers and stream
            # idleness are enforced by the relay, which knows which phase it is in.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect, connect=timeouts.connect),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),  # never share one user's cookies with another
            # trust_env would look proxies and ~/.netrc up again, in a thread, on every request: the egress
            # proxy is resolved once in __init__ instead.
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def request(
        self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes | None
    ) -> aiohttp.client._RequestContextManager:
        return self.session.request(
            method, self.base_url + path_qs, headers=headers, data=body, allow_redirects=False, proxy=self.proxy
        )
