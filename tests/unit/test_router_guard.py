"""The dispatcher's router guard with a scripted router: a replica that is not ready yet is
tried once more after a short backoff and never counts towards the breaker (issue 16)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import cast

import pytest

from semroute.dispatch.breaker import BreakerState, CircuitBreaker
from semroute.dispatch.router_guard import GuardedRouter
from semroute.errors import NotReady, RoutingUnavailable, ServiceUnreachable, ShuttingDown
from semroute.types import Decision, Policy

DECISION = cast(Decision, object())


class ScriptedRouter:
    """Answers each call with the next outcome: an exception to raise, or DECISION."""

    def __init__(self, *outcomes: BaseException | Decision) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    async def route(
        self, text: str, *, history: Sequence[str] = (), policy: Policy = Policy(),
        explain: bool = False,
    ) -> Decision:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def unreachable() -> ServiceUnreachable:
    return ServiceUnreachable("router at 127.0.0.1:1: UNAVAILABLE: connection refused")


def guard(router: ScriptedRouter, breaker: CircuitBreaker, sleeps: list[float]) -> GuardedRouter:
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    return GuardedRouter(router, breaker=breaker, retry_backoff_s=0.05, rng=random.Random(1),
                         sleep=sleep)


async def test_not_ready_is_retried_once_after_a_short_backoff() -> None:
    """A replica still loading its index answers NotReady; the guard waits a jittered backoff
    (0.5-1.5 x retry_backoff_s) and the retry's decision is returned."""
    router = ScriptedRouter(NotReady("no index loaded yet"), DECISION)
    sleeps: list[float] = []
    breaker = CircuitBreaker(1, cooldown_s=2.0)
    assert await guard(router, breaker, sleeps).route("hi") is DECISION
    assert router.calls == 2
    assert len(sleeps) == 1 and 0.025 <= sleeps[0] <= 0.075
    assert breaker.state is BreakerState.CLOSED


async def test_a_draining_replica_is_retried_like_a_starting_one() -> None:
    """ShuttingDown (a replica draining after SIGTERM) is retried on the next connection too."""
    router = ScriptedRouter(ShuttingDown("draining"), DECISION)
    assert await guard(router, CircuitBreaker(1, 2.0), []).route("hi") is DECISION
    assert router.calls == 2


async def test_not_ready_twice_falls_back_without_opening_the_breaker() -> None:
    """Two not-ready answers raise NotReady (the dispatcher's static fallback), and even a
    breaker that opens on the first failure stays closed: the router answered."""
    breaker = CircuitBreaker(1, cooldown_s=2.0)
    router = ScriptedRouter(NotReady("no index"), NotReady("no index"), DECISION)
    guarded = guard(router, breaker, [])
    with pytest.raises(NotReady) as info:
        await guarded.route("hi")
    assert type(info.value) is NotReady
    assert breaker.state is BreakerState.CLOSED
    assert await guarded.route("hi") is DECISION  # the next chat still asks the router


async def test_not_ready_neither_counts_nor_clears_unreachable_failures() -> None:
    """Unreachable calls still add up to an open breaker across not-ready answers in between:
    not ready says nothing about the replicas that could not be reached."""
    breaker = CircuitBreaker(2, cooldown_s=2.0)
    router = ScriptedRouter(
        unreachable(), unreachable(),            # call 1: both attempts unreachable -> 1 failure
        NotReady("loading"), NotReady("loading"),  # call 2: neutral
        unreachable(), unreachable(),            # call 3: second failure -> open
    )
    guarded = guard(router, breaker, [])
    for _ in range(3):
        with pytest.raises(NotReady):
            await guarded.route("hi")
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(ServiceUnreachable, match="circuit open"):
        await guarded.route("hi")
    assert router.calls == 6


async def test_a_not_ready_probe_frees_the_half_open_slot() -> None:
    """In half-open state a probe answered NotReady releases the slot (the breaker stays
    half-open), so the next chat may probe again instead of waiting a cooldown."""
    now = [0.0]
    breaker = CircuitBreaker(1, cooldown_s=2.0, clock=lambda: now[0])
    breaker.record_failure()
    now[0] = 3.0
    router = ScriptedRouter(NotReady("loading"), NotReady("loading"), DECISION)
    guarded = guard(router, breaker, [])
    with pytest.raises(NotReady):
        await guarded.route("hi")
    assert breaker.state is BreakerState.HALF_OPEN
    assert await guarded.route("hi") is DECISION
    assert breaker.state.value == "closed"


async def test_routing_unavailable_is_not_retried() -> None:
    """RoutingUnavailable (our credentials refused) is an operator problem, not a replica that
    will be ready soon: raised at once, breaker untouched."""
    breaker = CircuitBreaker(1, cooldown_s=2.0)
    router = ScriptedRouter(RoutingUnavailable("refused"), DECISION)
    with pytest.raises(RoutingUnavailable):
        await guard(router, breaker, []).route("hi")
    assert router.calls == 1 and breaker.state is BreakerState.CLOSED
