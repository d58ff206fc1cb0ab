"""The backends the dispatcher may call: client, breaker and concurrency slots per target."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from semroute.dispatch.backend_config import BackendConfig
from semroute.dispatch.breaker import CircuitBreaker
from semroute.dispatch.sse_client import BackendClient
from semroute.errors import (
    CircuitOpen,
    ConcurrencyLimited,
)

# ---- pool ---------------------------------------------------------------------------------------


class Backend:
    """A backend with its client, breaker and concurrency limit."""

    def __init__(
        self, config: BackendConfig, client: BackendClient, breaker: CircuitBreaker
    ) -> None:
        self.config = config
        self.client = client
        self.breaker = breaker
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self.in_flight = 0

    @property
    def name(self) -> str:
        return self.config.name

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of ``max_concurrency`` slots; waits at most ``timeouts.connect`` for one and
        then raises BackendRateLimited (the limit is ours, the effect is the same as a 429)."""
        try:
            async with asyncio.timeout(self.config.timeouts.connect):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise ConcurrencyLimited(
                self.name,
                f"max_concurrency {self.config.max_concurrency} reached; no slot within "
                f"{self.config.timeouts.connect:g} s",
            ) from exc
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()

    def check_breaker(self) -> None:
        if not self.breaker.try_acquire():
            raise CircuitOpen(
                self.name,
                f"circuit open after {self.breaker.failures} consecutive failures; "
                f"next probe in {self.breaker.retry_in():.1f} s",
            )


class BackendPool:
    """All configured backends, in file order. ``skipped`` maps each target that cannot be used
    (cloud key variable unset) to the reason."""

    def __init__(
        self,
        configs: Mapping[str, BackendConfig],
        *,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 10.0,
        environ: Mapping[str, str] | None = None,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        # The one place outside config.py that reads the environment: API keys by variable name.
        env = os.environ if environ is None else environ
        self.configs = dict(configs)
        self.backends: dict[str, Backend] = {}
        self.skipped: dict[str, str] = {}
        for name, cfg in self.configs.items():
            key = None
            if cfg.api_key_env:
                key = env.get(cfg.api_key_env) or None
                if key is None:
                    self.skipped[name] = (
                        f"target {name!r} skipped: environment variable {cfg.api_key_env} "
                        f"(backends.{name}.api_key_env in {cfg.source or 'backends file'}) "
                        "is not set"
                    )
                    continue
            transport = (transports or {}).get(name)
            self.backends[name] = Backend(
                cfg,
                BackendClient(cfg, key, transport),
                CircuitBreaker(breaker_failures, breaker_cooldown_s, clock),
            )

    def get(self, name: str) -> Backend | None:
        return self.backends.get(name)

    def names(self) -> list[str]:
        """Every configured target, usable or skipped, in file order."""
        return list(self.configs)

    def local_names(self) -> list[str]:
        return [n for n, c in self.configs.items() if c.local]

    async def aclose(self) -> None:
        await asyncio.gather(*(b.client.aclose() for b in self.backends.values()))
