"""Group policy (which policies apply, model allowlists, managed-settings documents), user codes, device-grant
state and the sign-in settings: units, with hypothesis where the input is arbitrary text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gate.identity.auth import Identity
from gate.identity.signin.grants import USER_CODE_ALPHABET, DeviceGrants, Poll, normalise_user_code
from gate.policy.groups import PolicyBook, deep_merge
from gate.policy.managed import document
from gate.policy.models import ModelPolicy, display_name
from gate.settings import ConfigError, PolicySettings, StoreSettings, load_settings
from gate.store.kv import open_store


def policies(*items: dict[str, Any]) -> list[PolicySettings]:
    return [PolicySettings.model_validate(item) for item in items]


def who(groups: tuple[str, ...] = (), email: str | None = None) -> Identity:
    return Identity(sub="s", expires_at=None, email=email, groups=frozenset(groups))


BOOK = PolicyBook(
    policies(
        {"name": "base", "models": ["claude-haiku-4-5"], "managed-settings": {"a": 1, "nested": {"x": 1, "y": 1}}},
        {"name": "contractors", "match": {"email-domains": ["contractor.test"]}, "models": []},
        {
            "name": "eng",
            "match": {"groups": ["eng"]},
            "models": ["claude-opus-*"],
            "managed-settings": {"nested": {"y": 2}},
        },
        {"name": "eng-late", "match": {"groups": ["eng"]}, "managed-settings": {"never": True}},
        {"name": "eng-at-corp", "match": {"groups": ["ops"], "email-domains": ["corp.test"]}, "models": ["m"]},
    )
)


def test_first_matching_policy_merges_onto_the_catch_all() -> None:
    eng = BOOK.resolve(who(("eng", "other")))
    assert eng is not None and eng.names == ("base", "eng")
    assert eng.models == ("claude-opus-*",)
    assert eng.managed_settings == {"a": 1, "nested": {"x": 1, "y": 2}}
    nobody = BOOK.resolve(who())
    assert nobody is not None and nobody.names == ("base",) and nobody.models == ("claude-haiku-4-5",)
    assert BOOK.resolve(who(email="Someone@CONTRACTOR.test")).names == ("base", "contractors")  # type: ignore[union-attr]
    # Both groups and domain must fit when both are given.
    assert BOOK.resolve(who(("ops",), "a@corp.test")).names[-1] == "eng-at-corp"  # type: ignore[union-attr]
    assert BOOK.resolve(who(("ops",), "a@else.test")).names == ("base",)  # type: ignore[union-attr]


def test_no_catch_all_means_no_policy_for_others() -> None:
    book = PolicyBook(policies({"name": "eng", "match": {"groups": ["eng"]}, "models": ["m"]}))
    assert book.resolve(who(("sales",))) is None
    policy = ModelPolicy(book)
    assert policy.allowed(who(("sales",)), "anything") and not policy.allowed(who(("eng",)), "other")


def test_model_allowlists() -> None:
    policy = ModelPolicy(BOOK)
    eng = who(("eng",))
    assert policy.allowed(eng, "claude-opus-4-6") and policy.allowed(eng, "claude-opus-4-1-20250805")
    assert not policy.allowed(eng, "claude-haiku-4-5") and not policy.allowed(eng, None)
    assert not policy.allowed(who(email="x@contractor.test"), "claude-haiku-4-5")  # models: [] allows none
    listed = orjson.loads(policy.models_list(who()) or b"")
    assert listed["data"] == [
        {
            "type": "model",
            "id": "claude-haiku-4-5",
            "display_name": "Claude Haiku 4.5",
            "created_at": "2025-01-01T00:00:00Z",
        }
    ]
    assert orjson.loads(policy.models_list(eng) or b"")["data"] == []  # prefixes are not listable
    assert policy.models_list(who(("sales",))) is not None


def test_policy_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="repeated: a"):
        PolicyBook(policies({"name": "a"}, {"name": "a"}))


def test_display_names() -> None:
    assert display_name("claude-sonnet-4-5") == "Claude Sonnet 4.5"
    assert display_name("claude-3-5-haiku-20241022") == "Claude Haiku 3.5"
    assert display_name("claude-opus-4-1-20250805") == "Claude Opus 4.1"


def test_managed_document_checksum_is_stable() -> None:
    body, checksum = document({"b": 1, "a": {"d": 2, "c": 3}})
    again, same = document({"a": {"c": 3, "d": 2}, "b": 1})
    assert checksum == same and body == again
    parsed = orjson.loads(body)
    assert parsed["uuid"] == parsed["checksum"] == checksum and parsed["settings"] == {"a": {"c": 3, "d": 2}, "b": 1}
    assert deep_merge({"env": {"A": "1"}, "l": [1]}, {"env": {"B": "2"}, "l": [2]}) == {
        "env": {"A": "1", "B": "2"},
        "l": [2],
    }


@given(st.text(max_size=80))
def test_user_code_normalisation_never_crashes(text: str) -> None:
    code = normalise_user_code(text)
    if code is not None:
        assert len(code) == 9 and code[4] == "-" and set(code.replace("-", "")) <= set(USER_CODE_ALPHABET)


def test_user_code_forms() -> None:
    assert normalise_user_code("wdjb mjht") == "WDJB-MJHT"
    assert normalise_user_code(" WDJB-MJHT ") == "WDJB-MJHT"
    assert normalise_user_code("WDJB-MJHA") is None  # a vowel is never in a code
    assert normalise_user_code("WDJB-MJH") is None


async def test_device_grant_state_machine(tmp_path: Path) -> None:
    store = open_store(StoreSettings(sqlite_path=str(tmp_path / "kv.sqlite3")))
    now = [1_000_000.0]
    store.clock = lambda: now[0]
    await store.start()
    grants = DeviceGrants(store, lifetime=600, interval=5)
    device_code, user_code = await grants.issue("127.0.0.1")
    assert (await grants.poll(device_code))[0] is Poll.PENDING
    now[0] += 1
    assert (await grants.poll(device_code))[0] is Poll.SLOW_DOWN
    now[0] += 5
    assert (await grants.poll(device_code))[0] is Poll.PENDING
    grant = await grants.by_user_code(user_code)
    assert grant is not None
    assert await grants.approve(grant, {"access_token": "t"}, "alice")
    assert not await grants.approve(grant, {"access_token": "u"}, "alice")  # a stale version
    assert await grants.by_user_code(user_code) is None  # a user code approves once
    assert await grants.poll(device_code) == (Poll.ISSUED, {"access_token": "t"})
    assert (await grants.poll(device_code))[0] is Poll.EXPIRED  # redeemed
    assert (await grants.poll("unknown"))[0] is Poll.UNKNOWN
    other, other_user_code = await grants.issue("127.0.0.1")
    now[0] += 601
    assert (await grants.poll(other))[0] is Poll.EXPIRED
    assert await grants.by_user_code(other_user_code) is None
    await store.close()


def _load(tmp_path: Path, **overrides: Any) -> Any:
    return load_settings(profiles=["local"], env={}, config_dir=tmp_path, overrides=overrides)


def test_sign_in_settings_are_validated_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sign-in.public-url, sign-in.idp.issuer, sign-in.idp.client-id are not set"):
        _load(tmp_path, **{"sign-in": {"enabled": True}})
    with pytest.raises(ConfigError, match="without a path"):
        _load(tmp_path, **{"sign-in": {"public-url": "https://gate.example.com/base"}})
    with pytest.raises(ConfigError, match="between 1m and 24h"):
        _load(tmp_path, **{"sign-in": {"session": {"lifetime": "2d"}}})
    with pytest.raises(ConfigError, match="must include openid"):
        _load(
            tmp_path,
            **{
                "sign-in": {
                    "enabled": True,
                    "public-url": "https://g.test",
                    "idp": {"issuer": "https://i.test", "client-id": "c", "scopes": ["email"]},
                }
            },
        )
    with pytest.raises(ConfigError, match=r"policies\[0\].models"):
        _load(tmp_path, policies=[{"name": "a", "models": "claude"}])
    settings = _load(
        tmp_path,
        **{
            "sign-in": {
                "enabled": True,
                "public-url": "https://g.test/",
                "idp": {"issuer": "https://i.test", "client-id": "c", "client-secret": "s3cret"},
            }
        },
    )
    assert settings.sign_in.public_url == "https://g.test" and settings.sign_in.session.lifetime == 3600
    assert "s3cret" not in str(settings.masked())


async def test_configured_session_keys_rotate_by_kid(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gate.identity.auth import AuthError
    from gate.identity.sessions import SessionTokens
    from gate.settings import SessionSettings

    def pem() -> str:
        return (
            Ed25519PrivateKey.generate()
            .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            .decode()
        )

    old_pem, new_pem = pem(), pem()
    before = SessionTokens(
        SessionSettings.model_validate({"signing-keys": [{"kid": "old", "private-key": old_pem}]}),
        issuer="https://g",
        leeway=0,
    )
    store = open_store(StoreSettings(sqlite_path=str(tmp_path / "kv.sqlite3")))
    await before.load(store)
    old_token, lifetime = before.mint(sub="a", email=None, name=None, groups=["g"])
    assert lifetime == 3600
    after = SessionTokens(
        SessionSettings.model_validate(
            {"signing-keys": [{"kid": "new", "private-key": new_pem}, {"kid": "old", "private-key": old_pem}]}
        ),
        issuer="https://g",
        leeway=0,
    )
    await after.load(store)
    assert after.kids == {"new", "old"}
    assert after.verify(old_token, "old").groups == {"g"}  # signed before the rotation, still accepted
    new_token, _ = after.mint(sub="a", email="a@x", name="A", groups=[])
    assert after.verify(new_token, "new").email == "a@x"
    with pytest.raises(AuthError):
        before.verify(new_token, "new")
    with pytest.raises(ValueError, match="not a PEM private key"):
        SessionTokens(
            SessionSettings.model_validate({"signing-keys": [{"kid": "k", "private-key": "nope"}]}),
            issuer="x",
            leeway=0,
        )


async def test_generated_session_key_is_shared_through_the_store(tmp_path: Path) -> None:
    from gate.identity.sessions import SessionTokens
    from gate.settings import SessionSettings

    store = open_store(StoreSettings(sqlite_path=str(tmp_path / "kv.sqlite3")))
    await store.start()
    first, second = (SessionTokens(SessionSettings(), issuer="https://g", leeway=0) for _ in range(2))
    await first.load(store)
    await second.load(store)
    assert first.kids == second.kids
    token, _ = first.mint(sub="a", email=None, name=None, groups=[])
    assert second.verify(token, next(iter(second.kids))).sub == "a"
    assert jwt_header(token)["alg"] == "RS256"
    await store.close()


def jwt_header(token: str) -> dict[str, Any]:
    import jwt

    return dict(jwt.get_unverified_header(token))
