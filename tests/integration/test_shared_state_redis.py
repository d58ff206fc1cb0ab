"""The shared state in a real Redis (started on a free loopback port for these tests): atomic
budget reservations across clients, one budget enforced by two dispatcher processes under 32
concurrent clients, the cache shared between replicas, and a Redis outage that fails no request
(cache bypassed, budgets from the local view, a metric and a log line)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from structlog.testing import capture_logs

from semroute.dispatch.redis_state import RedisState
from semroute.dispatch.state import Windows
from semroute.testing.devstack import GrpcService, free_port, start_dispatcher
from semroute.testing.faultserver import FaultServer, FaultSpec
from semroute.testing.redis import RedisServer, start_redis
from tests.integration.ledger_fixtures import (
    LedgerFactory,
    LedgerStack,
    ledger_llms,
    make_ledger_stack,
)

pytestmark = pytest.mark.integration
__all__ = ["ledger_llms", "make_ledger_stack"]  # fixtures, imported for pytest

MAX_TOKENS = 40
PRICE_IN, PRICE_OUT = 0.15, 0.60
PROMPT = "hello there"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def fresh_redis(redis_server: RedisServer) -> AsyncIterator[RedisServer]:
    """The module's server, emptied before each test."""
    state = RedisState(redis_server.url)
    await state._redis.flushall()
    await state.aclose()
    yield redis_server


async def test_reservations_are_atomic_across_clients(fresh_redis: RedisServer) -> None:
    """64 concurrent reservations of 10 from two clients against a limit of 100: exactly ten
    are granted and the counters read 100; the counters expire with their window."""
    a = RedisState(fresh_redis.url, timeout_s=5)
    b = RedisState(fresh_redis.url, timeout_s=5)
    w = Windows.at(1_790_000_000.0)
    try:
        results = await asyncio.gather(*(
            (a if i % 2 else b).reserve("t", 10, 100, None, w) for i in range(64)
        ))
        assert sum(not r.refused for r in results) == 10
        assert {r.refused for r in results if r.refused} == {"day"}
        assert await a.spent("t", w) == (100, 100)
        assert 0 < await a._redis.ttl(f"semroute:usd:t:{w.day}") <= 2 * 86_400
    finally:
        await a.aclose()
        await b.aclose()


