"""The circuit breaker state machine: every transition and threshold on a fake clock, plus a model check."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gate.settings import CircuitBreakerSettings
from gate.upstreams.breaker import (
    HALF_OPEN_RETRY_AFTER,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    Permit,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(
    clock: FakeClock | None = None,
    changes: list[tuple[BreakerState, BreakerState]] | None = None,
    **overrides: Any,
) -> tuple[CircuitBreaker, FakeClock]:
    clock = clock or FakeClock()
    on_change = None if changes is None else (lambda old, new: changes.append((old, new)))
    breaker = CircuitBreaker(CircuitBreakerSettings(**overrides), clock=clock, on_state_change=on_change)
    return breaker, clock


def call(breaker: CircuitBreaker, *, failed: bool = False, duration: float = 0.1) -> None:
    breaker.record(breaker.acquire(), failed=failed, duration=duration)


def trip(breaker: CircuitBreaker) -> None:
    """Open a breaker with default settings: 20 failed calls."""
    for _ in range(20):
        call(breaker, failed=True)
    assert breaker.state is OPEN


def to_half_open(breaker: CircuitBreaker, clock: FakeClock) -> list[Permit]:
    trip(breaker)
    clock.advance(60)
    return [breaker.acquire() for _ in range(10)]


# ---------------------------------------------------------------------------------------------------- CLOSED


def test_defaults_are_resilience4j_defaults_of_the_seed() -> None:
    snapshot = make()[0].snapshot()
    assert snapshot["state"] == "CLOSED"
    assert snapshot["failureRateThreshold"] == 50.0
    assert snapshot["slowCallRateThreshold"] == 100.0
    assert snapshot["failureRate"] == -1.0
    assert snapshot["bufferedCalls"] == 0
    assert "retryAfterSeconds" not in snapshot


def test_below_minimum_number_of_calls_never_trips() -> None:
    breaker, _ = make()
    for _ in range(19):
        call(breaker, failed=True)
    assert breaker.state is CLOSED
    snapshot = breaker.snapshot()
    assert snapshot["bufferedCalls"] == 19
    assert snapshot["failedCalls"] == 19
    assert snapshot["failureRate"] == -1.0
    assert snapshot["slowCallRate"] == -1.0


def test_failure_rate_exactly_at_threshold_trips_on_the_minimum_call() -> None:
    breaker, _ = make()
    for i in range(19):
        call(breaker, failed=i % 2 == 0)  # 10 failures among the first 19
    assert breaker.state is CLOSED
    call(breaker, failed=False)  # 10 of 20 = 50%
    assert breaker.state is OPEN
    snapshot = breaker.snapshot()
    assert snapshot["failureRate"] == 50.0
    assert snapshot["bufferedCalls"] == 20


def test_failure_rate_just_below_threshold_does_not_trip() -> None:
    breaker, _ = make()
    for i in range(20):
        call(breaker, failed=i < 9)  # 45%
    assert breaker.state is CLOSED
    assert breaker.snapshot()["failureRate"] == 45.0


def test_all_successful_but_slow_calls_trip_on_slow_call_rate() -> None:
    breaker, _ = make()
    for _ in range(19):
        call(breaker, duration=30.5)
    assert breaker.state is CLOSED
    call(breaker, duration=31)
    assert breaker.state is OPEN
    snapshot = breaker.snapshot()
    assert snapshot["slowCallRate"] == 100.0
    assert snapshot["failureRate"] == 0.0
    assert snapshot["slowCalls"] == 20


def test_a_call_exactly_at_the_slow_duration_is_not_slow() -> None:
    breaker, _ = make()
    for _ in range(20):
        call(breaker, duration=30.0)
    assert breaker.state is CLOSED
    assert breaker.snapshot()["slowCalls"] == 0


def test_slow_rate_below_100_percent_threshold_trips_when_configured() -> None:
    breaker, _ = make(slow_call_rate_threshold=50, minimum_number_of_calls=4)
    for duration in (1, 40, 1, 40):
        call(breaker, duration=duration)
    assert breaker.state is OPEN
    assert breaker.snapshot()["slowCallRate"] == 50.0


def test_slow_failed_calls_count_in_both_rates() -> None:
    breaker, _ = make(minimum_number_of_calls=4, failure_rate_threshold=100)
    for failed, duration in ((True, 40), (False, 40), (True, 1), (False, 1)):
        call(breaker, failed=failed, duration=duration)
    snapshot = breaker.snapshot()
    assert breaker.state is CLOSED
    assert (snapshot["failedCalls"], snapshot["slowCalls"], snapshot["slowFailedCalls"]) == (2, 2, 1)
    assert (snapshot["failureRate"], snapshot["slowCallRate"]) == (50.0, 50.0)


def test_window_slides_so_old_failures_fall_out() -> None:
    breaker, _ = make(sliding_window_size=10, minimum_number_of_calls=10)
    for i in range(10):
        call(breaker, failed=i < 4)  # 40%
    assert breaker.state is CLOSED
    for _ in range(10):
        call(breaker)
    snapshot = breaker.snapshot()
    assert (snapshot["bufferedCalls"], snapshot["failedCalls"], snapshot["failureRate"]) == (10, 0, 0.0)
    # Four more failures only make 40% again: the earlier four are gone.
    for _ in range(4):
        call(breaker, failed=True)
    assert breaker.state is CLOSED
    call(breaker, failed=True)  # 5 of the last 10
    assert breaker.state is OPEN


def test_minimum_above_window_size_is_capped_at_the_window_size() -> None:
    breaker, _ = make(sliding_window_size=5, minimum_number_of_calls=20)
    for _ in range(5):
        call(breaker, failed=True)
    assert breaker.state is OPEN


def test_released_permits_in_closed_state_are_not_recorded() -> None:
    breaker, _ = make()
    for _ in range(50):
        breaker.release(breaker.acquire())
    assert breaker.snapshot()["bufferedCalls"] == 0


# ------------------------------------------------------------------------------------------------------ OPEN


def test_open_rejects_with_retry_after_that_shrinks_with_the_clock() -> None:
    breaker, clock = make()
    trip(breaker)
    with pytest.raises(CircuitOpenError) as first:
        breaker.acquire()
    assert first.value.retry_after == pytest.approx(60.0)
    assert first.value.state is OPEN
    clock.advance(15)
    with pytest.raises(CircuitOpenError) as later:
        breaker.acquire()
    assert later.value.retry_after == pytest.approx(45.0)
    clock.advance(44.5)
    with pytest.raises(CircuitOpenError) as last:
        breaker.acquire()
    assert last.value.retry_after == pytest.approx(0.5)
    snapshot = breaker.snapshot()
    assert snapshot["notPermittedCalls"] == 3
    assert snapshot["retryAfterSeconds"] == pytest.approx(0.5)
    # The window that tripped the breaker stays visible while it is open.
    assert (snapshot["bufferedCalls"], snapshot["failureRate"]) == (20, 100.0)
    assert "OPEN" in str(last.value)


def test_open_stays_open_without_acquire_even_after_the_wait() -> None:
    breaker, clock = make()
    trip(breaker)
    clock.advance(600)
    assert breaker.state is OPEN  # like Resilience4j without automatic transition: the next acquire moves it
    assert breaker.snapshot()["retryAfterSeconds"] == 0.0


def test_first_acquire_after_the_wait_moves_to_half_open() -> None:
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker, clock = make(changes=changes)
    trip(breaker)
    clock.advance(59.999)
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    clock.advance(0.001)
    breaker.acquire()
    assert breaker.state is HALF_OPEN
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]
    snapshot = breaker.snapshot()
    assert (snapshot["bufferedCalls"], snapshot["notPermittedCalls"]) == (0, 0)


def test_custom_wait_duration() -> None:
    breaker, clock = make(wait_duration_in_open_state="5s")
    trip(breaker)
    with pytest.raises(CircuitOpenError) as rejected:
        breaker.acquire()
    assert rejected.value.retry_after == pytest.approx(5.0)
    clock.advance(5)
    breaker.acquire()
    assert breaker.state is HALF_OPEN


# ------------------------------------------------------------------------------------------------- HALF_OPEN


def test_half_open_permits_exactly_the_configured_number_then_rejects() -> None:
    breaker, clock = make()
    permits = to_half_open(breaker, clock)
    assert len(permits) == 10
    with pytest.raises(CircuitOpenError) as rejected:
        breaker.acquire()
    assert rejected.value.retry_after == HALF_OPEN_RETRY_AFTER
    assert rejected.value.state is HALF_OPEN
    assert breaker.snapshot()["notPermittedCalls"] == 1


def test_half_open_waits_for_every_permitted_call_before_deciding() -> None:
    breaker, clock = make()
    permits = to_half_open(breaker, clock)
    for permit in permits[:9]:
        breaker.record(permit, failed=True, duration=0.1)
    assert breaker.state is HALF_OPEN  # 9 failures, yet no verdict before the 10th
    assert breaker.snapshot()["failureRate"] == -1.0


def test_half_open_successes_close_with_a_fresh_window() -> None:
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker, clock = make(changes=changes)
    permits = to_half_open(breaker, clock)
    for i, permit in enumerate(permits):
        breaker.record(permit, failed=i < 4, duration=0.1)  # 40% < 50%
    assert breaker.state is CLOSED
    assert changes[-1] == (HALF_OPEN, CLOSED)
    snapshot = breaker.snapshot()
    assert (snapshot["bufferedCalls"], snapshot["failedCalls"], snapshot["notPermittedCalls"]) == (0, 0, 0)
    # A fresh window needs the full minimum again before it can trip.
    for _ in range(19):
        call(breaker, failed=True)
    assert breaker.state is CLOSED


def test_half_open_failures_at_threshold_open_again() -> None:
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker, clock = make(changes=changes)
    permits = to_half_open(breaker, clock)
    for i, permit in enumerate(permits):
        breaker.record(permit, failed=i < 5, duration=0.1)  # 50%
    assert breaker.state is OPEN
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]
    with pytest.raises(CircuitOpenError) as rejected:
        breaker.acquire()
    assert rejected.value.retry_after == pytest.approx(60.0)  # a whole new wait from the re-opening


def test_half_open_slow_calls_open_again() -> None:
    breaker, clock = make()
    for permit in to_half_open(breaker, clock):
        breaker.record(permit, failed=False, duration=45)
    assert breaker.state is OPEN


def test_release_in_half_open_frees_a_slot() -> None:
    breaker, clock = make()
    permits = to_half_open(breaker, clock)
    breaker.release(permits[0])
    replacement = breaker.acquire()
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    for permit in [*permits[1:], replacement]:
        breaker.record(permit, failed=False, duration=0.1)
    assert breaker.state is CLOSED


def test_settling_a_permit_twice_counts_once() -> None:
    breaker, clock = make()
    permits = to_half_open(breaker, clock)
    breaker.release(permits[0])
    breaker.release(permits[0])
    breaker.record(permits[0], failed=True, duration=0.1)
    breaker.acquire()
    with pytest.raises(CircuitOpenError):
        breaker.acquire()  # the double release freed one slot, not two
    breaker.record(permits[1], failed=True, duration=0.1)
    breaker.record(permits[1], failed=True, duration=0.1)
    assert breaker.snapshot()["bufferedCalls"] == 1


def test_half_open_trial_of_one_call() -> None:
    breaker, clock = make(permitted_number_of_calls_in_half_open_state=1)
    trip(breaker)
    clock.advance(60)
    breaker.record(breaker.acquire(), failed=False, duration=0.1)
    assert breaker.state is CLOSED


# --------------------------------------------------------------------------------------------- stale permits


def test_stale_closed_permit_recorded_while_open_is_ignored() -> None:
    breaker, _ = make()
    stale = breaker.acquire()
    trip(breaker)
    before = breaker.snapshot()
    breaker.record(stale, failed=True, duration=100)
    assert breaker.snapshot() == before


def test_stale_closed_permit_does_not_count_in_the_half_open_trial() -> None:
    breaker, clock = make()
    stale = [breaker.acquire() for _ in range(3)]
    permits = to_half_open(breaker, clock)
    breaker.record(stale[0], failed=True, duration=0.1)
    breaker.release(stale[1])  # must not free a half-open slot either
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    assert breaker.snapshot()["bufferedCalls"] == 0
    for permit in permits:
        breaker.record(permit, failed=False, duration=0.1)
    assert breaker.state is CLOSED
    breaker.record(stale[2], failed=True, duration=0.1)  # still from the first CLOSED era
    assert breaker.snapshot()["bufferedCalls"] == 0


def test_stale_half_open_permit_after_reopening_is_ignored() -> None:
    breaker, clock = make(permitted_number_of_calls_in_half_open_state=2)
    trip(breaker)
    clock.advance(60)
    first, second = breaker.acquire(), breaker.acquire()
    breaker.record(first, failed=True, duration=0.1)
    breaker.release(second)
    third = breaker.acquire()
    breaker.record(third, failed=True, duration=0.1)
    assert breaker.state is OPEN
    clock.advance(60)
    fresh = breaker.acquire()
    breaker.release(second)  # already settled
    breaker.record(first, failed=True, duration=0.1)  # from the previous trial
    assert breaker.snapshot()["bufferedCalls"] == 0
    breaker.acquire()
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    breaker.record(fresh, failed=False, duration=0.1)
    assert breaker.state is HALF_OPEN


# --------------------------------------------------------------------------------------- disabled, callbacks


def test_disabled_breaker_always_permits_and_records_nothing() -> None:
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker, _ = make(changes=changes, enabled=False)
    for _ in range(500):
        call(breaker, failed=True, duration=120)
    assert breaker.state is CLOSED
    assert changes == []
    assert breaker.snapshot()["bufferedCalls"] == 0


def test_state_changes_are_logged_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    breaker, clock = make()
    with caplog.at_level(logging.WARNING, logger="gate.breaker"):
        permits = to_half_open(breaker, clock)
        for permit in permits:
            breaker.record(permit, failed=False, duration=0.1)
    messages = [r.getMessage() for r in caplog.records if r.name == "gate.breaker"]
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "gate.breaker")
    assert len(messages) == 3
    assert "CLOSED -> OPEN" in messages[0] and "failure rate 100.0%" in messages[0]
    assert "OPEN -> HALF_OPEN" in messages[1]
    assert "HALF_OPEN -> CLOSED" in messages[2]


def test_a_failing_callback_does_not_break_the_transition(caplog: pytest.LogCaptureFixture) -> None:
    def broken(old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("metrics backend down")

    clock = FakeClock()
    breaker = CircuitBreaker(CircuitBreakerSettings(), clock=clock, on_state_change=broken)
    with caplog.at_level(logging.ERROR, logger="gate.breaker"):
        trip(breaker)
    assert breaker.state is OPEN
    assert any("callback failed" in r.getMessage() for r in caplog.records)
    clock.advance(60)
    breaker.acquire()
    assert breaker.state is HALF_OPEN


def test_settings_accept_kebab_case_and_durations() -> None:
    settings = CircuitBreakerSettings.model_validate(
        {
            "slow-call-duration-threshold": "500ms",
            "wait-duration-in-open-state": "2m",
            "sliding-window-size": 7,
        }
    )
    breaker = CircuitBreaker(settings, clock=FakeClock())
    for _ in range(7):
        call(breaker, duration=0.6)
    assert breaker.state is OPEN
    with pytest.raises(CircuitOpenError) as rejected:
        breaker.acquire()
    assert rejected.value.retry_after == pytest.approx(120.0)


# ----------------------------------------------------------------------------------------------- model check


@dataclass
class ReferenceBreaker:
    """The rules written as plainly as possible: a list of outcomes, rates recomputed from scratch."""

    settings: CircuitBreakerSettings
    state: BreakerState = CLOSED
    outcomes: list[tuple[bool, bool]] = field(default_factory=list)
    era: int = 0
    open_until: float = 0.0
    issued: int = 0
    not_permitted: int = 0

    @property
    def size(self) -> int:
        s = self.settings
        half_open = self.state is HALF_OPEN
        return s.permitted_number_of_calls_in_half_open_state if half_open else s.sliding_window_size

    @property
    def minimum(self) -> int:
        s = self.settings
        if self.state is HALF_OPEN:
            return s.permitted_number_of_calls_in_half_open_state
        return min(s.minimum_number_of_calls, s.sliding_window_size)

    def acquire(self, now: float) -> tuple[int | None, float | None]:
        """(era of the permit, None) or (None, retry_after)."""
        if not self.settings.enabled or self.state is CLOSED:
            return self.era, None
        if self.state is OPEN:
            if now < self.open_until:
                self.not_permitted += 1
                return None, self.open_until - now
            self.move(HALF_OPEN, now)
        if self.issued < self.settings.permitted_number_of_calls_in_half_open_state:
            self.issued += 1
            return self.era, None
        self.not_permitted += 1
        return None, HALF_OPEN_RETRY_AFTER

    def record(self, era: int, failed: bool, duration: float, now: float) -> None:
        if not self.settings.enabled or era != self.era:
            return
        slow = duration > self.settings.slow_call_duration_threshold
        self.outcomes = [*self.outcomes, (failed, slow)][-self.size :]
        if len(self.outcomes) < self.minimum:
            return
        failure_rate = 100 * sum(f for f, _ in self.outcomes) / len(self.outcomes)
        slow_rate = 100 * sum(s for _, s in self.outcomes) / len(self.outcomes)
        s = self.settings
        if failure_rate >= s.failure_rate_threshold or slow_rate >= s.slow_call_rate_threshold:
            self.move(OPEN, now)
        elif self.state is HALF_OPEN:
            self.move(CLOSED, now)

    def release(self, era: int) -> None:
        if self.settings.enabled and era == self.era and self.state is HALF_OPEN:
            self.issued -= 1

    def move(self, state: BreakerState, now: float) -> None:
        self.state = state
        self.era += 1
        self.issued = 0
        if state is OPEN:
            self.open_until = now + self.settings.wait_duration_in_open_state
        else:
            self.outcomes = []
            self.not_permitted = 0


@dataclass
class Outstanding:
    permit: Permit
    era: int
    settled: bool = False


class BreakerMachine(RuleBasedStateMachine):
    clock: FakeClock
    breaker: CircuitBreaker
    model: ReferenceBreaker
    outstanding: list[Outstanding]
    changes: list[tuple[BreakerState, BreakerState]]

    @initialize(
        window=st.integers(1, 8),
        minimum=st.integers(1, 10),
        failure_threshold=st.sampled_from([10.0, 34.0, 50.0, 100.0]),
        slow_threshold=st.sampled_from([25.0, 50.0, 100.0]),
        half_open=st.integers(1, 4),
        disabled=st.integers(0, 9),
    )
    def setup(
        self,
        window: int,
        minimum: int,
        failure_threshold: float,
        slow_threshold: float,
        half_open: int,
        disabled: int,
    ) -> None:
        settings = CircuitBreakerSettings(
            enabled=disabled != 0,  # one run in ten checks the disabled breaker
            sliding_window_size=window,
            minimum_number_of_calls=minimum,
            failure_rate_threshold=failure_threshold,
            slow_call_rate_threshold=slow_threshold,
            slow_call_duration_threshold=1.0,
            wait_duration_in_open_state=10.0,
            permitted_number_of_calls_in_half_open_state=half_open,
        )
        self.clock = FakeClock()
        self.changes = []
        self.breaker = CircuitBreaker(
            settings, clock=self.clock, on_state_change=lambda old, new: self.changes.append((old, new))
        )
        self.model = ReferenceBreaker(settings)
        self.outstanding = []

    @rule()
    def acquire(self) -> None:
        era, retry_after = self.model.acquire(self.clock.now)
        try:
            permit = self.breaker.acquire()
        except CircuitOpenError as rejected:
            assert era is None, "the breaker refused a call the rules allow"
            assert rejected.retry_after == pytest.approx(retry_after)
            assert rejected.retry_after > 0
        else:
            assert era is not None, "the breaker let through a call the rules refuse"
            self.outstanding.append(Outstanding(permit, era))

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), failed=st.booleans(), duration=st.sampled_from([0.0, 0.5, 1.0, 1.5, 60.0]))
    def record(self, data: st.DataObject, failed: bool, duration: float) -> None:
        call = data.draw(st.sampled_from(self.outstanding))
        self.breaker.record(call.permit, failed=failed, duration=duration)
        if not call.settled:
            self.model.record(call.era, failed, duration, self.clock.now)
        call.settled = True

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        call = data.draw(st.sampled_from(self.outstanding))
        self.breaker.release(call.permit)
        if not call.settled:
            self.model.release(call.era)
        call.settled = True

    @rule(seconds=st.sampled_from([0.5, 5.0, 9.999, 10.0, 30.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def agrees_with_the_rules(self) -> None:
        snapshot = self.breaker.snapshot()
        model = self.model
        assert self.breaker.state is model.state
        assert snapshot["state"] == str(model.state)
        assert snapshot["bufferedCalls"] == len(model.outcomes)
        assert snapshot["failedCalls"] == sum(f for f, _ in model.outcomes)
        assert snapshot["slowCalls"] == sum(s for _, s in model.outcomes)
        assert snapshot["notPermittedCalls"] == model.not_permitted

    @invariant()
    def counts_stay_within_the_window(self) -> None:
        snapshot = self.breaker.snapshot()
        buffered = snapshot["bufferedCalls"]
        assert isinstance(buffered, int)
        settings = self.model.settings
        # OPEN keeps showing the window that tripped it: the CLOSED window or the half-open trial.
        largest = max(settings.sliding_window_size, settings.permitted_number_of_calls_in_half_open_state)
        assert 0 <= buffered <= (settings.sliding_window_size if self.breaker.state is CLOSED else largest)
        assert 0 <= snapshot["failedCalls"] <= buffered  # type: ignore[operator]
        assert 0 <= snapshot["slowFailedCalls"] <= snapshot["slowCalls"] <= buffered  # type: ignore[operator]
        rate = snapshot["failureRate"]
        assert rate == -1.0 or 0.0 <= rate <= 100.0  # type: ignore[operator]
        if self.breaker.state is HALF_OPEN:
            half_open = settings.permitted_number_of_calls_in_half_open_state
            assert buffered < half_open  # a full trial is always judged at once
            assert 0 <= self.model.issued <= half_open

    @invariant()
    def every_change_was_reported_once(self) -> None:
        assert len(self.changes) == self.model.era
        for (_, previous_new), (old, _) in zip(self.changes, self.changes[1:], strict=False):
            assert previous_new is old


BreakerMachine.TestCase.settings = hypothesis_settings(
    max_examples=200, stateful_step_count=50, deadline=None
)
test_breaker_follows_the_rules = BreakerMachine.TestCase


# ---------------------------------------------------------------------------------------------------- late failures


def test_a_late_failure_turns_the_calls_outcome_into_a_failure_while_it_is_in_the_window() -> None:
    breaker, _ = make(sliding_window_size=4, minimum_number_of_calls=4)
    permits = [breaker.acquire() for _ in range(4)]
    for permit in permits:
        breaker.record(permit, failed=False, duration=0.1)
    breaker.record_late_failure(permits[0])
    breaker.record_late_failure(permits[0])  # once per call, however often it is reported
    assert breaker.snapshot()["failedCalls"] == 1 and breaker.state is CLOSED
    breaker.record_late_failure(permits[1])
    assert breaker.state is OPEN  # 2 of 4 failed: 50 %


def test_a_late_failure_of_a_call_that_left_the_window_is_ignored() -> None:
    breaker, _ = make(sliding_window_size=2, minimum_number_of_calls=2)
    first = breaker.acquire()
    breaker.record(first, failed=False, duration=0.1)
    call(breaker)
    call(breaker)  # ``first`` has been evicted
    breaker.record_late_failure(first)
    assert breaker.snapshot()["failedCalls"] == 0


def test_a_half_open_trial_closes_at_its_heads_and_late_failures_then_count_in_the_fresh_window() -> None:
    breaker, clock = make(permitted_number_of_calls_in_half_open_state=2, minimum_number_of_calls=2)
    call(breaker, failed=True)
    call(breaker, failed=True)
    assert breaker.state is OPEN
    clock.advance(60)
    trial = [breaker.acquire(), breaker.acquire()]
    for permit in trial:
        breaker.record(permit, failed=False, duration=0.1)
    assert breaker.state is CLOSED
    breaker.record_late_failure(trial[0])
    breaker.record_late_failure(trial[1])
    snapshot = breaker.snapshot()
    assert snapshot["failedCalls"] == 2 and snapshot["bufferedCalls"] == 2
    assert breaker.state is OPEN  # 2 of the 2 calls the fresh window has: 100 %


def test_a_late_failure_while_open_is_ignored() -> None:
    breaker, _ = make(sliding_window_size=2, minimum_number_of_calls=2)
    permit = breaker.acquire()
    breaker.record(permit, failed=False, duration=0.1)
    call(breaker, failed=True)
    assert breaker.state is OPEN  # 1 of 2: 50 %
    breaker.record_late_failure(permit)
    assert breaker.state is OPEN and breaker.snapshot()["failedCalls"] == 1
