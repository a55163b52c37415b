"""An incremental Server-Sent Events decoder over raw bytes, following WHATWG framing; it does no I/O.

Chunks may split an event, a line or a multi-byte UTF-8 character anywhere: only complete lines are decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_CR = 0x0D


@dataclass(frozen=True, slots=True, kw_only=True)
class SSEEvent:
    """One dispatched event: its type (``message`` unless an ``event:`` field said so), data and last id."""

    event: str = "message"
    data: str
    id: str | None = None


class SSEDecoder:
    """Feed raw bytes as they arrive; get back the events each chunk completes.

    Per the spec, ``close()`` discards an event the stream left unfinished: it returns nothing and sets
    ``truncated`` so a caller can tell a cut stream from a clean end.
    """

    __slots__ = ("_at_start", "_bom_head", "_data", "_event", "_last_id", "_pending", "_skip_lf", "truncated")

    def __init__(self) -> None:
        self._at_start = True  # a BOM may still open the stream
        self._bom_head = b""  # the first bytes while they could still be a split BOM
        self._skip_lf = False  # the last chunk ended in CR: an LF opening the next chunk belongs to that CR
        self._pending: list[bytes] = []  # pieces of a line whose end has not arrived yet (CR/CRLF already LF)
        self._event = ""
        self._data: list[str] = []
        self._last_id: str | None = None  # the spec's "last event ID buffer": it outlives each event
        self.truncated = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._at_start:
            chunk = self._bom_head + chunk
            if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
                self._bom_head = chunk
                return []
            self._at_start = False
            self._bom_head = b""
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
                if not chunk:
                    return []
        if b"\r" in chunk:
            # A CR ending this chunk ends a line already; remember it so a following LF is not a second end.
            self._skip_lf = chunk[-1] == _CR
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = chunk.rfind(b"\n")
        if end < 0:
            self._pending.append(chunk)
            return []
        if self._pending:
            head = b"".join(self._pending)
            self._pending = []
            complete = head + chunk[:end]
        else:
            complete = chunk[:end]
        if end + 1 < len(chunk):
            self._pending.append(chunk[end + 1 :])
        # LF never occurs inside a multi-byte sequence, so decoding whole lines never cuts a character.
        return self._read_lines(complete.decode("utf-8", "replace").split("\n"))

    def close(self) -> list[SSEEvent]:
        """End of stream: drop any unfinished event (spec) and reset, so the decoder could be reused."""
        self.truncated = bool(self._data or self._event or self._pending or self._bom_head)
        self._at_start = True
        self._bom_head = b""
        self._skip_lf = False
        self._pending = []
        self._event = ""
        self._data = []
        self._last_id = None
        return []

    def _read_lines(self, lines: list[str]) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append(_new_event(self._event or "message", "\n".join(data), self._last_id))
                    data = self._data = []
                self._event = ""
                continue
            name, _, value = line.partition(":")
            if value[:1] == " ":
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id" and "\0" not in value:
                self._last_id = value
            # Comments (empty name), `retry` (a reconnection delay, meaningless without a connection) and
            # unknown fields are ignored.
        return events


# The slot descriptors: setting through them skips the frozen ``__setattr__`` guard, as dataclasses do.
_set_event = vars(SSEEvent)["event"].__set__
_set_data = vars(SSEEvent)["data"].__set__
_set_id = vars(SSEEvent)["id"].__set__


def _new_event(event: str, data: str, event_id: str | None) -> SSEEvent:
    """Build an event without the frozen dataclass ``__init__``, which costs twice as much per event."""
    new = object.__new__(SSEEvent)
    _set_event(new, event)
    _set_data(new, data)
    _set_id(new, event_id)
    return new