def _write_config(tmp: Path, redis_url: str, llm: FaultServer, limit_usd: float) -> Path:
    (tmp / "tokens").write_text("team-a tok-team-a\nwarm-up tok-warm-up\n")
    backends = {"backends": {"gpt-4o-mini": {
        "base_url": llm.base_url, "model": "gpt-4o-mini", "input_cost": PRICE_IN,
        "output_cost": PRICE_OUT, "max_concurrency": 64,
        "timeouts": {"connect": 2, "first_token": 10, "idle": 10, "total": 30},
    }}}
    (tmp / "backends.yaml").write_text(yaml.safe_dump(backends))
    config = {
        "auth": {"tokens_file": str(tmp / "tokens")},
        # A generous deadline: this test is about atomicity, not outages (on a loaded 2-core
        # box a connect can take longer than the default, and the local view would answer).
        "state": {"url": redis_url, "timeout_s": 5},
        "cache": {"exact": True},
        "budgets": {"tenants": {"team-a": {"usd_per_day": limit_usd}}},
        "loop": {"decision_log": ""},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp / "config.yaml"


@pytest.mark.slow
async def test_two_dispatchers_sharing_redis_enforce_one_budget(
    fresh_redis: RedisServer, tmp_path: Path
) -> None:
    """Two `semroute serve dispatcher` processes, one Redis, 32 concurrent clients of one tenant
    asking distinct questions until refused: what was spent (the answers' own costs, and
    Redis's counter) stays within the day budget plus one request's estimate; both replicas
    answered and both refused."""
    # Actual cost ~ estimate: the backend always sends max_tokens chunks.
    chunks = tuple(f"t{i} " for i in range(MAX_TOKENS))
    estimate = ((len(PROMPT) + 3) // 4 + 4 + 1) * PRICE_IN / 1e6 + MAX_TOKENS * PRICE_OUT / 1e6
    # Room for more than the first 32 requests: both replicas answer, then both refuse.
    limit = 40 * estimate
    with FaultServer(FaultSpec(chunks=chunks), model="gpt-4o-mini") as llm:
        config = _write_config(tmp_path, fresh_redis.url, llm, limit)
        services: list[GrpcService] = []
        try:
            for i in range(2):
                log_dir = tmp_path / f"d{i}"
                log_dir.mkdir()
                services.append(start_dispatcher(
                    f"127.0.0.1:{free_port()}", tmp_path / "backends.yaml", log_dir,
                    http_port=0, extra_args=("--config", str(config)),
                ))
            answered: list[tuple[int, float]] = []
            refused: list[int] = []
            counter = iter(range(10_000))

            async def client(i: int) -> None:
                door = services[i % 2]
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{door.http_port}/v1", timeout=30,
                    headers={"authorization": "Bearer tok-team-a"},
                ) as c:
                    while True:
                        body = {"model": "gpt-4o-mini", "max_tokens": MAX_TOKENS, "messages": [
                            {"role": "user", "content": f"{PROMPT} {next(counter)}"}]}
                        r = await c.post("/chat/completions", json=body)
                        if r.status_code == 429:
                            assert r.json()["error"]["code"] == "insufficient_quota"
                            refused.append(i % 2)
                            return
                        assert r.status_code == 200, r.text
                        answered.append((i % 2, r.json()["usage"]["cost_usd"]))

            for n, service in enumerate(services):  # warm both (pools, Redis) on another tenant
                async with httpx.AsyncClient(
                    headers={"authorization": "Bearer tok-warm-up"}, timeout=30
                ) as c:
                    body = {"model": "gpt-4o-mini", "max_tokens": MAX_TOKENS,
                            "messages": [{"role": "user", "content": f"warm up {n}"}]}
                    r = await c.post(
                        f"http://127.0.0.1:{service.http_port}/v1/chat/completions", json=body
                    )
                    assert r.status_code == 200, r.text
            await asyncio.gather(*(client(i) for i in range(32)))
        finally:
            for service in services:
                service.stop()
    spent = sum(cost for _, cost in answered)
    assert spent <= limit + estimate
    assert spent >= limit - 2 * estimate  # the budget was really used, not refused early
    state = RedisState(fresh_redis.url)
    try:
        day, _ = await state.spent("team-a", Windows.at(time.time()))
    finally:
        await state.aclose()
    assert day / 1e9 == pytest.approx(spent, abs=1e-9)
    assert {d for d, _ in answered} == {0, 1}
    assert set(refused) == {0, 1} and len(refused) == 32
    assert len(llm.chat_requests()) == len(answered) + 2  # + the warm-ups


async def test_replicas_share_cache_entries(
    fresh_redis: RedisServer, make_ledger_stack: LedgerFactory
) -> None:
    """An answer cached by one dispatcher is a hit on another sharing the Redis."""
    one = await make_ledger_stack(cache__exact=True, state__url=fresh_redis.url)
    two = await make_ledger_stack(cache__exact=True, state__url=fresh_redis.url)
    body = {"model": "auto", "messages": [{"role": "user", "content": "shared question"}]}
    async with httpx.AsyncClient(headers=LedgerStack.headers("team-a")) as c:
        first = await c.post(f"{one.door.base_url}/chat/completions", json=body)
        second = await c.post(f"{two.door.base_url}/chat/completions", json=body)
    assert first.headers["x-semroute-cache"] == "miss"
    assert second.headers["x-semroute-cache"] == "hit"
    assert second.json()["choices"][0]["message"]["content"] == "Hello, world!"


async def test_redis_outage_fails_no_request(
    fresh_redis: RedisServer, make_ledger_stack: LedgerFactory
) -> None:
    """With Redis frozen the dispatcher still answers: cache bypass, the budget enforced from
    its local view, state_backend_up 0 and errors counted, one state_backend_down log line; once
    Redis is back, the cache is used again."""
    # Estimates at gpt-4o-mini for this prompt (8 tokens): 1.2e-6 + 0.6e-6 * max_tokens USD.
    # The limit lets a max_tokens=160 request in only when this replica's spend is not counted.
    limit = 1.2e-6 + 0.6e-6 * 160 + 1e-6
    stack = await make_ledger_stack(
        cache__exact=True, state__url=fresh_redis.url, state__timeout_s=0.2,
        state__retry_s=0.0, budgets__tenants={"team-a": {"usd_per_day": limit}},
    )
    body = {"model": "auto", "max_tokens": 100,
            "messages": [{"role": "user", "content": "outage question"}]}
    url = f"{stack.door.base_url}/chat/completions"
    async with httpx.AsyncClient(headers=LedgerStack.headers("team-a"), timeout=10) as c:
        assert (await c.post(url, json=body)).headers["x-semroute-cache"] == "miss"
        fresh_redis.pause()
        try:
            with capture_logs() as logs:
                during = await c.post(url, json=body)
            assert [e["event"] for e in logs].count("state_backend_down") == 1
            assert during.status_code == 200
            assert during.headers["x-semroute-cache"] == "bypass"
            assert stack.sample("semroute_state_backend_up") == 0.0
            assert stack.sample("semroute_state_backend_errors_total", op="cache_get") >= 1
            # The local view holds this replica's spend: a request over the rest is refused.
            big = {**body, "max_tokens": 160}
            over = await c.post(url, json=big)
            assert over.status_code == 429
            assert over.json()["error"]["code"] == "insufficient_quota"
        finally:
            fresh_redis.resume()
        after = await c.post(url, json=body)
    assert after.headers["x-semroute-cache"] == "hit"
    assert stack.sample("semroute_state_backend_up") == 1.0
