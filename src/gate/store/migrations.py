"""Numbered schema migrations for the SQL stores, recorded in ``gate_schema_migrations``.

Why not alembic: it needs SQLAlchemy, which Gate does not otherwise use, for three tables and two functions;
a numbered list applied in order under a lock (a PostgreSQL advisory lock, SQLite's ``BEGIN IMMEDIATE``) is the
same guarantee (each version once, in order, by one replica) in a screenful, as Anthropic's own gateway does with
its ``_migrations`` table. A migration is never edited once released: a change is a new number.
"""

from __future__ import annotations

__all__ = ["POSTGRES", "SQLITE"]

# Counters hold integers (spend in nano-dollars, requests, tokens); expires_at is epoch seconds.
SQLITE: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE gate_counters (
            key TEXT PRIMARY KEY,
            value INTEGER NOT NULL,
            expires_at REAL NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX gate_counters_expiry ON gate_counters (expires_at);
        CREATE TABLE gate_spend_limits (
            id TEXT PRIMARY KEY,
            scope_type TEXT NOT NULL,
            scope_id TEXT NOT NULL,
            period TEXT NOT NULL,
            amount INTEGER NOT NULL,
            currency TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            UNIQUE (scope_type, scope_id, period)
        );
        CREATE TABLE gate_admin_audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            before TEXT,
            after TEXT,
            reason TEXT
        );
        """,
    ),
]

POSTGRES: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE gate_counters (
            key text PRIMARY KEY,
            value bigint NOT NULL,
            expires_at double precision NOT NULL
        );
        CREATE INDEX gate_counters_expiry ON gate_counters (expires_at);
        CREATE TABLE gate_spend_limits (
            id text PRIMARY KEY,
            scope_type text NOT NULL,
            scope_id text NOT NULL,
            period text NOT NULL,
            amount bigint NOT NULL,
            currency text NOT NULL,
            created_by text NOT NULL,
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL,
            UNIQUE (scope_type, scope_id, period)
        );
        CREATE TABLE gate_admin_audit (
            id bigserial PRIMARY KEY,
            at double precision NOT NULL,
            actor text NOT NULL,
            action text NOT NULL,
            target text NOT NULL,
            before jsonb,
            after jsonb,
            reason text
        );
        """,
    ),
    (
        2,
        # Reserve several counters all or nothing, in one statement: make every row exist, lock them in key order
        # (so concurrent reservations cannot deadlock), check every limit, then add. A counter past its expiry
        # counts as zero and restarts.
        """
        CREATE FUNCTION gate_reserve(p_keys text[], p_amounts bigint[], p_limits bigint[], p_expires float8[])
        RETURNS TABLE (failed integer, current bigint)
        LANGUAGE plpgsql AS $$
        DECLARE
            now_s float8 := extract(epoch FROM clock_timestamp());
            i integer;
            v bigint;
        BEGIN
            INSERT INTO gate_counters (key, value, expires_at)
                SELECT t.k, 0, t.e FROM unnest(p_keys, p_expires) AS t(k, e) ORDER BY t.k
                ON CONFLICT (key) DO NOTHING;
            PERFORM 1 FROM gate_counters WHERE key = ANY (p_keys) ORDER BY key FOR UPDATE;
            FOR i IN 1 .. coalesce(array_length(p_keys, 1), 0) LOOP
                IF p_limits[i] IS NOT NULL THEN
                    SELECT CASE WHEN c.expires_at <= now_s THEN 0 ELSE c.value END INTO v
                        FROM gate_counters c WHERE c.key = p_keys[i];
                    IF v + p_amounts[i] > p_limits[i] THEN
                        failed := i;
                        current := v;
                        RETURN NEXT;
                        RETURN;
                    END IF;
                END IF;
            END LOOP;
            UPDATE gate_counters AS c
                SET value = CASE WHEN c.expires_at <= now_s THEN t.a ELSE c.value + t.a END,
                    expires_at = CASE WHEN c.expires_at <= now_s THEN t.e ELSE greatest(c.expires_at, t.e) END
                FROM unnest(p_keys, p_amounts, p_expires) AS t(k, a, e)
                WHERE c.key = t.k;
            failed := 0;
            current := 0;
            RETURN NEXT;
        END
        $$;

        -- Deltas in one statement, with the same lock order as gate_reserve. An expired counter restarts; a
        -- decrement never takes one below zero that way (a release after its counter expired).
        CREATE FUNCTION gate_add(p_keys text[], p_amounts bigint[], p_expires float8[])
        RETURNS void
        LANGUAGE plpgsql AS $$
        DECLARE
            now_s float8 := extract(epoch FROM clock_timestamp());
        BEGIN
            INSERT INTO gate_counters (key, value, expires_at)
                SELECT t.k, 0, t.e FROM unnest(p_keys, p_amounts, p_expires) AS t(k, a, e)
                WHERE t.a > 0 ORDER BY t.k
                ON CONFLICT (key) DO NOTHING;
            PERFORM 1 FROM gate_counters WHERE key = ANY (p_keys) ORDER BY key FOR UPDATE;
            UPDATE gate_counters AS c
                SET value = CASE WHEN c.expires_at <= now_s THEN greatest(t.a, 0) ELSE c.value + t.a END,
                    expires_at = CASE WHEN c.expires_at <= now_s THEN t.e ELSE greatest(c.expires_at, t.e) END
                FROM unnest(p_keys, p_amounts, p_expires) AS t(k, a, e)
                WHERE c.key = t.k;
        END
        $$;
        """,
    ),
]
