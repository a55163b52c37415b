"""Typed settings: packaged defaults, profile files, --config files, env vars and secret files, later wins.

Every leaf can be overridden from the environment in Spring Boot's relaxed form (upper case, dots and list
brackets become ``_``, dashes dropped: ``anthropic.api.keys[0].value`` is ``ANTHROPIC_API_KEYS_0_VALUE``) or by
its literal property name. ``NAME_FILE`` reads the value from a file (Kubernetes secret mounts), as does a
``${file:/path}`` placeholder in YAML. Placeholders are expanded in YAML only: a value from the environment or a
secret file is used as it is. Errors (unknown keys, wrong types, URLs and durations Gate cannot use) name the key
and the file or variable it came from.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "SEED_PROFILES",
    "ConfigError",
    "ConfigSources",
    "GateSettings",
    "KeyPath",
    "amqp_url_problem",
    "known_profiles",
    "load_settings",
    "load_with_sources",
    "parse_duration",
    "parse_size",
]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and where it came from.

    ``sources`` is what the loader had merged by then (None when it got no further than reading a file), so
    that ``gate config`` can still show it beside the errors.
    """

    def __init__(self, message: str, sources: ConfigSources | None = None) -> None:
        super().__init__(message)
        self.sources = sources


# ---------------------------------------------------------------------------------------------- value types

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|kib|mib|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1024,
    "mb": 1024**2,
    "gb": 1024**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def parse_duration(value: Any) -> float:
    """Seconds from Spring-style ``500ms``/``30s``/``5m``/``1h``/``2d`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration, such as 30s, 500ms or 5m")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 500ms, 5m or plain seconds)")
        seconds = float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "s").lower()]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from ``32MB``/``512KB``/a plain integer (KB and MB are binary, as in Spring's DataSize)."""
    if isinstance(value, bool):
        raise ValueError("a size, such as 32MB")
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (use e.g. 32MB, 16KB or plain bytes)")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


def _at_least(minimum: float, why: str) -> AfterValidator:
    """A duration floor: zero (or a few microseconds) is a value Gate cannot work with, and says why."""

    def check(seconds: float) -> float:
        if seconds < minimum or seconds <= 0:
            floor = "more than 0" if minimum <= 0 else f"at least {minimum * 1000:g}ms"
            raise ValueError(f"must be {floor}: {why}")
        return seconds

    return AfterValidator(check)


def parse_usd(value: Any) -> Decimal:
    """An exact, non-negative amount of USD: ``"0.30"``, ``3`` or ``0.3`` (a YAML float is read by its text)."""
    if isinstance(value, bool):
        raise ValueError("an amount of USD, such as 3.75")
    try:
        amount = Decimal(str(value).strip()) if isinstance(value, int | float | str) else Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        raise ValueError(f"not an amount of USD: {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError("an amount of USD must be a finite, non-negative number")
    return amount


def parse_instant(value: Any) -> datetime.datetime:
    """A point in time: a date (midnight UTC) or an ISO 8601 date-time (UTC unless it names its offset)."""
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"not a date or ISO 8601 date-time: {value!r}") from None
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=datetime.UTC)
    if isinstance(value, datetime.date):
        return datetime.datetime(value.year, value.month, value.day, tzinfo=datetime.UTC)
    raise ValueError(f"not a date or ISO 8601 date-time: {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration)]
# Positive: a zero timeout or interval fails every request (stream-idle: 0 cuts every stream) or spins a loop.
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), _at_least(0, "0 would expire at once")]
Size = Annotated[int, BeforeValidator(parse_size)]
Usd = Annotated[Decimal, BeforeValidator(parse_usd)]
Instant = Annotated[datetime.datetime, BeforeValidator(parse_instant)]


def _http_url_problem(value: str) -> str | None:
    """Why ``value`` is not an absolute http(s) URL with a host, or None."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    except ValueError:
        return "not a URL (a port that is not a number?)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http(s) URL with a host, such as https://idp.example.com/.well-known/jwks.json"
    return None


def amqp_url_problem(value: str) -> str | None:
    """Why ``value`` is not an AMQP URL the RabbitMQ client can use, or None (shared with the sink)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    except ValueError:
        return "not a URL (a port that is not a number?)"
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        return "not an AMQP URL: use amqp://user:password@host:5672/vhost (or amqps://)"
    return None


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=_kebab, populate_by_name=True, frozen=True, validate_default=True
    )


# ---------------------------------------------------------------------------------------------- sections


class ShutdownSettings(_Section):
    drain_timeout: Duration = 30.0  # in-flight requests and streams may finish within this
    flush_timeout: Duration = 5.0  # then the usage outbox gets this long to reach the broker


class LimitsSettings(_Section):
    max_body_size: Size = 32 * 1024 * 1024
    # Above security.jwt.max-token-length, so an oversized token reaches auth and gets its clean 401.
    max_header_size: Size = 64 * 1024
    header_timeout: PositiveDuration = 10.0  # a request whose headers have not all arrived by then: 408 / closed
    body_timeout: PositiveDuration = 60.0  # a body that stops arriving: 408
    # A client that takes no bytes of a streamed answer for this long is cut off (usage status client_timeout);
    # distinct from upstream's silence (anthropic.api.timeouts.stream-idle), which is Anthropic's fault.
    send_timeout: PositiveDuration = 120.0
    keep_alive_timeout: PositiveDuration = 75.0


class SslSettings(_Section):
    """TLS on Gate's own port, for deployments without a TLS-terminating ingress (PEM files, as Spring Boot's)."""

    certificate: str | None = None  # the server's certificate chain; TLS is on when this is set
    certificate_private_key: str | None = None
    trust_certificate: str | None = None  # CA bundle for client certificates (mutual TLS)
    client_auth: Literal["none", "want", "need"] | None = None  # None: "need" with a trust-certificate, else "none"

    @field_validator("certificate", "certificate_private_key", "trust_certificate", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _client_auth_needs_trust(self) -> SslSettings:
        if self.client_auth in ("want", "need") and self.trust_certificate is None:
            raise ValueError("client-auth want/need needs trust-certificate (the CA of the client certificates)")
        return self

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


class ServerSettings(_Section):
    host: str = Field("127.0.0.1", min_length=1)  # an empty host would bind every interface
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=256)
    shutdown: ShutdownSettings = ShutdownSettings()
    limits: LimitsSettings = LimitsSettings()
    ssl: SslSettings = SslSettings()


