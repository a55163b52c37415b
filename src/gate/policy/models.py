"""Model allowlists by group: ``/v1/messages`` and ``count_tokens`` refuse a model the caller may not use (400
``invalid_request_error``, before any upstream call, so no usage event), and ``/v1/models`` lists only the allowed
models (answered by Gate itself for a restricted caller, from the allowlist's exact ids).

Allowlist entries are exact model ids or prefixes ending in ``*`` (``claude-haiku-*``). A caller with no policy, or
whose policies name no ``models``, is not restricted; a policy with ``models: []`` allows none.
"""

from __future__ import annotations

from typing import Final

import orjson

from gate.http.server import Request, Response
from gate.identity.auth import Identity
from gate.ops.errors import error_response
from gate.policy.groups import PolicyBook

__all__ = ["ModelPolicy", "display_name"]

_CREATED_AT: Final = "2025-01-01T00:00:00Z"  # the list shape wants a date; Gate does not know upstream's


def display_name(model: str) -> str:
    """``claude-opus-4-6`` -> ``Claude Opus 4.6``: the family words capitalised, the version numbers dotted."""
    words = model.split("-")
    names = [w.capitalize() for w in words if not w.isdigit()]
    numbers = [w for w in words if w.isdigit() and len(w) < 8]  # a date suffix is not a version
    return " ".join(names) + (" " + ".".join(numbers) if numbers else "")


def _permits(allowlist: tuple[str, ...], model: str) -> bool:
    for entry in allowlist:
        if entry.endswith("*"):
            if model.startswith(entry[:-1]):
                return True
        elif model == entry:
            return True
    return False


class ModelPolicy:
    """The one question the relay asks after reading the body: :meth:`answer`."""

    def __init__(self, book: PolicyBook) -> None:
        self._book = book

    def __bool__(self) -> bool:
        return self._book.restricts_models

    def allowed(self, identity: Identity, model: str | None) -> bool:
        resolved = self._book.resolve(identity)
        if resolved is None or resolved.models is None:
            return True
        return model is not None and _permits(resolved.models, model)

    def models_list(self, identity: Identity) -> bytes | None:
        """The ``/v1/models`` answer for a restricted caller; None when the caller is not restricted."""
        resolved = self._book.resolve(identity)
        if resolved is None or resolved.models is None:
            return None
        ids = [m for m in resolved.models if not m.endswith("*")]
        data = [{"type": "model", "id": m, "display_name": display_name(m), "created_at": _CREATED_AT} for m in ids]
        return orjson.dumps(
            {"data": data, "has_more": False, "first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None}
        )

    def answer(self, identity: Identity, request: Request, model: str | None) -> Response | None:
        """Gate's own answer when policy decides the request; None to relay it upstream as usual."""
        if request.method == "POST":
            if self.allowed(identity, model):
                return None
            if model is None:
                return error_response(400, "model: field required.")
            return error_response(400, f"The model {model!r} is not available to you under the gateway's policy.")
        model_id = request.match_info.get("id")
        if model_id is not None:
            if self.allowed(identity, model_id):
                return None
            return error_response(404, f"model: {model_id}")
        body = self.models_list(identity)
        return None if body is None else Response(body=body, content_type="application/json")
