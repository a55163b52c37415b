"""The usage meter (message_start + cumulative message_delta, or a JSON body) and the usage record.

``UsageMeter`` reads a copy of the upstream body as it passes (decompressing it if needed) and keeps the
counts; ``UsageRecord`` is what the events package publishes: its field names are the event's ``data`` keys.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import orjson


@dataclass(slots=True)
class UsageRecord:
    """One upstream call's usage, as published in the CloudEvent's ``data`` (plus ``subject``)."""

    subject: str  # the JWT `sub`; becomes the CloudEvent subject, not a data field
    model: str | None
    message_id: str | None
    input_tokens: int
    output_tokens: int
    cache_creation_tokens: int
    cache_read_tokens: int
    latency_ms: int
    stream: bool
    stop_reason: str | None
    status: str  # "success" | "error" | "client_disconnected"
    error_type: str | None
    key_alias: str | None
    trace_id: str | None
    anthropic_request_id: str | None
    http_status: int | None = None
    time_to_first_token_ms: int | None = None
    cache_creation_5m_tokens: int | None = None
    cache_creation_1h_tokens: int | None = None
    web_search_requests: int | None = None
    web_fetch_requests: int | None = None
    service_tier: str | None = None
    claude_code_session_id: str | None = None
    groups: list[str] | None = None  # the caller's groups (Identity.groups, sorted); None when it has none
    event_id: str = ""  # CloudEvent id, made once when the record is made, stable across redeliveries
    time: str = ""  # RFC 3339 UTC with milliseconds, when the upstream call ended

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_creation_tokens + self.cache_read_tokens


MAX_BODY_BYTES = 64 * 1024 * 1024  # a non-streamed body bigger than this is not parsed: usage is abandoned
MAX_LINE_BYTES = 1024 * 1024  # an SSE line longer than this is content, never usage: it is skipped, not kept
_INFLATE_STEP = 256 * 1024  # inflate at most this much at a time, so a small compressed chunk cannot balloon

_BOM = b"\xef\xbb\xbf"
# Only these JSON string tokens mark a line worth parsing. Inside JSON text a quote is always escaped, so a
# quoted token cannot come from generated text; a false hit only costs one parse, which then checks "type".
_NEEDLES = (b'"message_', b'"error"')  # message_start, message_delta, message_stop; error
_CONTENT_NEEDLE = b'"content_block_delta"'  # looked for only until the first one is seen

# What the meter does with the decoded body: find out whether it is SSE or JSON, scan SSE lines, keep JSON.
_SNIFF, _SCAN, _COLLECT, _CLOSED = range(4)


def _load_brotli() -> ModuleType | None:
    try:
        return importlib.import_module("brotli")
    except ImportError:
        return None


_BROTLI = _load_brotli()
_DECODABLE = frozenset({"gzip", "x-gzip", "deflate", "identity", *(("br",) if _BROTLI is not None else ())})


def filter_accept_encoding(value: str | None) -> str | None:
    """Keep only the codings the meter can read (and drop refused ones); ``None`` when nothing is left."""
    if not value:
        return None
    kept: list[str] = []
    for item in value.split(","):
        token = item.strip()
        coding, _, params = token.partition(";")
        if coding.strip().lower() in _DECODABLE and not _refused(params):
            kept.append(token)
    return ", ".join(kept) or None


def _refused(params: str) -> bool:
    for param in params.split(";"):
        name, _, weight = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(weight) == 0.0
            except ValueError:
                return False
    return False


class _UndecodableBody(Exception):
    """The compressed copy of the body cannot be decompressed; the meter stops reading it."""


class _ZlibBody:
    """Incremental gzip or deflate (zlib-wrapped, or raw as some servers send it) with bounded output."""

    __slots__ = ("_ended", "_gzip", "_head", "_inflater")

    def __init__(self, *, gzip: bool) -> None:
        self._gzip = gzip
        self._head = b""  # deflate: the first byte, while the second needed to tell zlib from raw is missing
        self._inflater: Any = None
        self._ended = False  # past the end of the compressed data: what follows is not ours to read

    def decode(self, data: bytes) -> Iterator[bytes]:
        try:
            yield from self._inflate(data)
        except zlib.error as exc:
            raise _UndecodableBody from exc

    def flush(self) -> Iterator[bytes]:
        if self._inflater is None or self._ended:
            return
        try:
            rest: bytes = self._inflater.flush()
        except zlib.error as exc:
            raise _UndecodableBody from exc
        if rest:
            yield rest

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        if self._ended or not data:
            return
        inflater = self._inflater
        if inflater is None:
            if self._gzip:
                wbits = 16 + zlib.MAX_WBITS
            else:
                data = self._head + data
                if len(data) < 2:
                    self._head = data
                    return
                self._head = b""
                wbits = zlib.MAX_WBITS if _is_zlib_header(data) else -zlib.MAX_WBITS
            inflater = self._inflater = zlib.decompressobj(wbits)
        elif inflater.eof:  # gzip, a member ended with the last chunk: another may open this one
            if data[:1] != b"\x1f":
                self._ended = True
                return
            inflater = self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while True:
            out: bytes = inflater.decompress(data, _INFLATE_STEP)
            if out:
                yield out
            if inflater.eof:
                data = inflater.unused_data
                if not data:
                    return
                if not self._gzip or data[:1] != b"\x1f":
                    self._ended = True  # trailing bytes that are no gzip member: not ours to read
                    return
                inflater = self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # a further gzip member
                continue
            data = inflater.unconsumed_tail
            if not data and len(out) < _INFLATE_STEP:
                return


def _is_zlib_header(head: bytes) -> bool:
    return head[0] & 0x0F == 8 and head[0] >> 4 <= 7 and (head[0] << 8 | head[1]) % 31 == 0


class _BrotliBody:
    __slots__ = ("_error", "_inflater")

    def __init__(self, brotli: ModuleType) -> None:
        self._inflater: Any = brotli.Decompressor()
        self._error: type[Exception] = brotli.error

    def decode(self, data: bytes) -> Iterator[bytes]:
        try:
            out: bytes = self._inflater.process(data)
        except self._error as exc:
            raise _UndecodableBody from exc
        if out:
            yield out

    def flush(self) -> Iterator[bytes]:
        return iter(())


def _body_decoder(content_encoding: str | None) -> tuple[_ZlibBody | _BrotliBody | None, bool]:
    """The decoder for a Content-Encoding, and whether the meter can read such a body at all."""
    if not content_encoding:
        return None, True
    codings = [c for c in (p.strip().lower() for p in content_encoding.split(",")) if c and c != "identity"]
    if not codings:
        return None, True
    if len(codings) == 1:
        if codings[0] in ("gzip", "x-gzip"):
            return _ZlibBody(gzip=True), True
        if codings[0] == "deflate":
            return _ZlibBody(gzip=False), True
        if codings[0] == "br" and _BROTLI is not None:
            return _BrotliBody(_BROTLI), True
    return None, False


def _int(value: object) -> int | None:
    return value if type(value) is int else None


def _line_start(data: bytes, start: int, at: int) -> int:
    return max(start, data.rfind(b"\n", start, at) + 1, data.rfind(b"\r", start, at) + 1)


def _line_end(data: bytes, at: int, limit: int) -> int:
    lf = data.find(b"\n", at, limit)
    cr = data.find(b"\r", at, limit)
    if lf < 0:
        return cr if cr >= 0 else limit
    return lf if cr < 0 or lf < cr else cr


class UsageMeter:
    """Counts one upstream answer's usage from a copy of its body, fed chunk by chunk exactly as received.

    Streams are scanned for the few lines that carry usage (``message_start``, ``message_delta``, ``error``)
    and only those are parsed; a stream's body is never kept. A JSON body is kept (up to ``max_body_bytes``)
    and parsed by ``finish()``. A ``stream=True`` meter whose body opens with ``{`` reads it as JSON: an error
    answer to a streaming request. Nothing here raises on bad input; what cannot be read is not counted.
    """

    __slots__ = (
        "_decoder",
        "_finished",
        "_max_body_bytes",
        "_mode",
        "_pending",
        "_pending_size",
        "_skipping_line",
        "cache_creation_1h_tokens",
        "cache_creation_5m_tokens",
        "cache_creation_tokens",
        "cache_read_tokens",
        "content_started",
        "error_type",
        "input_tokens",
        "message_id",
        "message_stopped",
        "model",
        "output_tokens",
        "service_tier",
        "stop_reason",
        "web_fetch_requests",
        "web_search_requests",
    )

    def __init__(
        self, *, stream: bool, content_encoding: str | None = None, max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        self.message_id: str | None = None
        self.model: str | None = None
        self.stop_reason: str | None = None
        self.input_tokens = 0
        self.output_tokens = 0
        self.cache_creation_tokens = 0
        self.cache_read_tokens = 0
        self.cache_creation_5m_tokens: int | None = None
        self.cache_creation_1h_tokens: int | None = None
        self.web_search_requests: int | None = None
        self.web_fetch_requests: int | None = None
        self.service_tier: str | None = None
        self.error_type: str | None = None
        self.content_started = False
        self.message_stopped = False

        self._decoder, readable = _body_decoder(content_encoding)
        # A stream is sniffed first: its first non-blank byte tells SSE from a JSON error answer.
        self._mode = (_SNIFF if stream else _COLLECT) if readable else _CLOSED
        self._max_body_bytes = max_body_bytes
        self._pending: list[bytes] = []  # JSON: the body so far; SSE: pieces of a line whose end has not come
        self._pending_size = 0
        self._skipping_line = False  # SSE: inside a line too long to be usage, waiting for its end
        self._finished = False

    def feed(self, chunk: bytes) -> None:
        """Read one chunk of the body exactly as it came from upstream (still compressed, if it was)."""
        if self._finished or not chunk:
            return
        decoder = self._decoder
        if decoder is None:
            if self._mode == _SCAN:
                self._scan(chunk)  # the hot path: an uncompressed stream
            else:
                self._take(chunk)
            return
        if self._mode == _CLOSED:
            return
        try:
            for piece in decoder.decode(chunk):
                self._take(piece)
                if self._mode == _CLOSED:
                    break  # e.g. a JSON body over the cap: inflating the rest would be wasted work
        except _UndecodableBody:
            self._give_up()

    def finish(self) -> None:
        """End of body: flush the decompressor, parse a JSON body, read a last line left without its end."""
        if self._finished:
            return
        self._finished = True
        if self._decoder is not None and self._mode != _CLOSED:
            try:
                for piece in self._decoder.flush():
                    self._take(piece)
            except _UndecodableBody:
                self._give_up()
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending = []
        if self._mode == _SCAN:
            if not self._skipping_line:
                self._read_lines(data, 0, len(data))  # only a whole JSON line will parse
            return
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(body, dict):
            if body.get("type") == "error":
                self._read_error(body)
            else:
                self._read_message(body)

    # -- reading the decoded body --

    def _give_up(self) -> None:
        self._mode = _CLOSED
        self._pending = []
        self._pending_size = 0

    def _take(self, data: bytes) -> None:
        mode = self._mode
        if mode == _SNIFF:
            opening = data.lstrip()
            if not opening:
                return
            mode = self._mode = _COLLECT if opening[:1] == b"{" else _SCAN
        if mode == _SCAN:
            self._scan(data)
        elif mode == _COLLECT:
            self._pending_size += len(data)
            if self._pending_size > self._max_body_bytes:
                self._give_up()
            else:
                self._pending.append(data)

    def _scan(self, chunk: bytes) -> None:
        """Read the lines this chunk completes; hold back the unfinished last one."""
        end = chunk.rfind(b"\n")
        cr = chunk.rfind(b"\r", end + 1)
        if cr > end:
            end = cr
        if end < 0:
            self._hold(chunk)
            return
        start = 0
        data = chunk
        if self._pending:
            self._pending.append(chunk)
            data = b"".join(self._pending)
            end += len(data) - len(chunk)
            self._pending = []
            self._pending_size = 0
        elif self._skipping_line:
            self._skipping_line = False
            start = _line_end(chunk, 0, end + 1) + 1
        limit = end + 1
        # Most chunks hold no needle: two C-level searches settle them.
        if (
            data.find(b'"message_', start, limit) >= 0
            or data.find(b'"error"', start, limit) >= 0
            or not self.content_started
        ):
            self._read_lines(data, start, limit)
        if limit < len(data):
            self._hold(data[limit:])

    def _hold(self, piece: bytes) -> None:
        if self._skipping_line:
            return
        self._pending_size += len(piece)
        if self._pending_size > MAX_LINE_BYTES:
            self._pending = []
            self._pending_size = 0
            self._skipping_line = True
        else:
            self._pending.append(piece)

    def _read_lines(self, data: bytes, start: int, limit: int) -> None:
        """Parse the lines in ``data[start:limit]`` that hold a needle, in stream order."""
        if not self.content_started:
            self._look_for_content(data, start, limit)
        starts: list[int] = []
        for needle in _NEEDLES:
            at = data.find(needle, start, limit)
            while at >= 0:
                starts.append(_line_start(data, start, at))
                at = data.find(needle, _line_end(data, at, limit), limit)
        if not starts:
            return
        if len(starts) > 1:
            starts = sorted(set(starts))
        for line_start in starts:
            self._read_line(data[line_start : _line_end(data, line_start, limit)])

    def _look_for_content(self, data: bytes, start: int, limit: int) -> None:
        """Only the first content_block_delta matters (the first token), and it is independent of the rest."""
        at = data.find(_CONTENT_NEEDLE, start, limit)
        while at >= 0:
            line_end = _line_end(data, at, limit)
            self._read_line(data[_line_start(data, start, at) : line_end])
            if self.content_started:
                return
            at = data.find(_CONTENT_NEEDLE, line_end, limit)

    def _read_line(self, line: bytes) -> None:
        if line.startswith(_BOM):
            line = line[len(_BOM) :]
        if not line.startswith(b"data:"):
            return
        try:
            event = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "content_block_delta":
            self.content_started = True
        elif kind == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and isinstance(stop_reason := delta.get("stop_reason"), str):
                self.stop_reason = stop_reason
            usage = event.get("usage")
            if isinstance(usage, dict):
                self._read_usage(usage)
        elif kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict):
                self._read_message(message)
        elif kind == "message_stop":
            self.message_stopped = True
        elif kind == "error":
            self._read_error(event)

    def _read_message(self, message: dict[str, Any]) -> None:
        if isinstance(message_id := message.get("id"), str):
            self.message_id = message_id
        if isinstance(model := message.get("model"), str):
            self.model = model
        if isinstance(stop_reason := message.get("stop_reason"), str):
            self.stop_reason = stop_reason
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._read_usage(usage)

    def _read_error(self, body: dict[str, Any]) -> None:
        error = body.get("error")
        error_type = error.get("type") if isinstance(error, dict) else None
        self.error_type = error_type if isinstance(error_type, str) else "error"

    def _read_usage(self, usage: dict[str, Any]) -> None:
        """Each field present replaces the one before: message_delta counts are cumulative, not increments."""
        if (value := _int(usage.get("input_tokens"))) is not None:
            self.input_tokens = value
        if (value := _int(usage.get("output_tokens"))) is not None:
            self.output_tokens = value
        if (value := _int(usage.get("cache_creation_input_tokens"))) is not None:
            self.cache_creation_tokens = value
        if (value := _int(usage.get("cache_read_input_tokens"))) is not None:
            self.cache_read_tokens = value
        cache_creation = usage.get("cache_creation")
        if isinstance(cache_creation, dict):
            if (value := _int(cache_creation.get("ephemeral_5m_input_tokens"))) is not None:
                self.cache_creation_5m_tokens = value
            if (value := _int(cache_creation.get("ephemeral_1h_input_tokens"))) is not None:
                self.cache_creation_1h_tokens = value
        server_tool_use = usage.get("server_tool_use")
        if isinstance(server_tool_use, dict):
            if (value := _int(server_tool_use.get("web_search_requests"))) is not None:
                self.web_search_requests = value
            if (value := _int(server_tool_use.get("web_fetch_requests"))) is not None:
                self.web_fetch_requests = value
        if isinstance(tier := usage.get("service_tier"), str):
            self.service_tier = tier
