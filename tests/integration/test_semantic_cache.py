"""The semantic tier with the real in-process router (real encoder, real FAISS) over the
dispatcher's gRPC door: a re-typed question is answered from the cache with the router's own
embedding, a different question is not, tenants and per-route thresholds keep answers apart,
and conversations with earlier turns use the exact tier only."""

from __future__ import annotations

import re
from typing import Any

import pytest

from semroute.config import load_settings
from semroute.dispatch.ledger import build_ledger
from semroute.types import ChatRequest, DecisionEvent, DoneEvent, Message
from tests.integration.dispatcher_fixtures import (
    CREATIVE_PROMPT,
    Stack,
    StackFactory,
    collect,
    llms,
    make_stack,
)

pytestmark = pytest.mark.integration
__all__ = ["llms", "make_stack"]  # fixtures, imported for pytest

RETYPED = "write a short poem about autumn leaves please"  # cosine about 0.98 to CREATIVE_PROMPT
DIFFERENT = "Write a long essay about autumn leaves"  # cosine 0.877


async def _stack(make_stack: StackFactory, **cache: Any) -> Stack:
    settings = load_settings(cache__exact=True, cache__semantic=True,
                             **{f"cache__{k}": v for k, v in cache.items()})
    return await make_stack(
        ledger=lambda configs, metrics: build_ledger(settings, configs, metrics, None)
    )


async def _ask(stack: Stack, text: str, tenant: str = "", *earlier: Message) -> list[Any]:
    req = ChatRequest((*earlier, Message("user", text)), tenant=tenant)
    return await collect(stack.dispatcher.chat(req))


def _backend_calls(stack: Stack) -> int:
    return sum(len(llm.chat_requests()) for llm in stack.llms.values())


async def test_retyped_question_is_a_semantic_hit(make_stack: StackFactory) -> None:
    """The re-typed question gets the stored answer (decision says semantic match, done says
    hit, no backend call); a different question on the same subject is a miss."""
    stack = await _stack(make_stack)
    first = await _ask(stack, CREATIVE_PROMPT)
    calls = _backend_calls(stack)
    again = await _ask(stack, RETYPED)
    decision, done = again[0], again[-1]
    assert isinstance(decision, DecisionEvent) and decision.cache == "hit"
    match = re.fullmatch(r"response cache: semantic match \(similarity ([0-9.]+)\)",
                         decision.reason)
    assert match is not None and float(match.group(1)) >= 0.95, decision.reason
    assert isinstance(done, DoneEvent) and done.cache == "hit" and done.cost_usd == 0.0
    assert done.target == first[-1].target
    assert _backend_calls(stack) == calls
    other = await _ask(stack, DIFFERENT)
    assert other[0].cache == "miss" and _backend_calls(stack) == calls + 1
    assert stack.sample("semroute_cache_semantic_hits_total") == 1
    assert stack.sample("semroute_cache_requests_total", result="hit") == 1
    assert stack.sample("semroute_cache_requests_total", result="miss") == 2


async def test_tenants_and_route_thresholds_keep_answers_apart(make_stack: StackFactory) -> None:
    """Another tenant's re-typed question is a miss; so is ours when the route's own threshold
    is above the pair's similarity."""
    stack = await _stack(make_stack)
    first = await _ask(stack, CREATIVE_PROMPT, "team-a")
    assert (await _ask(stack, RETYPED, "team-b"))[0].cache == "miss"
    route = first[0].route
    strict = await _stack(make_stack, semantic_route_thresholds={route: 0.99})
    await _ask(strict, CREATIVE_PROMPT)
    assert (await _ask(strict, RETYPED))[0].cache == "miss"


async def test_conversations_with_earlier_turns_use_the_exact_tier_only(
    make_stack: StackFactory,
) -> None:
    """With an earlier exchange, a re-typed last question is not matched by meaning (the
    embedding is of the last turn only); the identical conversation is an exact hit."""
    stack = await _stack(make_stack)
    earlier = (Message("user", "Hello"), Message("assistant", "Hi! How can I help?"))
    await _ask(stack, CREATIVE_PROMPT, "", *earlier)
    assert (await _ask(stack, RETYPED, "", *earlier))[0].cache == "miss"
    assert (await _ask(stack, CREATIVE_PROMPT, "", *earlier))[0].cache == "hit"
