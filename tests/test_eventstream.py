"""Bedrock's event-stream frames to Anthropic's SSE: any split of the bytes gives the same SSE, any corrupted byte
is caught (CRCs and lengths), and hostile lengths cannot make the parser loop."""

from __future__ import annotations

import binascii
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gate.http.client import ClientError
from gate.upstreams.eventstream import SseTranslator
from tests.fake_anthropic import fixture
from tests.fake_clouds import bedrock_stream, exception_frame, frame

NAMES = ["stream-basic.sse", "stream-tool-use.sse", "stream-prompt-caching-usage.sse", "stream-web-search-usage.sse"]


def translate(data: bytes, cuts: list[int]) -> bytes:
    translator = SseTranslator()
    out, position = [], 0
    for size in cuts:
        out.append(translator.feed(data[position : position + size]))
        position += size
    out.append(translator.feed(data[position:]))
    assert translator.pending == 0
    return b"".join(out)


@pytest.mark.parametrize("name", NAMES[1:])
def test_whole_stream_gives_anthropic_sse_byte_for_byte(name: str) -> None:
    assert translate(bedrock_stream(fixture(name)), []) == fixture(name)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(NAMES), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=40))
def test_any_split_gives_the_same_sse(name: str, cuts: list[int]) -> None:
    data = bedrock_stream(fixture(name), with_metrics=name != "stream-basic.sse")
    assert translate(data, cuts) == fixture(name)


@settings(max_examples=150, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255), cut=st.integers(0, 5000))
def test_a_corrupted_byte_never_passes(position: int, flip: int, cut: int) -> None:
    data = bytearray(bedrock_stream(fixture("stream-tool-use.sse")))
    position %= len(data)
    data[position] ^= flip
    translator = SseTranslator()
    produced = b""
    with pytest.raises(ClientError):
        for piece in (bytes(data[:cut]), bytes(data[cut:])):
            produced += translator.feed(piece)
        if translator.pending:  # a length made longer: the stream ends inside a frame, which the answer refuses
            raise ClientError("ended inside a frame")
    assert fixture("stream-tool-use.sse").startswith(produced)  # only whole, good events before the bad one


def test_exception_frame_becomes_an_error_event() -> None:
    sse = SseTranslator().feed(exception_frame("modelStreamErrorException", "The model failed"))
    assert sse == (
        b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"The model failed"}}\n\n'
    )


def test_a_frame_shorter_than_its_parts_is_refused_not_looped_on() -> None:
    good = frame({":message-type": "event", ":event-type": "chunk"}, b"{}")
    prelude = struct.pack(">II", 0, len(good) - 16)
    hostile = prelude + struct.pack(">I", binascii.crc32(prelude)) + good[12:]
    with pytest.raises(ClientError):
        SseTranslator().feed(hostile)


def test_other_events_are_skipped() -> None:
    assert SseTranslator().feed(frame({":message-type": "event", ":event-type": "initial-response"}, b"{}")) == b""
