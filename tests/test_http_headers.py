"""The header reading shared by Gate's server and client (``gate.http.headers``), on arbitrary input."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gate.http.headers import content_length, decode_fields


@given(st.text())
def test_content_length_reads_only_plain_ascii_digits(value: str) -> None:
    parsed = content_length(value)
    if value and all("0" <= char <= "9" for char in value):
        assert parsed == int(value)
    else:
        assert parsed is None


def test_content_length_refuses_what_int_would_misread() -> None:
    assert content_length(None) is None
    assert content_length("") is None
    assert content_length("²") is None  # str.isdigit() says yes; int() says no
    assert content_length("١٢") is None  # Arabic-Indic digits: int() would read 12
    assert content_length(" 12") is None
    assert content_length("+12") is None
    assert content_length("18446744073709551615") == 2**64 - 1


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=40), st.binary(max_size=200)), max_size=20))
def test_decoded_fields_give_back_the_exact_bytes(raw: list[tuple[bytes, bytes]]) -> None:
    fields = decode_fields(raw)
    assert [(name.encode("latin-1"), value.encode("utf-8", "surrogateescape")) for name, value in fields.items()] == raw


def test_decoded_fields_are_case_insensitive_and_keep_repeats() -> None:
    fields = decode_fields([(b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"X-Name", "caf\u00e9".encode())])
    assert fields.getall("SET-COOKIE") == ["a=1", "b=2"]
    assert fields["x-name"] == "caf\u00e9"
