"""Alembic's environment for the usage sink's schema: run by ``gate.usagesink.postgres.migrate`` (online only).

The caller passes an open SQLAlchemy connection in ``config.attributes["connection"]`` and the schema name in
``config.attributes["schema"]``; the version table lives in that schema too, so several sinks (or test runs) can
keep separate schemas in one database.
"""

from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes["connection"]
schema = config.attributes["schema"]

context.configure(
    connection=connection,
    target_metadata=None,
    version_table_schema=schema,
    transaction_per_migration=True,
)
with context.begin_transaction():
    context.run_migrations(schema=schema)
