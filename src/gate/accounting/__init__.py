"""What a call consumed.

- ``gate.accounting.usage``: ``UsageMeter`` (reads Anthropic's usage from a JSON body or an SSE stream as it passes)
  and ``UsageRecord`` (one per upstream call: the contract with ``gate.events``).
- ``gate.accounting.prices``: ``PriceTable`` (from the ``prices`` settings: ``cost(record)`` -> ``Cost`` with exact
  ``Decimal`` USD and the price version, ``estimate(model, ...)`` for reservations).
- ``gate.accounting.sse``: a spec-level Server-Sent Events decoder (the reference the meter is tested against).
"""
