"""The proxied routes: authenticate, pick a key, ask the breaker, call Anthropic, relay the bytes back.

The response reaches the client chunk by chunk as upstream sends it, tapped by the usage meter on the way; every
upstream call of ``/v1/messages`` ends in exactly one usage record, whatever happens (errors, timeouts, a client
that goes away). The relay never blocks on publishing: ``UsageEvents.publish`` only enqueues.
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
from gate.events import UsageEvents
from gate.events.envelope import rfc3339_millis
from gate.http.client import ClientError, ConnectError, ConnectTimeout, UpstreamResponse
from gate.http.server import BadBody, BodyTooLarge, Request, Response, StreamResponse
from gate.identity.auth import Authenticator, AuthError, www_authenticate
from gate.ops.errors import error_response, error_type_for
from gate.ops.logs import access_line
from gate.ops.telemetry import Telemetry
from gate.policy.models import ModelPolicy
from gate.settings import GateSettings
from gate.upstreams.anthropic import Upstream, request_headers, response_headers
from gate.upstreams.breaker import CircuitBreaker, CircuitOpenError, Permit
from gate.upstreams.keys import Key, KeyPool, NoKeyAvailable

__all__ = ["Relay"]

log = logging.getLogger("gate.relay")

_AUTHORIZATION = istr("authorization")
_X_API_KEY = istr("x-api-key")
_ACCEPT_ENCODING = istr("accept-encoding")
_CONTENT_TYPE = istr("content-type")
_CONTENT_ENCODING = istr("content-encoding")
_CONTENT_LENGTH = istr("content-length")
_RETRY_AFTER = istr("retry-after")
_REQUEST_ID = istr("request-id")
_SESSION_ID = istr("x-claude-code-session-id")
# Answers about the key rather than the request: retried on another key. A 403 (``permission_error``) is about
# the request, say a model the organisation lacks, and reaches the client unchanged.
_KEY_TROUBLE = frozenset({401, 429})
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


@dataclass(slots=True)
class _Attempts:
    """What the upstream attempts of one client request share: the body, the breaker permit, keys tried."""

    path_qs: str
    accept_encoding: str | None
    body: bytes | None
    permit: Permit
    metered: bool
    tried: set[str] = field(default_factory=set)
    key_failures: int = 0
    connect_failures: int = 0
    permit_done: bool = False


class _UpstreamCall:
    """One upstream attempt. It ends in exactly one usage record (on metered routes), whatever ends it: ``end``
    says how, and leaving its ``with`` block without ending it ends it by the way it was left (the client went
    away, the client stalled, or a bug of ours, which is never recorded as a success)."""

    __slots__ = ("_exchange", "_record", "ended", "http_status", "meter", "metered", "request_id")

    def __init__(self, record: _RecordFn, exchange: _Exchange, *, metered: bool) -> None:
        self._record = record
        self._exchange = exchange
        self.metered = metered
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

    def answered(self, upstream: UpstreamResponse) -> None:
        self.http_status = upstream.status
        self.request_id = upstream.headers.get(_REQUEST_ID)

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
    """Try again upstream with this key."""

    next_key: Key


class Relay:
    """The handlers for ``/v1/messages``, ``/v1/messages/count_tokens`` and ``/v1/models``."""

    def __init__(
        self,
        settings: GateSettings,
        *,
        upstream: Upstream,
        auth: Authenticator,
        keys: KeyPool,
        breaker: CircuitBreaker,
        events: UsageEvents,
        telemetry: Telemetry,
        policy: ModelPolicy | None = None,
    ) -> None:
        api = settings.anthropic.api
        self._policy = policy
        self._upstream = upstream
        self._auth = auth
        self._keys = keys
        self._breaker = breaker
        self._events = events
        self._telemetry = telemetry
        self._default_version = api.default_version
        self._connect_attempts = api.retry.connect_attempts
        self._key_attempts = api.retry.key_attempts
        self._headers_timeout = api.timeouts.response_headers
        self._idle_timeout = api.timeouts.stream_idle
        limits = settings.server.limits
        self._send_timeout = limits.send_timeout
        self._max_body = limits.max_body_size
        self._body_timeout = limits.body_timeout
        self._access_log = settings.observability.logging.access_log
        shortest = min(self._headers_timeout, self._idle_timeout, self._send_timeout, self._body_timeout)
        self._watchdogs = _Watchdogs(max(min(1.0, shortest / 8), 0.005))

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
        if request.method == "POST":
            body_or_error = await self._read_body(request)
            if isinstance(body_or_error, Response):
                return body_or_error
            body = body_or_error
            parsed = _parse_json_object(body)
            if isinstance(parsed, str):
                return error_response(400, parsed)
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
        return await self._forward(request, exchange, body, metered=metered)

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
        self, request: Request, exchange: _Exchange, body: bytes | None, *, metered: bool
    ) -> StreamResponse:
        try:
            permit = self._breaker.acquire()
        except CircuitOpenError as exc:
            seconds = max(1, math.ceil(exc.retry_after))
            return error_response(
                503,
                "Upstream is failing; the gateway's circuit breaker is open. Retry later.",
                headers={"retry-after": str(seconds)},
            )
        attempts = _Attempts(
            path_qs=request.path_qs,
            accept_encoding=filter_accept_encoding(request.headers.get(_ACCEPT_ENCODING)),
            body=body,
            permit=permit,
            metered=metered,
        )
        key: Key | None = None
        try:
            while True:
                if key is None:
                    try:
                        key = self._keys.acquire(exclude=frozenset(attempts.tried))
                    except NoKeyAvailable as exc:
                        return _no_key_response(exc, retried=bool(attempts.tried))
                attempts.tried.add(key.alias)
                exchange.key_alias = key.alias
                with self._telemetry.client_span(
                    exchange.model, stream=exchange.stream, server_address=self._upstream.server_address
                ) as client_span:
                    exchange.client_span = client_span
                    with _UpstreamCall(self._record, exchange, metered=metered) as call:
                        outcome = await self._attempt(request, exchange, attempts, key, call)
                    exchange.client_span = None
                if isinstance(outcome, _Retry):
                    key = outcome.next_key
                    continue
                return outcome
        finally:
            if not attempts.permit_done:  # a 4xx, a client that left, no key: nothing learnt about upstream
                self._breaker.release(permit)

    async def _attempt(
        self, request: Request, exchange: _Exchange, attempts: _Attempts, key: Key, call: _UpstreamCall
    ) -> StreamResponse | _Retry:
        """One upstream call, judged by the breaker at its response head; ``call`` records how it ended."""
        headers = request_headers(
            request.headers,
            api_key=key.value,
            default_version=self._default_version,
            accept_encoding=attempts.accept_encoding,
        )
        sent = perf_counter()
        try:
            upstream = await self._send(request.method, attempts.path_qs, headers, attempts.body)
        except ConnectError as exc:
            # No connection, so nothing reached Anthropic: safe to try again, on the same key (it is not at fault).
            timed_out = isinstance(exc, ConnectTimeout)
            call.end("error", "timeout_error" if timed_out else "api_error")
            attempts.connect_failures += 1
            if attempts.connect_failures < self._connect_attempts:
                attempts.tried.discard(key.alias)
                return _Retry(key)
            self._judge(attempts, failed=True, duration=perf_counter() - sent)
            log.warning("upstream unreachable: %s", type(exc).__name__)
            if timed_out:
                return error_response(504, "The gateway could not connect to Anthropic in time.")
            return error_response(502, "The gateway could not reach Anthropic.")
        except TimeoutError:
            call.end("error", "timeout_error")
            self._judge(attempts, failed=True, duration=perf_counter() - sent)
            return error_response(504, "Anthropic did not answer in time.")
        except ClientError as exc:
            # The request may have reached Anthropic (a dropped connection, a malformed answer): never resent.
            call.end("error", "api_error")
            self._judge(attempts, failed=True, duration=perf_counter() - sent)
            log.warning("upstream call failed before its answer: %s", type(exc).__name__)
            return error_response(502, "The gateway could not reach Anthropic.")
        finally:
            exchange.upstream_wait += perf_counter() - sent
        waited = perf_counter() - sent
        call.answered(upstream)
        status = upstream.status
        if status in _KEY_TROUBLE:
            self._report_key_trouble(key, status, upstream.headers.get(_RETRY_AFTER))
            attempts.key_failures += 1
            next_key = self._next_key(attempts) if attempts.key_failures < self._key_attempts else None
            if next_key is not None:
                call.end_with_error_body(await self._drain(upstream, exchange), upstream.headers)
                return _Retry(next_key)
        if status >= 500:
            self._judge(attempts, failed=True, duration=waited)
        elif status < 400:
            # Judged now, at the head (a half-open trial must not wait for long streams); a stream that fails
            # later is then recorded by ``_relay`` as a late failure.
            self._judge(attempts, failed=False, duration=waited)
        return await self._relay(request, exchange, upstream, attempts, call)

    async def _send(self, method: str, path_qs: str, headers: Any, body: bytes | None) -> UpstreamResponse:
        """The upstream call up to its response headers, or TimeoutError after ``response-headers``."""
        watchdog = self._watchdogs.watch(self._headers_timeout)
        try:
            return await self._upstream.request(method, path_qs, headers, body)
        except asyncio.CancelledError:
            if watchdog.absorb_cancel():
                raise TimeoutError from None
            raise  # the client went away
        finally:
            watchdog.stop()

    def _judge(self, attempts: _Attempts, *, failed: bool, duration: float) -> None:
        if not attempts.permit_done:
            self._breaker.record(attempts.permit, failed=failed, duration=duration)
            attempts.permit_done = True

    def _next_key(self, attempts: _Attempts) -> Key | None:
        try:
            return self._keys.acquire(exclude=frozenset(attempts.tried))
        except NoKeyAvailable:
            return None

    def _report_key_trouble(self, key: Key, status: int, retry_after: str | None) -> None:
        if status == 429:
            self._keys.report_rate_limited(key.alias, _seconds(retry_after))
        else:
            self._keys.report_rejected(key.alias, status)

    async def _drain(self, upstream: UpstreamResponse, exchange: _Exchange) -> bytes:
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
        upstream: UpstreamResponse,
        attempts: _Attempts,
        call: _UpstreamCall,
    ) -> StreamResponse:
        """Send upstream's answer to the client as it arrives, and end ``call`` by how that went."""
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
                    "Anthropic stopped answering in time." if timed_out else "The connection to Anthropic broke.",
                )
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
                self._breaker.record_late_failure(attempts.permit)
            call.end(outcome, error_type)
        return response

    async def _relay_whole(
        self, exchange: _Exchange, upstream: UpstreamResponse, meter: UsageMeter | None
    ) -> StreamResponse:
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
        self, request: Request, exchange: _Exchange, upstream: UpstreamResponse, meter: UsageMeter | None
    ) -> StreamResponse:
        """Chunks as they come. Two deadlines, one at a time: upstream's silence (``stream-idle``) while waiting
        for a chunk, and the client's (``send-timeout``) while it does not take what was sent."""
        response = StreamResponse(status=upstream.status, headers=response_headers(upstream.headers, keep_length=True))
        try:
            await response.prepare(request)
        except ConnectionError:
            raise _ClientGone() from None
        exchange.response = response
        watchdog = self._watchdogs.watch(self._idle_timeout)
        try:
            while True:
                waited_from = perf_counter()
                try:
                    chunk = await upstream.readany()
                except ClientError:
                    raise _UpstreamBroke("api_error", response) from None
                finally:
                    exchange.upstream_wait += perf_counter() - waited_from
                if not chunk:
                    break
                watchdog.touch()
                if meter is not None:
                    meter.feed(chunk)
                    if exchange.ttft_ms is None and meter.content_started:
                        exchange.ttft_ms = int((perf_counter() - exchange.started) * 1000)
                if response.send(chunk):
                    watchdog.wait_for_client(self._send_timeout)
                    await response.drain()
                    watchdog.touch()
            await response.write_eof()
        except ConnectionError:
            raise _ClientGone() from None
        except asyncio.CancelledError:
            if watchdog.absorb_cancel():
                if watchdog.on_client:
                    raise _ClientStalled(response) from None
                raise _UpstreamBroke("timeout_error", response) from None
            raise
        finally:
            watchdog.stop()
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


