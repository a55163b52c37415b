"""What operators see.

- ``gate.ops.health``: ``Health`` (Spring Boot's ``/actuator/health`` shape, liveness and readiness).
- ``gate.ops.telemetry``: ``Telemetry`` (OpenTelemetry traces and metrics, the Prometheus scrape).
- ``gate.ops.logs``: structured logs, redaction of credentials, the access line.
- ``gate.ops.redact``: the one rule for masking secrets (``redact``, ``mask_url``, ``mask_config``).
- ``gate.ops.errors``: Gate's own error answers in Anthropic's shape.
- ``gate.ops.bounds``: ``bounded`` (the length limit on request-derived text in logs, events and spans).
"""
