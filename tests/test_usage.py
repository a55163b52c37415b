"""The usage meter: the documented fixtures, cumulative deltas, errors, compression, and any chunking."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gate.accounting.sse import SSEDecoder
from gate.accounting.usage import MAX_LINE_BYTES, UsageMeter, filter_accept_encoding

FIXTURES = Path(__file__).parent / "fixtures"
BASIC = (FIXTURES / "stream-basic.sse").read_bytes()
TOOL_USE = (FIXTURES / "stream-tool-use.sse").read_bytes()
WEB_SEARCH = (FIXTURES / "stream-web-search-usage.sse").read_bytes()
MESSAGE = (FIXTURES / "message-basic.json").read_bytes()
STREAMS = {"basic": BASIC, "tool-use": TOOL_USE, "web-search": WEB_SEARCH}
BODIES = [(BASIC, True), (TOOL_USE, True), (WEB_SEARCH, True), (MESSAGE, False)]
HAS_BROTLI = importlib.util.find_spec("brotli") is not None

FIELDS = (
    "message_id",
    "model",
    "stop_reason",
    "input_tokens",
    "output_tokens",
    "cache_creation_tokens",
    "cache_read_tokens",
    "cache_creation_5m_tokens",
    "cache_creation_1h_tokens",
    "web_search_requests",
    "web_fetch_requests",
    "service_tier",
    "error_type",
    "content_started",
    "message_stopped",
)
NOTHING = {
    **dict.fromkeys(FIELDS),
    "input_tokens": 0,
    "output_tokens": 0,
    "cache_creation_tokens": 0,
    "cache_read_tokens": 0,
    "content_started": False,
    "message_stopped": False,
}


def counts(meter: UsageMeter) -> dict[str, Any]:
    return {name: getattr(meter, name) for name in FIELDS}


def meter_of(*chunks: bytes, stream: bool = True, content_encoding: str | None = None) -> dict[str, Any]:
    meter = UsageMeter(stream=stream, content_encoding=content_encoding)
    for chunk in chunks:
        meter.feed(chunk)
    meter.finish()
    return counts(meter)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def sse(*events: tuple[str, dict[str, Any]], ending: str = "\n", compact: bool = True) -> bytes:
    separators = (",", ":") if compact else (", ", ": ")
    lines = []
    for kind, payload in events:
        lines += [f"event: {kind}", f"data: {json.dumps(payload, separators=separators)}", ""]
    return (ending.join(lines) + ending).encode()


def start(usage: dict[str, Any], **message: Any) -> tuple[str, dict[str, Any]]:
    body = {
        "id": "msg_1",
        "type": "message",
        "model": "claude-x",
        "stop_reason": None,
        "usage": usage,
        **message,
    }
    return "message_start", {"type": "message_start", "message": body}


def delta(usage: dict[str, Any] | None = None, stop_reason: str | None = None) -> tuple[str, dict[str, Any]]:
    payload: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": stop_reason}}
    if usage is not None:
        payload["usage"] = usage
    return "message_delta", payload


def text(value: str) -> tuple[str, dict[str, Any]]:
    return "content_block_delta", {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": value},
    }


STOP = ("message_stop", {"type": "message_stop"})


# -- the documented fixtures --


def test_stream_basic() -> None:
    got = meter_of(BASIC)
    assert (got["input_tokens"], got["output_tokens"], got["stop_reason"]) == (25, 15, "end_turn")
    assert got["message_id"] == "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"
    assert got["model"] == "claude-opus-4-6"
    assert got["content_started"] and got["message_stopped"]
    assert got["error_type"] is None


def test_stream_tool_use() -> None:
    assert meter_of(TOOL_USE) == {
        **NOTHING,
        "message_id": "msg_014p7gG3wDgGV9EUtLvnow3U",
        "model": "claude-3-haiku-20240307",
        "stop_reason": "tool_use",
        "input_tokens": 472,
        "output_tokens": 89,
        "content_started": True,
        "message_stopped": True,
    }


def test_stream_web_search_delta_raises_input_tokens() -> None:
    got = meter_of(WEB_SEARCH)
    assert got["input_tokens"] == 10682  # not message_start's 2679: message_delta counts are cumulative
    assert got["output_tokens"] == 510
    assert got["web_search_requests"] == 1
    assert got["web_fetch_requests"] is None
    assert got["service_tier"] == "standard"
    assert (got["cache_creation_tokens"], got["cache_read_tokens"]) == (0, 0)
    assert got["stop_reason"] == "end_turn"
    assert not got["content_started"]


def test_message_basic_json() -> None:
    assert meter_of(MESSAGE, stream=False) == {
        **NOTHING,
        "message_id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "model": "claude-opus-5",
        "stop_reason": "end_turn",
        "input_tokens": 12,
        "output_tokens": 6,
    }


def test_counts_are_readable_before_finish() -> None:
    meter = UsageMeter(stream=True)
    meter.feed(TOOL_USE[: TOOL_USE.index(b"event: content_block_start")])
    assert (meter.input_tokens, meter.output_tokens, meter.content_started) == (472, 2, False)
    meter.feed(TOOL_USE[TOOL_USE.index(b"event: content_block_start") :])
    assert (meter.output_tokens, meter.content_started, meter.message_stopped) == (89, True, True)


# -- usage fields and rules --


def test_cache_fields_and_nested_usage() -> None:
    usage = {
        "input_tokens": 10,
        "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 4000,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
        "output_tokens": 1,
        "service_tier": "priority",
    }
    final = {"output_tokens": 42, "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 3}}
    got = meter_of(sse(start(usage), text("hi"), delta(final, "end_turn"), STOP))
    assert got == {
        **NOTHING,
        "message_id": "msg_1",
        "model": "claude-x",
        "stop_reason": "end_turn",
        "input_tokens": 10,
        "output_tokens": 42,
        "cache_creation_tokens": 300,
        "cache_read_tokens": 4000,
        "cache_creation_5m_tokens": 100,
        "cache_creation_1h_tokens": 200,
        "web_search_requests": 2,
        "web_fetch_requests": 3,
        "service_tier": "priority",
        "content_started": True,
        "message_stopped": True,
    }


def test_nulls_count_as_absent() -> None:
    first = {"input_tokens": 5, "cache_read_input_tokens": 7, "service_tier": "standard"}
    later = {"input_tokens": None, "cache_read_input_tokens": None, "output_tokens": 3, "service_tier": None}
    got = meter_of(sse(start(first), delta(later, None), delta({"server_tool_use": None}, "max_tokens")))
    assert (got["input_tokens"], got["cache_read_tokens"], got["output_tokens"]) == (5, 7, 3)
    assert (got["service_tier"], got["stop_reason"], got["web_search_requests"]) == (
        "standard",
        "max_tokens",
        None,
    )


def test_message_delta_without_usage_is_tolerated() -> None:
    got = meter_of(sse(start({"input_tokens": 9, "output_tokens": 1}), delta(None, "end_turn"), STOP))
    assert (got["input_tokens"], got["output_tokens"], got["stop_reason"]) == (9, 1, "end_turn")


def test_each_message_delta_replaces_the_last() -> None:
    got = meter_of(sse(start({"input_tokens": 1}), delta({"output_tokens": 5}), delta({"output_tokens": 8})))
    assert got["output_tokens"] == 8


def test_error_event_mid_stream() -> None:
    error = ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    got = meter_of(sse(start({"input_tokens": 30, "output_tokens": 1}), text("Hel"), error, compact=False))
    assert got["error_type"] == "overloaded_error"
    assert (got["input_tokens"], got["output_tokens"], got["message_stopped"]) == (30, 1, False)


def test_json_error_body() -> None:
    body = b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"},"request_id":"req_1"}'
    assert meter_of(body, stream=False)["error_type"] == "rate_limit_error"
    # An error answer to a streaming request comes back as JSON, not SSE.
    assert meter_of(body[:10], body[10:], stream=True)["error_type"] == "rate_limit_error"


def test_ping_comments_and_unknown_events_pass() -> None:
    stream = (
        b': comment\n\nevent: ping\ndata: {"type": "ping"}\n\n'
        + sse(start({"input_tokens": 4}))
        + b'event: brand_new\ndata: {"type":"brand_new","usage":{"input_tokens":999}}\n\n'
        + sse(delta({"output_tokens": 2}, "end_turn"))
    )
    got = meter_of(stream)
    assert (got["input_tokens"], got["output_tokens"]) == (4, 2)


def test_bad_json_is_skipped() -> None:
    stream = (
        sse(start({"input_tokens": 4}))
        + b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":\n\n'
        + b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":\xff}}\n\n'
        + b'event: message_delta\ndata: ["message_delta"]\n\n'
        + sse(delta({"output_tokens": 6}))
    )
    got = meter_of(stream)
    assert (got["input_tokens"], got["output_tokens"]) == (4, 6)
    assert meter_of(b"{not json", stream=False) == NOTHING


def test_text_mentioning_keywords_is_not_usage() -> None:
    tricky = 'say "message_delta" and "error", {"type":"message_stop"}\r\n"usage"'
    got = meter_of(sse(start({"input_tokens": 4}), text(tricky), delta({"output_tokens": 6})))
    assert (got["error_type"], got["message_stopped"], got["output_tokens"]) == (None, False, 6)


def test_bom_and_leading_blank_lines() -> None:
    assert meter_of(b"\xef\xbb\xbf" + BASIC) == meter_of(BASIC)
    assert meter_of(b"\r\n\n" + BASIC) == meter_of(BASIC)
    data_first = b'\xef\xbb\xbfdata: {"type":"message_start","message":{"usage":{"input_tokens":3}}}\n\n'
    assert meter_of(data_first)["input_tokens"] == 3


def test_last_line_without_line_end_is_read_when_whole() -> None:
    whole = sse(start({"input_tokens": 4}), delta({"output_tokens": 6})).rstrip(b"\n")
    assert meter_of(whole)["output_tokens"] == 6
    assert meter_of(whole[:-3])["output_tokens"] == 0


def test_over_long_line_is_skipped_and_what_follows_counted() -> None:
    huge = b'data: {"type":"content_block_start","x":"' + b"y" * (MAX_LINE_BYTES + 10) + b'"}\n\n'
    stream = sse(start({"input_tokens": 4})) + huge + sse(delta({"output_tokens": 6}, "end_turn"))
    chunks = pieces(stream, list(range(0, len(stream), 64 * 1024)))
    got = meter_of(*chunks)
    assert (got["input_tokens"], got["output_tokens"], got["stop_reason"]) == (4, 6, "end_turn")


def test_non_streaming_body_over_the_cap_is_abandoned() -> None:
    meter = UsageMeter(stream=False, max_body_bytes=100)
    meter.feed(MESSAGE)
    meter.finish()
    assert counts(meter) == NOTHING


def test_feed_after_finish_is_ignored_and_finish_is_idempotent() -> None:
    meter = UsageMeter(stream=True)
    meter.feed(BASIC)
    meter.finish()
    meter.feed(sse(delta({"output_tokens": 1000})))
    meter.finish()
    assert meter.output_tokens == 15


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("ending", [b"\r\n", b"\r"])
def test_other_line_endings_give_the_same_usage(name: str, ending: bytes) -> None:
    converted = STREAMS[name].replace(b"\n", ending)
    assert meter_of(converted) == meter_of(STREAMS[name])
    assert meter_of(*[converted[i : i + 1] for i in range(len(converted))]) == meter_of(STREAMS[name])


@pytest.mark.parametrize(("body", "stream"), BODIES)
def test_byte_by_byte_gives_the_same_usage(body: bytes, stream: bool) -> None:
    assert meter_of(*[body[i : i + 1] for i in range(len(body))], stream=stream) == meter_of(
        body, stream=stream
    )


# -- compression --


def _deflate_raw(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


COMPRESSORS = {
    "gzip": ("gzip", gzip.compress),
    "x-gzip": ("x-gzip", gzip.compress),
    "deflate": ("deflate", zlib.compress),
    "deflate-raw": ("deflate", _deflate_raw),
}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
@pytest.mark.parametrize(("body", "stream"), BODIES)
def test_compressed_bodies_give_the_same_usage(kind: str, body: bytes, stream: bool) -> None:
    encoding, compress = COMPRESSORS[kind]
    packed = compress(body)
    expected = meter_of(body, stream=stream)
    assert meter_of(packed, stream=stream, content_encoding=encoding) == expected
    one_by_one = [packed[i : i + 1] for i in range(len(packed))]
    assert meter_of(*one_by_one, stream=stream, content_encoding=encoding) == expected


@given(
    st.sampled_from(BODIES),
    st.sampled_from(sorted(COMPRESSORS)),
    st.lists(st.integers(0, 2000), max_size=30),
)
def test_compressed_bodies_split_anywhere(
    body_stream: tuple[bytes, bool], kind: str, cuts: list[int]
) -> None:
    body, stream = body_stream
    encoding, compress = COMPRESSORS[kind]
    got = meter_of(*pieces(compress(body), cuts), stream=stream, content_encoding=encoding)
    assert got == meter_of(body, stream=stream)


def test_identity_and_case_are_understood() -> None:
    assert meter_of(BASIC, content_encoding="identity") == meter_of(BASIC)
    assert meter_of(gzip.compress(BASIC), content_encoding=" GZIP , identity") == meter_of(BASIC)


def test_multi_member_gzip() -> None:
    cut = BASIC.index(b"event: message_delta")
    packed = gzip.compress(BASIC[:cut]) + gzip.compress(BASIC[cut:])
    assert meter_of(*pieces(packed, [5, 40, 41]), content_encoding="gzip") == meter_of(BASIC)


def test_gzip_member_ending_exactly_at_a_chunk_end() -> None:
    cut = BASIC.index(b"event: message_delta")
    first, second = gzip.compress(BASIC[:cut]), gzip.compress(BASIC[cut:])
    assert meter_of(first, second, content_encoding="gzip") == meter_of(BASIC)
    assert meter_of(first, second[:1], second[1:], content_encoding="gzip") == meter_of(BASIC)
    body = gzip.compress(MESSAGE)
    assert meter_of(body, b"junk", stream=False, content_encoding="gzip") == meter_of(MESSAGE, stream=False)


def test_trailing_garbage_after_compressed_body_is_ignored() -> None:
    assert meter_of(zlib.compress(MESSAGE) + b"junk", stream=False, content_encoding="deflate") == meter_of(
        MESSAGE, stream=False
    )
    assert meter_of(gzip.compress(BASIC) + b"\x00\x00", content_encoding="gzip") == meter_of(BASIC)


def test_a_compressed_line_longer_than_the_inflate_step() -> None:
    filler = b'data: {"type":"content_block_delta","x":"' + b"z" * 3_000_000 + b'"}\n\n'
    stream = sse(start({"input_tokens": 4})) + filler + sse(delta({"output_tokens": 6}), STOP)
    got = meter_of(gzip.compress(stream), content_encoding="gzip")
    assert (got["input_tokens"], got["output_tokens"], got["message_stopped"]) == (4, 6, True)


def test_corrupt_compressed_body_keeps_what_was_counted_and_never_raises() -> None:
    packed = bytearray(gzip.compress(BASIC))
    assert meter_of(b"not gzip at all", content_encoding="gzip") == NOTHING
    got = meter_of(bytes(packed[:-40]), content_encoding="gzip")  # cut off before its end
    assert got["input_tokens"] == 25
    packed[len(packed) // 2] ^= 0xFF
    meter_of(bytes(packed), content_encoding="gzip")


@pytest.mark.parametrize("encoding", ["zstd", "compress", "gzip, gzip", "br" if not HAS_BROTLI else "zstd"])
def test_unreadable_encoding_records_nothing(encoding: str) -> None:
    assert meter_of(BASIC, content_encoding=encoding) == NOTHING
    assert meter_of(MESSAGE, stream=False, content_encoding=encoding) == NOTHING


@pytest.mark.skipif(not HAS_BROTLI, reason="brotli is not installed")
def test_brotli_when_available() -> None:
    brotli: Any = importlib.import_module("brotli")
    packed = brotli.compress(TOOL_USE)
    assert meter_of(*pieces(packed, [3, 50]), content_encoding="br") == meter_of(TOOL_USE)


# -- any chunking, any bytes --


@given(st.sampled_from(BODIES), st.lists(st.integers(0, 4000), max_size=80))
def test_any_split_of_a_fixture_gives_the_same_usage(
    body_stream: tuple[bytes, bool], cuts: list[int]
) -> None:
    body, stream = body_stream
    assert meter_of(*pieces(body, cuts), stream=stream) == meter_of(body, stream=stream)


@given(
    st.binary(max_size=400),
    st.lists(st.integers(0, 400), max_size=10),
    st.booleans(),
    st.sampled_from([None, "gzip", "deflate", "br", "zstd"]),
)
def test_arbitrary_bytes_never_raise(
    data: bytes, cuts: list[int], stream: bool, encoding: str | None
) -> None:
    meter_of(*pieces(data, cuts), stream=stream, content_encoding=encoding)


_fragments = st.sampled_from(
    [
        b"\n",
        b"\r",
        b"\r\n",
        b"data: ",
        b"event: message_delta\n",
        b'{"type":"message_delta","usage":{"output_tokens":',
        b'{"type":"message_start","message":{"usage":{"input_tokens":',
        b'{"type":"error","error":{"type":',
        b'"content_block_delta"',
        b"7",
        b"}}",
        b"}}}",
        b'"x"',
        b"\xef\xbb\xbf",
        b"\xc3",
    ]
)


@given(st.lists(_fragments, max_size=40), st.lists(st.integers(0, 600), max_size=15))
def test_usage_like_bytes_split_alike(tokens: list[bytes], cuts: list[int]) -> None:
    data = b"".join(tokens)
    assert meter_of(*pieces(data, cuts)) == meter_of(data)


# -- the meter agrees with a spec-level reading through SSEDecoder --


def reference(stream: bytes) -> dict[str, Any]:
    """The README's rules applied to events decoded by the full SSE decoder."""
    got = dict(NOTHING)

    def take(usage: dict[str, Any]) -> None:
        flat = {
            "input_tokens": "input_tokens",
            "output_tokens": "output_tokens",
            "cache_creation_input_tokens": "cache_creation_tokens",
            "cache_read_input_tokens": "cache_read_tokens",
            "service_tier": "service_tier",
        }
        for key, field in flat.items():
            if usage.get(key) is not None:
                got[field] = usage[key]
        nested = {
            ("cache_creation", "ephemeral_5m_input_tokens"): "cache_creation_5m_tokens",
            ("cache_creation", "ephemeral_1h_input_tokens"): "cache_creation_1h_tokens",
            ("server_tool_use", "web_search_requests"): "web_search_requests",
            ("server_tool_use", "web_fetch_requests"): "web_fetch_requests",
        }
        for (outer, key), field in nested.items():
            if (usage.get(outer) or {}).get(key) is not None:
                got[field] = usage[outer][key]

    decoder = SSEDecoder()
    for event in decoder.feed(stream):
        data = json.loads(event.data)
        if event.event == "message_start":
            message = data["message"]
            got["message_id"], got["model"] = message["id"], message["model"]
            take(message["usage"])
        elif event.event == "message_delta":
            if data["delta"].get("stop_reason") is not None:
                got["stop_reason"] = data["delta"]["stop_reason"]
            take(data.get("usage") or {})
        elif event.event == "content_block_delta":
            got["content_started"] = True
        elif event.event == "message_stop":
            got["message_stopped"] = True
        elif event.event == "error":
            got["error_type"] = data["error"]["type"]
    return got


