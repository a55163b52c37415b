"""Which upstream served each call: ``upstream`` and ``upstream_model`` (Gate's several upstreams).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade(schema: str, **_: Any) -> None:
    op.add_column("usage_events", sa.Column("upstream", sa.Text), schema=schema)
    op.add_column("usage_events", sa.Column("upstream_model", sa.Text), schema=schema)
    # Rows stored before this revision keep the two fields (when they had them) in ``data``.


def downgrade(schema: str, **_: Any) -> None:
    op.drop_column("usage_events", "upstream_model", schema=schema)
    op.drop_column("usage_events", "upstream", schema=schema)
