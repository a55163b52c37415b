"""Wires the rooms into Gate's HTTP server and runs it: routes, lifecycle, health, graceful shutdown.

This is the only module that knows every room; each room gets its settings and collaborators from here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gate import __version__
from gate.events import UsageEvents
from gate.http.server import HttpServer, Request, Response, Router
from gate.http.tls import server_context
from gate.identity.auth import Authenticator
from gate.ops.errors import error_response
from gate.ops.health import Health
from gate.ops.logs import flush_access_log
from gate.ops.telemetry import Telemetry
from gate.relay import Relay
from gate.settings import GateSettings
from gate.upstreams.anthropic import Upstream
from gate.upstreams.breaker import CircuitBreaker
from gate.upstreams.keyfiles import KeyFiles
from gate.upstreams.keys import KeyPool
from gate.upstreams.probe import KeyProber

__all__ = ["Gate", "run", "serve"]

log = logging.getLogger("gate")

_KNOWN_PATHS = {
    "/v1/messages": "POST",
    "/v1/messages/count_tokens": "POST",
    "/v1/models": "GET",
}


@dataclass
class Gate:
    """Every room of one Gate process, built from settings; ``router()`` is the HTTP face."""

    settings: GateSettings
    telemetry: Telemetry | None = None
    draining: bool = False
    upstream: Upstream = field(init=False)
    auth: Authenticator = field(init=False)
    keys: KeyPool = field(init=False)
    prober: KeyProber = field(init=False)
    breaker: CircuitBreaker = field(init=False)
    events: UsageEvents = field(init=False)
    health: Health = field(init=False)
    relay: Relay = field(init=False)
    key_files: KeyFiles | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        s = self.settings
        if self.telemetry is None:
            self.telemetry = Telemetry(s.observability, service_version=__version__)
        telemetry = self.telemetry
        self.upstream = Upstream(s.anthropic.api)
        self.auth = Authenticator(s.security.jwt, dev_auth=s.dev_auth)
        self.auth.on_refresh = telemetry.on_jwks_refresh
        api = s.anthropic.api
        self.keys = KeyPool(api.usable_keys, api.key_health, on_event=telemetry.on_key_event)
        if api.key_files.dir is not None:  # keys from a mounted Secret, re-read while running
            self.key_files = KeyFiles(api.key_files, self.keys, api.usable_keys)
            self.key_files.load()
        self.prober = KeyProber(
            self.keys,
            self.upstream,
            api.key_health,
            default_version=api.default_version,
            timeout=min(api.timeouts.response_headers, 30.0),
        )
        self.keys.on_quarantine = self.prober.watch
        self.breaker = CircuitBreaker(
            s.resilience.circuit_breaker, on_state_change=lambda old, new: telemetry.on_breaker_change(old, new)
        )
        telemetry.set_breaker_state_source(lambda: str(self.breaker.state))
        self.events = UsageEvents(s.usage)
        telemetry.set_usage_source(self.events)
        self.health = Health(self)
        self.relay = Relay(
            s,
            upstream=self.upstream,
            auth=self.auth,
            keys=self.keys,
            breaker=self.breaker,
            events=self.events,
            telemetry=telemetry,
        )

    # ------------------------------------------------------------------------------------------- HTTP

    def router(self, *, management: bool = True) -> Router:
        """The routes of the main port; with ``management`` it also serves ``/actuator/*``."""
        r = Router(self._not_found)
        r.add("POST", "/v1/messages", self.relay.messages)
        r.add("POST", "/v1/messages/count_tokens", self.relay.count_tokens)
        r.add("GET", "/v1/models", self.relay.models)
        r.add_param("GET", "/v1/models/", "id", self.relay.models)
        r.add("GET", "/", self._root)  # GET and HEAD: Claude Code probes the base URL
        r.add("HEAD", "/", self._root)
        r.add("GET", "/.well-known/jwks.json", self._jwks)
        if management:
            self.add_management_routes(r)
        return r

    def management_router(self) -> Router:
        r = Router(self._not_found)
        self.add_management_routes(r)
        return r

    def add_management_routes(self, r: Router) -> None:
        r.add("GET", "/actuator/health", self.health.overall)
        r.add("GET", "/actuator/health/liveness", self.health.liveness)
        r.add("GET", "/actuator/health/readiness", self.health.readiness)
        r.add("GET", "/actuator/prometheus", self._prometheus)

    def http_server(self, router: Router) -> HttpServer:
        limits = self.settings.server.limits
        return HttpServer(
            router,
            error=error_response,
            max_body_size=limits.max_body_size,
            max_header_size=limits.max_header_size,
            header_timeout=limits.header_timeout,
            keep_alive_timeout=limits.keep_alive_timeout,
        )

    async def _root(self, request: Request) -> Response:
        return Response(body=b'{"service":"gate","status":"ok"}', content_type="application/json")

    async def _jwks(self, request: Request) -> Response:
        document = self.auth.jwks_document()
        if document is None:
            return await self._not_found(request)
        return Response(body=document, content_type="application/json")

    async def _prometheus(self, request: Request) -> Response:
        assert self.telemetry is not None
        body, content_type = self.telemetry.prometheus()
        return Response(body=body, content_type=content_type)

    async def _not_found(self, request: Request) -> Response:
        allowed = _KNOWN_PATHS.get(request.path)
        if allowed is None and request.path.startswith("/v1/models/"):
            allowed = "GET"
        if allowed is not None and request.method != allowed:
            return error_response(
                405, f"Method {request.method} is not allowed on {request.path}.", headers={"Allow": allowed}
            )
        return error_response(404, f"Not found: {request.method} {request.path}")

    # ------------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self.upstream.start()
        await self.auth.start()
        await self.events.start()
        if self.key_files is not None:
            self.key_files.start()
        if not self.keys:
            log.warning("no Anthropic API key is configured: /v1/* answers 503 until one is (see README)")
        log.info(
            "gate %s ready: upstream %s, %d key(s), usage publisher %s, profiles %s",
            __version__,
            self.settings.anthropic.api.base_url,
            len(self.keys),
            self.settings.usage.publisher,
            ",".join(self.settings.profiles),
        )

    async def stop(self) -> None:
        self.draining = True
        flush_access_log()
        if self.key_files is not None:
            await self.key_files.close()
        await self.events.close(self.settings.server.shutdown.flush_timeout)
        await self.auth.close()
        await self.prober.close()
        await self.upstream.close()
        assert self.telemetry is not None
        await self.telemetry.shutdown()


async def serve(
    settings: GateSettings,
    *,
    sock: socket.socket | None = None,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    on_gate: Callable[[Gate], None] | None = None,
    handle_signals: bool = True,
    telemetry: Telemetry | None = None,
) -> None:
    """Run Gate until SIGTERM/SIGINT (or ``stop``), then drain in-flight requests and flush usage events.

    ``telemetry`` replaces the one built from settings (tests pass one with in-memory exporters).
    """
    gate = Gate(settings, telemetry=telemetry)
    if on_gate is not None:
        on_gate(gate)
    server = settings.server
    await gate.start()
    main = gate.http_server(gate.router(management=settings.management.server.port is None))
    management = None
    try:
        tls = server_context(server.ssl)
        if sock is not None:
            port = await main.listen(sock=sock, ssl=tls)
        else:
            port = await main.listen(server.host, server.port, reuse_port=server.workers > 1, ssl=tls)
        if settings.management.server.port is not None:
            management = gate.http_server(gate.management_router())
            mgmt = settings.management.server
            await management.listen(mgmt.host or server.host, mgmt.port or 0, reuse_port=True)
    except BaseException:
        await gate.stop()  # close the outbox, sessions and exporters before reporting the failure
        raise
    log.info("listening on %s://%s:%d", "https" if server.ssl.enabled else "http", server.host, port)
    if ready is not None:
        ready(port)

    stop = stop or asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if gate.key_files is not None:
            loop.add_signal_handler(signal.SIGHUP, gate.key_files.reload_now)
    await stop.wait()
    log.info("shutting down: draining in-flight requests for up to %.0fs", server.shutdown.drain_timeout)
    gate.draining = True
    await main.shutdown(server.shutdown.drain_timeout)  # stops listening, lets in-flight requests finish
    if management is not None:
        await management.shutdown(1.0)
    await gate.stop()
    log.info("stopped")


def run(settings: GateSettings) -> None:
    """Blocking entry point for ``gate serve``: one process, or ``server.workers`` sharing the port."""
    if settings.server.workers > 1:
        _run_workers(settings)
        return
    _run_loop(serve(settings))


def _run_loop(main: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency everywhere but Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


def _run_workers(settings: GateSettings) -> None:
    """One process per worker, all bound to the port with SO_REUSEPORT; each claims its own slot of the outbox
    path (``outbox.Outbox``), and at start adopts the files no live process holds, whatever the worker count."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    children = []
    for index in range(settings.server.workers):
        child = ctx.Process(target=_worker_main, args=(settings,), name=f"gate-worker-{index}")
        child.start()
        children.append(child)

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    def forward_hup(signum: int, _frame: Any) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGHUP)  # each worker re-reads its key files

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if settings.anthropic.api.key_files.dir is not None:  # else SIGHUP keeps its default meaning for the workers
        signal.signal(signal.SIGHUP, forward_hup)
    for child in children:
        child.join()


def _worker_main(settings: GateSettings) -> None:
    from gate.ops.logs import configure_logging

    logging_settings = settings.observability.logging
    configure_logging(logging_settings.format, logging_settings.level)
    _run_loop(serve(settings))
