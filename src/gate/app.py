"""Wires the rooms into Gate's HTTP server and runs it: routes, lifecycle, health, graceful shutdown.

This is the only module that knows every room; each room gets its settings and collaborators from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gate import __version__
from gate.accounting.prices import PriceTable
from gate.events import Events, open_events
from gate.http.server import HttpServer, Request, Response, Router
from gate.http.tls import server_context
from gate.identity.auth import Authenticator
from gate.ops import fdtable, heap
from gate.ops.errors import error_response
from gate.ops.health import Health
from gate.ops.logs import flush_access_log
from gate.ops.otlp_relay import TelemetryRelay
from gate.ops.telemetry import Telemetry
from gate.policy.groups import PolicyBook
from gate.policy.limits import Limits
from gate.policy.managed import ManagedSettings
from gate.policy.models import ModelPolicy
from gate.relay import Relay
from gate.settings import ConfigError, GateSettings, UpstreamSettings
from gate.upstreams.adapter import Adapter, Upstreams, UpstreamUnavailable
from gate.upstreams.anthropic import AnthropicAdapter, Upstream
from gate.upstreams.breaker import CircuitBreaker
from gate.upstreams.keyfiles import KeyFiles
from gate.upstreams.keys import KeyPool
from gate.upstreams.probe import KeyProber

if TYPE_CHECKING:
    from gate.identity.signin.service import SignIn

__all__ = ["Gate", "StartupError", "run", "serve"]

log = logging.getLogger("gate")

_KNOWN_PATHS = {
    "/v1/messages": "POST",
    "/v1/messages/count_tokens": "POST",
    "/v1/models": "GET",
}


class StartupError(Exception):
    """Gate could not start (a worker could not bind its port, ...); the message is one line for the operator."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
    breaker: CircuitBreaker = field(init=False)  # the first upstream's
    upstreams: Upstreams = field(init=False)
    prices: PriceTable = field(init=False)
    events: Events = field(init=False)
    health: Health = field(init=False)
    relay: Relay = field(init=False)
    key_files: KeyFiles | None = field(init=False, default=None)
    managed: ManagedSettings = field(init=False)
    otlp: TelemetryRelay = field(init=False)
    signin: SignIn | None = None  # when sign-in is enabled
    management_port: int | None = field(init=False, default=None)  # bound, when /actuator/* has its own port
    limits: Limits | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        s = self.settings
        if self.telemetry is None:
            self.telemetry = Telemetry(s.observability, service_version=__version__)
        telemetry = self.telemetry
        self.upstream = Upstream(s.anthropic.api)
        self.auth = Authenticator(s.security.jwt, dev_auth=s.dev_auth)
        self.auth.on_refresh = telemetry.on_jwks_refresh
        api = s.anthropic.api
        self.keys = KeyPool(
            api.usable_keys, api.key_health, on_event=telemetry.on_key_event, selection=api.key_selection
        )
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
        self.upstreams = Upstreams([self._adapter(u, first=i == 0) for i, u in enumerate(s.effective_upstreams)])
        self.breaker = self.upstreams.adapters[0].breaker
        telemetry.set_breaker_state_source(lambda: str(self.breaker.state))
        self.prices = PriceTable.from_settings(s.prices)
        logs = s.observability.logging
        self.events = open_events(s.usage, prices=self.prices, logging=(logs.format, logs.level))
        telemetry.set_usage_source(self.events)
        if s.limits.enabled:
            from gate.store.counters import open_counter_store

            self.limits = Limits(
                s.limits,
                open_counter_store(s.limits.store),
                self.prices,
                on_refusal=telemetry.on_limits_refusal,
                on_store_failure=telemetry.on_limits_store_failure,
            )
            telemetry.set_limits_source(self.limits)
        self.health = Health(self)
        book = PolicyBook(s.policies)
        self.managed = ManagedSettings(book, self.auth, pushed_env=_otlp_env(s))
        self.otlp = TelemetryRelay(
            s.sign_in.telemetry,
            self.auth,
            max_body=s.server.limits.max_body_size,
            body_timeout=s.server.limits.body_timeout,
        )
        if s.sign_in.enabled:
            from gate.identity.signin.service import SignIn
            from gate.store.kv import open_store

            self.signin = SignIn(s.sign_in, open_store(s.store), self.auth, leeway=s.security.jwt.leeway)
        self.relay = Relay(
            s,
            upstreams=self.upstreams,
            auth=self.auth,
            events=self.events,
            telemetry=telemetry,
            policy=ModelPolicy(book) if book.restricts_models else None,
            limits=self.limits,
        )

    def _adapter(self, settings: UpstreamSettings, *, first: bool) -> Adapter:
        """One upstream of ``upstreams`` (or the single anthropic one), with its own breaker."""
        s = self.settings
        assert self.telemetry is not None
        telemetry = self.telemetry
        breaker = CircuitBreaker(
            settings.circuit_breaker or s.resilience.circuit_breaker,
            # the state gauge and transitions counter follow the first upstream (the only one, by default)
            on_state_change=(lambda old, new: telemetry.on_breaker_change(old, new)) if first else None,
        )
        if settings.type == "anthropic":
            return AnthropicAdapter(settings, s.anthropic.api, breaker, upstream=self.upstream, keys=self.keys)
        if settings.type == "vertex":
            from gate.upstreams.vertex import VertexAdapter

            return VertexAdapter(settings, s.anthropic.api, breaker)
        if settings.type == "bedrock":
            from gate.upstreams.bedrock import BedrockAdapter

            return BedrockAdapter(settings, s.anthropic.api, breaker)
        from gate.upstreams.foundry import FoundryAdapter

        return FoundryAdapter(settings, s.anthropic.api, breaker)

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
        r.add("GET", "/managed/settings", self.managed.handle)
        for path in self.otlp.paths:
            r.add("POST", path, self.otlp.handle)
        if self.signin is not None:
            self.signin.add_routes(r)
        if self.limits is not None:
            from gate.policy.admin import SpendLimitsApi

            SpendLimitsApi(self.limits, self.auth, self.settings.limits.admin_group).routes(r)
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
        for adapter in self.upstreams:
            try:
                await adapter.start()  # credentials are loaded here: a missing one stops the start, named
            except UpstreamUnavailable as exc:
                raise ConfigError(f"upstreams: {adapter.name}: {exc}") from None
        await self.auth.start()
        if self.signin is not None:
            await self.signin.start()
        await self.otlp.start()
        await self.events.start()
        if self.limits is not None:
            await self.limits.start()
        if self.key_files is not None:
            self.key_files.start()
        if not self.keys and any(a.kind == "anthropic" for a in self.upstreams):
            log.warning("no Anthropic API key is configured: /v1/* answers 503 until one is (see README)")

    def announce_ready(self) -> None:
        """The "ready" line: logged once every port is bound, never before."""
        log.info(
            "gate %s ready: upstreams %s, %d key(s), usage publisher %s, profiles %s",
            __version__,
            ", ".join(f"{a.name} ({a.kind}, {a.server_address})" for a in self.upstreams),
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
        await self.otlp.close()
        if self.signin is not None:
            await self.signin.close()
        if self.limits is not None:
            await self.limits.close()
        await self.auth.close()
        await self.prober.close()
        await self.upstream.close()
        for adapter in self.upstreams:
            await adapter.close()
        assert self.telemetry is not None
        await self.telemetry.shutdown()


def _otlp_env(settings: GateSettings) -> dict[str, str] | None:
    """What managed settings push so that Claude Code sends its telemetry to Gate, when Gate relays it."""
    url = settings.sign_in.public_url
    if not settings.sign_in.telemetry.forward_to or url is None:
        return None
    return {
        "CLAUDE_CODE_ENABLE_TELEMETRY": "1",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_LOGS_EXPORTER": "otlp",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }


async def serve(
    settings: GateSettings,
    *,
    sock: socket.socket | None = None,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    on_gate: Callable[[Gate], None] | None = None,
    handle_signals: bool = True,
    telemetry: Telemetry | None = None,
    announce: bool = True,
) -> None:
    """Run Gate until SIGTERM/SIGINT (or ``stop``), then drain in-flight requests and flush usage events.

    ``ready`` is called with the main port once every port is bound; ``announce=False`` leaves the "ready" log
    line to the caller (the parent of ``--workers``). ``telemetry`` replaces the one built from settings (tests
    pass one with in-memory exporters).
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
            # Not shared with SO_REUSEPORT: each worker has a port of its own, so every worker can be scraped.
            gate.management_port = await management.listen(mgmt.host or server.host, mgmt.port or 0)
    except BaseException:
        await main.shutdown(0)
        await gate.stop()  # close the outbox, sessions and exporters before reporting the failure
        raise
    scheme = "https" if server.ssl.enabled else "http"
    if gate.management_port is not None:
        mgmt_host = settings.management.server.host or server.host
        log.info(
            "listening on %s://%s:%d, management on http://%s:%d",
            scheme,
            server.host,
            port,
            mgmt_host,
            gate.management_port,
        )
    else:
        log.info("listening on %s://%s:%d", scheme, server.host, port)
    if announce:
        gate.announce_ready()
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


def run(settings: GateSettings) -> int:
    """Blocking entry point for ``gate serve``: one process, or ``server.workers`` sharing the port; the exit code.

    Raises OSError (one process) or :class:`StartupError` (workers) when Gate cannot start.
    """
    if settings.server.workers > 1:
        return _Workers(settings).run()
    fdtable.prepare()
    _run_loop(serve(settings, ready=lambda _port: heap.settle()))
    return 0


def _run_loop(main: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency everywhere but Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


def worker_settings(settings: GateSettings, index: int) -> GateSettings:
    """Worker ``index``'s settings: when a management port is set, port + index (so each worker's /actuator/* and
    metrics can be reached; the main port is shared with SO_REUSEPORT). The outbox path stays the same: each
    process claims its own slot of it (``outbox.Outbox``) and adopts the files no live process holds, whatever
    the worker count."""
    mgmt = settings.management.server
    if not mgmt.port:  # none, or 0: an ephemeral port each, as logged
        return settings
    server = mgmt.model_copy(update={"port": mgmt.port + index})
    return settings.model_copy(update={"management": settings.management.model_copy(update={"server": server})})


class _Workers:
    """``--workers N``: N spawned processes, each a whole Gate, all bound to the port with SO_REUSEPORT.

    The parent says "ready" once every worker reported its ports bound, and exits non-zero with one line when
    any worker cannot start (the others are stopped) or dies later: an orchestrator then restarts the whole.
    """

    def __init__(self, settings: GateSettings) -> None:
        import multiprocessing

        self._settings = settings
        self._ctx = multiprocessing.get_context("spawn")
        self._children: list[Any] = []
        self._stopping = False

    def run(self) -> int:
        with self._shared_port() as settings:
            self._settings = settings
            return self._run()

    @contextlib.contextmanager
    def _shared_port(self) -> Iterator[GateSettings]:
        """Settings whose port every worker can share: ``port: 0`` becomes one ephemeral port, held (bound with
        SO_REUSEPORT, not listening, so it takes no connections) until the workers have bound it too."""
        settings = self._settings
        if settings.server.port != 0:
            yield settings
            return
        with socket.socket(socket.AF_INET6 if ":" in settings.server.host else socket.AF_INET) as holder:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            holder.bind((settings.server.host, 0))
            server = settings.server.model_copy(update={"port": holder.getsockname()[1]})
            yield settings.model_copy(update={"server": server})

    def _run(self) -> int:
        from multiprocessing.connection import wait

        settings = self._settings
        reports = []
        signal.signal(signal.SIGTERM, self._forward)  # before the first child: none is left behind
        signal.signal(signal.SIGINT, self._forward)
        if self._settings.anthropic.api.key_files.dir is not None:  # else SIGHUP keeps its default meaning
            signal.signal(signal.SIGHUP, self._forward_hup)
        for index in range(settings.server.workers):
            receive, send = self._ctx.Pipe(duplex=False)
            child = self._ctx.Process(
                target=_worker_main, args=(worker_settings(settings, index), index, send), name=f"gate-worker-{index}"
            )
            child.start()
            send.close()
            self._children.append(child)
            reports.append(receive)

        management: dict[int, int | None] = {}
        failure: str | None = None
        waiting = dict(enumerate(reports))
        while waiting and failure is None and not self._stopping:
            ready = wait([*waiting.values(), *(self._children[i].sentinel for i in waiting)])
            for index, receive in list(waiting.items()):
                if receive in ready:
                    try:
                        kind, detail = receive.recv()
                    except EOFError:  # exited without a word (killed, or a crash it could not report)
                        self._children[index].join()
                        kind, detail = "gone", None
                    if kind == "ready":
                        management[index] = detail[1]
                        del waiting[index]
                    elif kind == "failed":
                        failure = f"worker {index}: {detail}"
                        break
            for index in list(waiting):
                child = self._children[index]
                if failure is None and child.sentinel in ready and not child.is_alive() and not self._stopping:
                    failure = f"worker {index} exited with code {child.exitcode} before it was ready"
        if failure is not None:
            self._stop_all()
            raise StartupError(failure)
        if not self._stopping:
            self._announce(management)
        return self._supervise()

    def _announce(self, management: dict[int, int | None]) -> None:
        settings = self._settings
        server = settings.server
        log.info(
            "gate %s ready: %d workers listening on http://%s:%d, upstream %s, usage publisher %s, profiles %s",
            __version__,
            server.workers,
            server.host,
            server.port,
            settings.anthropic.api.base_url,
            settings.usage.publisher,
            ",".join(settings.profiles),
        )
        if settings.management.server.port is None:
            log.warning(
                "with %d workers, /actuator/* on the main port answers for whichever worker takes the connection; "
                "set management.server.port to reach each worker's health and metrics on a port of its own",
                server.workers,
            )
        else:
            host = settings.management.server.host or server.host
            ports = ", ".join(f"worker {i} http://{host}:{port}" for i, port in sorted(management.items()))
            log.info("management (health, /actuator/prometheus) per worker: %s", ports)

    def _supervise(self) -> int:
        """Wait for the workers; one that dies while Gate is not stopping stops the others."""
        from multiprocessing.connection import wait

        running = list(self._children)
        code = 0
        while running:
            wait([child.sentinel for child in running])
            for child in [c for c in running if not c.is_alive()]:
                running.remove(child)
                child.join()
                if child.exitcode != 0 and not self._stopping:
                    log.error("%s exited with code %s: stopping the other workers", child.name, child.exitcode)
                    code = 1
                    self._stop_all()
                elif child.exitcode not in (0, -signal.SIGTERM):
                    # A worker our SIGTERM met before it had set up its own handler (still starting: nothing in
                    # flight) ended by that signal, as asked; any other end is worth the non-zero exit.
                    code = code or 1
        return code

    def _forward(self, signum: int, _frame: Any) -> None:
        self._stopping = True
        self._signal_all()

    def _signal_all(self) -> None:
        for child in self._children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    def _forward_hup(self, signum: int, _frame: Any) -> None:
        for child in self._children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGHUP)  # each worker re-reads its key files

    def _stop_all(self) -> None:
        self._stopping = True
        self._signal_all()
        shutdown = self._settings.server.shutdown
        for child in self._children:
            child.join(shutdown.drain_timeout + shutdown.flush_timeout + 5)
            if child.is_alive():
                child.kill()
                child.join()


def _worker_main(settings: GateSettings, index: int, report: Any) -> None:
    """One worker: run Gate, tell the parent "ready" (with the management port) or why it could not start."""
    from gate.ops.logs import configure_logging
    from gate.settings import ConfigError

    logging_settings = settings.observability.logging
    configure_logging(logging_settings.format, logging_settings.level)
    fdtable.prepare()
    gates: list[Gate] = []

    def ready(port: int) -> None:
        heap.settle()
        report.send(("ready", (port, gates[0].management_port if gates else None)))

    try:
        _run_loop(serve(settings, ready=ready, on_gate=gates.append, announce=False))
    except (OSError, ConfigError) as exc:  # the parent prints one line for all; no traceback per worker
        report.send(("failed", str(exc)))
        raise SystemExit(2 if isinstance(exc, ConfigError) else 1) from None
