"""The proxied routes: authenticate, pick an upstream (failing over down the list before the first byte), pick a
key, ask that upstream's breaker, call it, relay the bytes back.

The response reaches the client chunk by chunk as upstream sends it, tapped by the usage meter on the way; every
upstream call of ``/v1/messages`` ends in exactly one usage record, whatever happens (errors, timeouts, a client
that goes away). The relay never blocks on publishing: ``publish`` only enqueues.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import orjson
from multidict import istr

from gate.accounting.usage import UsageMeter, UsageRecord, filter_accept_encoding
from gate.events import Events
from gate.events.envelope import rfc3339_millis
from gate.http.client import ClientError, ConnectError, ConnectTimeout, UpstreamResponse
from gate.http.deadlines import Deadline, Deadlines
from gate.http.server import BadBody, BodyTooLarge, Request, Response, StreamResponse
from gate.identity.auth import Authenticator, AuthError, www_authenticate
from gate.ops.errors import error_response, error_type_for
from gate.ops.logs import access_line
from gate.ops.telemetry import Telemetry
from gate.policy.limits import Admission, Limits, Refusal
from gate.policy.models import ModelPolicy
from gate.settings import GateSettings
from gate.upstreams.adapter import Adapter, Answer, Outgoing, Upstreams, UpstreamUnavailable, beta_values
from gate.upstreams.anthropic import response_headers
from gate.upstreams.breaker import CircuitOpenError, Permit
from gate.upstreams.keys import Key, NoKeyAvailable

__all__ = ["Relay"]

log = logging.getLogger("gate.relay")

_AUTHORIZATION = istr("authorization")
_X_API_KEY = istr("x-api-key")
_ACCEPT_ENCODING = istr("accept-encoding")
_CONTENT_TYPE = istr("content-type")
_CONTENT_ENCODING = istr("content-encoding")
_CONTENT_LENGTH = istr("content-length")
_RETRY_AFTER = istr("retry-after")
_SESSION_ID = istr("x-claude-code-session-id")
# Answers about the key rather than the request: retried on another key. A 403 (``permission_error``) is about
# the request, say a model the organisation lacks, and reaches the client unchanged.
_KEY_TROUBLE = frozenset({401, 429})
# Answers after which the next upstream that serves the model is tried (before the client has a byte), as
# Anthropic's own gateway does; 5xx is any status from 500.
_FAIL_OVER = frozenset({401, 403, 429})
_MAX_MODEL_LENGTH = 256  # no model id comes close; bounds what reaches spans, events and logs
# How a relayed 2xx can still show Anthropic failing (stalled or broken stream, an error event inside it): the
# breaker counts these like a 5xx or 529.
_UPSTREAM_FAULTS = frozenset({"api_error", "overloaded_error", "timeout_error"})
_MAX_BUFFERED_BODY = 8 * 1024 * 1024  # a non-streaming answer with a known length up to this is sent in one write


class _ClientGone(Exception):
    """The client closed its connection while we were answering."""


class _ClientStalled(Exception):
    """The client took no bytes for ``server.limits.send-timeout``: its fault, not Anthropic's."""

    def __init__(self, response: StreamResponse) -> None:
        super().__init__("client stalled")
        self.response = response


@dataclass(slots=True)
class _Exchange:
    """One client request: what it has learnt so far, the source of its access line and its records' context."""

    route: str
    started: float
    stream: bool = False
    model: str | None = None
    sub: str | None = None
    groups: list[str] | None = None
    session_id: str | None = None
    key_alias: str | None = None
    upstream_wait: float = 0.0
    status: int = 0
    ttft_ms: int | None = None
    records: list[UsageRecord] = field(default_factory=list)
    trace_id: str | None = None  # the request's trace, the same in every span and record of it
    span_id: str | None = None  # the SERVER span's
    server_span: Any = None
    client_span: Any = None
    response: StreamResponse | None = None
    admission: Admission | None = None  # what the limits reserved for this call; settled with its records
    affinity: str | None = None  # the session whose prompt cache a key should keep warm


@dataclass(slots=True)
class _Attempts:
    """What the attempts of one client request on one upstream share: the request, that upstream's breaker
    permit, keys tried; ``can_fail_over`` when a later upstream may take the request instead."""

    upstream: Adapter
    upstream_model: str | None
    path_qs: str
    accept_encoding: str | None
    body: bytes | None
    parsed: dict[str, Any] | None
    permit: Permit
    metered: bool
    can_fail_over: bool
    affinity: str | None = None  # the prompt cache a key should keep warm (session-affinity selection)
    tried: set[str] = field(default_factory=set)
    key_failures: int = 0
    connect_failures: int = 0
    permit_done: bool = False


