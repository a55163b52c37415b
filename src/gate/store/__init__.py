"""Shared state for many replicas.

- ``gate.store.kv``: ``KeyValueStore`` with TTLs (SQLite or PostgreSQL), where sign-in keeps its state.
- ``gate.store.counters``: :class:`~gate.store.counters.CounterStore` (the protocol), ``Charge``, ``Overdrawn``,
  ``SpendLimit``, ``AuditEntry``, ``StoreUnavailable`` and :func:`~gate.store.counters.open_counter_store`, which
  builds the configured backend: SQLite embedded (one process), PostgreSQL (asyncpg) or Redis (redis-py asyncio).
  Backends are imported only when chosen, so a process that uses SQLite never loads asyncpg or redis.
"""
