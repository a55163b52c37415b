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
        components: dict[str, dict[str, Any]] = {}
        upstreams = list(gate.upstreams)
        if len(upstreams) == 1:
            state = str(breaker.get("state"))
            components["circuitBreaker"] = {"status": _BREAKER_STATUS.get(state, "UNKNOWN"), "details": breaker}
        else:
            # One component per upstream; together DOWN only when none is UP (the others take its calls).
            parts = {adapter.name: adapter.health() for adapter in upstreams}
            up = any(part["status"] == "UP" for part in parts.values())
            components["upstreams"] = {"status": "UP" if up else "DOWN", "components": parts}
        components["pubsub"] = gate.events.health()
        if any(adapter.keys is not None for adapter in upstreams):
            # no usable key is DOWN for Gate only when Anthropic is its one upstream; else the others take its calls
            no_key = "DOWN" if len(upstreams) == 1 else "UNKNOWN"
            components["apiKeys"] = {
                "status": "UP" if available > 0 else no_key,
                "details": {"count": count, "available": available, "keys": keys.get("keys", [])},
            }
        components["jwks"] = gate.auth.health()
        components["lifecycle"] = {"status": "DOWN" if gate.draining else "UP", "details": {"draining": gate.draining}}
        if gate.signin is not None:
            components["signIn"] = gate.signin.health()
        if gate.limits is not None:
            components["limitsStore"] = gate.limits.health()
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
            "apiKeyConfigured": any(adapter.configured for adapter in gate.upstreams),
            "notDraining": not gate.draining,
        }
        return _answer("UP" if all(checks.values()) else "DOWN", {"details": checks})


def _count(value: object) -> int:
    return value if isinstance(value, int) else 0


def _answer(status: str, extra: dict[str, Any]) -> Response:
    # Rooms report no secrets; the masking is the net under them (an error text may quote a URL or a header).
    body = redact(orjson.dumps({"status": status, **extra}, default=str).decode())
    return Response(status=200 if status == "UP" else 503, text=body, content_type="application/json")
