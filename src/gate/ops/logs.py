"""Structured logs: one JSON object (or a readable line) per record, trace ids, and secret redaction.

The redaction filter sits on the root handler, so it covers every logger that propagates to root, aiohttp's
and libraries' included: Anthropic keys, JWTs, ``Bearer`` credentials and URL user info never reach the output
(the rule is :mod:`gate.ops.redact`'s, the same as health's and ``gate config``'s).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Mapping
from typing import IO, Any, Final, Literal

import orjson
from opentelemetry import trace

from gate.ops.bounds import MAX_FIELD_CHARS, bounded
from gate.ops.redact import redact

__all__ = [
    "ACCESS_LOGGER",
    "ConsoleFormatter",
    "JsonFormatter",
    "RedactingFilter",
    "access_log",
    "configure_logging",
    "flush_access_log",
    "redact",
]

ACCESS_LOGGER: Final = logging.getLogger("gate.access")
_ACCESS_NAME: Final = ACCESS_LOGGER.name

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_PLAIN_RECORD: Final = logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
_RECORD_ATTRS: Final = frozenset(_PLAIN_RECORD | {"message", "asctime", "taskName"})
_PLAIN_SIZE: Final = len(_PLAIN_RECORD)
_NOT_EXTRAS: Final = _RECORD_ATTRS | {"trace_id", "span_id"}


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, Mapping):
        return {key: _redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(item) for item in value]
    text = str(value)  # objects reach the output through str() (console) or orjson's default=str (json)
    masked = redact(text)
    return value if masked is text else masked


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message (after %-formatting its args), extras, exception and stack text.

    The message is formatted here once and the args dropped, so the formatter does not format it again.
    """

    def __init__(self) -> None:
        super().__init__()
        self._exception_formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            try:
                message = record.getMessage()
            except (TypeError, ValueError):  # a broken format: keep the text, never the raw args
                message = f"{record.msg} (unformattable arguments)"
            record.msg, record.args = redact(message), None
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        else:
            record.msg = _redact_value(record.msg)
        attributes = record.__dict__
        if len(attributes) > _PLAIN_SIZE:  # only a record with extras (or touched by a formatter) has more
            for key in attributes.keys() - _RECORD_ATTRS:
                attributes[key] = _redact_value(attributes[key])
        if record.exc_info and not record.exc_text:
            record.exc_text = self._exception_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class _Clock:
    """RFC 3339 UTC timestamps with milliseconds; the seconds part is formatted once per second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def format(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((created - second) * 1000):03d}Z"


def _trace_ids(record: logging.LogRecord) -> tuple[str | None, str | None]:
    """The record's own trace_id/span_id extras, else the current span's."""
    given = record.__dict__.get("trace_id")
    if given is not None:
        return given, record.__dict__.get("span_id")
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    attributes = record.__dict__
    if len(attributes) <= _PLAIN_SIZE:
        return {}
    return {key: value for key, value in attributes.items() if key not in _NOT_EXTRAS}  # in given order


def _exception_text(record: logging.LogRecord, formatter: logging.Formatter) -> str | None:
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    return record.exc_text or None


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, trace_id/span_id, extras, exception."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": self._clock.format(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id, span_id = _trace_ids(record)
        if trace_id:
            document["trace_id"] = trace_id
            if span_id:
                document["span_id"] = span_id
        document.update(_extras(record))
        exception = _exception_text(record, self)
        if exception:
            document["exception"] = exception
        if record.stack_info:
            document["stack"] = record.stack_info
        return orjson.dumps(document, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class ConsoleFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ... [trace_id span_id]`` and the traceback under it."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{self._clock.format(record.created)} {record.levelname:<7} {record.name}: {record.getMessage()}"]
        parts.extend(f"{key}={value}" for key, value in sorted(_extras(record).items()))
        trace_id, span_id = _trace_ids(record)
        if trace_id:
            parts.append(f"[{trace_id} {span_id or '-'}]")
        line = " ".join(parts)
        exception = _exception_text(record, self)
        if exception:
            line = f"{line}\n{exception}"
        if record.stack_info:
            line = f"{line}\n{record.stack_info}"
        return line


class _GateHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``configure_logging`` owns (and replaces when called again)."""

    access: _AccessWriter | None = None  # the fast path for access lines, with the JSON format only