class _UpstreamCall:
    """One upstream attempt. It ends in exactly one usage record (on metered routes), whatever ends it: ``end``
    says how, and leaving its ``with`` block without ending it ends it by the way it was left (the client went
    away, the client stalled, or a bug of ours, which is never recorded as a success)."""

    __slots__ = (
        "_exchange",
        "_record",
        "ended",
        "http_status",
        "meter",
        "metered",
        "request_id",
        "request_id_header",
        "upstream",
        "upstream_model",
    )

    def __init__(self, record: _RecordFn, exchange: _Exchange, attempts: _Attempts) -> None:
        self._record = record
        self._exchange = exchange
        self.metered = attempts.metered
        self.upstream = attempts.upstream.name
        self.upstream_model = attempts.upstream_model
        self.request_id_header = attempts.upstream.request_id_header
        self.meter: UsageMeter | None = None
        self.http_status: int | None = None
        self.request_id: str | None = None
        self.ended = False

    def __enter__(self) -> _UpstreamCall:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self.ended:
            return
        if exc_type is None:
            log.error("an upstream call ended without an outcome; recorded as an error")
            self.end("error", "api_error")
        elif issubclass(exc_type, (asyncio.CancelledError, _ClientGone)):
            self.end("client_disconnected", None)
        elif issubclass(exc_type, _ClientStalled):
            self.end("client_timeout", None)
        else:
            self.end("error", "api_error")

    def answered(self, upstream: Answer) -> None:
        self.http_status = upstream.status
        # a translated answer names it ``request-id`` already; a cloud's own answer by its own header
        self.request_id = upstream.headers.get("request-id") or upstream.headers.get(self.request_id_header)

    def end(self, status: str, error_type: str | None) -> None:
        """The attempt's outcome: record it, once."""
        if self.ended:
            return
        self.ended = True
        if self.metered:
            self._record(self._exchange, self, status, error_type)

    def end_with_error_body(self, body: bytes, headers: Any) -> None:
        """An upstream error answer that the client will not see (Gate retries): its type comes from its body."""
        meter = UsageMeter(stream=False, content_encoding=headers.get(_CONTENT_ENCODING))
        meter.feed(body)
        meter.finish()
        self.meter = meter
        self.end("error", meter.error_type or error_type_for(self.http_status or 502))


_RecordFn = Callable[[_Exchange, "_UpstreamCall", str, "str | None"], None]


@dataclass(slots=True, frozen=True)
class _Retry:
    """Try again on the same upstream, with this key (None: an upstream without keys)."""

    next_key: Key | None


@dataclass(slots=True, frozen=True)
class _FailOver:
    """This upstream failed before the client had a byte: try the next, or answer ``response`` if none is left."""

    response: StreamResponse