class ManagementServerSettings(_Section):
    port: int | None = Field(None, ge=0, le=65535)  # None: /actuator/* shares the main port
    host: str | None = None


class ManagementSettings(_Section):
    server: ManagementServerSettings = ManagementServerSettings()


class DevAuthSettings(_Section):
    enabled: bool = True  # only ever honoured with the `local` profile and no jwk-set-uri
    data_dir: str = "${XDG_DATA_HOME:~/.local/share}/gate"
    issuer: str = "gate-dev"


class ClaimSettings(_Section):
    """Which JWT claims name the caller's e-mail, display name and groups (IdPs differ: Entra's ``roles``, ...)."""

    email: str = "email"
    name: str = "name"
    groups: str = "groups"


class JwtSettings(_Section):
    jwk_set_uri: str | None = None
    leeway: Duration = 60.0
    refresh: PositiveDuration = 300.0
    min_refresh_interval: Duration = 10.0  # unknown-kid refreshes are at most this often
    fetch_timeout: PositiveDuration = 5.0
    # A token without `exp` would be good forever once issued (and cached 5 minutes at a time): refused unless
    # an identity provider that never sets `exp` is switched on deliberately.
    require_exp: bool = True
    issuer: str | None = None
    audiences: list[str] = []
    cache_size: int = Field(10_000, ge=0)
    max_token_length: Size = 16 * 1024
    claims: ClaimSettings = ClaimSettings()
    dev: DevAuthSettings = DevAuthSettings()

    @field_validator("jwk_set_uri", "issuer", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("jwk_set_uri")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        problem = None if value is None else _http_url_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class SecuritySettings(_Section):
    jwt: JwtSettings = JwtSettings()


class ApiKey(_Section):
    alias: str = Field(min_length=1)
    value: SecretStr = SecretStr("")
    # The Anthropic organisation the key belongs to: the prompt cache is per organisation, so session affinity
    # picks an organisation and round-robins among its keys. None: the key is an organisation of its own.
    organization: str | None = None


class TimeoutSettings(_Section):
    connect: PositiveDuration = 10.0
    response_headers: PositiveDuration = 600.0
    stream_idle: PositiveDuration = 300.0


class KeyHealthSettings(_Section):
    rate_limit_cooldown: Duration = 30.0  # when a 429 carries no retry-after
    max_cooldown: Duration = 3600.0
    quarantine: PositiveDuration = 3600.0  # longest rest of a key Anthropic rejected (401), between background probes
    probe_interval: PositiveDuration = 30.0  # first re-probe of a quarantined key after the immediate one; doubles


class RetrySettings(_Section):
    key_attempts: int = Field(2, ge=1, le=10)  # attempts across keys on 429/401 before the first byte
    connect_attempts: int = Field(2, ge=1, le=10)  # attempts on a connection failure


class KeyFilesSettings(_Section):
    """A directory of key files (a mounted Kubernetes Secret): file name = alias, content = key; re-read live."""

    dir: str | None = None  # blank: off (so an environment variable can switch off a profile's directory)
    poll_interval: Duration = Field(2.0, gt=0)  # SIGHUP re-reads at once

    @field_validator("dir", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


class AnthropicApiSettings(_Section):
    base_url: str = "https://api.anthropic.com"
    keys: list[ApiKey] = []
    key_files: KeyFilesSettings = KeyFilesSettings()
    default_version: str = "2023-06-01"
    pool_size: int = Field(0, ge=0)  # 0: unlimited connections to upstream
    # An idle connection is reused this long at most, so Gate lets go of it before a load balancer or proxy on the
    # way closes it under a request (the smallest common idle limits are 5 s: Node.js, Apache, uvicorn). 0: never.
    pool_idle_timeout: Duration = 4.0
    # Bytes of header names and values in one upstream response head (and at most 128 fields); more is a 502.
    # 16 KB is what Node's HTTP parser, hence Claude Code, reads by default: a larger head would not reach it.
    max_response_header_size: Size = Field(16 * 1024, ge=1024)
    use_env_proxy: bool = True  # honour HTTPS_PROXY / NO_PROXY (corporate egress proxies)
    timeouts: TimeoutSettings = TimeoutSettings()
    key_health: KeyHealthSettings = KeyHealthSettings()
    retry: RetrySettings = RetrySettings()
    # session-affinity: a Claude Code session keeps its key's organisation (its prompt cache) while it is healthy
    key_selection: Literal["round-robin", "session-affinity"] = "round-robin"

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        """An origin, optionally with a path prefix for a reverse proxy in front of Anthropic
        (``https://egress.example.com/anthropic``), which the client puts before every request's path. The
        client's own path already starts with ``/v1``, so a base URL ending in ``/v1`` would call ``/v1/v1/...``
        and every call would be a 404; user info, a query or a fragment would be silently dropped."""
        problem = _http_url_problem(value)
        if problem:
            raise ValueError(problem.replace("idp.example.com/.well-known/jwks.json", "api.anthropic.com"))
        parts = urlsplit(value)
        if parts.username is not None or parts.password is not None:
            raise ValueError("user info (user:password@) is not sent upstream; Gate injects the Anthropic key")
        if parts.query or parts.fragment:
            raise ValueError("a base URL takes no query or fragment")
        if re.search(r"/v1(/|$)", parts.path):
            raise ValueError("leave out /v1: Gate forwards the client's path, which starts with /v1 already")
        return value.rstrip("/")

    @field_validator("keys")
    @classmethod
    def _unique_aliases(cls, keys: list[ApiKey]) -> list[ApiKey]:
        aliases = [k.alias for k in keys]
        duplicates = sorted({a for a in aliases if aliases.count(a) > 1})
        if duplicates:
            raise ValueError(f"key aliases must be unique; repeated: {', '.join(duplicates)}")
        return keys

    @property
    def usable_keys(self) -> list[ApiKey]:
        """Keys with a value: the seed's ``${X:}`` idiom leaves unset ones out of the pool."""
        return [k for k in self.keys if k.value.get_secret_value().strip()]


class AnthropicSettings(_Section):
    api: AnthropicApiSettings = AnthropicApiSettings()


class CircuitBreakerSettings(_Section):
    enabled: bool = True
    sliding_window_size: int = Field(100, ge=1)
    minimum_number_of_calls: int = Field(20, ge=1)
    failure_rate_threshold: float = Field(50.0, gt=0, le=100)
    slow_call_rate_threshold: float = Field(100.0, gt=0, le=100)
    slow_call_duration_threshold: PositiveDuration = 30.0
    wait_duration_in_open_state: PositiveDuration = 60.0
    permitted_number_of_calls_in_half_open_state: int = Field(10, ge=1)


class ResilienceSettings(_Section):
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()


UpstreamType = Literal["anthropic", "vertex", "bedrock", "foundry"]
_UPSTREAM_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class UpstreamSettings(_Section):
    """One entry of ``upstreams:``: where a call may go, tried in list order (see README, Upstreams).

    Credentials by type: ``anthropic`` uses the key pool of ``anthropic.api``; ``vertex`` a service-account file
    (``credentials-file``) or Application Default Credentials; ``bedrock`` ``access-key-id``/``secret-access-key``
    (``session-token``), a Bedrock ``api-key``, or the standard AWS credential chain; ``foundry`` an ``api-key``,
    a static Entra ID ``token`` or a ``token-file`` (re-read when it changes).
    """

    name: str = Field(pattern=_UPSTREAM_NAME)
    type: UpstreamType
    base_url: str | None = None  # None: the type's public endpoint (anthropic: anthropic.api.base-url)
    # Anthropic model id (or a prefix ending in ``*``) -> this upstream's id; empty: every model, ids unchanged.
    models: dict[str, str] = {}
    # anthropic-beta values this upstream honours; None: every one is carried, [] refuses them all.
    betas: list[str] | None = None
    circuit_breaker: CircuitBreakerSettings | None = None  # None: resilience.circuit-breaker
    project_id: str | None = None  # vertex
    region: str | None = None  # vertex (or "global"), bedrock
    credentials_file: str | None = None  # vertex: a service-account JSON file; None: ADC
    access_key_id: SecretStr | None = None  # bedrock
    secret_access_key: SecretStr | None = None  # bedrock
    session_token: SecretStr | None = None  # bedrock
    profile: str | None = None  # bedrock: a named profile of the AWS config files
    api_key: SecretStr | None = None  # bedrock (Bedrock API key), foundry
    resource: str | None = None  # foundry: the Azure AI Foundry resource name
    token: SecretStr | None = None  # foundry: a static Entra ID bearer token
    token_file: str | None = None  # foundry: a file holding the Entra ID token (workload identity)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"not an http(s) URL: {value!r}")
        return value.rstrip("/")

    @field_validator("models")
    @classmethod
    def _model_ids(cls, models: dict[str, str]) -> dict[str, str]:
        for source, target in models.items():
            if not source.strip("*") or not target.strip():
                raise ValueError(f"models: an empty model id in {source!r}: {target!r}")
            if "*" in source[:-1] or "*" in target:
                raise ValueError(f"models: {source!r}: only a trailing * (a prefix) is allowed, on the left")
        return models

    @model_validator(mode="after")
    def _credentials(self) -> UpstreamSettings:
        def present(value: SecretStr | str | None) -> bool:
            text = value.get_secret_value() if isinstance(value, SecretStr) else value
            return bool(text and text.strip())

        missing: list[str] = []
        if self.type == "vertex":
            missing = [name for name in ("project_id", "region") if not present(getattr(self, name))]
        elif self.type == "bedrock":
            if not present(self.region):
                missing.append("region")
            if present(self.access_key_id) != present(self.secret_access_key):
                raise ValueError("bedrock: access-key-id and secret-access-key go together")
        elif self.type == "foundry":
            if not present(self.resource) and self.base_url is None:
                missing.append("resource (or base-url)")
            if not (present(self.api_key) or present(self.token) or present(self.token_file)):
                missing.append("api-key, token or token-file")
        if missing:
            raise ValueError(f"{self.type} upstream {self.name!r} needs {', '.join(_kebab(m) for m in missing)}")
        return self

    def endpoint(self) -> str:
        """The base URL calls go to: configured, or the type's public endpoint."""
        if self.base_url is not None:
            return self.base_url
        if self.type == "vertex":
            region = self.region or "global"
            return (
                "https://aiplatform.googleapis.com"
                if region == "global"
                else f"https://{region}-aiplatform.googleapis.com"
            )
        if self.type == "bedrock":
            return f"https://bedrock-runtime.{self.region}.amazonaws.com"
        if self.type == "foundry":
            return f"https://{self.resource}.services.ai.azure.com/anthropic"
        raise ValueError("an anthropic upstream takes anthropic.api.base-url")


class RabbitMQSettings(_Section):
    url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    routing_key: str = "usage"
    confirm_timeout: PositiveDuration = 10.0

    @field_validator("url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        problem = amqp_url_problem(value.get_secret_value())
        if problem:
            raise ValueError(problem)
        return value


class PubSubSettings(_Section):
    project_id: str = "gate-local"
    emulator_host: str | None = None  # else PUBSUB_EMULATOR_HOST, else Google's endpoint
    create_topic: bool = False
    publish_timeout: PositiveDuration = 10.0  # the client retries transient errors this long; then the outbox retries


class FileSinkSettings(_Section):
    path: str = "./data/usage-events.jsonl"


class OutboxSettings(_Section):
    path: str = "./data/usage-outbox.sqlite3"
    max_events: int = Field(1_000_000, ge=1)
    alarm_ratio: float = Field(0.8, gt=0, le=1)  # health turns DOWN/alarm at this fraction of max-events
    # Events are durable within about this (SIGKILL loses ~2x this at most). The writer thread wakes this often
    # even when idle: at 0 an idle Gate spent 70 % of a core.
    commit_interval: Annotated[Duration, _at_least(0.005, "the outbox writer wakes this often, even when idle")] = 0.025
    batch_size: int = Field(500, ge=1)
    retry_initial: PositiveDuration = 0.5
    retry_max: PositiveDuration = 30.0


class UsageSettings(_Section):
    publisher: Literal["rabbitmq", "pubsub", "file", "log", "none"] = "rabbitmq"
    destination: str = "llm-gateway-usage"
    event_type: str = Field("io.github.samzhu.gate.usage.v1", min_length=1)
    event_source: str = Field("/gate/messages", min_length=1)
    # None: each sink's convention, structured for RabbitMQ and binary (ce-* attributes) for Pub/Sub.
    content_mode: Literal["structured", "binary"] | None = None
    # loop: events are built, committed and delivered in the request process (its writer thread and event loop);
    # process: by a child process of each Gate process (events/delivery.py), worth it only when each Gate process
    # has a core to spare: on a shared core it cost 6-20 % of the throughput at c=50 (benchmarks/ANALYSIS.md).
    delivery: Literal["loop", "process"] = "loop"
    rabbitmq: RabbitMQSettings = RabbitMQSettings()
    pubsub: PubSubSettings = PubSubSettings()
    file: FileSinkSettings = FileSinkSettings()
    outbox: OutboxSettings = OutboxSettings()


class MetricsSettings(_Section):
    enabled: bool = True
    user_label: bool = False


class TracingSettings(_Section):
    enabled: bool = True
    user_attribute: str | None = "user.id"  # None or "" switches the user attribute off


class LoggingSettings(_Section):
    format: Literal["json", "console"] = "json"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = True


class ObservabilitySettings(_Section):
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    logging: LoggingSettings = LoggingSettings()


# ---------------------------------------------------------------------------------------------- limits

SpendPeriod = Literal["daily", "weekly", "monthly"]
ScopeType = Literal["user", "rbac_group", "organization"]


class SqliteStoreSettings(_Section):
    path: str = "./data/limits.sqlite3"


class PostgresStoreSettings(_Section):
    url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/postgres")
    schema_: str = Field("gate", alias="schema", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    pool_size: int = Field(10, ge=1, le=200)


class RedisStoreSettings(_Section):
    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    key_prefix: str = "gate:"
    pool_size: int = Field(50, ge=1, le=1000)


class CounterStoreSettings(_Section):
    """Where counters, caps and the audit log live: ``sqlite`` for one process, the others for replicas."""

    type: Literal["sqlite", "postgresql", "redis"] = "sqlite"
    on_failure: Literal["open", "closed"] = "open"  # store unreachable: admit unchecked, or refuse (503)
    timeout: Duration = 1.0  # each store operation; past it the store counts as down
    sqlite: SqliteStoreSettings = SqliteStoreSettings()
    postgresql: PostgresStoreSettings = PostgresStoreSettings()
    redis: RedisStoreSettings = RedisStoreSettings()


class SpendCapSettings(_Section):
    """A cap from configuration; the admin API's caps win over one with the same scope and period."""

    scope_type: ScopeType
    scope_id: str = "*"  # a user's sub or a group's name; "*": every user without a cap of their own
    period: SpendPeriod
    amount_usd: Decimal = Field(ge=0)


class RateSettings(_Section):
    requests_per_minute: int = Field(0, ge=0)  # 0: no limit
    tokens_per_minute: int = Field(0, ge=0)  # input + output + cache writes; cache reads do not count
    concurrent_streams: int = Field(0, ge=0)  # users only


class RateLimitSettings(_Section):
    user: RateSettings = RateSettings()  # every user, each on their own
    users: dict[str, RateSettings] = {}  # per-user overrides, by sub
    groups: dict[str, RateSettings] = {}  # shared by all members of the group


class EstimateSettings(_Section):
    # Request bytes per input token when reserving: lower is more cautious (JSON text runs about 3-4).
    bytes_per_token: float = Field(3.0, gt=0)
    default_max_tokens: int = Field(4096, ge=1)  # when a request names none


class UsageLimitsSettings(_Section):
    enabled: bool = False
    store: CounterStoreSettings = CounterStoreSettings()
    time_zone: str = "UTC"  # where days, weeks (ISO, from Monday) and months begin
    retention: Duration = 400 * 86400.0  # spend counters are kept this long after their period ends
    admin_group: str | None = None  # members (security.jwt.claims.groups) may use the spend-limits admin API
    caps_refresh: Duration = 5.0  # each replica reloads the admin API's caps this often
    estimate: EstimateSettings = EstimateSettings()
    spend_caps: list[SpendCapSettings] = []
    rate: RateLimitSettings = RateLimitSettings()

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as UTC or Europe/Paris)") from None
        return value


class LongPromptSettings(_Section):
    """Token prices for a request whose prompt (input + cache reads + cache writes) is over ``threshold_tokens``:
    they price every token of that request, output included. Web search keeps the version's price."""

    threshold_tokens: int = Field(ge=1)  # a prompt of this many tokens or fewer pays the version's own prices
    input: Usd
    output: Usd
    cache_write_5m: Usd
    cache_write_1h: Usd
    cache_read: Usd


class PriceVersionSettings(_Section):
    """One version of a model's prices: tokens in USD per million, web search in USD per 1,000 requests."""

    effective_from: Instant  # applies to calls at or after this instant, until a later version takes over
    version: str | None = None  # the label events carry as price_version; default "<pattern>@<date>"
    input: Usd
    output: Usd
    cache_write_5m: Usd
    cache_write_1h: Usd
    cache_read: Usd
    web_search: Usd
    long_prompt: LongPromptSettings | None = None  # prices by prompt length (Anthropic's Haiku 5.5 style)


class ModelPriceSettings(_Section):
    """Prices for the models matching any of ``match``: an exact id, or a prefix ending in ``*``."""

    match: list[str] = Field(min_length=1)
    versions: list[PriceVersionSettings] = Field(min_length=1)

    @field_validator("match")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if not pattern.strip() or pattern == "*" or "*" in pattern[:-1]:
                raise ValueError(f"not a model id or prefix* pattern: {pattern!r}")
        return patterns

    @field_validator("versions")
    @classmethod
    def _distinct_dates(cls, versions: list[PriceVersionSettings]) -> list[PriceVersionSettings]:
        starts = [v.effective_from for v in versions]
        if len(set(starts)) != len(starts):
            raise ValueError("two versions take effect at the same instant")
        return versions


class PricesSettings(_Section):
    """The price table: per model pattern, per token type, versioned by effective date (``gate.accounting.prices``)."""

    models: list[ModelPriceSettings] = []

    @field_validator("models")
    @classmethod
    def _each_pattern_once(cls, models: list[ModelPriceSettings]) -> list[ModelPriceSettings]:
        patterns = [p for entry in models for p in entry.match]
        repeated = sorted({p for p in patterns if patterns.count(p) > 1})
        if repeated:
            raise ValueError(f"a model pattern may appear in one entry only; repeated: {', '.join(repeated)}")
        return models


class SinkRabbitMQSettings(_Section):
    url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    queue: str = Field("gate-usage-sink", min_length=1)  # durable, bound to usage.destination
    binding_key: str = "#"
    prefetch: int = Field(500, ge=1, le=65535)  # unacknowledged messages in flight: a batch at most this big


class SinkPubSubSettings(_Section):
    project_id: str = "gate-local"
    subscription: str = Field("gate-usage-sink", min_length=1)  # created on usage.destination if missing
    emulator_host: str | None = None  # else PUBSUB_EMULATOR_HOST, else Google's endpoint
    max_messages: int = Field(500, ge=1)  # flow control: messages held unacknowledged at most


class SinkDatabaseSettings(_Section):
    url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/gate")
    schema_name: str = Field("public", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    migrate: bool = True  # apply the schema migrations at start (else: `gate usage-sink --migrate-only` first)
    connect_timeout: Duration = 10.0


class SinkBigQuerySettings(_Section):
    project_id: str | None = None  # None: the credentials' project
    dataset: str = "gate"
    table: str = "usage_events"
    create_table: bool = False  # create the partitioned, clustered table if missing

    @field_validator("project_id", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


class SinkReportSettings(_Section):
    enabled: bool = True
    admin_group: str = Field("gate-admins", min_length=1)  # only callers in this group see the report


class SinkServerSettings(_Section):
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8081, ge=0, le=65535)


class UsageSinkSettings(_Section):
    """``gate usage-sink``: usage events from the broker into PostgreSQL (and BigQuery), and the usage report."""

    source: Literal["rabbitmq", "pubsub"] = "rabbitmq"
    targets: list[Literal["postgresql", "bigquery"]] = Field(["postgresql"], min_length=1)
    batch_size: int = Field(200, ge=1)
    batch_linger: Duration = 0.05  # a batch is written when full or this long after its first event
    retry_initial: Duration = 0.5
    retry_max: Duration = 30.0
    rabbitmq: SinkRabbitMQSettings = SinkRabbitMQSettings()
    pubsub: SinkPubSubSettings = SinkPubSubSettings()
    database: SinkDatabaseSettings = SinkDatabaseSettings()
    bigquery: SinkBigQuerySettings = SinkBigQuerySettings()
    report: SinkReportSettings = SinkReportSettings()
    server: SinkServerSettings = SinkServerSettings()


# ---------------------------------------------------------------------------------------------- sign-in (Claude Code)


class StoreSettings(_Section):
    """Shared state with TTLs: sign-in device grants, refresh bookkeeping, rate-limit counters, session keys."""

    backend: Literal["sqlite", "postgres"] = "sqlite"
    sqlite_path: str = "./data/gate-store.sqlite3"
    postgres_url: SecretStr = SecretStr("")
    # Fernet keys (``Fernet.generate_key()``); the first encrypts, all decrypt (rotation). Empty: with SQLite a
    # key is generated beside the database file; PostgreSQL (several replicas) needs them configured.
    encryption_keys: list[SecretStr] = []
    sweep_interval: Duration = 30.0

    @field_validator("encryption_keys")
    @classmethod
    def _fernet_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        from cryptography.fernet import Fernet

        for index, key in enumerate(keys):
            try:
                Fernet(key.get_secret_value().encode())
            except (ValueError, TypeError):
                raise ValueError(f"encryption key #{index} is not a Fernet key (32 url-safe base64 bytes)") from None
        return keys

    @model_validator(mode="after")
    def _postgres_needs(self) -> StoreSettings:
        if self.backend == "postgres":
            if not self.postgres_url.get_secret_value().strip():
                raise ValueError("store.backend is postgres but store.postgres-url is empty")
            if not self.encryption_keys:
                raise ValueError("store.backend postgres needs store.encryption-keys (shared by every replica)")
        return self


class IdentityProviderSettings(_Section):
    """The company IdP that people sign in with (OpenID Connect, discovered from ``issuer``)."""

    issuer: str | None = None
    client_id: str = ""
    client_secret: SecretStr = SecretStr("")
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    scopes: list[str] = ["openid", "profile", "email", "offline_access"]
    prompt: str | None = None  # e.g. "consent": some IdPs grant offline_access (a refresh token) only then
    claims: ClaimSettings = ClaimSettings()
    require_verified_email: bool = True  # refuse an id_token whose email_verified is false
    timeout: Duration = 5.0


class SessionSigningKey(_Section):
    kid: str = Field(min_length=1, max_length=64)
    private_key: SecretStr  # PEM private key: RSA (>= 2048 bits, RS256) or Ed25519 (EdDSA)


class SessionSettings(_Section):
    lifetime: Duration = 3600.0
    refresh_lifetime: Duration = 30 * 86400.0  # an unused refresh token is forgotten after this
    # A refresh token used again this soon after its refresh gets the same answer: two Claude Code processes
    # sharing one credentials file refresh at the same moment, and the slower one must not lose the session.
    refresh_reuse_grace: Duration = 30.0
    # The first signs, every one verifies (rotation). Empty: one is generated and kept (encrypted) in the store.
    signing_keys: list[SessionSigningKey] = []

    @field_validator("lifetime")
    @classmethod
    def _lifetime(cls, value: float) -> float:
        if not 60 <= value <= 86400:
            raise ValueError("between 1m and 24h")
        return value


class DeviceFlowSettings(_Section):
    code_lifetime: Duration = 600.0
    poll_interval: int = Field(5, ge=1, le=60)  # seconds, as RFC 8628 counts them


class SignInLimitSettings(_Section):
    """Per client address, per ``window`` (RFC 8628 section 5.1)."""

    window: Duration = 600.0
    device_authorizations: int = Field(30, ge=1)
    device_posts: int = Field(10, ge=1)
    token_requests: int = Field(600, ge=1)


class TelemetryDestination(_Section):
    url: str
    headers: dict[str, SecretStr] = {}
    signals: list[Literal["metrics", "logs", "traces"]] = ["metrics", "logs", "traces"]

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"not an http(s) URL: {value!r}")
        return value.rstrip("/")


class TelemetryRelaySettings(_Section):
    """Where Claude Code's own OTLP telemetry (``/v1/metrics|logs|traces``) goes; never used for billing."""

    forward_to: list[TelemetryDestination] = []
    timeout: Duration = 10.0
    max_in_flight: int = Field(128, ge=1)


class SignInSettings(_Section):
    """Claude Code's gateway sign-in (``/login`` -> Cloud gateway): device flow, IdP, Gate sessions."""

    enabled: bool = False
    public_url: str | None = None  # how people and Claude Code reach Gate; the issuer of its session tokens
    idp: IdentityProviderSettings = IdentityProviderSettings()
    allowed_email_domains: list[str] = []  # empty: any
    allowed_groups: list[str] = []  # empty: any
    session: SessionSettings = SessionSettings()
    device: DeviceFlowSettings = DeviceFlowSettings()
    limits: SignInLimitSettings = SignInLimitSettings()
    telemetry: TelemetryRelaySettings = TelemetryRelaySettings()

    @field_validator("public_url", mode="before")
    @classmethod
    def _public_url(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().rstrip("/") or None
            if value is not None and not re.match(r"^https?://[^/\s?#]+$", value):
                raise ValueError(f"an origin such as https://gate.example.com, without a path (got {value!r})")
        return value

    @model_validator(mode="after")
    def _complete(self) -> SignInSettings:
        if self.enabled:
            missing = [
                name
                for name, value in (
                    ("sign-in.public-url", self.public_url),
                    ("sign-in.idp.issuer", self.idp.issuer),
                    ("sign-in.idp.client-id", self.idp.client_id),
                )
                if not value
            ]
            if missing:
                raise ValueError(
                    f"sign-in is enabled but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set"
                )
            if "openid" not in self.idp.scopes:
                raise ValueError("sign-in.idp.scopes must include openid")
        return self


class PolicyMatch(_Section):
    groups: list[str] = []
    email_domains: list[str] = []


class PolicySettings(_Section):
    """What callers may do by group and e-mail domain; a policy with an empty ``match`` is the catch-all base."""

    name: str = Field(min_length=1)
    match: PolicyMatch = PolicyMatch()
    models: list[str] | None = None  # exact ids, or prefixes ending in '*'; None: no restriction from this policy
    managed_settings: dict[str, Any] | None = None  # Claude Code's managed-settings.json for these callers


class GateSettings(_Section):
    """The whole configuration. ``profiles`` and ``sources`` are filled in by the loader."""

    server: ServerSettings = ServerSettings()
    management: ManagementSettings = ManagementSettings()
    security: SecuritySettings = SecuritySettings()
    anthropic: AnthropicSettings = AnthropicSettings()
    resilience: ResilienceSettings = ResilienceSettings()
    usage: UsageSettings = UsageSettings()
    prices: PricesSettings = PricesSettings()
    usage_sink: UsageSinkSettings = UsageSinkSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    sign_in: SignInSettings = SignInSettings()
    store: StoreSettings = StoreSettings()
    policies: list[PolicySettings] = []
    # Ordered: a call goes to the first that serves its model, then fails over down the list. Empty: one
    # ``anthropic`` upstream built from anthropic.api (the single-upstream case).
    upstreams: list[UpstreamSettings] = []
    limits: UsageLimitsSettings = UsageLimitsSettings()
    profiles: tuple[str, ...] = ("local",)
    sources: tuple[str, ...] = ()

    @field_validator("upstreams")
    @classmethod
    def _unique_upstreams(cls, upstreams: list[UpstreamSettings]) -> list[UpstreamSettings]:
        names = [u.name for u in upstreams]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"upstream names must be unique; repeated: {', '.join(duplicates)}")
        if sum(u.type == "anthropic" for u in upstreams) > 1:
            raise ValueError("at most one anthropic upstream (it uses the key pool of anthropic.api)")
        return upstreams

    @property
    def effective_upstreams(self) -> list[UpstreamSettings]:
        """``upstreams``, or the single ``anthropic`` upstream of anthropic.api when none are listed."""
        return self.upstreams or [UpstreamSettings(name="anthropic", type="anthropic")]

    @property
    def dev_auth(self) -> bool:
        """Development auth: only with the `local` profile and no JWKS configured."""
        jwt = self.security.jwt
        return jwt.jwk_set_uri is None and "local" in self.profiles and jwt.dev.enabled

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data, every secret masked (:func:`gate.ops.redact.mask_config`)."""
        from gate.ops.redact import mask_config

        data: dict[str, Any] = mask_config(self.model_dump(mode="python", by_alias=True, exclude={"sources"}))
        return {key: _decimals_as_text(value) for key, value in data.items()}


def _decimals_as_text(value: Any) -> Any:
    """Prices as their exact text: plain data that any YAML or JSON writer takes."""
    if isinstance(value, dict):
        return {key: _decimals_as_text(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decimals_as_text(item) for item in value]
    return str(value) if isinstance(value, Decimal) else value


# ---------------------------------------------------------------------------------------------- loading

# The environments the seed deployment names; a profile outside these, the packaged ones and ./config/'s is
# probably a typo (`--profile prdo`) and is warned about, not refused: a profile may exist only to be named.
SEED_PROFILES: tuple[str, ...] = ("lab", "sit", "uat", "prod", "gcp", "local")

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class ConfigSources:
    """What the loader merged (plain data, before validation) and, for every leaf, where it came from."""

    data: Mapping[str, Any]
    origin: Mapping[KeyPath, str]
    warnings: tuple[str, ...] = ()

    def source_of(self, path: KeyPath) -> str:
        """The file or variable that set ``path`` (or the list holding it); ``default`` when none did."""
        for length in range(len(path), 0, -1):
            found = self.origin.get(path[:length])
            if found:
                return found
        return "default"


@dataclass
class _Layers:
    """Merged raw data and, for every leaf path, the source that set it last."""

    data: dict[str, Any] = field(default_factory=dict)
    origin: dict[tuple[str | int, ...], str] = field(default_factory=dict)

    def merge(self, incoming: Mapping[str, Any], source: str) -> None:
        _merge_into(self.data, incoming, (), source, self.origin)


def _merge_into(
    target: dict[str, Any],
    incoming: Mapping[str, Any],
    prefix: tuple[str | int, ...],
    source: str,
    origin: dict[tuple[str | int, ...], str],
) -> None:
    for raw_key, value in incoming.items():
        key = str(raw_key)
        path = (*prefix, key)
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge_into(target[key], value, path, source, origin)
        else:
            # Lists replace wholesale, as in Spring: a profile's `keys` is the whole pool.
            target[key] = _plain(value)
            for stale in [p for p in origin if p[: len(path)] == path]:
                del origin[stale]
            for leaf in _leaf_paths(value, path):
                origin[leaf] = source


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _leaf_paths(value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[str | int, ...]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _leaf_paths(v, (*path, str(k)))
    elif isinstance(value, list):
        yield path
        for i, v in enumerate(value):
            yield from _leaf_paths(v, (*path, i))
    else:
        yield path


_PLACEHOLDER_NAME = re.compile(r"\$\{(?!file:)([^}:]+)")


def _placeholder_origins(raw: Any, env: Mapping[str, str], source: str) -> Iterator[tuple[KeyPath, str]]:
    """``source via ${NAME}`` for each leaf a set variable filled in (``source, ${NAME} unset`` when its default
    did): the file alone would not tell the operator which variable to look at."""
    for path, value in _leaves(raw, ()):
        if not isinstance(value, str) or "${" not in value:
            continue
        names = list(dict.fromkeys(name.strip() for name in _PLACEHOLDER_NAME.findall(value)))
        used = [name for name in names if env.get(name)]
        if used:
            yield path, f"{source} via {', '.join(f'${{{name}}}' for name in used)}"
        elif names:
            yield path, f"{source}, {', '.join(f'${{{name}}}' for name in names)} unset"


def _leaves(value: Any, path: KeyPath) -> Iterator[tuple[KeyPath, Any]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _leaves(v, (*path, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))
    else:
        yield path, value


def _resolve(value: Any, env: Mapping[str, str], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, env, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, env, where) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    resolved = _substitute(value, env, where)
    return os.path.expanduser(resolved) if resolved.startswith("~/") else resolved


def _substitute(text: str, env: Mapping[str, str], where: str) -> str:
    """``text`` with each ``${NAME}``, ``${NAME:default}`` and ``${file:/path}`` replaced.

    Defaults may nest placeholders (``${A:${B:x}}``), as in Spring. Unlike Spring, a variable set to the empty
    string counts as unset when there is a default (as the shell's ``${A:-x}``): ``GATE_HOST=`` from a compose
    file must not bind every interface, nor ``XDG_DATA_HOME=`` put the dev key in ``/gate``. A value taken from
    the environment or a file is used as it is: a password may well contain ``${``.
    """
    out: list[str] = []
    position = 0
    while (start := text.find("${", position)) >= 0:
        end = _closing_brace(text, start + 2)
        if end < 0:
            break  # unterminated: left as written
        out.append(text[position:start])
        out.append(_placeholder(text[start + 2 : end], env, where))
        position = end + 1
    out.append(text[position:])
    return "".join(out)


def _closing_brace(text: str, position: int) -> int:
    depth = 1
    while position < len(text):
        if text.startswith("${", position):
            depth += 1
            position += 2
            continue
        if text[position] == "}":
            depth -= 1
            if depth == 0:
                return position
        position += 1
    return -1


def _placeholder(body: str, env: Mapping[str, str], where: str) -> str:
    if body.startswith("file:"):
        return _read_secret_file(_substitute(body[5:], env, where).strip(), where)
    name, has_default, default = body.partition(":")
    name = name.strip()
    value = env.get(name)
    if value or (value is not None and not has_default):
        return value
    if not has_default:
        raise ConfigError(f"{where}: placeholder ${{{name}}} has no default and {name} is not set")
    resolved = _substitute(default, env, where)
    return os.path.expanduser(resolved) if resolved.startswith("~") else resolved


def _read_secret_file(path: str, where: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read secret file {path}: {exc.strerror}") from None


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    return data


def _packaged(name: str) -> str | None:
    resource = resources.files("gate").joinpath("config", name)
    return resource.read_text(encoding="utf-8") if resource.is_file() else None


# Env names: Spring's relaxed binding of every leaf that the schema knows.


def _env_name(path: tuple[str | int, ...]) -> str:
    return "_".join(str(p).replace("-", "").upper() for p in path)


def _schema_leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], bool]]:
    """(path, is_list_of_sections) for every settable property; list items are handled by index."""
    for name, info in model.model_fields.items():
        if name in {"profiles", "sources"}:
            continue
        alias = info.alias or name
        ann = info.annotation
        path = (*prefix, alias)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _schema_leaves(ann, path)
        elif getattr(ann, "__origin__", None) is list and _section_item(ann) is not None:
            yield path, True
        else:
            yield path, False


def _section_item(ann: Any) -> type[BaseModel] | None:
    args = getattr(ann, "__args__", ())
    if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None


def _env_overrides(env: Mapping[str, str]) -> list[tuple[tuple[str | int, ...], str, str]]:
    """(path, value, variable) for every variable that names a known property."""
    simple: dict[str, tuple[str | int, ...]] = {}  # env name or dotted name -> property path
    lists: list[tuple[tuple[str, ...], type[BaseModel]]] = []
    for path, is_list in _schema_leaves(GateSettings):
        if is_list:
            item = _section_item(_field_annotation(path))
            assert item is not None
            lists.append((path, item))
        else:
            simple[_env_name(path)] = path
            simple[".".join(path)] = path
    found: list[tuple[tuple[str | int, ...], str, str]] = []
    for var, raw in env.items():
        name, value = var, raw
        if var.endswith("_FILE") and (var[:-5] in simple or _list_path(var[:-5], lists)):
            name, value = var[:-5], _read_secret_file(raw, f"environment variable {var}")
        target: tuple[str | int, ...] | None = simple.get(name) or _list_path(name, lists)
        if target is not None:
            found.append((target, value, var))
    return sorted(found, key=lambda item: item[2])


def _field_annotation(path: tuple[str, ...]) -> Any:
    model: Any = GateSettings
    ann: Any = None
    for part in path:
        for name, info in model.model_fields.items():
            if (info.alias or name) == part:
                ann = info.annotation
                model = ann
                break
    return ann


def _list_path(var: str, lists: list[tuple[tuple[str, ...], type[BaseModel]]]) -> tuple[str | int, ...] | None:
    for path, item in lists:
        env_prefix = _env_name(path)
        dotted = ".".join(path)
        for pattern in (
            rf"^{re.escape(env_prefix)}_(\d+)_([A-Z0-9]+)$",
            rf"^{re.escape(dotted)}\[(\d+)\]\.([a-z0-9-]+)$",
        ):
            match = re.match(pattern, var)
            if not match:
                continue
            wanted = match.group(2).replace("-", "").upper()
            for name, info in item.model_fields.items():
                alias = info.alias or name
                if alias.replace("-", "").upper() == wanted:
                    return (*path, int(match.group(1)), alias)
    return None


def _set_path(data: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    node: Any = data
    for part, nxt in itertools.pairwise(path):
        if isinstance(part, int):
            while len(node) <= part:
                node.append({})
            node = node[part]
        else:
            if not isinstance(node.get(part), dict | list):
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
    last = path[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append({})
    node[last] = value


def active_profiles(cli_profiles: list[str] | None, env: Mapping[str, str]) -> tuple[str, ...]:
    if cli_profiles:
        names = [p for item in cli_profiles for p in item.split(",")]
    else:
        names = env.get("GATE_PROFILES", "local").split(",")
    profiles = tuple(dict.fromkeys(p.strip() for p in names if p.strip()))
    return profiles or ("local",)


def load_settings(
    config_files: list[str] | None = None,
    profiles: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    config_dir: str | Path = "config",
    overrides: Mapping[str, Any] | None = None,
) -> GateSettings:
    """Load the layered configuration; raise :class:`ConfigError` naming key and source on any mistake."""
    return load_with_sources(config_files, profiles, env, config_dir, overrides)[0]


def known_profiles(config_dir: str | Path = "config") -> list[str]:
    """Profiles with a packaged or ./config/ file, and the seed's environment names."""
    names = set(SEED_PROFILES)
    packaged = resources.files("gate").joinpath("config")
    files = [entry.name for entry in packaged.iterdir()]
    with contextlib.suppress(OSError):
        files += [entry.name for entry in Path(config_dir).iterdir()]
    for name in files:
        match = re.fullmatch(r"application-(.+)\.ya?ml", name)
        if match:
            names.add(match.group(1))
    return sorted(names)


def load_with_sources(
    config_files: list[str] | None = None,
    profiles: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    config_dir: str | Path = "config",
    overrides: Mapping[str, Any] | None = None,
) -> tuple[GateSettings, ConfigSources]:
    """:func:`load_settings`, with where each value came from and warnings (an unknown profile name)."""
    env = dict(os.environ if env is None else env)
    active = active_profiles(profiles, env)
    layers = _Layers()
    sources: list[str] = []

    def add(text: str | None, source: str) -> None:
        if text is None:
            return
        raw = _read_yaml(text, source)
        layers.merge(_resolve(raw, env, source), source)
        layers.origin.update(_placeholder_origins(raw, env, source))
        sources.append(source)

    add(_packaged("application.yaml"), "packaged application.yaml")
    config_path = Path(config_dir)
    add(_read_optional(config_path / "application.yaml"), str(config_path / "application.yaml"))
    for profile in active:
        name = f"application-{profile}.yaml"
        add(_packaged(name), f"packaged {name}")
        add(_read_optional(config_path / name), str(config_path / name))
    for file in config_files or []:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--config {file}: {exc.strerror}") from None
        add(text, file)
    for path, value, var in _env_overrides(env):
        where = f"environment variable {var}"
        # Literal: a key or a password may contain `${` (placeholders are for YAML files only).
        _set_path(layers.data, path, _coerce_env(value, path))
        for stale in [p for p in layers.origin if p[: len(path)] == path]:
            del layers.origin[stale]
        layers.origin[path] = where
        sources.append(where)
    if overrides:
        layers.merge(overrides, "command line")

    data = dict(layers.data)
    data["profiles"] = active
    data["sources"] = tuple(dict.fromkeys(sources))
    layers.origin[("profiles",)] = (
        "--profile" if profiles else "environment variable GATE_PROFILES" if env.get("GATE_PROFILES") else "default"
    )
    known = known_profiles(config_path)
    warnings = tuple(
        f"unknown profile {name!r}: no application-{name}.yaml and not one of the known profiles "
        f"({', '.join(known)}); check the spelling"
        for name in active
        if name not in known
    )
    found = ConfigSources({**layers.data, "profiles": list(active)}, layers.origin, warnings)
    try:
        settings = GateSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, layers.origin), found) from None
    if not settings.dev_auth and settings.security.jwt.jwk_set_uri is None:
        raise ConfigError(
            "security.jwt.jwk-set-uri is not set: outside the `local` profile Gate refuses to start without a "
            "JWKS (set SECURITY_JWT_JWKSETURI or security.jwt.jwk-set-uri)",
            found,
        )
    _check_ports(settings, layers.origin, found)
    return settings, found


def _check_ports(settings: GateSettings, origin: Mapping[KeyPath, str], found: ConfigSources) -> None:
    """With ``--workers N`` worker i's management port is ``management.server.port + i``: the range must fit."""
    server, management = settings.server, settings.management.server
    if not management.port:
        return
    last = management.port + server.workers - 1
    where = f"[from {_origin_of(('management', 'server', 'port'), origin)}]"
    if last > 65535:
        raise ConfigError(
            f"management.server.port: {management.port} + {server.workers} workers passes port 65535 {where}", found
        )
    if management.port <= server.port <= last:
        span = f"{management.port}-{last}" if last > management.port else str(management.port)
        raise ConfigError(
            f"management.server.port: its ports ({span}) include server.port {server.port} {where}", found
        )


def _read_optional(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None


def _coerce_env(value: str, path: tuple[str | int, ...]) -> Any:
    """Env values are strings; a YAML-looking list (``[a, b]``) or, for a list property, a comma list
    (``SECURITY_JWT_AUDIENCES=a,b``, as Spring binds it) becomes a list."""
    stripped = value.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            return yaml.safe_load(stripped)
        except yaml.YAMLError:
            return value
    names = tuple(part for part in path if isinstance(part, str))
    if len(names) == len(path) and getattr(_field_annotation(names), "__origin__", None) is list:
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _explain(exc: ValidationError, origin: Mapping[tuple[str | int, ...], str]) -> str:
    lines = ["invalid configuration:"]
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = _dotted(loc)
        source = _origin_of(loc, origin)
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        else:
            message = error["msg"].removeprefix("Value error, ")
            if "input" in error:
                message += _shown_input(key, error["input"])
        lines.append(f"  {key}: {message} [from {source}]")
    return "\n".join(lines)


def _shown_input(key: str, value: Any) -> str:
    """`` (got ...)`` for a short scalar, masked by the one rule (:mod:`gate.ops.redact`); nothing for a secret
    key's value or for a section or list (too big to help, and it may hold secrets)."""
    from gate.ops.redact import is_secret_key, mask_url, redact

    if value is not None and not isinstance(value, str | int | float | bool):
        return ""
    if is_secret_key(key.rsplit(".", 1)[-1]):
        return ""
    if isinstance(value, str):
        # A URL's user info is masked even without a scheme: `guest:secret@broker` is the mistake being reported.
        value = mask_url(value) if re.search(r"(url|uri)$", key) else redact(value)
    text = repr(value)
    return f" (got {text[:80]}{'...' if len(text) > 80 else ''})"


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _origin_of(loc: tuple[Any, ...], origin: Mapping[tuple[str | int, ...], str]) -> str:
    for length in range(len(loc), 0, -1):
        found = origin.get(tuple(loc[:length]))
        if found:
            return found
        # a leaf under this prefix tells which file the section came from
        for path, source in origin.items():
            if path[:length] == tuple(loc[:length]):
                return source
    return "default"
