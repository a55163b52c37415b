"""Structured logs: JSON and console lines, trace ids, the access log, and secret redaction everywhere."""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterator

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext

from gate.ops import logs
from gate.ops.bounds import MAX_FIELD_CHARS
from gate.ops.logs import access_line, access_log, configure_logging, flush_access_log, redact

API_KEY = "sk-ant-api03-" + "Zq9XwV7u" * 11 + "-Ab_cAA"
KEY_BODY = "Zq9XwV7u"
TOKEN = jwt.encode({"sub": "alice", "exp": 4102444800}, "test-secret-for-jwt-at-least-32-bytes", algorithm="HS256")
TOKEN_SIGNATURE = TOKEN.rsplit(".", 1)[1]
RFC3339_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")

Configure = Callable[[str], io.StringIO]


@pytest.fixture
def configure() -> Iterator[Configure]:
    """Configure logging into a buffer; put the root logger back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access_level = logging.getLogger("gate.access").level
    knobs = {name: getattr(logging, name) for name in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")}

    def setup(fmt: str) -> io.StringIO:
        buffer = io.StringIO()
        configure_logging(fmt, "DEBUG", stream=buffer)  # type: ignore[arg-type]
        return buffer

    yield setup
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("gate.access").setLevel(access_level)
    logging.captureWarnings(False)
    for name, value in knobs.items():
        setattr(logging, name, value)


def assert_clean(text: str) -> None:
    assert KEY_BODY not in text
    assert TOKEN not in text and TOKEN_SIGNATURE not in text
    assert "sk-ant-api03" not in text


def lines(buffer: io.StringIO) -> list[str]:
    return buffer.getvalue().splitlines()


def json_lines(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines(buffer) if line.startswith("{")]


FORMATS = pytest.mark.parametrize("fmt", ["json", "console"])


@FORMATS
def test_secrets_in_the_message_are_masked(configure: Configure, fmt: str) -> None:
    out = configure(fmt)
    logging.getLogger("gate.relay").info(f"calling upstream with {API_KEY} for {TOKEN}")
    text = out.getvalue()
    assert_clean(text)
    assert "sk-ant-***" in text and "eyJ***" in text


@FORMATS
def test_secrets_in_percent_args_are_masked(configure: Configure, fmt: str) -> None:
    out = configure(fmt)
    logging.getLogger("gate.keys").warning("key %s rejected for %s (%d)", API_KEY, TOKEN, 401)
    logging.getLogger("gate.keys").warning("headers: %r", {"Authorization": f"Bearer {TOKEN}", "x-api-key": API_KEY})
    text = out.getvalue()
    assert_clean(text)
    assert "(401)" in text
    assert "Bearer ***" in text


@FORMATS
def test_secrets_in_extra_fields_are_masked(configure: Configure, fmt: str) -> None:
    class Credential:
        def __str__(self) -> str:
            return f"Credential({API_KEY})"

    out = configure(fmt)
    logging.getLogger("gate.auth").info(
        "denied",
        extra={
            "authorization": f"Bearer {TOKEN}",
            "nested": {"keys": [API_KEY], "count": 2},
            "credential": Credential(),
            "sub": "alice",
        },
    )
    text = out.getvalue()
    assert_clean(text)
    assert "alice" in text
    if fmt == "json":
        (line,) = json_lines(out)
        assert line["authorization"] == "Bearer ***"
        assert line["nested"] == {"keys": ["sk-ant-***"], "count": 2}
        assert line["credential"] == "Credential(sk-ant-***)"


@FORMATS
def test_secrets_in_exception_text_and_traceback_are_masked(configure: Configure, fmt: str) -> None:
    out = configure(fmt)

    def call_upstream(api_key: str) -> None:
        raise ValueError(f"upstream refused {api_key} with token {TOKEN}")

    try:
        call_upstream(API_KEY)
    except ValueError:
        logging.getLogger("aiohttp.client").exception("request failed")
    text = out.getvalue()
    assert_clean(text)
    assert "Traceback" in text and "ValueError: upstream refused sk-ant-*** with token eyJ***" in text
    if fmt == "json":
        (line,) = json_lines(out)
        assert "ValueError" in str(line["exception"])


@FORMATS
def test_every_logger_and_warnings_pass_through_redaction(configure: Configure, fmt: str) -> None:
    out = configure(fmt)
    logging.getLogger("aiohttp.access").info('127.0.0.1 "POST /v1/messages" Authorization: Bearer %s', TOKEN)
    logging.getLogger("some.library.deep.inside").error("leaked %s", API_KEY)
    logging.getLogger().debug("root sees %s", API_KEY)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"deprecated key format {API_KEY}", UserWarning, stacklevel=1)
    text = out.getvalue()
    assert_clean(text)
    assert text.count("sk-ant-***") == 3


@FORMATS
def test_non_string_messages_and_stack_info(configure: Configure, fmt: str) -> None:
    out = configure(fmt)
    log = logging.getLogger("gate.misc")
    log.info({"key": API_KEY})
    log.error(ValueError(f"bad key {API_KEY}"))
    log.info("with stack %s", TOKEN, stack_info=True)
    assert_clean(out.getvalue())


@FORMATS
def test_unformattable_args_neither_raise_nor_leak(configure: Configure, fmt: str) -> None:
    out = configure(fmt)
    root = logging.getLogger()  # pytest's own capture handler would raise on this record before ours runs
    root.handlers[:] = [h for h in root.handlers if type(h).__name__ == "_GateHandler"]
    logging.getLogger("gate.misc").info("%d items", "not-a-number " + API_KEY)
    text = out.getvalue()
    assert_clean(text)
    assert "unformattable arguments" in text


def test_json_lines_carry_time_level_logger_message_and_extras(configure: Configure) -> None:
    out = configure("json")
    logging.getLogger("gate.events").warning("outbox at %d%%", 80, extra={"depth": 800_000, "sink": "rabbitmq"})
    (line,) = json_lines(out)
    assert RFC3339_MS.match(str(line["time"]))
    assert line["level"] == "WARNING" and line["logger"] == "gate.events"
    assert line["message"] == "outbox at 80%"
    assert line["depth"] == 800_000 and line["sink"] == "rabbitmq"
    assert "trace_id" not in line and "span_id" not in line
    assert len(lines(out)) == 1


def test_json_lines_carry_the_current_trace_ids(configure: Configure) -> None:
    out = configure("json")
    context = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=False)
    with trace.use_span(NonRecordingSpan(context)):
        logging.getLogger("gate.relay").info("in a span")
    (line,) = json_lines(out)
    assert line["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert line["span_id"] == "b7ad6b7169203331"


def test_console_lines_are_readable(configure: Configure) -> None:
    out = configure("console")
    context = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=False)
    with trace.use_span(NonRecordingSpan(context)):
        logging.getLogger("gate.relay").info("upstream answered %d", 200, extra={"key_alias": "primary"})
    (line,) = lines(out)
    assert re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z INFO +gate\.relay: upstream answered 200 ", line)
    assert "key_alias=primary" in line
    assert line.endswith("[0af7651916cd43dd8448eb211c80319c b7ad6b7169203331]")


def test_access_log_fields(configure: Configure) -> None:
    out = configure("json")
    access_log(
        method="POST",
        path="/v1/messages",
        status=200,
        latency_ms=812.46,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        span_id="b7ad6b7169203331",
        sub="alice",
        key_alias="primary",
        model="claude-sonnet-4-5",
        input_tokens=1200,
        output_tokens=350,
        cache_creation_tokens=0,
        cache_read_tokens=800,
        stop_reason="end_turn",
        error_type=None,
        name="a field named like a LogRecord attribute",
    )
    (line,) = json_lines(out)
    assert line["logger"] == "gate.access" and line["level"] == "INFO"
    assert line["message"] == "POST /v1/messages 200 812.5ms"
    expected = {
        "method": "POST", "path": "/v1/messages", "status": 200, "latency_ms": 812.46, "sub": "alice",
        "key_alias": "primary", "model": "claude-sonnet-4-5", "input_tokens": 1200, "output_tokens": 350,
        "cache_creation_tokens": 0, "cache_read_tokens": 800, "stop_reason": "end_turn",
        "trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331",
        "name_": "a field named like a LogRecord attribute",
    }  # fmt: skip
    assert {key: line[key] for key in expected} == expected
    assert "error_type" not in line  # None fields are left out


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_access_line_strings_are_cut_to_the_documented_maximum(configure: Configure, fmt: str) -> None:
    out = configure(fmt)
    huge = "m" * (11 * 1024 * 1024)  # the 11 MB model name that made a 20 MB access line
    access_line(
        {
            "method": "POST",
            "path": "/v1/models/" + "p" * 5000,
            "status": 400,
            "latency_ms": 1.0,
            "sub": "s" * 300,
            "model": huge,
            "stop_reason": "r" * 300,
            "input_tokens": 0,
        }
    )
    text = out.getvalue()
    assert len(text) < 4 * MAX_FIELD_CHARS + 1000
    if fmt == "json":
        (line,) = json_lines(out)
        for name in ("path", "sub", "model", "stop_reason"):
            assert len(line[name]) == MAX_FIELD_CHARS and line[name].endswith("…"), name
        assert line["input_tokens"] == 0


def test_the_fast_access_writer_cuts_long_strings_too(configure: Configure) -> None:
    out = configure("json")
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if isinstance(h, logs._GateHandler)]  # as in production
    assert logs._fast_access_writer() is not None
    access_line({"method": "POST", "path": "/v1/messages", "status": 200, "latency_ms": 2.0, "model": "ok-model"})
    access_line({"method": "POST", "path": "/v1/" + "p" * 5000, "status": 400, "latency_ms": 1.0, "model": "m" * 99999})
    flush_access_log()
    normal, cut = json_lines(out)
    assert normal["model"] == "ok-model" and normal["message"] == "POST /v1/messages 200 2.0ms"
    assert len(cut["model"]) == MAX_FIELD_CHARS and cut["model"].endswith("…")
    assert len(cut["path"]) == MAX_FIELD_CHARS and cut["message"].endswith("… 400 1.0ms")
    assert len(out.getvalue()) < 2048


def test_the_console_access_line_takes_the_fast_path_in_the_formatters_shape(configure: Configure) -> None:
    """``make run`` (the local profile logs to the console) must not pay the logging machinery per request."""
    fields = {
        "method": "POST", "path": "/v1/messages", "status": 200, "latency_ms": 2.0, "sub": "alice",
        "model": "claude-sonnet-4-5", "output_tokens": 6, "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331", "key": "sk-ant-api03-" + "x" * 40,
    }  # fmt: skip
    slow = configure("console")
    logging.getLogger().addHandler(logging.NullHandler())  # another handler beside Gate's: the logging path
    assert logs._fast_access_writer() is None
    access_line(dict(fields))
    out = configure("console")
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if isinstance(h, logs._GateHandler)]  # as in production
    assert logs._fast_access_writer() is not None
    access_line(dict(fields))
    access_line({**fields, "model": "m" * 99999})
    flush_access_log()
    fast, cut = lines(out)
    (expected,) = [line for line in lines(slow) if " gate.access: " in line]
    assert fast.split(" ", 1)[1] == expected.split(" ", 1)[1]  # the same line but for the time
    assert " INFO    gate.access: POST /v1/messages 200 2.0ms " in fast
    assert fast.endswith(" [0af7651916cd43dd8448eb211c80319c b7ad6b7169203331]")
    assert "sk-ant-api03-" + "x" * 40 not in out.getvalue()
    assert len(cut) < 2 * MAX_FIELD_CHARS + 500


def test_access_log_can_be_silenced(configure: Configure) -> None:
    out = configure("json")
    logging.getLogger("gate.access").setLevel(logging.WARNING)
    access_log(method="GET", path="/actuator/health", status=200, latency_ms=0.2)
    assert out.getvalue() == ""


def test_configuring_twice_keeps_one_gate_handler(configure: Configure) -> None:
    configure("json")
    out = configure("console")
    logging.getLogger("gate").info("once")
    assert len(lines(out)) == 1
    gate_handlers = [h for h in logging.getLogger().handlers if type(h).__name__ == "_GateHandler"]
    assert len(gate_handlers) == 1


# ---------------------------------------------------------------------------------------------- redact()

KEY_CHARS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=16)
B64 = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=8, max_size=60)
SURROUNDING = st.text(max_size=40)


@given(SURROUNDING, KEY_CHARS, SURROUNDING)
def test_redact_masks_any_key(before: str, body: str, after: str) -> None:
    masked = redact(f"{before} sk-ant-{body} {after}")
    assert f"sk-ant-{body}" not in masked
    assert "sk-ant-***" in masked


@given(SURROUNDING, B64, B64, B64, SURROUNDING)
def test_redact_masks_any_jwt_shape(before: str, header: str, payload: str, signature: str, after: str) -> None:
    token = f"eyJ{header}.{payload}.{signature}"
    masked = redact(f"{before} {token} {after}")
    assert token not in masked
    assert f".{payload}.{signature}" not in masked


@given(
    st.sampled_from(["Bearer", "bearer", "BEARER"]),
    st.text(alphabet="abc.XYZ012-_~+/=", min_size=1),
    SURROUNDING,
)
def test_redact_masks_bearer_credentials(scheme: str, credential: str, after: str) -> None:
    masked = redact(f"Authorization: {scheme} {credential} {after}")
    assert masked.startswith(f"Authorization: {scheme} ***")


@given(st.text())
def test_redact_is_idempotent(text: str) -> None:
    once = redact(text)
    assert redact(once) == once


@given(st.text().filter(lambda t: not any(m in t for m in ("sk-ant-", "eyJ", "://")) and "bearer" not in t.lower()))
def test_redact_leaves_clean_text_alone(text: str) -> None:
    assert redact(text) is text
