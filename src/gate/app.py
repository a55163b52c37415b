"""Wires the rooms into one aiohttp application and runs it: routes, lifecycle, health, graceful shutdown.

This is the only module that knows every room; each room gets its settings and collaborators from here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from gate import __version__
from gate.auth import Authenticator
from gate.breaker import CircuitBreaker
from gate.errors import error_body, error_response
from gate.events import UsageEvents
from gate.health import Health
from gate.keys import KeyPool
from gate.logs import flush_access_log
from gate.relay import Relay
from gate.settings import GateSettings
from gate.telemetry import Telemetry
from gate.upstream import Upstream

__all__ = ["Gate", "run", "serve"]

log = logging.getLogger("gate")

_KNOWN_PATHS = {
    "/v1/messages": "POST",
    "/v1/messages/count_tokens": "POST",
    "/v1/models": "GET",
}


@dataclass
class Gate:
    """Every room of one Gate process, built from settings; ``application()`` is the HTTP face."""

    settings: GateSettings
    telemetry: Telemetry | None = None
    draining: bool = False
    upstream: Upstream = field(init=False)
    auth: Authenticator = field(init=False)
    keys: KeyPool = field(init=False)
    breaker: CircuitBreaker = field(init=False)
    events: UsageEvents = field(init=False)
    health: Health = field(init=False)
    relay: Relay = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        if self.telemetry is None:
            self.telemetry = Telemetry(s.observability, service_version=__version__)
        telemetry = self.telemetry
        self.upstream = Upstream(s.anthropic.api)
        self.auth = Authenticator(s.security.jwt, dev_auth=s.dev_auth)
        self.auth.on_refresh = telemetry.on_jwks_refresh
        self.keys = KeyPool(s.anthropic.api.usable_keys, s.anthropic.api.key_health, on_event=telemetry.on_key_event)
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

    def application(self, *, management: bool = True) -> web.Application:
        """The main application; with ``management`` it also serves ``/actuator/*``."""
        app = web.Application(client_max_size=self.settings.server.limits.max_body_size, handler_args=None)
        app.cleanup_ctx.append(self._lifecycle)
        r = app.router
        r.add_post("/v1/messages", self.relay.messages)
        r.add_post("/v1/messages/count_tokens", self.relay.count_tokens)
        r.add_get("/v1/models", self.relay.models, allow_head=False)
        r.add_get("/v1/models/{id}", self.relay.models, allow_head=False)
        r.add_get("/", self._root)  # GET and HEAD: Claude Code probes the base URL
        r.add_get("/.well-known/jwks.json", self._jwks, allow_head=False)
        if management:
            self.add_management_routes(app)
        r.add_route("*", "/{tail:.*}", self._not_found)
        return app

    def management_application(self) -> web.Application:
        app = web.Application()
        self.add_management_routes(app)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    def add_management_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/actuator/health", self.health.overall)
        r.add_get("/actuator/health/liveness", self.health.liveness)
        r.add_get("/actuator/health/readiness", self.health.readiness)
        r.add_get("/actuator/prometheus", self._prometheus)

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"service":"gate","status":"ok"}', content_type="application/json")

    async def _jwks(self, request: web.Request) -> web.Response:
        document = self.auth.jwks_document()
        if document is None:
            return await self._not_found(request)
        return web.Response(body=document, content_type="application/json")

    async def _prometheus(self, request: web.Request) -> web.Response:
        assert self.telemetry is not None
        body, content_type = self.telemetry.prometheus()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def _not_found(self, request: web.Request) -> web.Response:
        allowed = _KNOWN_PATHS.get(request.path)
        if allowed is None and request.path.startswith("/v1/models/"):
            allowed = "GET"
        if allowed is not None and request.method != allowed:
            return error_response(
                405, f"Method {request.method} is not allowed on {request.path}.", headers={"Allow": allowed}
            )
        return error_response(404, f"Not found: {request.method} {request.path}")

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        await self.start()
        yield
        await self.stop()

    # ------------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self.upstream.start()
        await self.auth.start()
        await self.events.start()
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
        await self.events.close(self.settings.server.shutdown.flush_timeout)
        await self.auth.close()
        await self.upstream.close()
        assert self.telemetry is not None
        await self.telemetry.shutdown()


# ---------------------------------------------------------------------------------------------- HTTP server

_HEADER_TIMEOUT_BODY = error_body("timeout_error", "The request headers did not arrive in time.")
_HEADER_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"x-gate-error: timeout_error\r\nConnection: close\r\n\r\n%s"
) % (len(_HEADER_TIMEOUT_BODY), _HEADER_TIMEOUT_BODY)


class _GuardedRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol with a deadline on request headers and protocol errors in Anthropic's shape.

    aiohttp bounds an idle keep-alive connection, but lets a request whose headers trickle in (slowloris) hold its
    connection for the whole keep-alive time. Here a clock starts when a connection opens, and again when the first
    byte of a later request arrives, and stops once aiohttp has parsed that request's headers. When
    ``header_timeout`` runs out first, a connection holding part of a request gets a 408 and is closed; one that
    sent nothing is simply closed (a flood of idle sockets drains away). Malformed requests get 400, oversized
    request lines and headers 431, both as Anthropic-shaped JSON, with nothing of the request echoed or logged.
    """

    __slots__ = ("_header_bytes", "_header_timeout", "_header_timer")

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = False  # part of a request arrived since the clock started

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_header_clock()

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._stop_header_clock()
        elif data and (self._header_timer is not None or self._waiter is not None):
            # Bytes of a request whose headers are not complete yet (a waiter means: idle between requests).
            if self._header_timer is None:
                self._start_header_clock()
            self._header_bytes = True

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)

    def _start_header_clock(self) -> None:
        self._header_bytes = False
        self._header_timer = self._loop.call_later(self._header_timeout, self._header_clock_ran_out)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_clock_ran_out(self) -> None:
        self._header_timer = None
        if self.transport is None:
            return
        if self._header_bytes:
            self.transport.write(_HEADER_TIMEOUT_ANSWER)
        log.debug("closed a connection whose request headers did not arrive within %.1fs", self._header_timeout)
        self.force_close()  # the transport sends what was written, then closes

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 500:
            self.log_exception("unhandled error answering %s %s", request.method, request.path, exc_info=exc)
        else:
            # The parser's message quotes the offending bytes (perhaps a token): only the kind of error is logged.
            log.info("refused a malformed HTTP request: %s", type(exc).__name__ if exc else status)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun; the connection is dropped instead")
        if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message):
            status = 431
            text = f"The request line or headers exceed the gateway's limit of {self.max_field_size} bytes a line."
        elif status == 500:
            text = "The gateway failed to answer this request."
        elif status == 504:
            text = "The gateway did not answer in time."
        else:
            text = "The request is not valid HTTP/1.1."
        response = error_response(status, text)
        response.force_close()
        return response


class _GuardedServer(web.Server):
    """aiohttp's protocol factory, making ``_GuardedRequestHandler``s with the settings aiohttp computed."""

    def __init__(self, server: web.Server, header_timeout: float) -> None:
        super().__init__(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
        self._header_timeout = header_timeout

    def __call__(self) -> web.RequestHandler:
        return _GuardedRequestHandler(self, loop=self._loop, header_timeout=self._header_timeout, **self._kwargs)


class _GuardedRunner(web.AppRunner):
    """An AppRunner whose connections have a header deadline (see ``_GuardedRequestHandler``)."""

    __slots__ = ("_header_timeout",)

    def __init__(self, app: web.Application, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # runs the app's startup and freezes it
        return _GuardedServer(server, self._header_timeout)


def _runner(app: web.Application, settings: GateSettings) -> web.AppRunner:
    limits = settings.server.limits
    return _GuardedRunner(
        app,
        header_timeout=limits.header_timeout,
        handle_signals=False,
        access_log=None,  # Gate writes its own access line, with trace ids and usage
        handler_cancellation=True,  # a client that goes away cancels its upstream call at once
        shutdown_timeout=settings.server.shutdown.drain_timeout,
        keepalive_timeout=limits.keep_alive_timeout,
        max_line_size=limits.max_header_size,
        max_field_size=limits.max_header_size,
    )


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
    runner = _runner(gate.application(management=settings.management.server.port is None), settings)
    await runner.setup()
    server = settings.server
    if sock is not None:
        site: web.BaseSite = web.SockSite(runner, sock)
    else:
        site = web.TCPSite(runner, server.host, server.port, reuse_port=server.workers > 1, backlog=1024)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()  # close the outbox, sessions and exporters before reporting the failure
        raise
    management_runner = None
    if settings.management.server.port is not None:
        management_runner = _GuardedRunner(
            gate.management_application(),
            header_timeout=server.limits.header_timeout,
            handle_signals=False,
            access_log=None,
        )
        await management_runner.setup()
        mgmt = settings.management.server
        await web.TCPSite(management_runner, mgmt.host or server.host, mgmt.port, reuse_port=True).start()
    port = _bound_port(site)
    log.info("listening on http://%s:%d", server.host, port)
    if ready is not None:
        ready(port)

    stop = stop or asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight requests for up to %.0fs", server.shutdown.drain_timeout)
    gate.draining = True
    await runner.cleanup()  # stops listening, waits for in-flight handlers, then runs Gate.stop
    if management_runner is not None:
        await management_runner.cleanup()
    log.info("stopped")


def _bound_port(site: web.BaseSite) -> int:
    server = getattr(site, "_server", None)
    sockets = getattr(server, "sockets", None) or []
    for sock in sockets:
        return int(sock.getsockname()[1])
    return 0


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
    """One process per worker, all bound to the port with SO_REUSEPORT; each keeps its own outbox file."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    children = []
    for index in range(settings.server.workers):
        outbox = settings.usage.outbox.model_copy(update={"path": f"{settings.usage.outbox.path}.{index}"})
        usage = settings.usage.model_copy(update={"outbox": outbox})
        worker_settings = settings.model_copy(update={"usage": usage})
        child = ctx.Process(target=_worker_main, args=(worker_settings,), name=f"gate-worker-{index}")
        child.start()
        children.append(child)

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()


def _worker_main(settings: GateSettings) -> None:
    from gate.logs import configure_logging

    logging_settings = settings.observability.logging
    configure_logging(logging_settings.format, logging_settings.level)
    _run_loop(serve(settings))