class Relay:
    """The handlers for ``/v1/messages``, ``/v1/messages/count_tokens`` and ``/v1/models``."""

    def __init__(
        self,
        settings: GateSettings,
        *,
        upstreams: Upstreams,
        auth: Authenticator,
        events: Events,
        telemetry: Telemetry,
        policy: ModelPolicy | None = None,
        limits: Limits | None = None,
    ) -> None:
        api = settings.anthropic.api
        self._policy = policy
        self._limits = limits
        self._upstreams = upstreams
        self._auth = auth
        self._events = events
        self._telemetry = telemetry
        self._connect_attempts = api.retry.connect_attempts
        self._key_attempts = api.retry.key_attempts
        self._headers_timeout = api.timeouts.response_headers
        self._idle_timeout = api.timeouts.stream_idle
        server_limits = settings.server.limits
        self._send_timeout = server_limits.send_timeout
        self._max_body = server_limits.max_body_size
        self._body_timeout = server_limits.body_timeout
        self._access_log = settings.observability.logging.access_log
        shortest = min(self._headers_timeout, self._idle_timeout, self._send_timeout, self._body_timeout)
        self._watchdogs = Deadlines(max(min(1.0, shortest / 8), 0.005))

    # ------------------------------------------------------------------------------------------- handlers

    async def messages(self, request: Request) -> StreamResponse:
        return await self._handle(request, "/v1/messages", metered=True)

    async def count_tokens(self, request: Request) -> StreamResponse:
        return await self._handle(request, "/v1/messages/count_tokens", metered=False)

    async def models(self, request: Request) -> StreamResponse:
        route = "/v1/models/{id}" if "id" in request.match_info else "/v1/models"
        return await self._handle(request, route, metered=False)

    async def _handle(self, request: Request, route: str, *, metered: bool) -> StreamResponse:
        exchange = _Exchange(route=route, started=perf_counter())
        telemetry = self._telemetry
        with telemetry.server_span(request.method, route, request.headers) as span:
            exchange.server_span = span
            exchange.trace_id, exchange.span_id = telemetry.trace_ids()
            try:
                response = await self._serve(request, exchange, metered=metered)
                exchange.status = response.status
                return response
            except asyncio.CancelledError:
                exchange.status = 499  # nginx's convention for "client closed request"
                raise
            except _ClientGone:
                exchange.status = 499
                return exchange.response or Response(status=499)
            finally:
                duration = perf_counter() - exchange.started
                overhead = max(duration - exchange.upstream_wait, 0.0)
                for record in exchange.records:
                    self._events.publish(record)
                if exchange.admission is not None:
                    # no records (no upstream call): the reservation goes back
                    exchange.admission.settle(exchange.records)
                telemetry.record_request(
                    method=request.method,
                    route=route,
                    status=exchange.status,
                    duration=duration,
                    overhead=overhead,
                    sub=exchange.sub,
                )
                if self._access_log:
                    self._log_access(request, exchange, duration, overhead)

    async def _serve(self, request: Request, exchange: _Exchange, *, metered: bool) -> StreamResponse:
        try:
            headers = request.headers
            identity = await self._auth.authenticate(headers.get(_AUTHORIZATION), headers.get(_X_API_KEY))
        except AuthError as exc:
            self._telemetry.on_auth_failure(exc.reason)
            return error_response(401, exc.message, headers={"WWW-Authenticate": www_authenticate(exc)})
        exchange.sub = identity.sub
        exchange.groups = sorted(identity.groups) or None
        body: bytes | None = None
        parsed: dict[str, Any] | None = None
        if request.method == "POST":
            body_or_error = await self._read_body(request)
            if isinstance(body_or_error, Response):
                return body_or_error
            body = body_or_error
            parsed_or_error = _parse_json_object(body)
            if isinstance(parsed_or_error, str):
                return error_response(400, parsed_or_error)
            parsed = parsed_or_error
            model = parsed.get("model")
            if isinstance(model, str):
                if len(model) > _MAX_MODEL_LENGTH:
                    return error_response(
                        400, f"model: no model has a name of {len(model)} characters (at most {_MAX_MODEL_LENGTH})."
                    )
                exchange.model = model
            exchange.stream = parsed.get("stream") is True
        if self._policy is not None and (answer := self._policy.answer(identity, request, exchange.model)) is not None:
            return answer  # refused (or /v1/models answered) by model policy: no upstream call, no usage event
        exchange.session_id = request.headers.get(_SESSION_ID)
        if parsed is not None and body is not None:
            if metered and self._limits is not None:
                verdict = await self._limits.admit(
                    identity, exchange.model, len(body), parsed.get("max_tokens"), exchange.stream
                )
                if isinstance(verdict, Refusal):
                    return verdict.response()  # a 429 naming the limit: no upstream call, no usage event
                exchange.admission = verdict
            exchange.affinity = _affinity(exchange.session_id, parsed, identity.sub)
        # The body is parsed and the caller known: checks of the request itself go here, before any upstream.
        return await self._forward(request, exchange, body, parsed, metered=metered)

    async def _read_body(self, request: Request) -> bytes | Response:
        length = request.content_length
        if length is not None and length > self._max_body:
            return error_response(413, f"Request body is larger than the gateway's limit of {self._max_body} bytes.")
        # The whole body may have come with the headers: then no deadline is needed.
        watchdog = None if request.complete else self._watchdogs.watch(self._body_timeout)
        try:
            return await request.read()
        except ConnectionError:
            raise _ClientGone() from None
        except BadBody:
            return error_response(400, "The request body's chunked framing is malformed.")
        except BodyTooLarge:
            return error_response(413, f"Request body is larger than the gateway's limit of {self._max_body} bytes.")
        except asyncio.CancelledError:
            if watchdog is not None and watchdog.absorb_cancel():
                return error_response(408, "The request body did not arrive in time.")
            raise
        finally:
            if watchdog is not None:
                watchdog.stop()

    # ------------------------------------------------------------------------------------------- upstream

    async def _forward(
        self,
        request: Request,
        exchange: _Exchange,
        body: bytes | None,
        parsed: dict[str, Any] | None,
        *,
        metered: bool,
    ) -> StreamResponse:
        """Try the upstreams that serve the request in order; the next only while the client has no byte."""
        route = exchange.route
        candidates, refusal = self._upstreams.candidates(route, exchange.model, beta_values(request.headers))
        if not candidates:
            if refusal is None:
                return error_response(404, f"Not found: {request.method} {request.path} (no upstream serves it)")
            return error_response(400 if exchange.model or route.startswith("/v1/messages") else 404, refusal)
        accept_encoding = filter_accept_encoding(request.headers.get(_ACCEPT_ENCODING))
        fallback: StreamResponse | None = None  # the last upstream failure, for when no other upstream can try
        retry_after: float | None = None
        for index, (upstream, upstream_model) in enumerate(candidates):
            try:
                permit = upstream.breaker.acquire()
            except CircuitOpenError as exc:
                retry_after = exc.retry_after if retry_after is None else min(retry_after, exc.retry_after)
                continue
            attempts = _Attempts(
                upstream=upstream,
                upstream_model=upstream_model,
                path_qs=request.path_qs,
                accept_encoding=accept_encoding,
                body=body,
                parsed=parsed,
                permit=permit,
                metered=metered,
                can_fail_over=index < len(candidates) - 1,
                affinity=exchange.affinity,
            )
            try:
                outcome = await self._try_upstream(request, exchange, attempts)
            finally:
                if not attempts.permit_done:  # a 4xx, a client that left, no key: nothing learnt about upstream
                    upstream.breaker.release(permit)
            if isinstance(outcome, _FailOver):
                log.warning("upstream %s failed before the first byte; trying the next", upstream.name)
                fallback = outcome.response
                continue
            return outcome
        if fallback is not None:
            return fallback
        seconds = max(1, math.ceil(retry_after or 1))
        return error_response(
            503,
            "Upstream is failing; the gateway's circuit breaker is open. Retry later.",
            headers={"retry-after": str(seconds)},
        )

    async def _try_upstream(
        self, request: Request, exchange: _Exchange, attempts: _Attempts
    ) -> StreamResponse | _FailOver:
        """The attempts on one upstream: across its keys (429/401) and connection failures."""
        upstream = attempts.upstream
        keys = upstream.keys
        key: Key | None = None
        while True:
            if keys is not None and key is None:
                try:
                    key = keys.acquire(exclude=frozenset(attempts.tried), affinity=attempts.affinity)
                except NoKeyAvailable as exc:
                    return self._give_up(attempts, _no_key_response(exc, retried=bool(attempts.tried)))
            if key is not None:
                attempts.tried.add(key.alias)
            exchange.key_alias = key.alias if key is not None else None
            outgoing = Outgoing(
                method=request.method,
                route=exchange.route,
                path_qs=attempts.path_qs,
                headers=request.headers,
                body=attempts.body,
                parsed=attempts.parsed,
                upstream_model=attempts.upstream_model,
                stream=exchange.stream,
                accept_encoding=attempts.accept_encoding,
                key=key,
            )
            with self._telemetry.client_span(
                exchange.model, stream=exchange.stream, server_address=upstream.server_address
            ) as client_span:
                exchange.client_span = client_span
                client_span.set_attribute("gate.upstream", upstream.name)
                with _UpstreamCall(self._record, exchange, attempts) as call:
                    outcome = await self._attempt(request, exchange, attempts, outgoing, call)
                exchange.client_span = None
            if isinstance(outcome, _Retry):
                key = outcome.next_key
                continue
            return outcome

    def _give_up(self, attempts: _Attempts, response: StreamResponse) -> StreamResponse | _FailOver:
        """This upstream's last word: the next upstream's turn when there is one, else the client's answer."""
        return _FailOver(response) if attempts.can_fail_over else response

    async def _attempt(
        self, request: Request, exchange: _Exchange, attempts: _Attempts, outgoing: Outgoing, call: _UpstreamCall
    ) -> StreamResponse | _Retry | _FailOver:
        """One upstream call, judged by the breaker at its response head; ``call`` records how it ended."""
        upstream = attempts.upstream
        sent = perf_counter()
        try:
            prepared = await upstream.prepare(outgoing)
            response = await self._send(upstream, prepared, request.method)
        except UpstreamUnavailable as exc:
            call.end("error", "api_error")  # nothing was sent: no credentials to send it with
            self._judge(attempts, failed=True, duration=perf_counter() - sent)
            log.warning("upstream %s unavailable: %s", upstream.name, exc)
            return self._give_up(attempts, error_response(502, f"The gateway could not call {upstream.label}."))
        except ConnectError as exc:
            # No connection, so nothing reached upstream: safe to try again, on the same key (it is not at fault).
            timed_out = isinstance(exc, ConnectTimeout)
            call.end("error", "timeout_error" if timed_out else "api_error")
            attempts.connect_failures += 1
            if attempts.connect_failures < self._connect_attempts:
                if outgoing.key is not None:
                    attempts.tried.discard(outgoing.key.alias)
                return _Retry(outgoing.key)
            self._judge(attempts, failed=True, duration=perf_counter() - sent)
            log.warning("upstream %s unreachable: %s", upstream.name, type(exc).__name__)
            if timed_out:
                message = f"The gateway could not connect to {upstream.label} in time."
                return self._give_up(attempts, error_response(504, message))
            return self._give_up(attempts, error_response(502, f"The gateway could not reach {upstream.label}."))
        except TimeoutError:
            call.end("error", "timeout_error")
            self._judge(attempts, failed=True, duration=perf_counter() - sent)
            return self._give_up(attempts, error_response(504, f"{upstream.label} did not answer in time."))
        except ClientError as exc:
            # The request may have reached upstream (a dropped connection, a malformed answer): never resent to
            # the same upstream; another one may still answer while the client has nothing.
            call.end("error", "api_error")
            self._judge(attempts, failed=True, duration=perf_counter() - sent)
            log.warning("upstream %s call failed before its answer: %s", upstream.name, type(exc).__name__)
            return self._give_up(attempts, error_response(502, f"The gateway could not reach {upstream.label}."))
        finally:
            exchange.upstream_wait += perf_counter() - sent
        waited = perf_counter() - sent
        answer = upstream.answer(response, outgoing)
        call.answered(answer)
        status = answer.status
        key = outgoing.key
        if key is not None and status in _KEY_TROUBLE:
            self._report_key_trouble(upstream, key, status, answer.headers.get(_RETRY_AFTER))
            attempts.key_failures += 1
            next_key = self._next_key(attempts) if attempts.key_failures < self._key_attempts else None
            if next_key is not None:
                call.end_with_error_body(await self._drain(answer, exchange), answer.headers)
                return _Retry(next_key)
        if status >= 500:
            self._judge(attempts, failed=True, duration=waited)
        elif status < 400:
            # Judged now, at the head (a half-open trial must not wait for long streams); a stream that fails
            # later is then recorded by ``_relay`` as a late failure.
            self._judge(attempts, failed=False, duration=waited)
        if attempts.can_fail_over and (status >= 500 or status in _FAIL_OVER):
            body = await self._drain(answer, exchange)
            call.end_with_error_body(body, answer.headers)
            return _FailOver(
                Response(status=status, body=body, headers=response_headers(answer.headers, keep_length=False))
            )
        return await self._relay(request, exchange, answer, attempts, call)

    async def _send(self, upstream: Adapter, prepared: Any, method: str) -> Any:
        """The upstream call up to its response headers, or TimeoutError after ``response-headers``."""
        watchdog = self._watchdogs.watch(self._headers_timeout)
        try:
            return await upstream.send(prepared, method)
        except asyncio.CancelledError:
            if watchdog.absorb_cancel():
                raise TimeoutError from None
            raise  # the client went away
        finally:
            watchdog.stop()

    def _judge(self, attempts: _Attempts, *, failed: bool, duration: float) -> None:
        if not attempts.permit_done:
            attempts.upstream.breaker.record(attempts.permit, failed=failed, duration=duration)
            attempts.permit_done = True

    def _next_key(self, attempts: _Attempts) -> Key | None:
        keys = attempts.upstream.keys
        if keys is None:
            return None
        try:
            return keys.acquire(exclude=frozenset(attempts.tried), affinity=attempts.affinity)
        except NoKeyAvailable:
            return None

    def _report_key_trouble(self, upstream: Adapter, key: Key, status: int, retry_after: str | None) -> None:
        keys = upstream.keys
        if keys is None:
            return
        if status == 429:
            keys.report_rate_limited(key.alias, _seconds(retry_after))
        else:
            keys.report_rejected(key.alias, status)

    async def _drain(self, upstream: Answer, exchange: _Exchange) -> bytes:
        """An error answer read to its end (bounded by ``stream-idle``), so its connection can be reused."""
        started = perf_counter()
        watchdog = self._watchdogs.watch(self._idle_timeout)
        try:
            return await upstream.read()
        except ClientError:
            return b""
        except asyncio.CancelledError:
            if watchdog.absorb_cancel():
                return b""
            raise
        finally:
            watchdog.stop()
            exchange.upstream_wait += perf_counter() - started
            upstream.release()

    # ------------------------------------------------------------------------------------------- relaying

    async def _relay(
        self,
        request: Request,
        exchange: _Exchange,
        upstream: Answer,
        attempts: _Attempts,
        call: _UpstreamCall,
    ) -> StreamResponse | _FailOver:
        """Send upstream's answer to the client as it arrives, and end ``call`` by how that went. An answer that
        breaks before its first byte reached the client may still fail over to the next upstream."""
        status = upstream.status
        meter = (
            UsageMeter(
                stream=exchange.stream and status < 300, content_encoding=upstream.headers.get(_CONTENT_ENCODING)
            )
            if attempts.metered
            else None
        )
        call.meter = meter
        length = upstream.content_length
        outcome, error_type = ("success" if status < 400 else "error"), None
        response: StreamResponse
        fail_over = False
        try:
            if length is not None and length <= _MAX_BUFFERED_BODY:
                response = await self._relay_whole(exchange, upstream, meter)
            else:
                response = await self._relay_stream(request, exchange, upstream, meter)
        except _UpstreamBroke as exc:
            outcome, error_type = "error", exc.error_type
            log.warning("upstream answer ended abnormally: %s", exc.error_type)
            if exc.response is None or not exc.response.head_sent:
                timed_out = exc.error_type == "timeout_error"  # nothing reached the client yet: a clean answer
                response = error_response(
                    504 if timed_out else 502,
                    f"{attempts.upstream.label} stopped answering in time."
                    if timed_out
                    else f"The connection to {attempts.upstream.label} broke.",
                )
                fail_over = attempts.can_fail_over
                exchange.response = None  # never sent: the next upstream's answer is the client's
            else:
                response = _cut_off(request, exc.response)  # end it truncated, as a dropped connection would
        except _ClientStalled as exc:
            outcome = "client_timeout"
            log.info("client took no bytes for %.0f s; connection closed", self._send_timeout)
            response = _cut_off(request, exc.response)
        except (asyncio.CancelledError, _ClientGone):
            outcome = "client_disconnected"
            raise
        except BaseException:
            outcome, error_type = "error", "api_error"  # a bug of ours: recorded, never as a success
            raise
        finally:
            upstream.release()  # back to the pool when read to the end, else closed so Anthropic sees the cancel
            if meter is not None:
                meter.finish()
                if outcome == "success" and meter.error_type is not None:
                    outcome, error_type = "error", meter.error_type  # `event: error` after the 200
                elif outcome == "error" and error_type is None:
                    error_type = meter.error_type or error_type_for(status)
            if status < 400 and error_type in _UPSTREAM_FAULTS:
                attempts.upstream.breaker.record_late_failure(attempts.permit)
            call.end(outcome, error_type)
        return _FailOver(response) if fail_over else response

    async def _relay_whole(self, exchange: _Exchange, upstream: Answer, meter: UsageMeter | None) -> StreamResponse:
        started = perf_counter()
        if upstream.complete():  # the whole answer came with the headers: no deadline needed
            body = await upstream.read()
        else:
            watchdog = self._watchdogs.watch(self._idle_timeout)
            try:
                body = await upstream.read()
            except ClientError:
                raise _UpstreamBroke("api_error") from None
            except asyncio.CancelledError:
                if watchdog.absorb_cancel():
                    raise _UpstreamBroke("timeout_error") from None
                raise
            finally:
                watchdog.stop()
                exchange.upstream_wait += perf_counter() - started
        if meter is not None:
            meter.feed(body)
        return Response(
            status=upstream.status, body=body, headers=response_headers(upstream.headers, keep_length=False)
        )

    async def _relay_stream(
        self, request: Request, exchange: _Exchange, upstream: Answer, meter: UsageMeter | None
    ) -> StreamResponse:
        """Chunks as they come, through a ``_StreamSink`` (meter, then client) fed by the answer's source. This task
        runs only at the start, the end, on a failure or a deadline, and while the client does not keep up. Two
        deadlines, one at a time: upstream's silence (``stream-idle``) while waiting for upstream, and the client's
        (``send-timeout``) while it does not take what was sent."""
        response = StreamResponse(status=upstream.status, headers=response_headers(upstream.headers, keep_length=True))
        try:
            await response.prepare(request)
        except ConnectionError:
            raise _ClientGone() from None
        exchange.response = response
        watchdog = self._watchdogs.watch(self._idle_timeout)
        sink = _StreamSink(exchange, meter, response, watchdog)
        source: _Pushed | _Pulled = (
            _Pushed(upstream, sink) if isinstance(upstream, UpstreamResponse) else _Pulled(upstream, sink)
        )
        sink.source = source
        on_client = False  # whose deadline runs: upstream's silence, or a client that takes nothing
        try:
            source.start()
            while True:
                if sink.blocked:  # the client's buffer is full: upstream is not read until it drains
                    on_client = True
                    watchdog.touch(self._send_timeout)
                    await response.drain()
                    on_client = False
                    watchdog.touch(self._idle_timeout)
                    sink.blocked = False
                    source.resume()
                    continue
                error = sink.error
                if error is not None:
                    if isinstance(error, ClientError):
                        raise _UpstreamBroke("api_error", response) from None
                    raise error  # the client went away (ConnectionError, below), or a bug of ours
                if sink.ended:
                    break
                waited_from, busy = perf_counter(), sink.busy
                try:
                    await source.next()
                finally:
                    exchange.upstream_wait += perf_counter() - waited_from - (sink.busy - busy)
            await response.write_eof()
        except ConnectionError:
            raise _ClientGone() from None
        except asyncio.CancelledError:
            if watchdog.absorb_cancel():
                if on_client:
                    raise _ClientStalled(response) from None
                raise _UpstreamBroke("timeout_error", response) from None
            raise
        finally:
            watchdog.stop()
            # The sink and its source refer to each other: left so, the cycle would keep the whole stream
            # (exchange, meter, response, task) alive until a full collection.
            sink.source = None
        return response

    # ------------------------------------------------------------------------------------------- records

    def _record(self, exchange: _Exchange, call: _UpstreamCall, status: str, error_type: str | None) -> None:
        meter = call.meter
        now = time.time()
        record = UsageRecord(
            subject=exchange.sub or "",
            model=(meter.model if meter and meter.model else None) or exchange.model,
            message_id=meter.message_id if meter else None,
            input_tokens=meter.input_tokens if meter else 0,
            output_tokens=meter.output_tokens if meter else 0,
            cache_creation_tokens=meter.cache_creation_tokens if meter else 0,
            cache_read_tokens=meter.cache_read_tokens if meter else 0,
            latency_ms=int((perf_counter() - exchange.started) * 1000),
            stream=exchange.stream,
            stop_reason=meter.stop_reason if meter else None,
            status=status,
            error_type=error_type,
            key_alias=exchange.key_alias,
            trace_id=exchange.trace_id,
            anthropic_request_id=call.request_id,
            http_status=call.http_status,
            time_to_first_token_ms=exchange.ttft_ms,
            cache_creation_5m_tokens=meter.cache_creation_5m_tokens if meter else None,
            cache_creation_1h_tokens=meter.cache_creation_1h_tokens if meter else None,
            web_search_requests=meter.web_search_requests if meter else None,
            web_fetch_requests=meter.web_fetch_requests if meter else None,
            service_tier=meter.service_tier if meter else None,
            claude_code_session_id=exchange.session_id,
            groups=exchange.groups,
            upstream=call.upstream,
            upstream_model=call.upstream_model,
            event_id="",  # the outbox gives it an id, in batches, as it stores it (stable from then on)
            time=rfc3339_millis(now),
        )
        exchange.records.append(record)
        self._telemetry.finish_call(exchange.server_span, exchange.client_span, record=record, sub=exchange.sub)

    def _log_access(self, request: Request, exchange: _Exchange, duration: float, overhead: float) -> None:
        fields: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "status": exchange.status,
            "latency_ms": round(duration * 1000, 3),
            "overhead_ms": round(overhead * 1000, 3),
            "trace_id": exchange.trace_id,
            "span_id": exchange.span_id,
            "sub": exchange.sub,
            "key_alias": exchange.key_alias,
            "model": exchange.model,
            "stream": exchange.stream,
        }
        if exchange.records:
            record = exchange.records[-1]
            fields["input_tokens"] = record.input_tokens
            fields["output_tokens"] = record.output_tokens
            fields["cache_creation_tokens"] = record.cache_creation_tokens
            fields["cache_read_tokens"] = record.cache_read_tokens
            fields["stop_reason"] = record.stop_reason
            fields["usage_status"] = record.status
        access_line(fields)


