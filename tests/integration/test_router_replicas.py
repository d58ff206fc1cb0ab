"""Several router replicas behind one client channel, no proxy (issue 16): an ``ipv4:`` target
listing two real router servers on loopback is balanced call by call (round_robin), keeps
answering when one replica goes away, and the dispatcher's guard retries a replica that is not
ready yet on the other one."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from semroute.dispatch.breaker import BreakerState, CircuitBreaker
from semroute.dispatch.router_guard import GuardedRouter
from semroute.errors import NotReady
from semroute.grpc.router_client import RouterClient
from semroute.metrics import RouterMetrics
from tests.integration.router_grpc_support import running_router, small_index

__all__ = ["small_index"]

QUERY = "Write a Python function that sorts a list of tuples"


def route_calls(metrics: RouterMetrics, code: str = "OK") -> int:
    value = metrics.registry.get_sample_value(
        "semroute_router_requests_total", {"method": "Route", "code": code}
    )
    return int(value or 0)


async def test_round_robin_reaches_both_replicas_and_survives_losing_one(
    small_index: Path,
) -> None:
    """Calls over ``ipv4:A,B`` reach both servers (their own request counters), and after A is
    stopped every call still succeeds, all on B, with no retry layer in between."""
    async with running_router(small_index) as a, running_router(small_index) as b:
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        async with RouterClient(target, timeout=5.0) as client:
            assert client.lb_policy == "round_robin"
            for _ in range(20):
                assert (await client.route(QUERY)).route == "code"
            assert route_calls(a.metrics) > 0 and route_calls(b.metrics) > 0
            assert route_calls(a.metrics) + route_calls(b.metrics) == 20

            await a.server.stop(0)
            before = route_calls(b.metrics)
            for _ in range(20):
                assert (await client.route(QUERY)).route == "code"
            assert route_calls(b.metrics) - before == 20


async def test_pick_first_stays_on_one_replica(small_index: Path) -> None:
    """``lb_policy="pick_first"`` on the same two-address target keeps every call on one
    server: the policy is what spreads the calls, not the target."""
    async with running_router(small_index) as a, running_router(small_index) as b:
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        async with RouterClient(target, lb_policy="pick_first") as client:
            for _ in range(10):
                await client.route(QUERY)
        assert sorted([route_calls(a.metrics), route_calls(b.metrics)]) == [0, 10]


async def test_guard_retries_a_not_ready_replica_on_the_ready_one(small_index: Path) -> None:
    """Replica B has no index loaded yet (health NOT_SERVING, Route answers NotReady). Through
    the dispatcher's guard every call still gets a decision: a call that lands on B is retried
    once, after the backoff, on the next replica. B saw calls, and the breaker stayed closed.

    round_robin only picks connected replicas, so the test first waits until A has answered
    (both connections up); before that a call and its retry can both land on B."""
    async with running_router(small_index) as a, running_router(small_index, load=False) as b:
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        breaker = CircuitBreaker(1, cooldown_s=30.0)
        async with RouterClient(target, timeout=5.0) as client:
            for _ in range(50):
                try:
                    await client.route(QUERY)
                    break
                except NotReady:
                    await asyncio.sleep(0.02)
            warm_a, warm_b = route_calls(a.metrics), route_calls(b.metrics, "UNAVAILABLE")
            assert warm_a == 1
            guarded = GuardedRouter(client, breaker=breaker, retry_backoff_s=0.01,
                                    rng=random.Random(0))
            for _ in range(20):
                assert (await guarded.route(QUERY)).route == "code"
        assert route_calls(b.metrics, "UNAVAILABLE") > warm_b
        assert route_calls(a.metrics) - warm_a == 20
        assert breaker.state is BreakerState.CLOSED
