"""The dispatcher's guard around its router: one retry, a circuit breaker, a static fallback.

The router is not a single point of failure. ``GuardedRouter`` wraps any ``RouterLike`` (the gRPC
``RouterClient`` in production, whose own per-call deadline is ``dispatcher.router_timeout_s``):

- a call that could not *connect* (``ServiceUnreachable`` with gRPC code UNAVAILABLE) is tried
  once more after a jittered ``retry_backoff_s``; a deadline is not retried (its time is spent);
- a replica that answered it is *not ready* (``NotReady``: no index loaded yet, starting or
  loading; ``ShuttingDown``: draining) is tried once more the same way. The retry takes the
  client's next connection, and with several replicas behind ``round_robin``
  (``semroute.grpc.balancing``) the next replica, which is likely ready;
- ``failures`` consecutive unreachable calls open a breaker (``semroute.dispatch.breaker``, the
  backends' kind): while it is open calls fail at once with ``ServiceUnreachable``, and after the
  cooldown one probe goes through, so routing resumes by itself when the router is back.

"Not ready" never counts towards the breaker (nor resets it). The replica answered at once, so
the router is reachable and no deadline was spent; it becomes ready by itself when its index is
loaded (seconds); and the breaker guards every replica behind the channel, so opening it because
one replica is starting would send to the static fallback, for a whole cooldown, the chats a
ready replica would have routed. While every replica is still loading a chat costs two quick
refusals and one backoff before its fallback, and only during start-up.

``fallback_chain`` is the chain the dispatcher then uses (``dispatcher.fallback_targets``, or
every local backend followed by the others, in backends-file order).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from semroute.dispatch.breaker import CircuitBreaker
from semroute.errors import NotReady, RoutingUnavailable, ServiceUnreachable
from semroute.types import Decision, Policy, RouterLike

_NO_POLICY = Policy()


def is_connect_failure(exc: ServiceUnreachable) -> bool:
    """Did the call fail to reach the router at all (worth one quick retry)? A deadline or a
    router-side status is not."""
    code = getattr(exc, "grpc_code", None)
    return getattr(code, "name", "UNAVAILABLE") == "UNAVAILABLE"


def is_not_ready(exc: NotReady) -> bool:
    """Did a router replica answer that it cannot route *yet* (starting, loading, draining)?
    Worth one retry elsewhere; says nothing against the router (see the module docstring)."""
    return not isinstance(exc, ServiceUnreachable | RoutingUnavailable)


class GuardedRouter:
    """A ``RouterLike`` with one retry and a breaker (see the module docstring)."""

    def __init__(
        self,
        router: RouterLike,
        *,
        breaker: CircuitBreaker,
        retry_backoff_s: float = 0.05,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.router = router
        self.breaker = breaker
        self._backoff = retry_backoff_s
        self._rng = rng or random.Random()
        self._sleep = sleep

    async def route(
        self,
        text: str,
        *,
        history: Sequence[str] = (),
        policy: Policy = _NO_POLICY,
        explain: bool = False,
    ) -> Decision:
        """The router's decision; raises ServiceUnreachable when it cannot be had (breaker open,
        or two unreachable calls), NotReady when the retry found no ready replica either, and
        whatever else the router raised, unchanged."""
        if not self.breaker.try_acquire():
            raise ServiceUnreachable(
                f"router circuit open after {self.breaker.failures} unreachable call(s); next "
                f"probe in {self.breaker.retry_in():.1f} s"
            )
        for attempt in (0, 1):
            try:
                decision = await self.router.route(
                    text, history=history, policy=policy, explain=explain
                )
            except ServiceUnreachable as exc:
                if attempt == 0 and is_connect_failure(exc):
                    await self._sleep(self._backoff * self._rng.uniform(0.5, 1.5))
                    continue
                self.breaker.record_failure()
                raise
            except NotReady as exc:
                if attempt == 0 and is_not_ready(exc):
                    await self._sleep(self._backoff * self._rng.uniform(0.5, 1.5))
                    continue
                self.breaker.release()
                raise
            except BaseException:
                # The router answered (an error of its own) or we were cancelled: says nothing
                # about whether it can be reached.
                self.breaker.release()
                raise
            self.breaker.record_success()
            return decision
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        close = getattr(self.router, "aclose", None) or getattr(self.router, "close", None)
        if close is not None:
            await close()


def fallback_chain(
    configured: Sequence[str], backends: Sequence[str], local: Sequence[str]
) -> tuple[str, ...]:
    """The static chain used without a router: ``configured`` when set, else every local backend
    then the others, each in backends-file order."""
    if configured:
        return tuple(dict.fromkeys(configured))
    return tuple(dict.fromkeys([*local, *(b for b in backends if b not in local)]))
