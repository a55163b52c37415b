"""One masking rule (gate.ops.redact) everywhere a secret could surface: logs, health, sink errors, ``gate config``
and configuration errors mask keys, JWTs, bearer credentials and URL user info the same way, and keep hosts."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable

import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr

from gate.events.sink import describe_error
from gate.ops.health import _answer
from gate.ops.logs import configure_logging
from gate.ops.redact import MASK, mask_config, mask_url, redact
from gate.settings import ConfigError, GateSettings, load_settings

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
# (what a component might quote, the secret part, what every place shows instead)
SAMPLES = {
    "anthropic-key": ("sk-ant-api03-SECRETKEY_abc-123", "SECRETKEY_abc-123", "sk-ant-***"),
    "jwt": (JWT, "eyJzdWIiOiJhbGljZSJ9", "eyJ***"),
    "bearer": ("Bearer opaque-credential-42", "opaque-credential-42", "Bearer ***"),
    "url-password": ("amqp://gate:rabbit-pw@mq.internal:5672/prod", "rabbit-pw", "amqp://***@mq.internal:5672/prod"),
    "url-token": ("https://ghp-token-77@idp.example.com/jwks", "ghp-token-77", "https://***@idp.example.com/jwks"),
    "url-query": ("https://idp.example.com/jwks?access_token=q-secret&v=2", "q-secret", "access_token=***&v=2"),
}


def via_logs(text: str) -> str:
    out = io.StringIO()
    handler = configure_logging("json", "INFO", stream=out)
    try:
        logging.getLogger("gate.test").warning("broker refused: %s", text, extra={"detail": {"error": text}})
    finally:
        logging.getLogger().removeHandler(handler)
    line = json.loads(out.getvalue())
    message = str(line["message"]).removeprefix("broker refused: ")
    assert message == line["detail"]["error"]
    return message


def via_health(text: str) -> str:
    response = _answer("DOWN", {"components": {"pubsub": {"status": "DOWN", "details": {"lastError": text}}}})
    body = orjson.loads(response.body)
    return str(body["components"]["pubsub"]["details"]["lastError"])


def via_sink_error(text: str) -> str:
    return describe_error(ConnectionError(text)).removeprefix("ConnectionError: ")


def via_gate_config(text: str) -> str:
    return str(GateSettings.model_validate({"usage": {"destination": text}}).masked()["usage"]["destination"])


def via_config_error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"USAGE_PUBLISHER": text}, config_dir="/nonexistent")
    message = str(caught.value)
    return message[message.index("(got '") + 6 : message.index("') [from")]


PLACES: dict[str, Callable[[str], str]] = {
    "logs": via_logs,
    "health": via_health,
    "sink-error": via_sink_error,
    "gate-config": via_gate_config,
    "config-error": via_config_error,
}


@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_every_place_masks_the_same_way(place: str, sample: str) -> None:
    text, secret, shown = SAMPLES[sample]
    masked = PLACES[place](f"at {text} now")
    assert secret not in masked
    assert shown in masked
    assert masked == f"at {redact(text)} now"  # the one rule, nothing more and nothing less


@pytest.mark.parametrize("place", list(PLACES))
def test_hosts_and_ordinary_text_stay_visible(place: str) -> None:
    text = "no amqp://mq.internal:5672/prod nor https://api.anthropic.com/v1/messages"
    assert PLACES[place](text) == text


def test_gate_config_masks_secret_keys_whole_and_secret_urls_to_their_host() -> None:
    data = {
        "keys": [{"alias": "primary", "value": SecretStr("sk-ant-x")}, {"alias": "empty", "value": SecretStr("")}],
        "rabbitmq": {"url": SecretStr("amqp://gate:pw@mq:5672/"), "password": "plain"},
        "broker": {"url": "gate:pw@mq:5672"},  # no scheme: still user info
        "opaque": SecretStr("not-a-url"),
    }
    assert mask_config(data) == {
        "keys": [{"alias": "primary", "value": MASK}, {"alias": "empty", "value": ""}],
        "rabbitmq": {"url": "amqp://***@mq:5672/", "password": MASK},
        "broker": {"url": "***@mq:5672"},
        "opaque": MASK,
    }


def test_known_secrets_are_replaced_wherever_they_appear() -> None:
    assert redact("auth failed for s3cr3t (s3cr3t)", "s3cr3t", "") == "auth failed for *** (***)"


def test_mask_url_keeps_scheme_host_port_and_path() -> None:
    assert mask_url("amqps://u:p%40ss@broker.example.com:5671/vhost") == "amqps://***@broker.example.com:5671/vhost"
    assert mask_url("amqp://u:p@ss@broker/") == "amqp://***@broker/"  # a raw @ in the password goes too
    assert mask_url("https://idp.example.com/jwks") == "https://idp.example.com/jwks"


# Anything but the characters that end a URL's user info for the rule: separators, whitespace, quotes, brackets.
_USERINFO = st.text(
    alphabet=st.characters(blacklist_categories=("Zs", "Zl", "Zp", "Cc", "Cs"), blacklist_characters="/?#@\"'<>[]")
)


@hypothesis_settings(max_examples=500)
@given(user=_USERINFO.filter(bool), password=_USERINFO, before=st.sampled_from(["", "error: ", '{"e":"']))
def test_any_user_info_is_masked_and_the_host_kept(user: str, password: str, before: str) -> None:
    url = f"amqp://{user}:{password}@mq.internal:5672/"
    masked = redact(f"{before}{url}")
    assert masked == f"{before}amqp://***@mq.internal:5672/"
