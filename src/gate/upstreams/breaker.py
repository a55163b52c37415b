"""The circuit breaker in front of Anthropic: Resilience4j's count-based state machine, clock-injected.

Libraries checked first: pybreaker 1.4, aiobreaker 1.2, circuitbreaker 2.1, purgatory 3.0 and
resilient-circuit 0.8 trip on consecutive failures or a plain failure fraction; none has a slow-call rate, a
minimum number of calls and a bounded multi-call half-open trial together. interlock-cb 2.8 has those
semantics, but only behind decorators and context managers that time the call and classify exceptions
themselves: the acquire-now, record-after-the-stream split the relay needs (with ignored outcomes and stale
permits) is private API there, and it counts a call as slow at ``>=`` the threshold where Resilience4j uses
``>``.

Semantics (Resilience4j, ``COUNT_BASED`` window, no automatic OPEN -> HALF_OPEN transition):

* CLOSED keeps the outcomes of the last ``sliding-window-size`` calls. Once ``minimum-number-of-calls``
  (capped at the window size) are buffered, a failure rate or slow-call rate at or above its threshold opens
  the circuit. A call is slow when its duration exceeds ``slow-call-duration-threshold``.
* OPEN rejects at once with the seconds left; the first ``acquire`` after ``wait-duration-in-open-state``
  moves to HALF_OPEN.
* HALF_OPEN lets exactly ``permitted-number-of-calls-in-half-open-state`` calls through and judges them as a
  window of that size: CLOSED (fresh window) if both rates are below their thresholds, else OPEN again.
* Every permit ends in one ``record`` or ``release``; ``release`` (a 4xx, a client that left) returns a
  half-open slot without an outcome. A permit from an earlier state (older generation) is ignored.

Gate records a call at upstream's response head (so a half-open trial ends as soon as its calls have answered,
however long their streams run), and a stream that fails later (stalls, breaks, carries an ``overloaded_error``)
through ``record_late_failure``: the call's outcome in the window turns into a failure while it is still there;
once the trial has closed the circuit, the failure counts in the fresh window; while open or in a newer trial,
it is ignored (a trial is judged by its own calls).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from gate.settings import CircuitBreakerSettings

__all__ = ["BreakerState", "CircuitBreaker", "CircuitOpenError", "Permit"]

logger = logging.getLogger("gate.breaker")

# Callers turned away by a full half-open trial may retry soon: the trial ends as soon as its calls return.
HALF_OPEN_RETRY_AFTER = 1.0

_FAILED = 1
_SLOW = 2


class BreakerState(StrEnum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


class CircuitOpenError(Exception):
    """The breaker refused the call; ``retry_after`` is the number of seconds worth waiting."""

    def __init__(self, state: BreakerState, retry_after: float) -> None:
        super().__init__(f"circuit breaker is {state}; retry after {retry_after:.1f} s")
        self.state = state
        self.retry_after = retry_after


@dataclass(slots=True, eq=False)
class Permit:
    """Leave to make one call; hand it back once through ``record`` or ``release``."""

    generation: int
    settled: bool = False
    window: _Window | None = None  # where ``record`` put the outcome, and its position there
    seq: int = 0
    failed_late: bool = False


class _Window:
    """The last ``size`` outcomes with running totals: O(1) per call, subtract-on-evict."""

    __slots__ = ("_next", "_outcomes", "added", "calls", "failed", "size", "slow", "slow_failed")

    def __init__(self, size: int) -> None:
        self.size = size
        self._outcomes = bytearray(size)
        self._next = 0
        self.added = 0  # outcomes ever added: the sequence number of the next one
        self.calls = 0
        self.failed = 0
        self.slow = 0
        self.slow_failed = 0

    def fail(self, seq: int) -> bool:
        """Turn the outcome added as number ``seq`` into a failure; False once it has left the window."""
        if not self.added - self.size <= seq < self.added:
            return False
        slot = seq % self.size
        outcome = self._outcomes[slot]
        if outcome & _FAILED:
            return False
        self._count(outcome, -1)
        self._outcomes[slot] = outcome | _FAILED
        self._count(outcome | _FAILED, 1)
        return True

    def add(self, outcome: int) -> int:
        """Add an outcome; its sequence number (see ``fail``)."""
        if self.calls == self.size:
            self._count(self._outcomes[self._next], -1)
        else:
            self.calls += 1
        self._outcomes[self._next] = outcome
        self._count(outcome, 1)
        self._next = (self._next + 1) % self.size
        seq = self.added
        self.added += 1
        return seq

    def _count(self, outcome: int, step: int) -> None:
        if outcome & _FAILED:
            self.failed += step
        if outcome & _SLOW:
            self.slow += step
        if outcome == _FAILED | _SLOW:
            self.slow_failed += step

    def failure_rate(self) -> float:
        return self.failed * 100.0 / self.calls if self.calls else 0.0

    def slow_call_rate(self) -> float:
        return self.slow * 100.0 / self.calls if self.calls else 0.0


class CircuitBreaker:
    """One breaker for one upstream. Not thread-safe: meant for one event loop, and nothing inside awaits."""

    def __init__(
        self,
        settings: CircuitBreakerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self._clock = clock
        self._on_state_change = on_state_change
        self._enabled = settings.enabled
        self._slow_after = settings.slow_call_duration_threshold
        self._failure_threshold = settings.failure_rate_threshold
        self._slow_threshold = settings.slow_call_rate_threshold
        self._wait = settings.wait_duration_in_open_state
        self._half_open_calls = settings.permitted_number_of_calls_in_half_open_state
        self._window_size = settings.sliding_window_size
        # As Resilience4j: with a count-based window, a minimum above the window size means the window size.
        self._closed_minimum = min(settings.minimum_number_of_calls, settings.sliding_window_size)
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._window = _Window(settings.sliding_window_size)
        self._minimum = self._closed_minimum
        self._open_until = 0.0
        self._half_open_issued = 0
        self._not_permitted = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    def acquire(self) -> Permit:
        """A permit for one call, or :class:`CircuitOpenError` with the seconds to wait."""
        if self._state is BreakerState.CLOSED or not self._enabled:
            return Permit(self._generation)
        if self._state is BreakerState.OPEN:
            remaining = self._open_until - self._clock()
            if remaining > 0:
                self._not_permitted += 1
                raise CircuitOpenError(BreakerState.OPEN, remaining)
            self._transition(BreakerState.HALF_OPEN)
        if self._half_open_issued < self._half_open_calls:
            self._half_open_issued += 1
            return Permit(self._generation)
        self._not_permitted += 1
        raise CircuitOpenError(BreakerState.HALF_OPEN, HALF_OPEN_RETRY_AFTER)

    def record(self, permit: Permit, *, failed: bool, duration: float) -> None:
        """The outcome of the call made with ``permit``; ``duration`` in seconds."""
        if not self._take(permit):
            return
        outcome = (_FAILED if failed else 0) | (_SLOW if duration > self._slow_after else 0)
        window = self._window
        permit.window, permit.seq = window, window.add(outcome)
        self._judge()

    def record_late_failure(self, permit: Permit) -> None:
        """The call recorded as a success with ``permit`` failed afterwards (its stream broke or stalled)."""
        if permit.failed_late or permit.window is None or not self._enabled or self._state is BreakerState.OPEN:
            return
        permit.failed_late = True
        if permit.window is self._window:
            if self._window.fail(permit.seq):
                self._judge()
        elif self._state is BreakerState.CLOSED and permit.generation + 1 == self._generation:
            self._window.add(_FAILED)  # the trial closed the circuit on this call's head; its failure counts now
            self._judge()

    def release(self, permit: Permit) -> None:
        """Hand back a permit whose call says nothing about upstream health (a 4xx, a client that left)."""
        if self._take(permit) and self._state is BreakerState.HALF_OPEN:
            self._half_open_issued -= 1

    def snapshot(self) -> dict[str, object]:
        """State and window figures under Resilience4j's health detail names; rates -1 below the minimum."""
        window = self._window
        judged = window.calls >= self._minimum
        details: dict[str, object] = {
            "state": str(self._state),
            "failureRate": round(window.failure_rate(), 2) if judged else -1.0,
            "slowCallRate": round(window.slow_call_rate(), 2) if judged else -1.0,
            "failureRateThreshold": self._failure_threshold,
            "slowCallRateThreshold": self._slow_threshold,
            "bufferedCalls": window.calls,
            "failedCalls": window.failed,
            "slowCalls": window.slow,
            "slowFailedCalls": window.slow_failed,
            "notPermittedCalls": self._not_permitted,
        }
        if self._state is BreakerState.OPEN:
            details["retryAfterSeconds"] = round(max(0.0, self._open_until - self._clock()), 3)
        return details

    # ------------------------------------------------------------------------------------------ internals

    def _take(self, permit: Permit) -> bool:
        """Settle ``permit`` once; True when it belongs to the current state and may count."""
        if permit.settled:
            return False
        permit.settled = True
        return self._enabled and permit.generation == self._generation

    def _judge(self) -> None:
        window = self._window
        if window.calls < self._minimum:
            return
        failing = window.failure_rate() >= self._failure_threshold
        if failing or window.slow_call_rate() >= self._slow_threshold:
            self._transition(BreakerState.OPEN)
        elif self._state is BreakerState.HALF_OPEN:
            self._transition(BreakerState.CLOSED)

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        window = self._window
        rates = f"failure rate {window.failure_rate():.1f}%, slow-call rate {window.slow_call_rate():.1f}%"
        self._state = new
        self._generation += 1
        self._half_open_issued = 0
        if new is BreakerState.OPEN:
            # The window that tripped stays readable in snapshots while open, as in Resilience4j.
            self._open_until = self._clock() + self._wait
            logger.warning(
                "circuit breaker %s -> OPEN (%s over %d calls); rejecting calls for %.1f s",
                old,
                rates,
                window.calls,
                self._wait,
            )
        elif new is BreakerState.HALF_OPEN:
            self._fresh_window(self._half_open_calls, self._half_open_calls)
            logger.warning("circuit breaker OPEN -> HALF_OPEN; letting %d trial calls through", self._half_open_calls)
        else:
            logger.warning("circuit breaker %s -> CLOSED (%s over the trial calls)", old, rates)
            self._fresh_window(self._window_size, self._closed_minimum)
        if self._on_state_change is not None:
            try:
                self._on_state_change(old, new)
            except Exception:
                # A broken metrics hook must not leave the breaker half-way through a transition.
                logger.exception("circuit breaker state-change callback failed")

    def _fresh_window(self, size: int, minimum: int) -> None:
        self._window = _Window(size)
        self._minimum = minimum
        self._not_permitted = 0
