"""The usage sink (``gate usage-sink``): Gate's usage CloudEvents from RabbitMQ or Pub/Sub into PostgreSQL (and
BigQuery), exactly one row per event, with its own health, metrics and the usage report.

- ``gate.usagesink.service``: ``UsageSink`` (consume, batch, write, acknowledge after commit; HTTP) and ``run``.
- ``gate.usagesink.sources``: ``RabbitMQSource``, ``PubSubSource`` (reconnecting consumers), ``Delivery``.
- ``gate.usagesink.rows``: CloudEvent decoding (both content modes) and ``UsageRow``, the table's columns.
- ``gate.usagesink.postgres``: ``PostgresStore`` (idempotent batch writes) and ``migrate`` (Alembic).
- ``gate.usagesink.bigquery``: the BigQuery table schema and ``BigQueryLoader`` (insertAll, event id as insertId).
- ``gate.usagesink.report``: the report page and CSV export, for the admin group only.
"""
