"""Shared state for many replicas: atomic counters with expiry, spend caps and the admin audit log.

Public surface: :class:`~gate.store.counters.CounterStore` (the protocol), ``Charge``, ``Overdrawn``,
``SpendLimit``, ``AuditEntry``, ``StoreUnavailable`` and :func:`~gate.store.counters.open_counter_store`, which
builds the configured backend: SQLite embedded (one process), PostgreSQL (asyncpg) or Redis (redis-py asyncio).
Backends are imported only when chosen, so a process that uses SQLite never loads asyncpg or redis. The
sign-in's key-value store with TTLs is ``gate.store.kv``, beside these.
"""
