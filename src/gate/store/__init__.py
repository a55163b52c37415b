"""Shared state with TTLs and atomic counters: ``gate.store.kv`` (``KeyValueStore``, SQLite or PostgreSQL)."""
