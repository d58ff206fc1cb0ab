"""The per-backend circuit breaker: closed -> open after N failures -> half-open probe."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

# ---- circuit breaker ----------------------------------------------------------------------------


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after ``failures`` consecutive failures; after ``cooldown_s`` lets exactly one probe
    through (half-open). A successful probe closes it, a failed one re-opens it for another
    cooldown. ``clock`` is injectable so tests need not sleep."""

    def __init__(self, failures: int, cooldown_s: float, clock: Any = time.monotonic) -> None:
        if failures < 1:
            raise ValueError("failures must be >= 1")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._open_for = cooldown_s  # this opening's length (a Retry-After hold may differ)
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._probing or self._clock() - self._opened_at >= self._open_for:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def retry_in(self) -> float:
        """Seconds until the next probe is allowed (0 when closed or half-open)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._open_for - (float(self._clock()) - self._opened_at))

    def try_acquire(self) -> bool:
        """May a request go through now? In half-open state only one caller gets True until it
        reports back with ``record_success``/``record_failure``/``release``."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        self._consecutive += 1
        if self._probing or self._consecutive >= self.failures:
            self._opened_at = float(self._clock())
            self._open_for = self.cooldown_s
        self._probing = False

    def hold_for(self, seconds: float) -> None:
        """Open now for ``seconds`` (a backend's ``Retry-After``), then let one probe through;
        an opening that lasts longer already is kept."""
        now = float(self._clock())
        if seconds <= self.retry_in():
            return
        self._opened_at = now
        self._open_for = seconds
        self._probing = False

    def release(self) -> None:
        """The call ended without saying anything about the backend's health (cancelled,
        rejected input): free the half-open probe slot without changing the state."""
        self._probing = False