class _AccessWriter:
    """Access lines in the handler's format without the logging machinery, written a loop turn at a time.

    Measured, one access line through ``logging`` (record, filter, formatter, handler lock, a write and a
    flush) cost ~15 us, a sixth of a proxied request; the console format's (sorted extras, a span lookup) cost
    half of Gate's throughput under the ``local`` profile. Here a line is one orjson call (JSON) or one join
    (console), the same redaction, in the same shape the formatter gives, and the lines that one turn of the event
    loop produces go out in one write; ``flush`` also runs at shutdown.
    """

    _MAX_PENDING: Final = 256  # write inline past this, so a loop that never yields cannot hold lines back

    def __init__(self, handler: _GateHandler, format: Literal["json", "console"]) -> None:
        self._handler = handler
        self._clock = _Clock()
        self._render = self._json if format == "json" else self._console
        self._pending: list[str] = []
        self._scheduled = False
        self._lock = threading.Lock()  # several loops (tests, in threads) may share one process's stdout

    def write(self, fields: dict[str, Any]) -> None:
        line = redact(self._render(fields))
        with self._lock:
            self._pending.append(line)
            if len(self._pending) >= self._MAX_PENDING:
                self._write_locked()
                return
            if self._scheduled:
                return
            self._scheduled = True
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop: write now
            self.flush()

    def _json(self, fields: dict[str, Any]) -> str:
        document: dict[str, Any] = {
            "time": self._clock.format(time.time()),
            "level": "INFO",
            "logger": _ACCESS_NAME,
            "message": _access_message(fields),
            **fields,
        }
        text = orjson.dumps(document, default=str)
        if len(text) > _LONG_ACCESS_LINE:  # a string a client or an upstream chose is too long: cut, then redo
            _bound_strings(fields)
            document.update(fields, message=_access_message(fields))
            text = orjson.dumps(document, default=str)
        return text.decode()

    def _console(self, fields: dict[str, Any]) -> str:
        """ConsoleFormatter's line: the relay passes trace_id and span_id as fields, shown at the end."""
        _bound_strings(fields)
        trace_id = fields.pop("trace_id", None)
        span_id = fields.pop("span_id", None)
        parts = [f"{self._clock.format(time.time())} INFO    {_ACCESS_NAME}: {_access_message(fields)}"]
        parts.extend(f"{key}={value}" for key, value in sorted(fields.items()))
        if trace_id:
            parts.append(f"[{trace_id} {span_id or '-'}]")
        return " ".join(parts)

    def flush(self) -> None:
        with self._lock:
            self._scheduled = False
            self._write_locked()

    def _write_locked(self) -> None:
        if not self._pending:
            return
        text = "\n".join(self._pending) + "\n"
        self._pending = []
        handler = self._handler
        handler.acquire()
        try:
            handler.stream.write(text)
            handler.flush()
        except (OSError, ValueError):  # a closed stdout must not break a request
            pass
        finally:
            handler.release()


def configure_logging(
    format: Literal["json", "console"], level: str, *, stream: IO[str] | None = None
) -> logging.Handler:
    """Route every logger through one redacting handler on the root logger (stdout unless ``stream``)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _GateHandler)]:
        root.removeHandler(handler)
    handler = _GateHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(JsonFormatter() if format == "json" else ConsoleFormatter())
    handler.access = _AccessWriter(handler, format)
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings go through the same handler, and so through redaction
    # Neither format prints the caller, thread or process, so skip collecting them for every record: the
    # logging HOWTO's "Optimization" knobs, worth about a quarter of the cost of an access-log line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    return handler


# An access line this long carries a string over MAX_FIELD_CHARS, or nearly: only then are its strings looked at.
_LONG_ACCESS_LINE: Final = 2 * MAX_FIELD_CHARS + 1024


def _access_message(fields: dict[str, Any]) -> str:
    return f"{fields['method']} {fields['path']} {fields['status']} {fields['latency_ms']:.1f}ms"


def _bound_strings(fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        if type(value) is str and len(value) > MAX_FIELD_CHARS:
            fields[key] = bounded(value)


# Field names a LogRecord reserves; an access-log field with one of these names is renamed, not dropped.
_RESERVED: Final = _RECORD_ATTRS | {"message"}


def access_log(*, method: str, path: str, status: int, latency_ms: float, **fields: Any) -> None:
    """One line per request on ``gate.access``: method, path, status, latency_ms and the given fields
    (trace_id, span_id, sub, key_alias, model, tokens, stop_reason...). Fields that are None are left out.
    Never pass bodies or headers."""
    access_line({"method": method, "path": path, "status": status, "latency_ms": latency_ms, **fields})


def access_line(fields: dict[str, Any]) -> None:
    """``access_log`` for a dict the caller built (the relay's per-request path): it starts with method, path,
    status and latency_ms; None values are left out, and strings (the path, model, sub...: chosen by a client or
    an upstream) are cut to ``MAX_FIELD_CHARS``. The dict is consumed."""
    if not ACCESS_LOGGER.isEnabledFor(logging.INFO):
        return
    for key in [key for key, value in fields.items() if value is None]:
        del fields[key]
    writer = _fast_access_writer()
    if writer is not None:
        writer.write(fields)  # it checks the length of the line it made: one len() where a loop here cost ~2 us
        return
    _bound_strings(fields)
    message = _access_message(fields)
    extra = {f"{key}_" if key in _RESERVED else key: value for key, value in fields.items()}
    ACCESS_LOGGER.info("%s", message, extra=extra)


def _fast_access_writer() -> _AccessWriter | None:
    """The handler's writer, when it is the only place access lines go (no test or extra handler)."""
    if ACCESS_LOGGER.handlers or not ACCESS_LOGGER.propagate:
        return None
    handlers = logging.getLogger().handlers
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    return handler.access if isinstance(handler, _GateHandler) else None


def flush_access_log() -> None:
    """Write out access lines still waiting for their loop turn (at shutdown)."""
    writer = _fast_access_writer()
    if writer is not None:
        writer.flush()
