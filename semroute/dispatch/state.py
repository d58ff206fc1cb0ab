"""Where the response cache, the budgets and the rate-limit counters live.

``StateBackend`` is the small interface the cache and the tenant guard use; ``LocalState`` keeps
everything in this process (the default: one dispatcher, nothing to run).
``semroute.dispatch.redis_state`` keeps it in Redis so several dispatcher replicas share one
cache and one budget per tenant.

Money is counted in integer nano-USD (1e-9 USD): a cheap target's price of a short answer is a
few micro-dollars, and integers add up exactly (and atomically in Redis with INCRBY).

Windows: budgets count per UTC day and per UTC calendar month; rate limits per fixed UTC
minute. A window's key names its start, so a new window starts at zero by itself.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

NANO = 1_000_000_000  # nano-USD per USD


def to_nanos(usd: float) -> int:
    return round(usd * NANO)


@dataclass(frozen=True)
class Windows:
    """The UTC windows ``now`` falls in, their names (key suffixes) and when each resets."""

    day: str
    month: str
    minute: str
    day_reset: float  # epoch seconds
    month_reset: float
    minute_reset: float

    @classmethod
    def at(cls, now: float) -> Windows:
        return _windows_at(int(now))

    @classmethod
    def _compute(cls, now: int) -> Windows:
        t = datetime.fromtimestamp(now, UTC)
        day_start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        month_start = day_start.replace(day=1)
        next_month = (month_start + timedelta(days=32)).replace(day=1)
        minute = int(now // 60)
        return cls(
            day=day_start.strftime("%Y%m%d"),
            month=month_start.strftime("%Y%m"),
            minute=str(minute),
            day_reset=(day_start + timedelta(days=1)).timestamp(),
            month_reset=next_month.timestamp(),
            minute_reset=(minute + 1) * 60.0,
        )


@functools.lru_cache(maxsize=8)
def _windows_at(second: int) -> Windows:
    # Every request asks; the answer only changes once a second.
    return Windows._compute(second)


@dataclass(frozen=True)
class Reserved:
    """Outcome of a budget reservation: ``refused`` is "" (granted), "day" or "month";
    ``used`` the nano-USD already counted in the refusing window (or the day's after the
    grant)."""

    refused: str
    used: int


class StateBackend(Protocol):
    """What the cache and the tenant guard need. Limits are nano-USD / counts; None = none.
    Every method is atomic with respect to other dispatchers sharing the backend."""

    where: str

    async def cache_get(self, key: str) -> tuple[bool, bytes | None]:
        """(available, value): available False means the store could not be asked (bypass)."""
        ...

    async def cache_put(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def reserve(
        self, tenant: str, nanos: int, day_limit: int | None, month_limit: int | None,
        w: Windows,
    ) -> Reserved:
        """Add ``nanos`` to the tenant's day and month spend unless that takes either over its
        limit (then nothing is added)."""
        ...

    async def settle(self, tenant: str, delta_nanos: int, w: Windows) -> None:
        """Correct the spend by ``delta_nanos`` (actual minus reserved; may be negative)."""
        ...

    async def admit(
        self, tenant: str, requests_limit: int | None, tokens_limit: int | None, w: Windows
    ) -> str:
        """Count one request in this minute unless the tenant is at its requests or tokens
        limit: returns "" (admitted), "requests" or "tokens" (refused, nothing counted)."""
        ...

    async def add_tokens(self, tenant: str, tokens: int, w: Windows) -> None: ...

    async def spent(self, tenant: str, w: Windows) -> tuple[int, int]:
        """(day, month) nano-USD counted so far."""
        ...

    async def aclose(self) -> None: ...


class LocalState:
    """Everything in this process's memory. The cache is an LRU of ``max_entries`` with a TTL
    per entry; counters of past windows are dropped as new ones start."""

    where = "local"

    def __init__(
        self, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._counters: dict[tuple[str, str, str], int] = {}
        self._windows: tuple[str, str, str] = ("", "", "")

    async def cache_get(self, key: str) -> tuple[bool, bytes | None]:
        entry = self._cache.get(key)
        if entry is None:
            return True, None
        expires, value = entry
        if self._clock() >= expires:
            del self._cache[key]
            return True, None
        self._cache.move_to_end(key)
        return True, value

    async def cache_put(self, key: str, value: bytes, ttl_s: float) -> None:
        self._cache[key] = (self._clock() + ttl_s, value)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    def _roll(self, w: Windows) -> None:
        now = (w.day, w.month, w.minute)
        if now != self._windows:
            live = set(now)
            self._counters = {k: v for k, v in self._counters.items() if k[2] in live}
            self._windows = now

    def _get(self, tenant: str, kind: str, window: str) -> int:
        return self._counters.get((tenant, kind, window), 0)

    def _add(self, tenant: str, kind: str, window: str, amount: int) -> None:
        key = (tenant, kind, window)
        self._counters[key] = self._counters.get(key, 0) + amount

    async def reserve(
        self, tenant: str, nanos: int, day_limit: int | None, month_limit: int | None,
        w: Windows,
    ) -> Reserved:
        self._roll(w)
        day, month = self._get(tenant, "usd", w.day), self._get(tenant, "usd", w.month)
        if day_limit is not None and day + nanos > day_limit:
            return Reserved("day", day)
        if month_limit is not None and month + nanos > month_limit:
            return Reserved("month", month)
        self._add(tenant, "usd", w.day, nanos)
        self._add(tenant, "usd", w.month, nanos)
        return Reserved("", day + nanos)

    async def settle(self, tenant: str, delta_nanos: int, w: Windows) -> None:
        self._roll(w)
        self._add(tenant, "usd", w.day, delta_nanos)
        self._add(tenant, "usd", w.month, delta_nanos)

    async def admit(
        self, tenant: str, requests_limit: int | None, tokens_limit: int | None, w: Windows
    ) -> str:
        self._roll(w)
        if requests_limit is not None and self._get(tenant, "req", w.minute) >= requests_limit:
            return "requests"
        if tokens_limit is not None and self._get(tenant, "tok", w.minute) >= tokens_limit:
            return "tokens"
        self._add(tenant, "req", w.minute, 1)
        return ""

    async def add_tokens(self, tenant: str, tokens: int, w: Windows) -> None:
        self._roll(w)
        self._add(tenant, "tok", w.minute, tokens)

    async def spent(self, tenant: str, w: Windows) -> tuple[int, int]:
        self._roll(w)
        return self._get(tenant, "usd", w.day), self._get(tenant, "usd", w.month)

    async def aclose(self) -> None:
        self._cache.clear()
