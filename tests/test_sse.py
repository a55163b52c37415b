"""The SSE decoder: WHATWG framing, and the same events however the bytes are cut into chunks."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gate.accounting.sse import SSEDecoder, SSEEvent

FIXTURES = Path(__file__).parent / "fixtures"
SSE_FIXTURES = sorted(FIXTURES.glob("*.sse"))


def _event_line(kind: str, payload: dict[str, object]) -> str:
    return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


# A fixture-like stream whose text is raw UTF-8 of 2, 3 and 4 bytes a character, so cuts land inside them.
MULTIBYTE_STREAM = (
    _event_line(
        "message_start",
        {
            "type": "message_start",
            "message": {"id": "msg_ü", "model": "claude-x", "usage": {"input_tokens": 7, "output_tokens": 1}},
        },
    )
    + _event_line(
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Grüße, 世界! 🎉"},
        },
    )
    + ": a comment with ü and 🎉\n\n"
    + _event_line(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "naïve café 𝄞"}},
    )
    + _event_line(
        "message_delta",
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}},
    )
    + _event_line("message_stop", {"type": "message_stop"})
).encode()

STREAMS = [path.read_bytes() for path in SSE_FIXTURES] + [MULTIBYTE_STREAM]
STREAM_IDS = [path.name for path in SSE_FIXTURES] + ["multibyte"]


def decode(*chunks: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def split_stream(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    data = draw(st.sampled_from(STREAMS))
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=60))
    return data, pieces(data, cuts)


# -- framing --


def test_basic_event() -> None:
    assert decode(b"event: ping\ndata: {}\n\n") == [SSEEvent(event="ping", data="{}")]


@pytest.mark.parametrize("ending", [b"\n", b"\r", b"\r\n"])
def test_every_line_ending(ending: bytes) -> None:
    stream = ending.join([b"event: a", b"data: 1", b"data: 2", b"", b"data: 3", b"", b""])
    assert decode(stream) == [SSEEvent(event="a", data="1\n2"), SSEEvent(data="3")]


def test_mixed_line_endings() -> None:
    assert decode(b"data: a\rdata: b\r\ndata: c\n\r\n") == [SSEEvent(data="a\nb\nc")]


def test_cr_and_lf_split_across_chunks_are_one_line_end() -> None:
    # Were the LF taken as a second line end, the blank line would dispatch "a" on its own.
    assert decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [SSEEvent(data="a\nb")]


def test_cr_then_cr_is_a_blank_line() -> None:
    assert decode(b"data: a\r", b"\rdata: b\n\n") == [SSEEvent(data="a"), SSEEvent(data="b")]


def test_lone_lf_chunk_after_cr() -> None:
    assert decode(b"data: a\r", b"\n", b"", b"\n") == [SSEEvent(data="a")]


def test_comments_are_ignored() -> None:
    assert decode(b": hello\ndata: x\n:another\n\n") == [SSEEvent(data="x")]


def test_comment_only_block_dispatches_nothing() -> None:
    assert decode(b": keep-alive\n\n") == []


def test_data_lines_join_with_lf() -> None:
    assert decode(b"data: a\ndata:\ndata: c\n\n") == [SSEEvent(data="a\n\nc")]


def test_one_optional_space_after_colon() -> None:
    assert decode(b"data:x\n\ndata: x\n\ndata:  x\n\n") == [
        SSEEvent(data="x"),
        SSEEvent(data="x"),
        SSEEvent(data=" x"),
    ]


def test_field_without_colon_has_empty_value() -> None:
    assert decode(b"data\n\n") == [SSEEvent(data="")]
    assert decode(b"event\ndata: x\n\n") == [SSEEvent(data="x")]


def test_value_may_hold_colons() -> None:
    assert decode(b"data: a: b:c\n\n") == [SSEEvent(data="a: b:c")]


def test_event_without_data_is_not_dispatched_and_resets_type() -> None:
    assert decode(b"event: lonely\n\ndata: x\n\n") == [SSEEvent(data="x")]


def test_event_type_resets_after_dispatch() -> None:
    assert decode(b"event: a\ndata: 1\n\ndata: 2\n\n") == [SSEEvent(event="a", data="1"), SSEEvent(data="2")]


def test_unknown_fields_and_retry_are_ignored() -> None:
    assert decode(b"foo: bar\nretry: 10\ndata: x\nDATA: y\n\n") == [SSEEvent(data="x")]


def test_id_persists_and_nul_id_is_ignored() -> None:
    assert decode(b"id: 1\ndata: a\n\ndata: b\n\nid: x\x00y\ndata: c\n\nid\ndata: d\n\n") == [
        SSEEvent(data="a", id="1"),
        SSEEvent(data="b", id="1"),
        SSEEvent(data="c", id="1"),
        SSEEvent(data="d", id=""),
    ]


def test_bom_at_start_is_dropped_even_when_split() -> None:
    expected = [SSEEvent(data="x")]
    assert decode(b"\xef\xbb\xbfdata: x\n\n") == expected
    assert decode(b"\xef", b"\xbb", b"\xbfdata: x\n\n") == expected
    assert decode(b"\xef\xbb", b"\xbf", b"data: x\n\n") == expected


def test_bom_later_in_stream_is_kept() -> None:
    # Only the stream's first bytes may be a BOM; later, it makes the field name unknown.
    assert decode(b"data: a\n\n\xef\xbb\xbfdata: b\n\n") == [SSEEvent(data="a")]


def test_bom_prefix_that_is_not_a_bom() -> None:
    assert decode(b"\xef", b"\n", b"data: x\n\n") == [SSEEvent(data="x")]


def test_unfinished_event_is_discarded_on_close() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\n") == [SSEEvent(data="a")]
    assert decoder.close() == []
    assert decoder.truncated


def test_unterminated_last_line_is_discarded() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b") == [SSEEvent(data="a")]
    assert decoder.close() == []
    assert decoder.truncated


def test_clean_close_is_not_truncated() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\n")
    assert decoder.close() == []
    assert not decoder.truncated


def test_invalid_utf8_is_replaced() -> None:
    assert decode(b"data: \xff\xe2\x82\n\n") == [SSEEvent(data="\ufffd\ufffd")]


def test_multibyte_characters_split_everywhere() -> None:
    whole = decode(MULTIBYTE_STREAM)
    assert decode(*[MULTIBYTE_STREAM[i : i + 1] for i in range(len(MULTIBYTE_STREAM))]) == whole
    assert "Grüße, 世界! 🎉" in whole[1].data


@pytest.mark.parametrize("stream", STREAMS, ids=STREAM_IDS)
def test_fixture_events_are_json_and_named(stream: bytes) -> None:
    events = decode(stream)
    assert events
    for event in events:
        assert json.loads(event.data)["type"] == event.event


@pytest.mark.parametrize("stream", STREAMS, ids=STREAM_IDS)
def test_fixture_fed_byte_by_byte(stream: bytes) -> None:
    assert decode(*[stream[i : i + 1] for i in range(len(stream))]) == decode(stream)


@pytest.mark.parametrize("stream", STREAMS, ids=STREAM_IDS)
@pytest.mark.parametrize("ending", [b"\r", b"\r\n"])
def test_fixture_with_other_line_endings(stream: bytes, ending: bytes) -> None:
    converted = stream.replace(b"\n", ending)
    assert decode(converted) == decode(stream)
    assert decode(*[converted[i : i + 1] for i in range(len(converted))]) == decode(stream)


# -- any chunking gives the same events --


@given(split_stream())
def test_any_split_of_a_fixture_gives_the_same_events(case: tuple[bytes, list[bytes]]) -> None:
    data, chunks = case
    assert decode(*chunks) == decode(data)


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=20))
def test_arbitrary_bytes_never_raise_and_split_alike(data: bytes, cuts: list[int]) -> None:
    whole = decode(data)
    assert decode(*pieces(data, [min(cut, len(data)) for cut in cuts])) == whole


_sse_alphabet = st.sampled_from(
    [b"\n", b"\r", b"\r\n", b":", b" ", b"data", b"event", b"id", b"x", b"\xc3\xbc"]
)


@given(st.lists(_sse_alphabet, max_size=80), st.lists(st.integers(0, 400), max_size=20))
def test_sse_like_bytes_split_alike(tokens: list[bytes], cuts: list[int]) -> None:
    data = b"".join(tokens)
    assert decode(*pieces(data, [min(cut, len(data)) for cut in cuts])) == decode(data)
