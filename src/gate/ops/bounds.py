"""How long a request-derived string may be once it reaches a log line, a usage event or a span.

A client chooses the ``model`` string, a JWT its ``sub``, an upstream its ``request-id``: none of them has a
length limit of its own, and one 11 MB model name once made a 20 MB access line and a Pub/Sub message too large
to send. Every such string is cut here, at the boundary where it leaves Gate, to ``MAX_FIELD_CHARS``.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_FIELD_CHARS", "TRUNCATION_MARK", "bounded"]

# 256 characters: ten times the longest model id or request id Anthropic uses, and at most 1,023 bytes in UTF-8
# (255 characters of up to 4 bytes, then the 3-byte mark), under Pub/Sub's 1,024-byte limit on an attribute value.
MAX_FIELD_CHARS: Final = 256
TRUNCATION_MARK: Final = "\u2026"  # "…": a cut value ends with it, and is exactly MAX_FIELD_CHARS long


def bounded(text: str) -> str:
    """``text`` itself when it fits, else its first ``MAX_FIELD_CHARS - 1`` characters and ``…``."""
    if len(text) <= MAX_FIELD_CHARS:
        return text
    return text[: MAX_FIELD_CHARS - 1] + TRUNCATION_MARK
