"""The key pool: round robin, cooldown and quarantine on a fake clock, thread safety, secrecy of values."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr

from gate.settings import AnthropicApiSettings, ApiKey, KeyHealthSettings
from gate.upstreams.keys import Key, KeyPool, NoKeyAvailable

SECRET = "sk-ant-api03-TOPSECRET"


class FakeClock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def api_keys(*aliases: str) -> list[ApiKey]:
    return [ApiKey(alias=alias, value=SecretStr(f"{SECRET}-{alias}")) for alias in aliases]


def make(
    *aliases: str, clock: FakeClock | None = None, events: list[tuple[str, str]] | None = None, **health: Any
) -> tuple[KeyPool, FakeClock]:
    clock = clock or FakeClock()
    on_event = None if events is None else (lambda kind, alias: events.append((kind, alias)))
    pool = KeyPool(api_keys(*aliases), KeyHealthSettings(**health), clock=clock, on_event=on_event)
    return pool, clock


def take(pool: KeyPool, n: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    return [pool.acquire(exclude).alias for _ in range(n)]


def state_of(pool: KeyPool, alias: str) -> dict[str, object]:
    keys = pool.snapshot()["keys"]
    assert isinstance(keys, list)
    return next(entry for entry in keys if entry["alias"] == alias)


# ------------------------------------------------------------------------------------------------- selection


def test_round_robin_over_three_keys() -> None:
    pool, _ = make("a", "b", "c")
    assert take(pool, 7) == ["a", "b", "c", "a", "b", "c", "a"]
    assert len(pool) == 3


def test_key_carries_the_secret_value() -> None:
    pool, _ = make("primary")
    key = pool.acquire()
    assert key == Key("primary", f"{SECRET}-primary")


def test_usable_keys_from_settings_leave_blank_values_out() -> None:
    api = AnthropicApiSettings.model_validate(
        {"keys": [{"alias": "primary", "value": SECRET}, {"alias": "secondary", "value": " "}]}
    )
    pool = KeyPool(api.usable_keys, api.key_health)
    assert len(pool) == 1
    assert pool.acquire().alias == "primary"


def test_single_key_is_always_chosen() -> None:
    pool, _ = make("only")
    assert take(pool, 3) == ["only"] * 3


def test_duplicate_aliases_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        KeyPool(api_keys("a", "a"), KeyHealthSettings())


@pytest.mark.parametrize(("aliases", "spread"), [(("a", "b", "c"), 1), (("a", "b", "c", "d"), 0)])
def test_even_distribution_under_threads(aliases: tuple[str, ...], spread: int) -> None:
    pool, _ = make(*aliases)

    def worker() -> Counter[str]:
        return Counter(pool.acquire().alias for _ in range(10_000))

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so unguarded updates would collide
    try:
        with ThreadPoolExecutor(max_workers=8) as executor:
            futures = [executor.submit(worker) for _ in range(8)]
            totals: Counter[str] = sum((f.result() for f in futures), Counter())
    finally:
        sys.setswitchinterval(switch_interval)
    assert sum(totals.values()) == 80_000
    assert set(totals) == set(aliases)
    assert max(totals.values()) - min(totals.values()) == spread  # 80,000 selections split exactly by turn


# ---------------------------------------------------------------------------------------------------- health


def test_cooling_key_is_skipped_and_returns_when_the_clock_passes() -> None:
    events: list[tuple[str, str]] = []
    pool, clock = make("a", "b", "c", events=events)
    pool.report_rate_limited("b", 10)
    assert ("cooldown", "b") in events
    assert "b" not in take(pool, 6)
    assert state_of(pool, "b") == {"alias": "b", "state": "cooling", "availableInSeconds": 10.0}
    clock.advance(9.5)
    assert "b" not in take(pool, 6)
    assert state_of(pool, "b")["availableInSeconds"] == 0.5
    clock.advance(0.5)
    assert "b" in take(pool, 3)
    assert events.count(("restored", "b")) == 1
    assert state_of(pool, "b")["state"] == "available"


def test_retry_after_none_uses_the_default_cooldown() -> None:
    pool, clock = make("a", "b", rate_limit_cooldown="45s")
    pool.report_rate_limited("a", None)
    assert state_of(pool, "a") == {"alias": "a", "state": "cooling", "availableInSeconds": 45.0}
    clock.advance(44.9)
    assert take(pool, 2) == ["b", "b"]
    clock.advance(0.1)
    assert sorted(take(pool, 2)) == ["a", "b"]


def test_retry_after_is_capped_at_max_cooldown() -> None:
    pool, _ = make("a", "b", max_cooldown="5m")
    pool.report_rate_limited("a", 86_400)
    assert state_of(pool, "a")["availableInSeconds"] == 300.0
    pool.report_rate_limited("b", math.inf)
    assert state_of(pool, "b")["availableInSeconds"] == 300.0


def test_odd_retry_after_values() -> None:
    pool, _ = make("a", "b")
    pool.report_rate_limited("a", math.nan)  # unusable header value: default cooldown
    assert state_of(pool, "a")["availableInSeconds"] == 30.0
    pool.report_rate_limited("b", -5)  # in the past: back at once
    assert state_of(pool, "b")["state"] == "available"
    assert pool.acquire().alias == "b"


def test_rejected_key_is_quarantined_with_an_error_alarm(caplog: pytest.LogCaptureFixture) -> None:
    events: list[tuple[str, str]] = []
    pool, clock = make("primary", "secondary", events=events, quarantine="1h")
    with caplog.at_level(logging.ERROR, logger="gate.keys"):
        pool.report_rejected("primary", 401)
    alarms = [r for r in caplog.records if r.name == "gate.keys" and r.levelno == logging.ERROR]
    assert len(alarms) == 1
    assert "'primary'" in alarms[0].getMessage() and "401" in alarms[0].getMessage()
    assert ("quarantine", "primary") in events
    assert state_of(pool, "primary") == {
        "alias": "primary", "state": "quarantined", "availableInSeconds": 3600.0
    }
    assert take(pool, 4) == ["secondary"] * 4
    clock.advance(3600)
    assert "primary" in take(pool, 2)
    assert ("restored", "primary") in events


def test_quarantine_outlasts_a_shorter_cooldown_and_keeps_its_label() -> None:
    pool, _ = make("a", "b")
    pool.report_rejected("a", 403)
    pool.report_rate_limited("a", 5)
    assert state_of(pool, "a") == {"alias": "a", "state": "quarantined", "availableInSeconds": 3600.0}
    pool.report_rate_limited("b", 60)
    pool.report_rejected("b", 403)
    assert state_of(pool, "b") == {"alias": "b", "state": "quarantined", "availableInSeconds": 3600.0}


def test_a_longer_cooldown_extends_a_cooling_key() -> None:
    pool, clock = make("a", "b")
    pool.report_rate_limited("a", 10)
    clock.advance(5)
    pool.report_rate_limited("a", 20)
    pool.report_rate_limited("a", 1)  # a shorter one does not bring it back early
    assert state_of(pool, "a")["availableInSeconds"] == 20.0


def test_all_keys_rejected_is_told_apart_from_all_keys_cooling() -> None:
    pool, _ = make("a", "b")
    pool.report_rejected("a", 401)
    pool.report_rejected("b", 403)
    with pytest.raises(NoKeyAvailable) as rejected:
        pool.acquire()
    assert rejected.value.rejected_only is True
    pool.report_rate_limited("a", 5)  # a quarantined key keeps its label; add a merely cooling one
    pool2, _ = make("a", "b")
    pool2.report_rejected("a", 401)
    pool2.report_rate_limited("b", 5)
    with pytest.raises(NoKeyAvailable) as mixed:
        pool2.acquire()
    assert mixed.value.rejected_only is False


def test_all_keys_out_raises_with_the_soonest_return() -> None:
    pool, clock = make("a", "b", "c")
    pool.report_rate_limited("a", 10)
    pool.report_rate_limited("b", 5)
    pool.report_rejected("c", 401)
    with pytest.raises(NoKeyAvailable) as caught:
        pool.acquire()
    assert caught.value.retry_after == pytest.approx(5.0)
    assert pool.snapshot()["available"] == 0
    clock.advance(2)
    with pytest.raises(NoKeyAvailable) as later:
        pool.acquire()
    assert later.value.retry_after == pytest.approx(3.0)
    clock.advance(3)
    assert pool.acquire().alias == "b"


def test_unknown_alias_reports_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    events: list[tuple[str, str]] = []
    pool, _ = make("a", events=events)
    with caplog.at_level(logging.WARNING, logger="gate.keys"):
        pool.report_rate_limited("ghost", 10)
        pool.report_rejected("ghost", 401)
    assert events == []
    assert pool.snapshot()["available"] == 1
    assert sum("unknown" in r.getMessage() for r in caplog.records) == 2


def test_report_success_changes_nothing() -> None:
    pool, _ = make("a", "b")
    pool.report_rate_limited("a", 10)
    pool.report_success("a")
    assert state_of(pool, "a")["state"] == "cooling"


def test_healthy_pool_never_reads_the_clock_on_acquire() -> None:
    clock = FakeClock()
    reads = 0

    def counting_clock() -> float:
        nonlocal reads
        reads += 1
        return clock()

    pool = KeyPool(api_keys("a", "b"), KeyHealthSettings(), clock=counting_clock)
    take(pool, 4)
    assert reads == 0
    pool.report_rate_limited("a", 1)
    clock.advance(1)
    take(pool, 2)  # notices that a is back
    reads = 0
    take(pool, 4)
    assert reads == 0


def test_a_clock_that_starts_at_zero() -> None:
    pool, clock = make("a", "b", clock=FakeClock(0.0))
    pool.report_rate_limited("a", 0)
    assert take(pool, 2) == ["a", "b"]
    pool.report_rate_limited("b", 1)
    clock.advance(1)
    assert sorted(take(pool, 2)) == ["a", "b"]


# --------------------------------------------------------------------------------------- exclude, empty pool


def test_exclude_skips_given_aliases() -> None:
    pool, _ = make("a", "b", "c")
    assert set(take(pool, 9, frozenset({"a"}))) == {"b", "c"}
    assert take(pool, 3, frozenset({"a", "c"})) == ["b"] * 3


def test_only_excluded_keys_available_raises() -> None:
    pool, _ = make("a", "b")
    pool.report_rate_limited("b", 7)
    with pytest.raises(NoKeyAvailable) as caught:
        pool.acquire(frozenset({"a"}))
    assert caught.value.retry_after == pytest.approx(7.0)  # when b returns
    with pytest.raises(NoKeyAvailable) as everything:
        pool.acquire(frozenset({"a", "b"}))
    assert everything.value.retry_after == 0.0
    assert pool.acquire().alias == "a"


def test_zero_keys() -> None:
    pool, _ = make()
    assert len(pool) == 0
    with pytest.raises(NoKeyAvailable) as caught:
        pool.acquire()
    assert caught.value.retry_after is None
    assert "configured" in str(caught.value)
    assert pool.snapshot() == {"count": 0, "available": 0, "keys": []}


def test_selected_event_per_acquire() -> None:
    events: list[tuple[str, str]] = []
    pool, _ = make("a", "b", events=events)
    take(pool, 3)
    assert events == [("selected", "a"), ("selected", "b"), ("selected", "a")]


# --------------------------------------------------------------------------------------------------- secrecy


def test_values_never_show_in_repr_str_snapshot_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    pool, clock = make("a", "b")
    with caplog.at_level(logging.DEBUG):
        key = pool.acquire()
        texts = [repr(key), str(key), f"{key}", json.dumps(pool.snapshot())]
        pool.report_rate_limited("a", None)
        pool.report_rejected("b", 403)
        with pytest.raises(NoKeyAvailable) as caught:
            pool.acquire()
        texts += [str(caught.value), repr(caught.value), json.dumps(pool.snapshot())]
        clock.advance(3600)
        pool.acquire()
    texts += [record.getMessage() for record in caplog.records]
    texts += [repr(record.args) for record in caplog.records]
    assert key.alias in texts[0]
    assert any("'b'" in text for text in texts)
    for text in texts:
        assert SECRET not in text


# -------------------------------------------------------------------------------------------------- property


operations = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.frozensets(st.sampled_from("abcd"), max_size=4)),
        st.tuples(
            st.just("limited"), st.sampled_from("abcd"), st.none() | st.just(math.nan) | st.floats(-5, 5_000)
        ),
        st.tuples(st.just("rejected"), st.sampled_from("abcd"), st.sampled_from([401, 403])),
        st.tuples(st.just("advance"), st.floats(0, 120)),
    ),
    max_size=60,
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(aliases=st.lists(st.sampled_from("abcd"), unique=True, max_size=4), ops=operations)
def test_never_selects_a_resting_key_and_only_raises_no_key_available(
    aliases: list[str], ops: list[tuple[Any, ...]]
) -> None:
    settings = KeyHealthSettings(rate_limit_cooldown=30, max_cooldown=600, quarantine=900)
    clock = FakeClock(0.0)
    pool = KeyPool(api_keys(*aliases), settings, clock=clock)
    back_at = dict.fromkeys(aliases, -math.inf)  # the model: when each key is back in rotation
    for op in ops:
        if op[0] == "acquire":
            exclude = op[1]
            candidates = [a for a in aliases if a not in exclude]
            resting = {a: back_at[a] - clock.now for a in candidates if back_at[a] > clock.now}
            try:
                alias = pool.acquire(exclude).alias
            except NoKeyAvailable as exc:
                if not aliases:
                    assert exc.retry_after is None
                else:
                    assert len(resting) == len(candidates), "refused although a key was in rotation"
                    assert exc.retry_after == pytest.approx(min(resting.values(), default=0.0))
            else:
                assert alias in candidates
                assert alias not in resting, f"selected {alias}, which rests for {resting.get(alias)} s"
        elif op[0] == "limited":
            _, alias, retry_after = op
            pool.report_rate_limited(alias, retry_after)
            if alias in back_at:
                seconds = 30 if retry_after is None or math.isnan(retry_after) else retry_after
                back_at[alias] = max(back_at[alias], clock.now + min(max(seconds, 0), 600))
        elif op[0] == "rejected":
            _, alias, status = op
            pool.report_rejected(alias, status)
            if alias in back_at:
                back_at[alias] = max(back_at[alias], clock.now + 900)
        else:
            clock.advance(op[1])
        snapshot = pool.snapshot()
        assert snapshot["count"] == len(aliases)
        assert snapshot["available"] == sum(back_at[a] <= clock.now for a in aliases)


# ------------------------------------------------------------------------------------------------- probes


def test_a_rejected_key_is_handed_to_the_prober_and_restore_puts_it_back_at_once() -> None:
    events: list[tuple[str, str]] = []
    pool, _ = make("a", "b", events=events, quarantine="1h")
    probed: list[str] = []
    pool.on_quarantine = lambda key: probed.append(key.alias)
    pool.report_rejected("a", 401)
    assert probed == ["a"] and pool.is_quarantined("a")
    assert take(pool, 2) == ["b", "b"]
    pool.restore("a")
    assert not pool.is_quarantined("a") and ("restored", "a") in events
    assert sorted(take(pool, 2)) == ["a", "b"]
    pool.restore("b")  # not quarantined: nothing happens
    assert events.count(("restored", "b")) == 0


def test_a_cooling_key_is_not_restored_by_a_probe() -> None:
    pool, _ = make("a", "b")
    pool.report_rate_limited("a", 30)
    pool.restore("a")
    assert state_of(pool, "a")["state"] == "cooling"
