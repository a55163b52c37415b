"""Where a call goes.

- ``gate.upstreams.adapter``: ``Adapter`` (the interface the relay uses), ``Upstreams`` (the ordered failover list),
  ``ModelMap``, ``Outgoing``/``Prepared``/``Answer``.
- ``gate.upstreams.anthropic``: ``Upstream`` (the Anthropic API origin, its pool and header hygiene) and
  ``AnthropicAdapter``.
- ``gate.upstreams.vertex``, ``gate.upstreams.bedrock``, ``gate.upstreams.foundry``: Claude on Google Vertex AI,
  Amazon Bedrock and Microsoft Foundry (imported only when configured); ``gate.upstreams.eventstream``: Bedrock's
  frames as Anthropic's SSE.
- ``gate.upstreams.keys``: ``KeyPool`` (the company's Anthropic keys: rotation, cooldown, quarantine).
- ``gate.upstreams.breaker``: ``CircuitBreaker`` (may we call an upstream at all; one per upstream).
"""
