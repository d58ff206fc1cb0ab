"""Per-tenant budgets (USD per UTC day and month) and rate limits (requests and tokens per
minute), enforced across replicas when the state backend is Redis.

Budgets are checked before the call and settled after it: ``reserve`` adds the request's
estimated cost (prompt estimated from its characters, completion at ``max_tokens`` or
``budgets.completion_estimate_tokens``, at the most expensive target of the chain) to the
tenant's spend unless that would pass a limit (InsufficientQuota); ``settle`` replaces the
estimate with the actual cost. Reservations are atomic, so concurrent requests of one tenant
can together overspend by no more than the amount by which actual costs exceed estimates.

Rate limits count fixed UTC minutes: a request is refused (RateLimitExceeded, Retry-After = the
rest of the minute) when the tenant already sent ``requests_per_minute`` requests, or its
prompt + completion tokens already reached ``tokens_per_minute``, this minute.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

from semroute.config import BudgetSettings, TenantLimits
from semroute.dispatch.state import StateBackend, Windows, to_nanos
from semroute.errors import ConfigError, InsufficientQuota, RateLimitExceeded

ANONYMOUS = "anonymous"  # the tenant of every request when auth is off


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TenantGuard:
    """See the module docstring. ``clock`` is wall-clock epoch seconds (windows are UTC)."""

    def __init__(
        self,
        settings: BudgetSettings,
        state: StateBackend,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.state = state
        self.clock = clock

    def check_names(self, known: set[str] | None) -> None:
        """Raise ConfigError when ``budgets.tenants`` names a tenant no token is named for
        (``known``: the token file's names; None when auth is off)."""
        if known is None:
            return
        unknown = sorted(set(self.settings.tenants) - known - {ANONYMOUS})
        if unknown:
            raise ConfigError(
                f"budgets.tenants: no token is named {', '.join(map(repr, unknown))} in the "
                "auth token files (lines `NAME TOKEN`); known: "
                f"{', '.join(sorted(known)) or 'none'}"
            )

    def limits(self, tenant: str) -> tuple[TenantLimits, str]:
        """The tenant's limits and the config field they come from."""
        if tenant in self.settings.tenants:
            return self.settings.tenants[tenant], f"budgets.tenants.{tenant}"
        return self.settings.default, "budgets.default"

    def has_budget(self, tenant: str) -> bool:
        lim, _ = self.limits(tenant)
        return lim.usd_per_day is not None or lim.usd_per_month is not None

    async def admit(self, tenant: str) -> None:
        """Count the request against the tenant's rate limits; RateLimitExceeded when over."""
        lim, field = self.limits(tenant)
        if lim.requests_per_minute is None and lim.tokens_per_minute is None:
            return
        w = Windows.at(self.clock())
        refused = await self.state.admit(
            tenant, lim.requests_per_minute, lim.tokens_per_minute, w
        )
        if not refused:
            return
        wait = max(1, math.ceil(w.minute_reset - self.clock()))
        if refused == "requests":
            what = f"{lim.requests_per_minute} requests per minute ({field}.requests_per_minute)"
        else:
            what = f"{lim.tokens_per_minute} tokens per minute ({field}.tokens_per_minute)"
        raise RateLimitExceeded(
            f"rate limit reached for tenant {tenant!r}: {what}; retry after {wait} s",
            retry_after_s=float(wait),
        )

    async def reserve(self, tenant: str, estimate_usd: float) -> int:
        """Reserve the estimate (nano-USD returned, 0 when the tenant has no budget);
        InsufficientQuota naming the limit and its reset when it does not fit."""
        lim, field = self.limits(tenant)
        if lim.usd_per_day is None and lim.usd_per_month is None:
            return 0
        nanos = max(1, to_nanos(estimate_usd))
        now = self.clock()
        w = Windows.at(now)
        day = to_nanos(lim.usd_per_day) if lim.usd_per_day is not None else None
        month = to_nanos(lim.usd_per_month) if lim.usd_per_month is not None else None
        got = await self.state.reserve(tenant, nanos, day, month, w)
        if not got.refused:
            return nanos
        if got.refused == "day":
            limit, reset, name = lim.usd_per_day, w.day_reset, "usd_per_day"
        else:
            limit, reset, name = lim.usd_per_month, w.month_reset, "usd_per_month"
        raise InsufficientQuota(
            f"tenant {tenant!r} has used {got.used / 1e9:.6f} of its {limit:g} USD budget "
            f"({field}.{name}); this request needs up to {nanos / 1e9:.6f} USD; the budget "
            f"resets at {_iso(reset)}",
            retry_after_s=float(max(1, math.ceil(reset - now))),
        )

    async def settle(self, tenant: str, reserved: int, actual_usd: float, tokens: int) -> None:
        """Replace the reservation by the actual cost; count the tokens for the rate limit."""
        w = Windows.at(self.clock())
        if reserved:
            delta = to_nanos(actual_usd) - reserved
            if delta:
                await self.state.settle(tenant, delta, w)
        lim, _ = self.limits(tenant)
        if tokens and lim.tokens_per_minute is not None:
            await self.state.add_tokens(tenant, tokens, w)

    async def spent(self, tenant: str) -> tuple[float, float]:
        """(day, month) USD counted for the tenant so far (reservations included)."""
        day, month = await self.state.spent(tenant, Windows.at(self.clock()))
        return day / 1e9, month / 1e9
