"""Circuit breaker state machine: closed -> open -> half-open -> closed/open."""

from __future__ import annotations

import pytest

from semroute.dispatch.breaker import BreakerState, CircuitBreaker


class Clock:
    """A settable monotonic clock so the tests never sleep."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_opens_after_consecutive_failures(clock: Clock) -> None:
    """The breaker stays closed below the threshold and opens exactly at it."""
    b = CircuitBreaker(failures=3, cooldown_s=5.0, clock=clock)
    for _ in range(2):
        assert b.try_acquire()
        b.record_failure()
    assert b.state is BreakerState.CLOSED
    assert b.try_acquire()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    assert not b.try_acquire()
    assert b.retry_in() == pytest.approx(5.0)


def test_success_resets_the_consecutive_count(clock: Clock) -> None:
    """Failures separated by a success do not add up."""
    b = CircuitBreaker(failures=2, cooldown_s=5.0, clock=clock)
    b.record_failure()
    b.record_success()
    b.record_failure()
    assert b.state is BreakerState.CLOSED


def test_half_open_admits_exactly_one_probe(clock: Clock) -> None:
    """After the cooldown one caller gets through; others are refused until it reports."""
    b = CircuitBreaker(failures=1, cooldown_s=5.0, clock=clock)
    b.record_failure()
    clock.now += 4.9
    assert not b.try_acquire()
    clock.now += 0.2
    assert b.state is BreakerState.HALF_OPEN
    assert b.try_acquire()
    assert not b.try_acquire()
    b.record_success()
    assert b.state is BreakerState.CLOSED
    assert b.try_acquire() and b.try_acquire()


def test_failed_probe_reopens_for_a_full_cooldown(clock: Clock) -> None:
    """A failing probe re-opens the breaker, counted from the probe's failure."""
    b = CircuitBreaker(failures=3, cooldown_s=5.0, clock=clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 6
    assert b.try_acquire()
    b.record_failure()  # one failure is enough in half-open state
    assert b.state is BreakerState.OPEN
    clock.now += 4
    assert not b.try_acquire()
    clock.now += 1.5
    assert b.try_acquire()


def test_release_frees_the_probe_without_changing_state(clock: Clock) -> None:
    """A cancelled probe neither closes nor re-opens the breaker; the next caller may probe."""
    b = CircuitBreaker(failures=1, cooldown_s=1.0, clock=clock)
    b.record_failure()
    clock.now += 2
    assert b.try_acquire()
    b.release()
    assert b.state is BreakerState.HALF_OPEN
    assert b.try_acquire()


def test_rejects_a_zero_threshold() -> None:
    """A breaker that could never be closed is a configuration mistake."""
    with pytest.raises(ValueError, match="failures"):
        CircuitBreaker(failures=0, cooldown_s=1.0)
