"""The shared state backend: the cache, budgets and rate-limit counters in Redis.

``RedisState`` talks to Redis; every check-and-add is one Lua script, so two dispatchers that
reserve budget at the same moment cannot both pass a limit only one of them fits under.
``SharedState`` is what the dispatcher uses: Redis while it answers, and the in-process
``LocalState`` while it does not. A Redis failure never fails a request: the cache is
bypassed, budgets and rate limits are enforced from this replica's local view (every update is
mirrored there, so it knows at least its own spend), the failure is logged once per outage
(``state_backend_down`` / ``state_backend_up``) and counted in
``semroute_state_backend_errors_total``; Redis is tried again after ``state.retry_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from semroute.dispatch.state import LocalState, Reserved, Windows
from semroute.errors import ConfigError
from semroute.logs import get_logger

log = get_logger(__name__)
_T = TypeVar("_T")

DAY_TTL_S = 2 * 86_400
MONTH_TTL_S = 32 * 86_400
MINUTE_TTL_S = 120

# KEYS: day, month. ARGV: amount, day limit (-1: none), month limit, day ttl, month ttl.
# Returns {0, day after} when granted, {1, day} / {2, month} when refused.
_RESERVE = """
local d = tonumber(redis.call('GET', KEYS[1]) or '0')
local m = tonumber(redis.call('GET', KEYS[2]) or '0')
local a = tonumber(ARGV[1])
if tonumber(ARGV[2]) >= 0 and d + a > tonumber(ARGV[2]) then return {1, d} end
if tonumber(ARGV[3]) >= 0 and m + a > tonumber(ARGV[3]) then return {2, m} end
redis.call('INCRBY', KEYS[1], a)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('INCRBY', KEYS[2], a)
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {0, d + a}
"""

# KEYS: requests, tokens (this minute). ARGV: requests limit (-1: none), tokens limit, ttl.
_ADMIT = """
if tonumber(ARGV[1]) >= 0 and tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[1])
then return 1 end
if tonumber(ARGV[2]) >= 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[2])
then return 2 end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 0
"""

# KEYS: day, month. ARGV: delta, day ttl, month ttl.
_SETTLE = """
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('INCRBY', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 0
"""


def _limit(value: int | None) -> int:
    return -1 if value is None else value


class RedisState:
    """The ``StateBackend`` in Redis (``redis://`` or ``rediss://`` URL). Keys:
    ``<prefix>:cache:<key>``, ``<prefix>:usd:<tenant>:<day|month>``,
    ``<prefix>:req|tok:<tenant>:<minute>``; every counter expires after its window."""

    def __init__(self, url: str, *, prefix: str = "semroute", timeout_s: float = 0.5) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:
            raise ConfigError(
                "state.url is a redis:// URL but the redis client is not installed: "
                "pip install 'semroute[redis]'"
            ) from exc
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"state.url: expected redis://host:port/db or '', got {url!r}")
        try:
            self._redis: Any = aioredis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                retry_on_timeout=False,
            )
        except ValueError as exc:
            raise ConfigError(f"state.url: {exc}") from exc
        self.where = url.split("@")[-1]  # no password in logs
        self._p = prefix
        self._reserve = self._redis.register_script(_RESERVE)
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)

    def _usd(self, tenant: str, w: Windows) -> list[str]:
        return [f"{self._p}:usd:{tenant}:{w.day}", f"{self._p}:usd:{tenant}:{w.month}"]

    async def cache_get(self, key: str) -> tuple[bool, bytes | None]:
        value = await self._redis.get(f"{self._p}:cache:{key}")
        return True, value

    async def cache_put(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._redis.set(f"{self._p}:cache:{key}", value, px=max(1, int(ttl_s * 1000)))

    async def reserve(
        self, tenant: str, nanos: int, day_limit: int | None, month_limit: int | None,
        w: Windows,
    ) -> Reserved:
        code, used = await self._reserve(
            keys=self._usd(tenant, w),
            args=[nanos, _limit(day_limit), _limit(month_limit), DAY_TTL_S, MONTH_TTL_S],
        )
        return Reserved({0: "", 1: "day", 2: "month"}[int(code)], int(used))

    async def settle(self, tenant: str, delta_nanos: int, w: Windows) -> None:
        await self._settle(keys=self._usd(tenant, w), args=[delta_nanos, DAY_TTL_S, MONTH_TTL_S])

    async def admit(
        self, tenant: str, requests_limit: int | None, tokens_limit: int | None, w: Windows
    ) -> str:
        keys = [f"{self._p}:req:{tenant}:{w.minute}", f"{self._p}:tok:{tenant}:{w.minute}"]
        code = await self._admit(
            keys=keys, args=[_limit(requests_limit), _limit(tokens_limit), MINUTE_TTL_S]
        )
        return {0: "", 1: "requests", 2: "tokens"}[int(code)]

    async def add_tokens(self, tenant: str, tokens: int, w: Windows) -> None:
        key = f"{self._p}:tok:{tenant}:{w.minute}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, tokens)
            pipe.expire(key, MINUTE_TTL_S)
            await pipe.execute()

    async def spent(self, tenant: str, w: Windows) -> tuple[int, int]:
        day, month = await self._redis.mget(self._usd(tenant, w))
        return int(day or 0), int(month or 0)

    async def aclose(self) -> None:
        await self._redis.aclose()


class SharedState:
    """Redis with the local view as its stand-in (see the module docstring). ``on_error(op)``
    is called for every failed Redis call (the dispatcher counts them in a metric);
    ``up`` says whether Redis is being used right now."""

    def __init__(
        self,
        remote: RedisState,
        local: LocalState,
        *,
        retry_s: float = 2.0,
        on_error: Callable[[str], None] = lambda op: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.remote = remote
        self.local = local
        self.where = remote.where
        self._retry_s = retry_s
        self._on_error = on_error
        self._clock = clock
        self._down_until = 0.0
        self.up = True

    async def _try(self, op: str, call: Callable[[], Awaitable[_T]]) -> tuple[bool, _T | None]:
        if not self.up and self._clock() < self._down_until:
            return False, None
        try:
            result = await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # redis errors, OSError, timeouts: all mean "not now"
            self._on_error(op)
            self._down_until = self._clock() + self._retry_s
            if self.up:
                log.warning(
                    "state_backend_down", backend=self.where, op=op, error=str(exc)[:200],
                    action="cache bypassed, budgets and rate limits from the local view",
                    retry_s=self._retry_s,
                )
            self.up = False
            return False, None
        if not self.up:
            log.info("state_backend_up", backend=self.where)
            self.up = True
        return True, result

    async def cache_get(self, key: str) -> tuple[bool, bytes | None]:
        ok, got = await self._try("cache_get", lambda: self.remote.cache_get(key))
        return (True, got[1]) if ok and got is not None else (False, None)

    async def cache_put(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._try("cache_put", lambda: self.remote.cache_put(key, value, ttl_s))

    async def reserve(
        self, tenant: str, nanos: int, day_limit: int | None, month_limit: int | None,
        w: Windows,
    ) -> Reserved:
        ok, got = await self._try(
            "reserve", lambda: self.remote.reserve(tenant, nanos, day_limit, month_limit, w)
        )
        if ok and got is not None:
            if not got.refused:
                await self.local.settle(tenant, nanos, w)  # mirror: the local view
            return got
        return await self.local.reserve(tenant, nanos, day_limit, month_limit, w)

    async def settle(self, tenant: str, delta_nanos: int, w: Windows) -> None:
        await self.local.settle(tenant, delta_nanos, w)
        await self._try("settle", lambda: self.remote.settle(tenant, delta_nanos, w))

    async def admit(
        self, tenant: str, requests_limit: int | None, tokens_limit: int | None, w: Windows
    ) -> str:
        ok, got = await self._try(
            "admit", lambda: self.remote.admit(tenant, requests_limit, tokens_limit, w)
        )
        if ok and got is not None:
            if not got:
                await self.local.admit(tenant, None, None, w)
            return got
        return await self.local.admit(tenant, requests_limit, tokens_limit, w)

    async def add_tokens(self, tenant: str, tokens: int, w: Windows) -> None:
        await self.local.add_tokens(tenant, tokens, w)
        await self._try("add_tokens", lambda: self.remote.add_tokens(tenant, tokens, w))

    async def spent(self, tenant: str, w: Windows) -> tuple[int, int]:
        ok, got = await self._try("spent", lambda: self.remote.spent(tenant, w))
        return got if ok and got is not None else await self.local.spent(tenant, w)

    async def aclose(self) -> None:
        await self.local.aclose()
        await self.remote.aclose()
