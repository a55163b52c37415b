"""Header fields as Gate's HTTP layer reads them, on both sides: the raw fields httptools hands over decoded into
a case-insensitive multidict, and Content-Length read as a number. The server and the client share these so that
a request and a response are read by the same rules.
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["MAX_FIELDS", "content_length", "decode_fields"]

MAX_FIELDS = 128  # header fields in one head, as aiohttp: real peers send a few dozen


def decode_fields(raw: Iterable[tuple[bytes, bytes]]) -> CIMultiDictProxy[str]:
    """Names as latin-1 (llhttp admits only token characters in them); values as UTF-8 with undecodable bytes kept
    as surrogates, as aiohttp does, so that a later check can still refuse them by name."""
    return CIMultiDictProxy(
        CIMultiDict([(name.decode("latin-1"), value.decode("utf-8", "surrogateescape")) for name, value in raw])
    )


def content_length(value: str | None) -> int | None:
    """A Content-Length value in bytes; None when it is absent or not a plain run of ASCII digits.

    ``str.isdigit`` alone admits other scripts' digits (``"²"``), which ``int`` then refuses; llhttp has already
    refused any framing it would not accept, so this only has to read what it let through.
    """
    if value is None or not value.isascii() or not value.isdigit():
        return None
    return int(value)
