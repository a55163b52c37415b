"""``/actuator/health`` in Spring Boot's shape, plus Kubernetes liveness and readiness.

Each room reports its own component; this module only aggregates them and never exposes a secret.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from gate.http.server import Request, Response
from gate.ops.redact import redact

if TYPE_CHECKING:
    from gate.app import Gate

__all__ = ["Health"]

_BREAKER_STATUS = {"CLOSED": "UP", "HALF_OPEN": "UNKNOWN", "OPEN": "DOWN"}  # Resilience4j's mapping


class Health:
    """Aggregates the rooms' health: overall DOWN when any component is DOWN, as Spring Boot does."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def components(self) -> dict[str, dict[str, Any]]:
        gate = self._gate
        breaker = gate.breaker.snapshot()
        keys = gate.keys.snapshot()
        count = _count(keys.get("count"))
        available = _count(keys.get("available"))
        components: dict[str, dict[str, Any]] = {
            "circuitBreaker": {"status": _BREAKER_STATUS.get(str(breaker.get("state")), "UNKNOWN"), "details": breaker},
            "pubsub": gate.events.health(),
            "apiKeys": {
                "status": "UP" if available > 0 else "DOWN",
                "details": {"count": count, "available": available, "keys": keys.get("keys", [])},
            },
            "jwks": gate.auth.health(),
            "lifecycle": {"status": "DOWN" if gate.draining else "UP", "details": {"draining": gate.draining}},
        }
        if gate.signin is not None:
            components["signIn"] = gate.signin.health()
        return components

    async def overall(self, request: Request) -> Response:
        components = self.components()
        status = "DOWN" if any(c.get("status") == "DOWN" for c in components.values()) else "UP"
        return _answer(status, {"components": components})

    async def liveness(self, request: Request) -> Response:
        return _answer("UP", {})

    async def readiness(self, request: Request) -> Response:
        gate = self._gate
        jwks = gate.auth.health()
        details = jwks.get("details")
        jwks_keys = _count(details.get("keys")) if isinstance(details, dict) else 0
        checks = {
            "jwksLoaded": jwks_keys > 0,
            "apiKeyConfigured": len(gate.keys) > 0,
            "notDraining": not gate.draining,
        }
        return _answer("UP" if all(checks.values()) else "DOWN", {"details": checks})


def _count(value: object) -> int:
    return value if isinstance(value, int) else 0


def _answer(status: str, extra: dict[str, Any]) -> Response:
    # Rooms report no secrets; the masking is the net under them (an error text may quote a URL or a header).
    body = redact(orjson.dumps({"status": status, **extra}, default=str).decode())
    return Response(status=200 if status == "UP" else 503, text=body, content_type="application/json")
