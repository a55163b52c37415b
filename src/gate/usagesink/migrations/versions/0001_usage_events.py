"""The usage_events table: one row per usage CloudEvent, keyed by the event id.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade(schema: str, **_: Any) -> None:
    op.create_table(
        "usage_events",
        sa.Column("event_id", sa.Text, primary_key=True),  # redelivery of an event never makes a second row
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("subject", sa.Text),
        sa.Column("groups", postgresql.ARRAY(sa.Text)),
        sa.Column("model", sa.Text),
        sa.Column("message_id", sa.Text),
        sa.Column("status", sa.Text),
        sa.Column("error_type", sa.Text),
        sa.Column("http_status", sa.Integer),
        sa.Column("stream", sa.Boolean),
        sa.Column("stop_reason", sa.Text),
        sa.Column("input_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("output_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("cache_creation_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("cache_creation_5m_tokens", sa.BigInteger),
        sa.Column("cache_creation_1h_tokens", sa.BigInteger),
        sa.Column("cache_read_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("total_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("web_search_requests", sa.Integer),
        sa.Column("web_fetch_requests", sa.Integer),
        sa.Column("cost", sa.Numeric),  # exact USD, unbounded precision: never a float
        sa.Column("price_version", sa.Text),
        sa.Column("latency_ms", sa.Integer),
        sa.Column("time_to_first_token_ms", sa.Integer),
        sa.Column("key_alias", sa.Text),
        sa.Column("trace_id", sa.Text),
        sa.Column("anthropic_request_id", sa.Text),
        sa.Column("service_tier", sa.Text),
        sa.Column("claude_code_session_id", sa.Text),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("event_source", sa.Text, nullable=False),
        sa.Column("data", postgresql.JSONB, nullable=False),  # the whole event data, fields added later included
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        schema=schema,
    )
    op.create_index("usage_events_time", "usage_events", ["event_time"], schema=schema)
    op.create_index("usage_events_subject_time", "usage_events", ["subject", "event_time"], schema=schema)
    op.create_index("usage_events_model_time", "usage_events", ["model", "event_time"], schema=schema)
    op.create_index("usage_events_groups", "usage_events", ["groups"], schema=schema, postgresql_using="gin")


def downgrade(schema: str, **_: Any) -> None:
    op.drop_table("usage_events", schema=schema)
