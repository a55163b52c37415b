"""The usage meter (message_start + cumulative message_delta, or a JSON body) and the usage record.

CONTRACT (filled in by the sse/usage work): ``UsageMeter`` and ``UsageRecord`` below are what the relay and the
events package use. Field names of ``UsageRecord`` are the usage event's ``data`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class UsageRecord:
    """One upstream call's usage, as published in the CloudEvent's ``data`` (plus ``subject``)."""

    subject: str  # the JWT `sub`; becomes the CloudEvent subject, not a data field
    model: str | None
    message_id: str | None
    input_tokens: int
    output_tokens: int
    cache_creation_tokens: int
    cache_read_tokens: int
    latency_ms: int
    stream: bool
    stop_reason: str | None
    status: str  # "success" | "error" | "client_disconnected"
    error_type: str | None
    key_alias: str | None
    trace_id: str | None
    anthropic_request_id: str | None
    http_status: int | None = None
    time_to_first_token_ms: int | None = None
    cache_creation_5m_tokens: int | None = None
    cache_creation_1h_tokens: int | None = None
    web_search_requests: int | None = None
    web_fetch_requests: int | None = None
    service_tier: str | None = None
    claude_code_session_id: str | None = None
    event_id: str = ""  # CloudEvent id, made once when the record is made, stable across redeliveries
    time: str = ""  # RFC 3339 UTC with milliseconds, when the upstream call ended

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_creation_tokens + self.cache_read_tokens