class _StreamSink:
    """Where a streamed answer's bytes go as they arrive: the usage meter (every byte, in order), then the client.

    Its source calls it: from the upstream connection's callbacks for a pushed answer, from the relay task for a
    pulled one. It wakes the relay task only for what needs a task: the end, a failure (upstream's, the client's,
    or a bug of ours: never raised into the upstream connection's parser, where it would read as a malformed
    answer), and a client whose buffer is full (``blocked``: the source is paused until the task has drained it
    under the client's deadline). Each piece from upstream pushes upstream's deadline out (a float store).
    """

    __slots__ = (
        "_exchange",
        "_meter",
        "_response",
        "_waiter",
        "_watchdog",
        "blocked",
        "busy",
        "ended",
        "error",
        "source",
    )

    def __init__(
        self, exchange: _Exchange, meter: UsageMeter | None, response: StreamResponse, watchdog: Deadline
    ) -> None:
        self._exchange = exchange
        self._meter = meter
        self._response = response
        self._watchdog = watchdog
        self._waiter: asyncio.Future[None] | None = None
        self.source: _Pushed | _Pulled | None = None
        self.blocked = False  # the client is not keeping up: the source is paused until the relay task drains it
        self.ended = False
        self.error: BaseException | None = None
        self.busy = 0.0  # seconds spent relaying: Gate's time, not upstream's

    # the source's side (``gate.http.client.BodyReceiver``)

    def body(self, data: bytes) -> None:
        self._relay(data, last=False)

    def body_end(self, data: bytes) -> None:
        """The last bytes and the end go to the client in one write (for a whole answer in one read, its only
        one); a client that has not taken them is still drained under its deadline."""
        self._relay(data, last=True)

    def _relay(self, data: bytes, *, last: bool) -> None:
        if self.error is not None or self.ended:
            return
        started = perf_counter()
        try:
            if not self.blocked:
                self._watchdog.touch()  # upstream is alive
            meter = self._meter
            if meter is not None and data:
                meter.feed(data)
                exchange = self._exchange
                if exchange.ttft_ms is None and meter.content_started:
                    exchange.ttft_ms = int((perf_counter() - exchange.started) * 1000)
            if last:
                self.ended = True
                if self._response.end(data):
                    self.blocked = True  # nothing more to read: only the client's deadline is left
                self._wake()
            elif self._response.send(data) and not self.blocked:
                self.blocked = True
                self._pause()
                self._wake()
        except ConnectionError as exc:  # the client went away
            self._stop(exc)
        except Exception as exc:  # a bug of ours: the relay task raises it (recorded, never as a success)
            log.exception("relaying a chunk failed")
            self._stop(exc)
        finally:
            self.busy += perf_counter() - started

    def body_failed(self, error: ClientError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    # the relay task's side

    async def wait(self) -> None:
        """Until the relay task has something to do: the client blocked, the end, or a failure."""
        if self.blocked or self.ended or self.error is not None:
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _stop(self, error: BaseException) -> None:
        self.error = error
        self._pause()
        self._wake()

    def _pause(self) -> None:
        if self.source is not None:
            self.source.pause()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Pushed:
    """A pass-through answer (``UpstreamResponse``: Anthropic's, and any cloud's answer Gate forwards unchanged):
    the upstream connection's callbacks hand each read to the sink, so the relay task sleeps from the first
    byte to the last unless the client falls behind."""

    __slots__ = ("_answer", "_sink")

    def __init__(self, answer: UpstreamResponse, sink: _StreamSink) -> None:
        self._answer = answer
        self._sink = sink

    def start(self) -> None:
        self._answer.push_to(self._sink)  # what arrived with the head goes out now

    async def next(self) -> None:
        await self._sink.wait()

    def pause(self) -> None:
        self._answer.pause_reading()

    def resume(self) -> None:
        self._answer.resume_reading()


class _Pulled:
    """Any other answer (one that transforms what upstream sends, as Bedrock's event stream): the relay task
    reads each piece and hands it to the sink. Flow control is the task's: it reads nothing while it drains."""

    __slots__ = ("_answer", "_sink")

    def __init__(self, answer: Answer, sink: _StreamSink) -> None:
        self._answer = answer
        self._sink = sink

    def start(self) -> None:
        pass

    async def next(self) -> None:
        try:
            chunk = await self._answer.readany()
        except ClientError as exc:
            self._sink.body_failed(exc)
            return
        if chunk:
            self._sink.body(chunk)
        else:
            self._sink.body_end(b"")

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


def _cut_off(request: Request, response: StreamResponse) -> StreamResponse:
    """End an answer the client has part of by closing its connection: no well-framed end may suggest it is whole."""
    if request.transport is not None:
        request.transport.abort()
    response.eof = True
    return response


class _UpstreamBroke(Exception):
    """Upstream failed after its response had begun (dropped connection or idle timeout)."""

    def __init__(self, error_type: str, response: StreamResponse | None = None) -> None:
        super().__init__(error_type)
        self.error_type = error_type
        self.response = response  # set when the client already has part of the answer


def _parse_json_object(body: bytes) -> dict[str, Any] | str:
    if not body:
        return "The request body is empty; it must be a JSON object."
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return f"The request body is not valid JSON: {exc.msg} at position {exc.pos}."
    if not isinstance(parsed, dict):
        return "The request body must be a JSON object."
    return parsed


def _affinity(session_id: str | None, body: dict[str, Any], sub: str) -> str:
    """Which prompt cache a call belongs to: its Claude Code session, else ``metadata.user_id``, else the user."""
    if session_id:
        return session_id
    metadata = body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    return user_id if isinstance(user_id, str) and user_id else sub


def _no_key_response(exc: NoKeyAvailable, *, retried: bool) -> Response:
    if exc.retry_after is None and not retried:
        return error_response(503, "The gateway has no usable Anthropic API key configured.")
    seconds = max(1, math.ceil(exc.retry_after or 1))
    if exc.rejected_only:
        # Anthropic rejected every key (401/403): not a rate limit the client can wait out, an operator's problem.
        return error_response(
            503,
            "Every Anthropic API key of the gateway was rejected by Anthropic; the operators have been alerted.",
            headers={"retry-after": str(seconds)},
        )
    return error_response(
        429,
        "Every Anthropic API key of the gateway is rate limited; retry after the indicated time.",
        headers={"retry-after": str(seconds)},
    )


def _seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 and math.isfinite(seconds) else None
