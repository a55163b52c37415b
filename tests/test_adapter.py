"""The upstream interface's pure parts: the model map, beta values, and cloud errors in Anthropic's shape."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gate.upstreams.adapter import ModelMap, TranslatedError, anthropic_error_body, beta_values


def test_model_map_exact_then_longest_prefix_and_empty_serves_all() -> None:
    models = ModelMap({"claude-sonnet-4-5": "a", "claude-*": "b", "claude-sonnet-*": "c"})
    assert models.lookup("claude-sonnet-4-5") == "a"
    assert models.lookup("claude-sonnet-4-6") == "c"
    assert models.lookup("claude-opus-4-6") == "b"
    assert models.lookup("gpt-5") is None and models.lookup(None) is None
    assert ModelMap({}).lookup("anything") == "anything"


def test_beta_values_from_repeated_comma_headers() -> None:
    headers = CIMultiDict([("anthropic-beta", "a, b"), ("Anthropic-Beta", "c,,"), ("x", "y")])
    assert beta_values(headers) == ["a", "b", "c"]
    assert beta_values(CIMultiDict()) == []


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, b'{"message":"Too many requests"}', ("rate_limit_error", "Too many requests")),  # AWS
        (
            403,
            b'{"error":{"code":403,"message":"Permission denied","status":"PERMISSION_DENIED"}}',
            ("permission_error", "Permission denied"),
        ),
        (404, b'[{"error":{"code":404,"message":"Not found","status":"NOT_FOUND"}}]', ("not_found_error", "Not found")),
        (502, b"<html>bad gateway</html>", ("api_error", "The upstream answered with HTTP 502.")),
        (503, b"", ("overloaded_error", "The upstream answered with HTTP 503.")),
    ],
)
def test_cloud_errors_become_anthropic_errors(status: int, body: bytes, expected: tuple[str, str]) -> None:
    error = json.loads(anthropic_error_body(status, body))
    assert error == {"type": "error", "error": {"type": expected[0], "message": expected[1]}}


def test_an_anthropic_error_passes_unchanged() -> None:
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}'
    assert anthropic_error_body(529, body) == body


@given(st.binary(max_size=300))
def test_any_error_body_gives_anthropic_shape(body: bytes) -> None:
    error = json.loads(anthropic_error_body(500, body))
    assert (error["type"] == "error" and set(error["error"]) == {"type", "message"}) or error == json.loads(body)


class _Huge:
    """An upstream answer whose error body never ends."""

    status = 500
    headers: Any = CIMultiDictProxy(CIMultiDict({"x-amzn-requestid": "r1"}))
    released = False

    async def readany(self) -> bytes:
        return b"x" * 10_000

    def release(self) -> None:
        self.released = True


async def test_a_huge_error_body_is_not_read_to_its_end() -> None:
    answer = TranslatedError(_Huge(), request_id_header="x-amzn-requestid")  # type: ignore[arg-type]
    body = await answer.read()
    assert json.loads(body)["error"]["type"] == "api_error" and await answer.read() == b""
    assert answer.headers["request-id"] == "r1" and answer.headers["content-type"] == "application/json"
