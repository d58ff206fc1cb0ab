"""Per-tenant budgets and rate limits through both real doors: OpenAI-shaped 429s naming the
limit and its reset (insufficient_quota, rate_limit_exceeded with Retry-After), gRPC
RESOURCE_EXHAUSTED with the same class on the client, and one tenant's limits leaving another
alone. Nothing refused reaches a backend."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import openai
import pytest

from semroute.errors import DispatchFailed, InsufficientQuota, RateLimitExceeded
from semroute.testing.faultserver import FaultSpec
from semroute.types import ChatRequest, GenerationParams, Message
from tests.integration.ledger_fixtures import (
    TOKENS,
    LedgerFactory,
    LedgerStack,
    ledger_llms,
    make_ledger_stack,
)

pytestmark = pytest.mark.integration
__all__ = ["ledger_llms", "make_ledger_stack"]  # fixtures, imported for pytest
# Limits count UTC windows: the guard reads this clock, so no window turns over mid-test.
MIDDAY = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def _body(text: str = "hi there", **extra: object) -> dict[str, object]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


async def test_budget_checks_the_estimate_then_settles_the_actual_cost(
    make_ledger_stack: LedgerFactory,
) -> None:
    """A request whose estimate fits is answered and its spend settles to the actual cost; one
    whose estimate does not fit is 429 insufficient_quota naming the tenant, the limit, its
    field and the reset, with Retry-After, and reaches no backend; team-b is not affected."""
    stack = await make_ledger_stack(budgets__tenants={"team-a": {"usd_per_day": 0.001}})
    stack.dispatcher.ledger.guard.clock = lambda: MIDDAY
    async with httpx.AsyncClient(base_url=stack.door.base_url) as c:
        ok = await c.post("/chat/completions", json=_body(max_tokens=100),
                          headers=LedgerStack.headers("team-a"))
        # Estimate at gpt-4o-mini: 10,000 completion tokens * 0.60 / 1e6 = 0.006 > 0.001.
        refused = await c.post("/chat/completions", json=_body(max_tokens=10_000),
                               headers=LedgerStack.headers("team-a"))
        other = await c.post("/chat/completions", json=_body(max_tokens=10_000),
                             headers=LedgerStack.headers("team-b"))
    assert ok.status_code == 200 and other.status_code == 200
    spent_day, spent_month = await stack.dispatcher.ledger.guard.spent("team-a")
    assert spent_day == spent_month == pytest.approx(ok.json()["usage"]["cost_usd"], abs=1e-9)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "insufficient_quota"
    assert error["type"] == "insufficient_quota"
    assert "'team-a'" in error["message"]
    assert "0.001 USD budget (budgets.tenants.team-a.usd_per_day)" in error["message"]
    assert "resets at 2026-12-02T00:00:00Z" in error["message"]
    assert refused.headers["retry-after"] == str(12 * 3600)
    assert stack.sample("semroute_tenant_refusals_total", tenant="team-a", limit="budget") == 1
    assert len(stack.llms["gpt-4o-mini"].chat_requests()) == 2


async def test_requests_per_minute_gives_rate_limit_exceeded_with_retry_after(
    make_ledger_stack: LedgerFactory,
) -> None:
    """The third request in a minute: 429 rate_limit_exceeded, Retry-After 1..60 s; the
    OpenAI SDK sees a RateLimitError; the backend saw only two requests."""
    stack = await make_ledger_stack(budgets__default={"requests_per_minute": 2})
    stack.dispatcher.ledger.guard.clock = lambda: MIDDAY + 15
    async with httpx.AsyncClient(base_url=stack.door.base_url) as c:
        ok = [
            (await c.post("/chat/completions", json=_body(), headers=LedgerStack.headers("team-a")))
            for _ in range(2)
        ]
        refused = await c.post("/chat/completions", json=_body(),
                               headers=LedgerStack.headers("team-a"))
    assert [r.status_code for r in ok] == [200, 200]
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert "2 requests per minute (budgets.default.requests_per_minute)" in (
        refused.json()["error"]["message"]
    )
    assert refused.headers["retry-after"] == "45"
    sdk = openai.AsyncOpenAI(base_url=stack.door.base_url, api_key=TOKENS["team-a"],
                             max_retries=0)
    with pytest.raises(openai.RateLimitError):
        await sdk.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
    await sdk.close()
    assert len(stack.llms["gpt-4o-mini"].chat_requests()) == 2


async def test_grpc_refusals_are_resource_exhausted_with_our_classes(
    make_ledger_stack: LedgerFactory,
) -> None:
    """Over gRPC the same limits end the call with RESOURCE_EXHAUSTED and the client raises
    InsufficientQuota / RateLimitExceeded with the server's message."""
    stack = await make_ledger_stack(
        budgets__tenants={"team-a": {"usd_per_day": 1e-6}, "team-b": {"requests_per_minute": 1}}
    )
    stack.dispatcher.ledger.guard.clock = lambda: MIDDAY
    big = ChatRequest((Message("user", "hi"),), params=GenerationParams(max_tokens=1000))
    client = stack.client("team-a")
    try:
        with pytest.raises(InsufficientQuota, match="usd_per_day") as quota:
            _ = [e async for e in client.chat(big)]
        assert quota.value.grpc_code.name == "RESOURCE_EXHAUSTED"  # type: ignore[attr-defined]
    finally:
        await client.close()
    client = stack.client("team-b")
    try:
        _ = [e async for e in client.chat(big)]
        with pytest.raises(RateLimitExceeded, match="requests_per_minute"):
            _ = [e async for e in client.chat(big)]
    finally:
        await client.close()
    assert len(stack.llms["gpt-4o-mini"].chat_requests()) == 1


async def test_reservation_is_returned_when_nothing_was_generated(
    make_ledger_stack: LedgerFactory,
) -> None:
    """A chat closed right after its decision, and one whose every target failed, leave the
    tenant's spend at zero: the estimate is given back."""
    stack = await make_ledger_stack(budgets__tenants={"team-a": {"usd_per_day": 1.0}})
    stack.dispatcher.ledger.guard.clock = lambda: MIDDAY
    req = ChatRequest((Message("user", "hi"),), params=GenerationParams(max_tokens=100),
                      tenant="team-a")
    events = stack.dispatcher.chat(req)
    first = await anext(events)
    assert first.route == "general"  # type: ignore[union-attr]
    assert await stack.dispatcher.ledger.guard.spent("team-a") != (0.0, 0.0)  # reserved
    await events.aclose()
    assert await stack.dispatcher.ledger.guard.spent("team-a") == (0.0, 0.0)
    for llm in stack.llms.values():
        llm.set_default(FaultSpec("500"))
    with pytest.raises(DispatchFailed):
        _ = [e async for e in stack.dispatcher.chat(req)]
    assert await stack.dispatcher.ledger.guard.spent("team-a") == (0.0, 0.0)
