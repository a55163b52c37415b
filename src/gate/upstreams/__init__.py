"""Where a call goes.

- ``gate.upstreams.keys``: ``KeyPool`` (the company's Anthropic keys: rotation, cooldown, quarantine).
- ``gate.upstreams.breaker``: ``CircuitBreaker`` (may we call upstream at all).
- ``gate.upstreams.anthropic``: ``Upstream`` (the Anthropic API origin, its pool and header hygiene).
"""