_count = st.one_of(st.none(), st.integers(0, 10**7))
_usage = st.fixed_dictionaries(
    {},
    optional={
        "input_tokens": _count,
        "output_tokens": _count,
        "cache_creation_input_tokens": _count,
        "cache_read_input_tokens": _count,
        "cache_creation": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {}, optional={"ephemeral_5m_input_tokens": _count, "ephemeral_1h_input_tokens": _count}
            ),
        ),
        "server_tool_use": st.one_of(
            st.none(),
            st.fixed_dictionaries({}, optional={"web_search_requests": _count, "web_fetch_requests": _count}),
        ),
        "service_tier": st.one_of(st.none(), st.sampled_from(["standard", "priority", "batch"])),
    },
)
_stop_reason = st.one_of(st.none(), st.sampled_from(["end_turn", "max_tokens", "tool_use", "pause_turn"]))
_middle = st.one_of(
    st.text(max_size=30).map(text),
    st.just(("ping", {"type": "ping"})),
    st.just(("content_block_stop", {"type": "content_block_stop", "index": 0})),
    st.builds(delta, st.one_of(st.none(), _usage), _stop_reason),
)


@st.composite
def anthropic_stream(draw: st.DrawFn) -> bytes:
    events = [start(draw(_usage) | {"output_tokens": 1}, id=draw(st.text(max_size=8)), model="claude-x")]
    events += draw(st.lists(_middle, max_size=8))
    if draw(st.booleans()):
        events.append(
            (
                "error",
                {
                    "type": "error",
                    "error": {"type": draw(st.sampled_from(["overloaded_error", "api_error"]))},
                },
            )
        )
    if draw(st.booleans()):
        events.append(STOP)
    return sse(*events, ending=draw(st.sampled_from(["\n", "\r", "\r\n"])), compact=draw(st.booleans()))


@given(anthropic_stream(), st.lists(st.integers(0, 3000), max_size=40))
def test_meter_matches_the_spec_reading(stream: bytes, cuts: list[int]) -> None:
    assert meter_of(*pieces(stream, cuts)) == reference(stream)


# -- Accept-Encoding --


@pytest.mark.parametrize(
    ("offered", "kept"),
    [
        (None, None),
        ("", None),
        ("zstd", None),
        ("*", None),
        ("gzip, deflate", "gzip, deflate"),
        ("gzip, deflate, br, zstd", "gzip, deflate, br" if HAS_BROTLI else "gzip, deflate"),
        ("GZIP;q=0.5 , identity", "GZIP;q=0.5, identity"),
        ("gzip;q=0, identity", "identity"),
        ("identity;q=0.0, zstd", None),
        ("deflate;q=bogus", "deflate;q=bogus"),
    ],
)
def test_filter_accept_encoding(offered: str | None, kept: str | None) -> None:
    assert filter_accept_encoding(offered) == kept