class _Watchdogs:
    """One timer for every watchdog of a relay: a sweep every ``resolution`` seconds fires the overdue ones.

    Profiled, a timer per request (``call_at`` then ``cancel``) was a visible cost; joining and leaving a set is
    not. A deadline fires between its time and one ``resolution`` later.
    """

    __slots__ = ("_handle", "_loop", "_resolution", "_watching")

    def __init__(self, resolution: float) -> None:
        self._resolution = resolution
        self._watching: set[_IdleWatchdog] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, timeout: float) -> _IdleWatchdog:
        loop = asyncio.get_running_loop()
        watchdog = _IdleWatchdog(self, loop, timeout)
        self._watching.add(watchdog)
        if self._handle is None or self._loop is not loop:
            self._loop = loop
            self._handle = loop.call_later(self._resolution, self._sweep)
        return watchdog

    def forget(self, watchdog: _IdleWatchdog) -> None:
        self._watching.discard(watchdog)

    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        for watchdog in [w for w in self._watching if now >= w.due]:
            self._watching.discard(watchdog)
            watchdog.fire()
        self._handle = loop.call_later(self._resolution, self._sweep) if self._watching else None


class _IdleWatchdog:
    """Cancels its task when its deadline passes: ``timeout`` after the last ``touch`` (upstream's silence), or
    after ``wait_for_client`` (the client's). Moving the deadline only stores a number."""

    __slots__ = ("_loop", "_owner", "_task", "_timeout", "due", "fired", "on_client")

    def __init__(self, owner: _Watchdogs, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._owner = owner
        self._loop = loop
        self._task = asyncio.current_task()
        self._timeout = timeout
        self.due = loop.time() + timeout
        self.fired = False
        self.on_client = False  # whether the deadline running is the client's

    def touch(self) -> None:
        self.due = self._loop.time() + self._timeout
        self.on_client = False

    def wait_for_client(self, timeout: float) -> None:
        self.due = self._loop.time() + timeout
        self.on_client = True

    def fire(self) -> None:
        self.fired = True
        if self._task is not None:
            self._task.cancel()

    def stop(self) -> None:
        self._owner.forget(self)

    def absorb_cancel(self) -> bool:
        """On a CancelledError: True (and the task's cancel request withdrawn) when this watchdog caused it."""
        if not self.fired or self._task is None:
            return False
        self._task.uncancel()
        return True


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
