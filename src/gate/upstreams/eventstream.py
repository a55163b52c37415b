"""Bedrock's streamed answer (AWS event-stream frames) turned back into the SSE Anthropic's API sends.

Frames are parsed by botocore's ``EventStreamBuffer`` (incremental, CRC-checked: prelude and message); each
``chunk`` event carries one Anthropic event as ``{"bytes": base64(event JSON)}``, which becomes
``event: {type}\\ndata: {event JSON}\\n\\n`` with the JSON bytes exactly as Anthropic made them. Bedrock adds
``amazon-bedrock-invocationMetrics`` to ``message_stop``; Anthropic's API does not, so it is dropped there.
An exception frame becomes Anthropic's ``event: error``. A corrupt frame (CRC, lengths) or a stream that ends inside
a frame breaks the answer as a dropped connection would (``ClientError``): the client must not take it as whole.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson
from botocore.eventstream import EventStreamBuffer, MessagePrelude, ParserError

from gate.http.client import ClientError, UpstreamResponse
from gate.upstreams.adapter import cloud_headers

__all__ = ["EventStreamAnswer", "SseTranslator"]

_PRELUDE_AND_CRC = 16  # total length (4), headers length (4), prelude CRC (4) and message CRC (4)
# Bedrock's exception names -> Anthropic's error types (a mid-stream error event carries one of these).
_EXCEPTION_TYPES = {
    "internalServerException": "api_error",
    "modelStreamErrorException": "api_error",
    "modelTimeoutException": "timeout_error",
    "throttlingException": "rate_limit_error",
    "serviceUnavailableException": "overloaded_error",
    "validationException": "invalid_request_error",
    "accessDeniedException": "permission_error",
}
_METRICS_KEY = "amazon-bedrock-invocationMetrics"


class _Frames(EventStreamBuffer):  # type: ignore[misc]
    def _validate_prelude(self, prelude: MessagePrelude) -> None:
        super()._validate_prelude(prelude)
        # botocore does not check this; a total length below its own parts would make it loop without end.
        if prelude.total_length < _PRELUDE_AND_CRC + prelude.headers_length:
            raise ParserError(f"frame length {prelude.total_length} is shorter than its parts")


class SseTranslator:
    """Feed event-stream bytes as they come, get SSE bytes back (b"" until a frame is whole)."""

    def __init__(self) -> None:
        self._frames = _Frames()
        self.pending = 0  # bytes of an unfinished frame
        self._broken: ClientError | None = None

    def feed(self, data: bytes) -> bytes:
        """The SSE of every frame completed by ``data``. A bad frame raises ``ClientError``, after the events of the
        good frames before it have been returned (on the next call, then)."""
        if self._broken is not None:
            raise self._broken
        self._frames.add_data(data)
        out: list[bytes] = []
        try:
            for message in self._frames:
                out.append(_to_sse(message.headers, message.payload))
        except (ParserError, ValueError, binascii.Error) as exc:
            self._broken = ClientError(f"malformed event-stream frame: {type(exc).__name__}")
            if not out:
                raise self._broken from None
        self.pending = len(self._frames._data)
        return b"".join(out)

    @property
    def broken(self) -> bool:
        return self._broken is not None


def _to_sse(headers: Mapping[str, Any], payload: bytes) -> bytes:
    kind = headers.get(":message-type")
    if kind == "event":
        if headers.get(":event-type") != "chunk":
            return b""
        data = base64.b64decode(orjson.loads(payload)["bytes"], validate=True)
        event = orjson.loads(data)
        event_type = event.get("type") if isinstance(event, dict) else None
        if not isinstance(event_type, str):
            raise ValueError("a chunk without an event type")
        if event_type == "message_stop" and _METRICS_KEY in event:
            del event[_METRICS_KEY]
            data = orjson.dumps(event)
        return b"event: " + event_type.encode() + b"\ndata: " + data + b"\n\n"
    if kind in ("exception", "error"):
        name = str(headers.get(":exception-type") or headers.get(":error-code") or "")
        try:
            message = orjson.loads(payload).get("message") if payload else None
        except (orjson.JSONDecodeError, AttributeError):
            message = None
        message = message if isinstance(message, str) and message else headers.get(":error-message") or name
        error = {"type": "error", "error": {"type": _EXCEPTION_TYPES.get(name, "api_error"), "message": message}}
        return b"event: error\ndata: " + orjson.dumps(error) + b"\n\n"
    return b""


class EventStreamAnswer:
    """A Bedrock ``invoke-with-response-stream`` answer, read as Anthropic's SSE (see the module docstring)."""

    __slots__ = ("_response", "_translator", "content_length", "headers", "status")

    def __init__(self, response: UpstreamResponse, *, request_id_header: str) -> None:
        self._response = response
        self._translator = SseTranslator()
        self.status = response.status
        self.content_length: int | None = None
        self.headers = cloud_headers(response.headers, request_id_header, "text/event-stream; charset=utf-8")

    def complete(self) -> bool:
        return False

    async def readany(self) -> bytes:
        while True:
            if self._translator.broken:  # the good frames before a bad one went out on the last read
                raise ClientError("malformed event-stream frame")
            chunk = await self._response.readany()
            if not chunk:
                if self._translator.pending:
                    raise ClientError("the event stream ended inside a frame")
                return b""
            sse = self._translator.feed(chunk)
            if sse:
                return sse

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        self._response.release()
