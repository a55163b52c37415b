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
from gate.policy.limits import Admission, Limits, Refusal
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
_KEY_TROUBLE = frozenset({401, 403, 429})
# How a relayed 2xx can still show Anthropic failing (stalled or broken stream, an error event inside it): the
# breaker counts these like a 5xx or 529.
_UPSTREAM_FAULTS = frozenset({"api_error", "overloaded_error", "timeout_error"})
_MAX_BUFFERED_BODY = 8 * 1024 * 1024  # a non-streaming answer with a known length up to this is sent in one write


class _ClientGone(Exception):
    """The client closed its connection while we were answering."""


@dataclass(slots=True)
class _Call:
    """What one client request has learnt so far; the source of its usage record and access log line."""

    route: str
    started: float
    stream: bool = False
    model: str | None = None
    sub: str | None = None
    session_id: str | None = None
    key_alias: str | None = None
    upstream_wait: float = 0.0
    status: int = 0
    meter: UsageMeter | None = None
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
class _Attempt:
    """The state shared by the upstream attempts of one client request (key and connect retries)."""

    path_qs: str
    accept_encoding: str | None
    body: bytes | None
    permit: Permit
    metered: bool
    tried: set[str] = field(default_factory=set)
    key_failures: int = 0
    connect_failures: int = 0
    permit_done: bool = False
    affinity: str | None = None
    headers_wait: float = 0.0  # time to upstream's response headers: what the breaker judges slowness by


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
        limits: Limits | None = None,
    ) -> None:
        api = settings.anthropic.api
        self._limits = limits
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
        self._max_body = settings.server.limits.max_body_size
        self._body_timeout = settings.server.limits.body_timeout
        self._access_log = settings.observability.logging.access_log
        self._watchdogs = _Watchdogs(max(min(1.0, self._headers_timeout / 8, self._idle_timeout / 8), 0.005))

    # ------------------------------------------------------------------------------------------- handlers

    async def messages(self, request: Request) -> StreamResponse:
        return await self._handle(request, "/v1/messages", metered=True)

    async def count_tokens(self, request: Request) -> StreamResponse:
        return await self._handle(request, "/v1/messages/count_tokens", metered=False)

    async def models(self, request: Request) -> StreamResponse:
        route = "/v1/models/{id}" if "id" in request.match_info else "/v1/models"
        return await self._handle(request, route, metered=False)

    async def _handle(self, request: Request, route: str, *, metered: bool) -> StreamResponse:
        call = _Call(route=route, started=perf_counter())
        telemetry = self._telemetry
        with telemetry.server_span(request.method, route, request.headers) as span:
            call.server_span = span
            call.trace_id, call.span_id = telemetry.trace_ids()
            try:
                response = await self._serve(request, call, metered=metered)
                call.status = response.status
                return response
            except asyncio.CancelledError:
                call.status = 499  # nginx's convention for "client closed request"
                raise
            except _ClientGone:
                call.status = 499
                return call.response or Response(status=499)
            finally:
                duration = perf_counter() - call.started
                overhead = max(duration - call.upstream_wait, 0.0)
                for record in call.records:
                    self._events.publish(record)
                if call.admission is not None:
                    call.admission.settle(call.records)  # no records (no upstream call): the reservation goes back
                telemetry.record_request(
                    method=request.method,
                    route=route,
                    status=call.status,
                    duration=duration,
                    overhead=overhead,
                    sub=call.sub,
                )
                if self._access_log:
                    self._log_access(request, call, duration, overhead)

    async def _serve(self, request: Request, call: _Call, *, metered: bool) -> StreamResponse:
        try:
            headers = request.headers
            identity = await self._auth.authenticate(headers.get(_AUTHORIZATION), headers.get(_X_API_KEY))
        except AuthError as exc:
            self._telemetry.on_auth_failure(exc.reason)
            return error_response(401, exc.message, headers={"WWW-Authenticate": www_authenticate(exc)})
        call.sub = identity.sub
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
            call.model = model if isinstance(model, str) else None
            call.stream = parsed.get("stream") is True
            if metered and self._limits is not None:
                max_tokens = parsed.get("max_tokens")
                verdict = await self._limits.admit(identity, call.model, len(body), max_tokens, call.stream)
                if isinstance(verdict, Refusal):
                    return verdict.response()
                call.admission = verdict
            call.affinity = _affinity(request.headers.get(_SESSION_ID), parsed, identity.sub)
        call.session_id = request.headers.get(_SESSION_ID)
        return await self._forward(request, call, body, metered=metered)

    async def _read_body(self, request: Request) -> bytes | Response:
        length = request.content_length
        if length is not None and length > self._max_body:
            return error_response(413, f"Request body is larger than the gateway's limit of {self._max_body} bytes.")
        try:
            if request.complete:  # the whole body came with the headers: no deadline needed
                return await request.read()
            async with asyncio.timeout(self._body_timeout):
                return await request.read()
        except ConnectionError:
            raise _ClientGone() from None
        except BadBody:
            return error_response(400, "The request body's chunked framing is malformed.")
        except BodyTooLarge:
            return error_response(413, f"Request body is larger than the gateway's limit of {self._max_body} bytes.")
        except TimeoutError:
            return error_response(408, "The request body did not arrive in time.")

    # ------------------------------------------------------------------------------------------- upstream

    async def _forward(self, request: Request, call: _Call, body: bytes | None, *, metered: bool) -> StreamResponse:
        try:
            permit = self._breaker.acquire()
        except CircuitOpenError as exc:
            seconds = max(1, math.ceil(exc.retry_after))
            return error_response(
                503,
                "Upstream is failing; the gateway's circuit breaker is open. Retry later.",
                headers={"retry-after": str(seconds)},
            )
        attempt = _Attempt(
            path_qs=request.path_qs,
            accept_encoding=filter_accept_encoding(request.headers.get(_ACCEPT_ENCODING)),
            body=body,
            permit=permit,
            metered=metered,
            affinity=call.affinity,
        )
        key: Key | None = None
        try:
            while True:
                if key is None:
                    try:
                        key = self._keys.acquire(exclude=frozenset(attempt.tried), affinity=call.affinity)
                    except NoKeyAvailable as exc:
                        self._breaker.release(permit)
                        attempt.permit_done = True
                        return _no_key_response(exc, retried=bool(attempt.tried))
                attempt.tried.add(key.alias)
                call.key_alias = key.alias
                with self._telemetry.client_span(
                    call.model, stream=call.stream, server_address=self._upstream.server_address
                ) as client_span:
                    call.client_span = client_span
                    outcome = await self._attempt(request, call, attempt, key)
                    call.client_span = None
                if isinstance(outcome, _Retry):
                    key = outcome.next_key
                    continue
                return outcome
        finally:
            if not attempt.permit_done:
                self._breaker.release(permit)

    async def _attempt(self, request: Request, call: _Call, attempt: _Attempt, key: Key) -> StreamResponse | _Retry:
        """One upstream call: exactly one usage record when metered, whatever happens."""
        headers = request_headers(
            request.headers,
            api_key=key.value,
            default_version=self._default_version,
            accept_encoding=attempt.accept_encoding,
        )
        sent = perf_counter()
        try:
            upstream = await self._send(request.method, attempt.path_qs, headers, attempt.body)
        except ConnectError as exc:
            # No connection, so nothing reached Anthropic: safe to try again, on the same key (it is not at fault).
            waited = perf_counter() - sent
            call.upstream_wait += waited
            timed_out = isinstance(exc, ConnectTimeout)
            if attempt.metered:
                error_type = "timeout_error" if timed_out else "api_error"
                self._record(call, status="error", error_type=error_type, http_status=None, request_id=None)
            attempt.connect_failures += 1
            if attempt.connect_failures < self._connect_attempts:
                attempt.tried.discard(key.alias)
                return _Retry(key)
            self._settle(attempt, failed=True, duration=waited)
            log.warning("upstream unreachable: %s", type(exc).__name__)
            if timed_out:
                return error_response(504, "The gateway could not connect to Anthropic in time.")
            return error_response(502, "The gateway could not reach Anthropic.")
        except TimeoutError:
            waited = perf_counter() - sent
            call.upstream_wait += waited
            self._settle(attempt, failed=True, duration=waited)
            if attempt.metered:
                self._record(call, status="error", error_type="timeout_error", http_status=None, request_id=None)
            return error_response(504, "Anthropic did not answer in time.")
        except ClientError as exc:
            # The request may have reached Anthropic (a dropped connection, a malformed answer): never resent.
            waited = perf_counter() - sent
            call.upstream_wait += waited
            self._settle(attempt, failed=True, duration=waited)
            if attempt.metered:
                self._record(call, status="error", error_type="api_error", http_status=None, request_id=None)
            log.warning("upstream call failed before its answer: %s", type(exc).__name__)
            return error_response(502, "The gateway could not reach Anthropic.")
        except asyncio.CancelledError:
            # The client left while Anthropic was thinking; the pool has closed that connection (Anthropic sees
            # the cancel), the permit goes back in ``_forward``.
            call.upstream_wait += perf_counter() - sent
            if attempt.metered:
                self._record(call, status="client_disconnected", error_type=None, http_status=None, request_id=None)
            raise
        waited = perf_counter() - sent
        call.upstream_wait += waited
        status = upstream.status
        if status in _KEY_TROUBLE:
            self._report_key_trouble(key, status, upstream.headers.get(_RETRY_AFTER))
            attempt.key_failures += 1
            if attempt.key_failures < self._key_attempts:
                next_key = self._next_key(attempt)
                if next_key is not None:
                    try:
                        answer = await self._drain(upstream, call)
                    except asyncio.CancelledError:
                        if attempt.metered:
                            self._record_error_body(call, status, b"", upstream.headers)
                        raise
                    if attempt.metered:
                        self._record_error_body(call, status, answer, upstream.headers)
                    return _Retry(next_key)
        else:
            self._keys.report_success(key.alias)
        if status >= 500:
            self._settle(attempt, failed=True, duration=waited)
        # A 2xx is judged once relayed (a stream can still break or carry an overloaded error), yet by its time
        # to headers: a long stream is not a slow call. A 4xx says nothing about upstream: ``_forward`` releases.
        attempt.headers_wait = waited
        return await self._relay(request, call, upstream, attempt)

    async def _send(self, method: str, path_qs: str, headers: Any, body: bytes | None) -> UpstreamResponse:
        """The upstream call up to its response headers, or TimeoutError after ``response-headers``.

        The deadline ``asyncio.timeout`` would give, from the relay's shared watchdog sweep: profiled, the
        context manager's bookkeeping cost more than the rest of Gate's header hygiene on every request.
        """
        watchdog = self._watchdogs.watch(self._headers_timeout)
        try:
            return await self._upstream.request(method, path_qs, headers, body)
        except asyncio.CancelledError:
            if watchdog.absorb_cancel():
                raise TimeoutError from None
            raise  # the client went away
        finally:
            watchdog.stop()

    def _settle(self, attempt: _Attempt, *, failed: bool, duration: float) -> None:
        if not attempt.permit_done:
            self._breaker.record(attempt.permit, failed=failed, duration=duration)
            attempt.permit_done = True

    def _next_key(self, attempt: _Attempt) -> Key | None:
        try:
            return self._keys.acquire(exclude=frozenset(attempt.tried), affinity=attempt.affinity)
        except NoKeyAvailable:
            return None

    def _report_key_trouble(self, key: Key, status: int, retry_after: str | None) -> None:
        if status == 429:
            self._keys.report_rate_limited(key.alias, _seconds(retry_after))
        else:
            self._keys.report_rejected(key.alias, status)

    async def _drain(self, upstream: UpstreamResponse, call: _Call) -> bytes:
        started = perf_counter()
        try:
            async with asyncio.timeout(self._idle_timeout):
                return await upstream.read()
        except (TimeoutError, ClientError):
            return b""
        finally:
            call.upstream_wait += perf_counter() - started
            upstream.release()

    # ------------------------------------------------------------------------------------------- relaying

    async def _relay(
        self, request: Request, call: _Call, upstream: UpstreamResponse, attempt: _Attempt
    ) -> StreamResponse:
        """Send upstream's answer to the client as it arrives; always ends in one record when metered."""
        status = upstream.status
        meter = (
            UsageMeter(stream=call.stream and status < 300, content_encoding=upstream.headers.get(_CONTENT_ENCODING))
            if attempt.metered
            else None
        )
        call.meter = meter
        request_id = upstream.headers.get(_REQUEST_ID)
        length = upstream.content_length
        outcome, error_type = ("success" if status < 400 else "error"), None
        judged = True
        response: StreamResponse
        try:
            if length is not None and length <= _MAX_BUFFERED_BODY:
                response = await self._relay_whole(call, upstream, meter)
            else:
                response = await self._relay_stream(request, call, upstream, meter)
        except _UpstreamBroke as exc:
            outcome, error_type = "error", exc.error_type
            log.warning("upstream answer ended abnormally: %s", exc.error_type)
            if exc.response is None:
                timed_out = exc.error_type == "timeout_error"
                response = error_response(
                    504 if timed_out else 502,
                    "Anthropic stopped answering in time." if timed_out else "The connection to Anthropic broke.",
                )
            else:
                # The client has part of the answer: end it truncated, as a dropped connection from Anthropic would.
                if request.transport is not None:
                    request.transport.abort()
                response = exc.response
        except (asyncio.CancelledError, _ClientGone):
            outcome, error_type = "client_disconnected", None
            raise
        except Exception:
            outcome, error_type = "error", "api_error"  # a bug of ours: recorded, never as a success
            judged = False  # and not held against Anthropic
            raise
        finally:
            upstream.release()  # back to the pool when read to the end, else closed so Anthropic sees the cancel
            if meter is not None:
                meter.finish()
                if outcome == "success" and meter.error_type is not None:
                    outcome, error_type = "error", meter.error_type  # `event: error` after the 200
                elif outcome == "error" and error_type is None:
                    error_type = meter.error_type or error_type_for(status)
                self._record(call, status=outcome, error_type=error_type, http_status=status, request_id=request_id)
            if judged and status < 400 and outcome != "client_disconnected":  # else ``_forward`` releases
                self._settle(attempt, failed=error_type in _UPSTREAM_FAULTS, duration=attempt.headers_wait)
        return response

    async def _relay_whole(self, call: _Call, upstream: UpstreamResponse, meter: UsageMeter | None) -> StreamResponse:
        started = perf_counter()
        try:
            if upstream.complete():  # the whole answer came with the headers: no deadline needed
                body = await upstream.read()
            else:
                async with asyncio.timeout(self._idle_timeout):
                    body = await upstream.read()
        except TimeoutError:
            raise _UpstreamBroke("timeout_error") from None
        except ClientError:
            raise _UpstreamBroke("api_error") from None
        finally:
            call.upstream_wait += perf_counter() - started
        if meter is not None:
            meter.feed(body)
        return Response(
            status=upstream.status, body=body, headers=response_headers(upstream.headers, keep_length=False)
        )

    async def _relay_stream(
        self, request: Request, call: _Call, upstream: UpstreamResponse, meter: UsageMeter | None
    ) -> StreamResponse:
        response = StreamResponse(status=upstream.status, headers=response_headers(upstream.headers, keep_length=True))
        try:
            await response.prepare(request)
        except ConnectionError:
            raise _ClientGone() from None
        call.response = response
        watchdog = self._watchdogs.watch(self._idle_timeout)
        try:
            while True:
                waited_from = perf_counter()
                try:
                    chunk = await upstream.readany()
                except ClientError:
                    raise _UpstreamBroke("api_error", response) from None
                finally:
                    call.upstream_wait += perf_counter() - waited_from
                if not chunk:
                    break
                watchdog.touch()
                if meter is not None:
                    meter.feed(chunk)
                    if call.ttft_ms is None and meter.content_started:
                        call.ttft_ms = int((perf_counter() - call.started) * 1000)
                try:
                    await response.write(chunk)
                except ConnectionError:
                    raise _ClientGone() from None
            await response.write_eof()
        except ConnectionError:
            raise _ClientGone() from None
        except asyncio.CancelledError:
            if watchdog.absorb_cancel():
                raise _UpstreamBroke("timeout_error", response) from None
            raise
        finally:
            watchdog.stop()
        return response

    # ------------------------------------------------------------------------------------------- records

    def _record_error_body(self, call: _Call, status: int, body: bytes, headers: Any) -> None:
        meter = UsageMeter(stream=False, content_encoding=headers.get(_CONTENT_ENCODING))
        meter.feed(body)
        meter.finish()
        call.meter = meter
        self._record(
            call,
            status="error",
            error_type=meter.error_type or error_type_for(status),
            http_status=status,
            request_id=headers.get(_REQUEST_ID),
        )

    def _record(
        self, call: _Call, *, status: str, error_type: str | None, http_status: int | None, request_id: str | None
    ) -> None:
        meter = call.meter
        now = time.time()
        record = UsageRecord(
            subject=call.sub or "",
            model=(meter.model if meter and meter.model else None) or call.model,
            message_id=meter.message_id if meter else None,
            input_tokens=meter.input_tokens if meter else 0,
            output_tokens=meter.output_tokens if meter else 0,
            cache_creation_tokens=meter.cache_creation_tokens if meter else 0,
            cache_read_tokens=meter.cache_read_tokens if meter else 0,
            latency_ms=int((perf_counter() - call.started) * 1000),
            stream=call.stream,
            stop_reason=meter.stop_reason if meter else None,
            status=status,
            error_type=error_type,
            key_alias=call.key_alias,
            trace_id=call.trace_id,
            anthropic_request_id=request_id,
            http_status=http_status,
            time_to_first_token_ms=call.ttft_ms,
            cache_creation_5m_tokens=meter.cache_creation_5m_tokens if meter else None,
            cache_creation_1h_tokens=meter.cache_creation_1h_tokens if meter else None,
            web_search_requests=meter.web_search_requests if meter else None,
            web_fetch_requests=meter.web_fetch_requests if meter else None,
            service_tier=meter.service_tier if meter else None,
            claude_code_session_id=call.session_id,
            event_id="",  # the outbox gives it an id, in batches, as it stores it (stable from then on)
            time=rfc3339_millis(now),
        )
        call.records.append(record)
        call.meter = None
        self._telemetry.finish_call(call.server_span, call.client_span, record=record, sub=call.sub)

    def _log_access(self, request: Request, call: _Call, duration: float, overhead: float) -> None:
        fields: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "status": call.status,
            "latency_ms": round(duration * 1000, 3),
            "overhead_ms": round(overhead * 1000, 3),
            "trace_id": call.trace_id,
            "span_id": call.span_id,
            "sub": call.sub,
            "key_alias": call.key_alias,
            "model": call.model,
            "stream": call.stream,
        }
        if call.records:
            record = call.records[-1]
            fields["input_tokens"] = record.input_tokens
            fields["output_tokens"] = record.output_tokens
            fields["cache_creation_tokens"] = record.cache_creation_tokens
            fields["cache_read_tokens"] = record.cache_read_tokens
            fields["stop_reason"] = record.stop_reason
            fields["usage_status"] = record.status
        access_line(fields)


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
    """Cancels its task when no chunk arrived for ``timeout`` seconds; ``touch`` only stores a number."""

    __slots__ = ("_loop", "_owner", "_task", "_timeout", "due", "fired")

    def __init__(self, owner: _Watchdogs, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._owner = owner
        self._loop = loop
        self._task = asyncio.current_task()
        self._timeout = timeout
        self.due = loop.time() + timeout
        self.fired = False

    def touch(self) -> None:
        self.due = self._loop.time() + self._timeout

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
