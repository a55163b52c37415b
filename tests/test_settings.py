"""Configuration: layers, profiles, placeholders, secret files, Spring's relaxed env names, errors that name
the key and its source, and durations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gate.settings import (
    SEED_PROFILES,
    ConfigError,
    GateSettings,
    active_profiles,
    known_profiles,
    load_settings,
    load_with_sources,
    parse_duration,
    parse_size,
)

JWKS = "https://idp.example.com/.well-known/jwks.json"

ISSUE_YAML = """\
server:
  host: 127.0.0.1
  port: 8080
security:
  jwt:
    jwk-set-uri: https://idp.example.com/.well-known/jwks.json
anthropic:
  api:
    base-url: https://api.anthropic.com
    keys:
      - alias: primary
        value: ${ANTHROPIC_KEY_PRIMARY:}
      - alias: secondary
        value: ${ANTHROPIC_KEY_SECONDARY:}
usage:
  publisher: rabbitmq        # rabbitmq | pubsub | file | log | none
  destination: llm-gateway-usage
  rabbitmq:
    url: amqp://guest:guest@127.0.0.1:5672/
"""


def write(path: Path, content: str | dict[str, Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return str(path)


def load(tmp: Path, *files: str, env: dict[str, str] | None = None, profiles: list[str] | None = None) -> GateSettings:
    """Settings with nothing from the real environment; ./config is ``tmp/config``."""
    return load_settings(list(files), profiles=profiles, env=env or {}, config_dir=tmp / "config")


def config_error(tmp: Path, *files: str, env: dict[str, str] | None = None, profiles: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp, *files, env=env, profiles=profiles)
    return str(caught.value)


# ---------------------------------------------------------------------------------------------- the issue's YAML


@pytest.mark.parametrize("profiles", [None, ["prod"]])
def test_the_issue_yaml_loads_exactly(tmp_path: Path, profiles: list[str] | None) -> None:
    config = write(tmp_path / "gate.yaml", ISSUE_YAML)
    settings = load(tmp_path, config, env={"ANTHROPIC_KEY_PRIMARY": "sk-ant-primary-1"}, profiles=profiles)
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.security.jwt.jwk_set_uri == JWKS
    assert not settings.dev_auth
    api = settings.anthropic.api
    assert api.base_url == "https://api.anthropic.com"
    assert [k.alias for k in api.keys] == ["primary", "secondary"]  # the file's list replaces the profile's
    assert [(k.alias, k.value.get_secret_value()) for k in api.usable_keys] == [("primary", "sk-ant-primary-1")]
    assert settings.usage.publisher == "rabbitmq"
    assert settings.usage.destination == "llm-gateway-usage"
    assert settings.usage.rabbitmq.url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.sources[-1] == config


def test_both_keys_set_gives_two_and_neither_gives_none(tmp_path: Path) -> None:
    config = write(tmp_path / "gate.yaml", ISSUE_YAML)
    both = load(tmp_path, config, env={"ANTHROPIC_KEY_PRIMARY": "sk-ant-1", "ANTHROPIC_KEY_SECONDARY": "sk-ant-2"})
    assert [k.alias for k in both.anthropic.api.usable_keys] == ["primary", "secondary"]
    blank = load(tmp_path, config, env={"ANTHROPIC_KEY_PRIMARY": "   ", "ANTHROPIC_KEY_SECONDARY": ""})
    assert blank.anthropic.api.usable_keys == []


# ---------------------------------------------------------------------------------------------- layers


def test_each_layer_overrides_the_one_before(tmp_path: Path) -> None:
    """packaged defaults < packaged profile < ./config/application-{profile}.yaml < --config files < env."""
    assert load(tmp_path, env={"JWK_SET_URI": JWKS}, profiles=["prod"]).usage.publisher == "rabbitmq"  # packaged
    assert load(tmp_path).usage.publisher == "file"  # packaged application-local.yaml
    write(tmp_path / "config" / "application.yaml", {"usage": {"destination": "from-config-dir"}})
    write(
        tmp_path / "config" / "application-local.yaml", {"usage": {"publisher": "log", "destination": "from-profile"}}
    )
    settings = load(tmp_path)
    assert (settings.usage.publisher, settings.usage.destination) == ("log", "from-profile")
    first = write(tmp_path / "a.yaml", {"usage": {"publisher": "none", "destination": "from-a"}})
    second = write(tmp_path / "b.yaml", {"usage": {"destination": "from-b"}})
    settings = load(tmp_path, first, second)
    assert (settings.usage.publisher, settings.usage.destination) == ("none", "from-b")
    settings = load(tmp_path, first, second, env={"USAGE_DESTINATION": "from-env"})
    assert (settings.usage.publisher, settings.usage.destination) == ("none", "from-env")
    assert settings.sources == (
        "packaged application.yaml",
        str(tmp_path / "config" / "application.yaml"),
        "packaged application-local.yaml",
        str(tmp_path / "config" / "application-local.yaml"),
        first,
        second,
        "environment variable USAGE_DESTINATION",
    )


def test_mappings_merge_deeply_and_lists_replace(tmp_path: Path) -> None:
    config = write(
        tmp_path / "gate.yaml",
        {"anthropic": {"api": {"timeouts": {"connect": "3s"}, "keys": [{"alias": "only", "value": "sk-ant-x"}]}}},
    )
    api = load(tmp_path, config).anthropic.api
    assert api.timeouts.connect == 3.0 and api.timeouts.stream_idle == 300.0  # siblings kept
    assert [k.alias for k in api.keys] == ["only"]  # the local profile's three keys are gone


# ---------------------------------------------------------------------------------------------- profiles


def test_profiles_come_from_the_cli_else_gate_profiles_else_local() -> None:
    assert active_profiles(None, {}) == ("local",)
    assert active_profiles(None, {"GATE_PROFILES": "gcp, prod"}) == ("gcp", "prod")
    assert active_profiles(["a", "b,c", "a"], {"GATE_PROFILES": "gcp"}) == ("a", "b", "c")
    assert active_profiles(None, {"GATE_PROFILES": " , "}) == ("local",)


def test_profile_files_apply_in_the_order_given(tmp_path: Path) -> None:
    write(tmp_path / "config" / "application-one.yaml", {"usage": {"destination": "one"}})
    write(tmp_path / "config" / "application-two.yaml", {"usage": {"destination": "two"}})
    env = {"JWK_SET_URI": JWKS}
    assert load(tmp_path, env=env, profiles=["one", "two"]).usage.destination == "two"
    assert load(tmp_path, env=env, profiles=["two,one"]).usage.destination == "one"
    settings = load(tmp_path, env={**env, "GATE_PROFILES": "one,two"})
    assert settings.profiles == ("one", "two") and settings.usage.destination == "two"


def test_gcp_profile_publishes_to_pubsub(tmp_path: Path) -> None:
    settings = load(tmp_path, env={"JWK_SET_URI": JWKS, "GOOGLE_CLOUD_PROJECT": "acme-prod"}, profiles=["gcp"])
    assert settings.usage.publisher == "pubsub" and settings.usage.pubsub.project_id == "acme-prod"


def test_dev_auth_only_with_local_and_no_jwks(tmp_path: Path) -> None:
    assert load(tmp_path).dev_auth
    assert not load(tmp_path, env={"JWK_SET_URI": JWKS}).dev_auth
    assert not load(tmp_path, env={"SECURITY_JWT_DEV_ENABLED": "false", "JWK_SET_URI": JWKS}).dev_auth
    message = config_error(tmp_path, profiles=["prod"])
    assert "security.jwt.jwk-set-uri" in message
    message = config_error(tmp_path, env={"SECURITY_JWT_JWKSETURI": "  "}, profiles=["prod"])
    assert "security.jwt.jwk-set-uri" in message


# ---------------------------------------------------------------------------------------------- placeholders


def test_placeholders_take_the_variable_or_the_default(tmp_path: Path) -> None:
    config = write(
        tmp_path / "gate.yaml",
        "usage:\n"
        "  destination: ${DEST:fallback}\n"
        "  event-source: /gate/${REGION:eu}/${ZONE:a}\n"
        "  file:\n"
        "    path: ${DATA:${HOME_DIR:/srv}/gate}/usage.jsonl\n"
        "server:\n"
        "  port: ${PORT:9090}\n",
    )
    settings = load(tmp_path, config)
    assert settings.usage.destination == "fallback"
    assert settings.usage.event_source == "/gate/eu/a"
    assert settings.usage.file.path == "/srv/gate/usage.jsonl"
    assert settings.server.port == 9090
    settings = load(tmp_path, config, env={"DEST": "topic-x", "REGION": "us", "HOME_DIR": "/opt", "PORT": "1234"})
    assert (settings.usage.destination, settings.usage.event_source) == ("topic-x", "/gate/us/a")
    assert settings.usage.file.path == "/opt/gate/usage.jsonl"
    assert settings.server.port == 1234
    settings = load(tmp_path, config, env={"DATA": "/data"})
    assert settings.usage.file.path == "/data/usage.jsonl"


def test_an_empty_variable_takes_the_default(tmp_path: Path) -> None:
    """Compose files pass ``GATE_HOST: ${GATE_HOST}`` through empty: that must not bind every interface."""
    settings = load(tmp_path, env={"GATE_HOST": "", "GATE_PORT": "", "XDG_DATA_HOME": ""})
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.security.jwt.dev.data_dir == str(Path.home() / ".local/share/gate")
    config = write(tmp_path / "gate.yaml", "usage:\n  destination: ${TOPIC}\n")
    assert load(tmp_path, config, env={"TOPIC": ""}).usage.destination == ""  # set, and no default: empty


def test_a_value_from_the_environment_is_taken_literally(tmp_path: Path) -> None:
    config = write(tmp_path / "gate.yaml", "anthropic:\n  api:\n    keys:\n      - alias: a\n        value: ${KEY}\n")
    settings = load(tmp_path, config, env={"KEY": "sk-ant-${NOT_A_PLACEHOLDER}}"})
    assert settings.anthropic.api.keys[0].value.get_secret_value() == "sk-ant-${NOT_A_PLACEHOLDER}}"


def test_a_placeholder_without_default_must_be_set(tmp_path: Path) -> None:
    config = write(tmp_path / "gate.yaml", "usage:\n  destination: ${TOPIC}\n")
    message = config_error(tmp_path, config)
    assert "TOPIC" in message and config in message
    assert load(tmp_path, config, env={"TOPIC": "t"}).usage.destination == "t"


def test_file_placeholder_reads_the_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "secrets" / "primary"
    write(secret, "sk-ant-from-a-file\n")
    config = write(
        tmp_path / "gate.yaml",
        f"anthropic:\n  api:\n    keys:\n      - alias: primary\n        value: ${{file:{secret}}}\n"
        "      - alias: second\n        value: ${file:${SECRETS:/nowhere}/primary}\n",
    )
    keys = load(tmp_path, config, env={"SECRETS": str(secret.parent)}).anthropic.api.keys
    assert [k.value.get_secret_value() for k in keys] == ["sk-ant-from-a-file", "sk-ant-from-a-file"]
    message = config_error(tmp_path, config)
    assert "/nowhere/primary" in message and config in message


def test_name_file_variables_read_kubernetes_secret_mounts(tmp_path: Path) -> None:
    secret = write(tmp_path / "mounted" / "key", "sk-ant-mounted\n")
    password = write(tmp_path / "mounted" / "amqp", "amqp://gate:s3cret@rabbit:5672/\n")
    env = {"ANTHROPIC_API_KEYS_0_VALUE_FILE": secret, "USAGE_RABBITMQ_URL_FILE": password}
    settings = load(tmp_path, env=env)
    assert settings.anthropic.api.keys[0].value.get_secret_value() == "sk-ant-mounted"
    assert settings.usage.rabbitmq.url.get_secret_value() == "amqp://gate:s3cret@rabbit:5672/"
    message = config_error(tmp_path, env={"ANTHROPIC_API_KEYS_0_VALUE_FILE": str(tmp_path / "missing")})
    assert "ANTHROPIC_API_KEYS_0_VALUE_FILE" in message and "missing" in message


# ---------------------------------------------------------------------------------------------- environment


def test_spring_relaxed_and_literal_env_names(tmp_path: Path) -> None:
    env = {
        "SERVER_PORT": "9191",
        "ANTHROPIC_API_BASEURL": "http://127.0.0.1:9999/",
        "ANTHROPIC_API_KEYS_0_VALUE": "sk-ant-zero",
        "anthropic.api.keys[1].value": "sk-ant-one",
        "RESILIENCE_CIRCUITBREAKER_FAILURERATETHRESHOLD": "25",
        "SECURITY_JWT_LEEWAY": "500ms",
        "usage.file.path": "/tmp/literal.jsonl",
        "OBSERVABILITY_LOGGING_ACCESSLOG": "false",
        "UNRELATED_VARIABLE": "ignored",
    }
    settings = load(tmp_path, env=env)
    assert settings.server.port == 9191
    assert settings.anthropic.api.base_url == "http://127.0.0.1:9999"
    values = [k.value.get_secret_value() for k in settings.anthropic.api.keys]
    assert values[:2] == ["sk-ant-zero", "sk-ant-one"]
    assert [k.alias for k in settings.anthropic.api.keys] == ["primary", "secondary", "default"]  # aliases kept
    assert settings.resilience.circuit_breaker.failure_rate_threshold == 25.0
    assert settings.security.jwt.leeway == 0.5
    assert settings.usage.file.path == "/tmp/literal.jsonl"
    assert settings.observability.logging.access_log is False


def test_env_overrides_a_key_alias_and_list_properties(tmp_path: Path) -> None:
    env = {
        "ANTHROPIC_API_KEYS_2_ALIAS": "team-b",
        "ANTHROPIC_API_KEYS_2_VALUE": "sk-ant-b",
        "SECURITY_JWT_AUDIENCES": "gate-api, claude-code",
        "JWK_SET_URI": JWKS,
    }
    settings = load(tmp_path, env=env)
    assert [(k.alias, k.value.get_secret_value()) for k in settings.anthropic.api.usable_keys] == [
        ("team-b", "sk-ant-b")
    ]
    assert settings.security.jwt.audiences == ["gate-api", "claude-code"]
    settings = load(tmp_path, env={**env, "SECURITY_JWT_AUDIENCES": "[one, two]"})
    assert settings.security.jwt.audiences == ["one", "two"]


def test_empty_key_values_stay_out_of_the_pool(tmp_path: Path) -> None:
    env = {"ANTHROPIC_KEY_PRIMARY": "", "ANTHROPIC_KEY_SECONDARY": "sk-ant-second", "ANTHROPIC_API_KEY": " "}
    settings = load(tmp_path, env=env)
    assert len(settings.anthropic.api.keys) == 3
    assert [k.alias for k in settings.anthropic.api.usable_keys] == ["secondary"]


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_top_level_key_in_a_config_file(tmp_path: Path) -> None:
    good = write(tmp_path / "good.yaml", {"usage": {"destination": "x"}})
    bad = write(tmp_path / "bad.yaml", {"usage": {"destination": "y"}, "servr": {"port": 1}})
    message = config_error(tmp_path, good, bad)
    assert "servr: unknown key" in message and f"[from {bad}]" in message
    assert good not in message


def test_unknown_nested_key_names_the_dotted_path_and_file(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", {"security": {"jwt": {"jwks-uri": JWKS}}})
    message = config_error(tmp_path, bad)
    assert "security.jwt.jwks-uri: unknown key" in message and bad in message


def test_wrong_type_from_env_names_the_variable(tmp_path: Path) -> None:
    message = config_error(tmp_path, env={"SERVER_PORT": "eighty"})
    assert "server.port" in message and "environment variable SERVER_PORT" in message and "'eighty'" in message
    message = config_error(tmp_path, env={"server.port": "70000"})
    assert "server.port" in message and "environment variable server.port" in message


def test_bad_durations_name_the_key_and_source(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", {"security": {"jwt": {"leeway": "5 minutes"}}})
    message = config_error(tmp_path, bad)
    assert "security.jwt.leeway" in message and "not a duration" in message and bad in message
    message = config_error(tmp_path, env={"ANTHROPIC_API_TIMEOUTS_CONNECT": "-3s"})
    assert "anthropic.api.timeouts.connect" in message and "ANTHROPIC_API_TIMEOUTS_CONNECT" in message


def test_duplicate_alias_is_refused(tmp_path: Path) -> None:
    bad = write(
        tmp_path / "bad.yaml",
        {"anthropic": {"api": {"keys": [{"alias": "a", "value": "sk-ant-1"}, {"alias": "a", "value": "sk-ant-2"}]}}},
    )
    message = config_error(tmp_path, bad)
    assert "anthropic.api.keys" in message and "repeated: a" in message and bad in message
    assert "sk-ant-1" not in message and "sk-ant-2" not in message


def test_several_errors_are_reported_together(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", {"usage": {"publisher": "kafka"}, "server": {"workers": 0}})
    message = config_error(tmp_path, bad, env={"SERVER_PORT": "x"})
    assert "usage.publisher" in message and "server.workers" in message and "server.port" in message


@pytest.mark.parametrize(
    ("content", "says"),
    [("server: [1, 2\n", "not valid YAML"), ("- a\n- b\n", "top level must be a mapping")],
)
def test_unreadable_files_are_named(tmp_path: Path, content: str, says: str) -> None:
    bad = write(tmp_path / "bad.yaml", content)
    message = config_error(tmp_path, bad)
    assert says in message and bad in message
    message = config_error(tmp_path, str(tmp_path / "absent.yaml"))
    assert "absent.yaml" in message


def test_errors_never_show_secret_values(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", {"anthropic": {"api": {"keys": "sk-ant-api03-secret-in-the-wrong-place"}}})
    message = config_error(tmp_path, bad)
    assert "anthropic.api.keys" in message and "secret-in-the-wrong-place" not in message
    assert "sk-ant-***" in message  # masked by the one rule, as in logs
    message = config_error(tmp_path, env={"ANTHROPIC_API_KEYS_0_VALUE": "sk-ant-x", "ANTHROPIC_API_KEYS_0_ALIAS": ""})
    assert "anthropic.api.keys[0].alias" in message and "sk-ant-x" not in message
    bad = write(tmp_path / "bad2.yaml", {"usage": {"rabbitmq": {"url": 5, "routing-key": ["amqp://u:pw@h/"]}}})
    message = config_error(tmp_path, bad)
    assert "usage.rabbitmq.url" in message and "pw" not in message
    # A URL without its scheme is the mistake being reported: its user info is masked all the same.
    message = config_error(tmp_path, env={"USAGE_RABBITMQ_URL": "gate:rabbit-pw@mq:5672"})
    assert "usage.rabbitmq.url" in message and "rabbit-pw" not in message and "***@mq:5672" in message


# ---------------------------------------------------------------------------------------------- masking


def test_masked_configuration_hides_every_secret(tmp_path: Path) -> None:
    env = {
        "ANTHROPIC_KEY_PRIMARY": "sk-ant-primary-secret",
        "ANTHROPIC_API_KEYS_1_VALUE": "sk-ant-second-secret",
        "USAGE_RABBITMQ_URL": "amqp://gate:rabbit-secret@mq:5672/",
        "JWK_SET_URI": "https://reader:idp-secret@idp.example.com/jwks.json?access_token=idp-token",
        "USAGE_EVENTSOURCE": "/gate/eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.sig",
    }
    settings = load(tmp_path, env=env)
    dumped = yaml.safe_dump(settings.masked())
    for secret in ("sk-ant-primary-secret", "sk-ant-second-secret", "rabbit-secret", "idp-secret", "idp-token"):
        assert secret not in dumped
    masked = settings.masked()
    assert masked["anthropic"]["api"]["keys"][0] == {"alias": "primary", "value": "***"}
    # Only the user info goes: the host and path say which broker and which IdP are meant.
    assert masked["usage"]["rabbitmq"]["url"] == "amqp://***@mq:5672/"
    assert masked["security"]["jwt"]["jwk-set-uri"] == "https://***@idp.example.com/jwks.json?access_token=***"
    assert masked["usage"]["event-source"] == "/gate/eyJ***"  # a JWT anywhere, as in logs
    assert load(tmp_path).masked()["anthropic"]["api"]["base-url"] == "https://api.anthropic.com"  # no secret: shown


# ---------------------------------------------------------------------------------------------- durations and sizes


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("30", 30.0),
        (30, 30.0),
        (0.25, 0.25),
        ("1.5s", 1.5),
        (" 10 S ", 10.0),
        ("250us", 0.00025),
    ],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5 minutes", "-1s", "1h30m", "s", "PT30S", True, -1])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@given(st.one_of(st.text(max_size=20), st.integers(), st.floats(allow_nan=False)))
def test_any_duration_input_parses_or_is_a_value_error(value: Any) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        return
    assert seconds >= 0


def test_sizes() -> None:
    assert parse_size("32MB") == 32 * 1024 * 1024
    assert parse_size("16KB") == parse_size("16kib") == 16384
    assert parse_size(100) == parse_size("100") == 100
    with pytest.raises(ValueError):
        parse_size("lots")


# ---------------------------------------------------------------------------------------------- environment values


@pytest.mark.parametrize(
    "value",
    ["sk-ant-ab${x:Z}cd", "sk-ant-${UNSET_WITHOUT_DEFAULT}", "pa${ss", "${file:/etc/hostname}", "~/not-a-home"],
)
def test_environment_values_are_literal(tmp_path: Path, value: str) -> None:
    """``${...}`` is expanded in YAML files only: a key or password from the environment is used as it is."""
    url = f"amqp://gate:{value.replace('/', '%2F')}@mq:5672/"
    settings = load(tmp_path, env={"ANTHROPIC_API_KEYS_0_VALUE": value, "USAGE_RABBITMQ_URL": url})
    assert settings.anthropic.api.keys[0].value.get_secret_value() == value
    assert settings.usage.rabbitmq.url.get_secret_value() == url


def test_a_file_variable_is_literal_too(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("sk-ant-${HOME}\n")
    settings = load(tmp_path, env={"ANTHROPIC_API_KEYS_0_VALUE_FILE": str(secret), "HOME": "/root"})
    assert settings.anthropic.api.keys[0].value.get_secret_value() == "sk-ant-${HOME}"


# ---------------------------------------------------------------------------------------------- unusable values

UNUSABLE = {
    # variable: (value, key, what the message says)
    "USAGE_RABBITMQ_URL": ("localhost:5672", "usage.rabbitmq.url", "not an AMQP URL"),
    "SECURITY_JWT_JWKSETURI": ("not-a-url", "security.jwt.jwk-set-uri", "not an http(s) URL"),
    "ANTHROPIC_API_BASEURL": ("https://api.anthropic.com/v1", "anthropic.api.base-url", "leave out /v1"),
    "ANTHROPIC_API_TIMEOUTS_STREAMIDLE": ("0", "anthropic.api.timeouts.stream-idle", "must be more than 0"),
    "USAGE_OUTBOX_COMMITINTERVAL": ("0", "usage.outbox.commit-interval", "at least 5ms"),
}


@pytest.mark.parametrize("variable", list(UNUSABLE))
def test_unusable_values_are_refused_naming_key_and_variable(tmp_path: Path, variable: str) -> None:
    value, key, says = UNUSABLE[variable]
    message = config_error(tmp_path, env={"JWK_SET_URI": JWKS, variable: value})
    assert f"{key}: " in message and says in message and f"[from environment variable {variable}]" in message


@pytest.mark.parametrize(
    ("section", "says"),
    [
        ({"usage": {"rabbitmq": {"url": "http://mq:5672/"}}}, "not an AMQP URL"),
        ({"usage": {"rabbitmq": {"url": "amqp://mq:port/"}}}, "not a URL"),
        ({"usage": {"rabbitmq": {"url": "amqp:///vhost"}}}, "not an AMQP URL"),
        ({"security": {"jwt": {"jwk-set-uri": "ftp://idp/jwks"}}}, "not an http(s) URL"),
        ({"security": {"jwt": {"jwk-set-uri": "https:///jwks"}}}, "not an http(s) URL"),
        ({"anthropic": {"api": {"base-url": "api.anthropic.com"}}}, "not an http(s) URL"),
        ({"anthropic": {"api": {"base-url": "https://egress.example.com/anthropic/v1/"}}}, "leave out /v1"),
        ({"anthropic": {"api": {"base-url": "https://user:pw@egress.example.com"}}}, "user info"),
        ({"anthropic": {"api": {"base-url": "https://api.anthropic.com?beta=1"}}}, "no query"),
        ({"anthropic": {"api": {"timeouts": {"connect": "0s"}}}}, "must be more than 0"),
        ({"anthropic": {"api": {"timeouts": {"response-headers": 0}}}}, "must be more than 0"),
        ({"server": {"limits": {"header-timeout": "0ms"}}}, "must be more than 0"),
        ({"security": {"jwt": {"refresh": 0}}}, "must be more than 0"),
        ({"resilience": {"circuit-breaker": {"slow-call-duration-threshold": 0}}}, "must be more than 0"),
        ({"usage": {"outbox": {"commit-interval": "1ms"}}}, "at least 5ms"),
        ({"usage": {"outbox": {"retry-initial": 0}}}, "must be more than 0"),
        ({"usage": {"rabbitmq": {"confirm-timeout": 0}}}, "must be more than 0"),
    ],
)
def test_unusable_values_in_a_file_name_key_and_file(tmp_path: Path, section: dict[str, Any], says: str) -> None:
    bad = write(tmp_path / "bad.yaml", {"security": {"jwt": {"jwk-set-uri": JWKS}}} | section)
    message = config_error(tmp_path, bad, profiles=["prod"])
    assert says in message and f"[from {bad}]" in message
    assert "pw" not in message.replace("password", "")


@pytest.mark.parametrize(
    "section",
    [
        {"anthropic": {"api": {"base-url": "https://egress.example.com/anthropic/"}}},  # a reverse proxy's prefix
        {"anthropic": {"api": {"base-url": "http://127.0.0.1:8081"}}},
        {"usage": {"rabbitmq": {"url": "amqps://gate:p%40ss@mq.internal/prod"}}},
        {"usage": {"outbox": {"commit-interval": "5ms"}}},
        {"server": {"shutdown": {"drain-timeout": 0}}, "security": {"jwt": {"leeway": 0, "min-refresh-interval": 0}}},
    ],
)
def test_usable_values_still_load(tmp_path: Path, section: dict[str, Any]) -> None:
    load(tmp_path, write(tmp_path / "ok.yaml", section))


def test_management_ports_of_the_workers_must_fit(tmp_path: Path) -> None:
    message = config_error(tmp_path, env={"MANAGEMENT_SERVER_PORT": "65535", "SERVER_WORKERS": "2"})
    assert "management.server.port" in message and "65535" in message
    assert "environment variable MANAGEMENT_SERVER_PORT" in message
    message = config_error(tmp_path, env={"MANAGEMENT_SERVER_PORT": "8079", "SERVER_WORKERS": "2"})
    assert "include server.port 8080" in message
    settings = load(tmp_path, env={"MANAGEMENT_SERVER_PORT": "9090", "SERVER_WORKERS": "4"})
    assert settings.management.server.port == 9090


# ---------------------------------------------------------------------------------------------- sources, profiles


def test_each_value_knows_its_source(tmp_path: Path) -> None:
    extra = write(tmp_path / "extra.yaml", "usage:\n  destination: ${TOPIC:fallback}\n  event-source: /x\n")
    env = {"TOPIC": "billing", "SERVER_PORT": "9000", "ANTHROPIC_KEY_PRIMARY": "sk-ant-x"}
    settings, sources = load_with_sources([extra], env=env, config_dir=tmp_path / "config")
    assert settings.usage.destination == "billing"
    assert sources.source_of(("usage", "destination")) == f"{extra} via ${{TOPIC}}"
    assert sources.source_of(("usage", "event-source")) == extra
    assert sources.source_of(("server", "port")) == "environment variable SERVER_PORT"
    assert sources.source_of(("server", "host")) == "packaged application.yaml, ${GATE_HOST} unset"
    key = ("anthropic", "api", "keys", 0, "value")
    assert sources.source_of(key) == "packaged application-local.yaml via ${ANTHROPIC_KEY_PRIMARY}"
    assert sources.source_of(("usage", "outbox", "batch-size")) == "default"
    assert sources.source_of(("profiles",)) == "default"


def test_an_unknown_profile_is_warned_about_not_refused(tmp_path: Path) -> None:
    write(tmp_path / "config" / "application-eu.yaml", "usage:\n  destination: eu\n")
    known = known_profiles(tmp_path / "config")
    assert set(SEED_PROFILES) | {"eu"} <= set(known)
    env = {"JWK_SET_URI": JWKS}
    for good in (["prod"], ["eu", "uat"], ["lab,sit"]):
        assert load_with_sources(profiles=good, env=env, config_dir=tmp_path / "config")[1].warnings == ()
    settings, sources = load_with_sources(profiles=["prdo"], env=env, config_dir=tmp_path / "config")
    assert settings.profiles == ("prdo",)
    (warning,) = sources.warnings
    assert "'prdo'" in warning and "prod" in warning and "eu" in warning and "gcp" in warning


def test_a_config_error_carries_what_was_merged(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_with_sources(profiles=["prod"], env={"USAGE_DESTINATION": "billing"}, config_dir=tmp_path / "config")
    assert "jwk-set-uri" in str(caught.value)
    sources = caught.value.sources
    assert sources is not None and sources.data["usage"]["destination"] == "billing"
    assert sources.source_of(("usage", "destination")) == "environment variable USAGE_DESTINATION"


# ---------------------------------------------------------------------------------------------- security.jwt


def test_tokens_must_carry_exp_unless_switched_off(tmp_path: Path) -> None:
    assert load(tmp_path).security.jwt.require_exp is True
    assert load(tmp_path, env={"SECURITY_JWT_REQUIREEXP": "false"}).security.jwt.require_exp is False


@pytest.mark.parametrize("url", ["localhost:5672", "http://mq:5672/", "amqp://mq:port/", "amqp:///vhost"])
def test_the_rabbitmq_sink_refuses_a_url_it_cannot_use(url: str) -> None:
    """Built around load_settings (tests, embedders): a configuration error at once, not a traceback per retry."""
    from pydantic import SecretStr

    from gate.events.rabbitmq import RabbitMQSink

    usage = GateSettings().usage
    usage = usage.model_copy(update={"rabbitmq": usage.rabbitmq.model_copy(update={"url": SecretStr(url)})})
    with pytest.raises(ConfigError, match=r"^usage\.rabbitmq\.url: not an? "):
        RabbitMQSink(usage)
