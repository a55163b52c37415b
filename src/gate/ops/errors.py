"""Gate's own error responses, in Anthropic's shape, so every client's error handling just works."""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from gate.http.server import Response

__all__ = ["error_body", "error_response", "error_type_for"]

# Anthropic's error types by status (its documented ones, plus the statuses Gate itself answers with).
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    431: "request_too_large",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type_for(status: int) -> str:
    """Anthropic's error type for an HTTP status (a usage record's ``error_type`` when the body names none)."""
    return _TYPE_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(error_type: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})


def error_response(
    status: int,
    message: str,
    *,
    error_type: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A JSON error answer in Anthropic's shape: ``{"type":"error","error":{"type":..,"message":..}}``."""
    kind = error_type or error_type_for(status)
    response = Response(status=status, body=error_body(kind, message), content_type="application/json", headers=headers)
    response.headers["x-gate-error"] = kind  # tells a gateway answer from an upstream one
    return response
