"""The response cache and cost accounting through both real doors (gRPC Chat and the OpenAI
HTTP door) of a dispatcher whose backends are fault servers: hit/miss/bypass in the decision and
done events and the x-semroute-cache header, a replayed stream with the original chunks,
tenants that never share entries, nothing cached from failed streams or personal data, and the
cost, counterfactual and savings counters."""

from __future__ import annotations

import json

import httpx
import pytest

from semroute.errors import StreamInterrupted
from semroute.testing.faultserver import FaultSpec
from semroute.types import (
    ChatRequest,
    DecisionEvent,
    DeltaEvent,
    DoneEvent,
    GenerationParams,
    Message,
)
from tests.integration.ledger_fixtures import (
    CHUNKS,
    PRICES,
    LedgerFactory,
    LedgerStack,
    ledger_llms,
    make_ledger_stack,
)

pytestmark = pytest.mark.integration
__all__ = ["ledger_llms", "make_ledger_stack"]  # fixtures, imported for pytest

PROMPT = "Summarise the plot of Hamlet in one sentence"


def _chat(text: str = PROMPT, **params: object) -> ChatRequest:
    return ChatRequest((Message("user", text),), params=GenerationParams(**params))  # type: ignore[arg-type]


async def _grpc_chat(stack: LedgerStack, tenant: str, req: ChatRequest) -> list[object]:
    client = stack.client(tenant)
    try:
        return [e async for e in client.chat(req)]
    finally:
        await client.close()


async def test_grpc_hit_replays_the_same_stream_without_calling_a_backend(
    make_ledger_stack: LedgerFactory,
) -> None:
    """Second identical chat: decision and done say hit, the deltas are the original chunks in
    order, cost 0, no backend request; the saved cost and counters are recorded."""
    stack = await make_ledger_stack(cache__exact=True)
    first = await _grpc_chat(stack, "team-a", _chat())
    second = await _grpc_chat(stack, "team-a", _chat())
    assert isinstance(first[0], DecisionEvent) and first[0].cache == "miss"
    assert isinstance(first[-1], DoneEvent) and first[-1].cache == "miss"
    assert first[-1].cost_usd > 0
    assert isinstance(second[0], DecisionEvent) and second[0].cache == "hit"
    assert [e.text for e in second if isinstance(e, DeltaEvent)] == list(CHUNKS)
    done = second[-1]
    assert isinstance(done, DoneEvent)
    assert (done.cache, done.cost_usd, done.attempts, done.target) == ("hit", 0.0, 0, "gpt-4o-mini")
    assert done.completion_tokens == first[-1].completion_tokens
    assert len(stack.llms["gpt-4o-mini"].chat_requests()) == 1
    assert stack.sample("semroute_cache_requests_total", result="hit") == 1
    assert stack.sample("semroute_cache_requests_total", result="miss") == 1
    labels = {"tenant": "team-a", "route": "general", "target": "gpt-4o-mini"}
    assert stack.sample("semroute_cache_saved_usd_total", **labels) == pytest.approx(
        first[-1].cost_usd
    )
    assert stack.sample("semroute_cost_usd_total", **labels) == pytest.approx(first[-1].cost_usd)


async def test_tenants_never_see_each_others_entries(make_ledger_stack: LedgerFactory) -> None:
    """The same chat from another tenant's token is a miss and calls the backend again."""
    stack = await make_ledger_stack(cache__exact=True)
    await _grpc_chat(stack, "team-a", _chat())
    other = await _grpc_chat(stack, "team-b", _chat())
    assert isinstance(other[0], DecisionEvent) and other[0].cache == "miss"
    assert len(stack.llms["gpt-4o-mini"].chat_requests()) == 2


async def test_http_header_and_usage_say_miss_then_hit(make_ledger_stack: LedgerFactory) -> None:
    """x-semroute-cache is miss then hit, streaming or not (one entry serves both shapes);
    usage carries cost and counterfactual cost; the hit's stream has the original chunks."""
    stack = await make_ledger_stack(cache__exact=True)
    body = {"model": "auto", "messages": [{"role": "user", "content": PROMPT}]}
    async with httpx.AsyncClient(base_url=stack.door.base_url, headers=stack.headers("team-a")) as c:
        miss = await c.post("/chat/completions", json=body)
        hit = await c.post("/chat/completions", json=body)
        streamed = await c.post("/chat/completions", json={**body, "stream": True})
    assert miss.status_code == hit.status_code == streamed.status_code == 200
    assert miss.headers["x-semroute-cache"] == "miss"
    assert hit.headers["x-semroute-cache"] == "hit"
    assert streamed.headers["x-semroute-cache"] == "hit"
    assert hit.json()["choices"][0]["message"]["content"] == "".join(CHUNKS)
    usage = miss.json()["usage"]
    assert usage["cost_usd"] > 0 and usage["counterfactual_cost_usd"] == usage["cost_usd"]
    assert hit.json()["usage"]["cost_usd"] == 0.0
    assert hit.json()["semroute"]["cache"] == "hit"
    deltas = [
        json.loads(line[6:])["choices"][0]["delta"].get("content")
        for line in streamed.text.split("\n\n") if line.startswith("data: {")
    ]
    assert [d for d in deltas if d] == list(CHUNKS)
    assert len(stack.llms["gpt-4o-mini"].chat_requests()) == 1


async def test_personal_data_and_sampled_requests_bypass(make_ledger_stack: LedgerFactory) -> None:
    """A prompt with personal data, or temperature > 0, is a bypass every time (the backend
    answers each); temperature 0 is cached."""
    stack = await make_ledger_stack(cache__exact=True)
    pii = "Mail jane.doe@example.com the summary of Hamlet"
    for _ in range(2):
        events = await _grpc_chat(stack, "team-a", _chat(pii))
        assert isinstance(events[0], DecisionEvent) and events[0].cache == "bypass"
        events = await _grpc_chat(stack, "team-a", _chat(temperature=0.8))
        assert isinstance(events[-1], DoneEvent) and events[-1].cache == "bypass"
    assert len(stack.llms["local-small"].chat_requests()) == 2  # PII stays local
    assert len(stack.llms["gpt-4o-mini"].chat_requests()) == 2
    await _grpc_chat(stack, "team-a", _chat(temperature=0.0))
    cached = await _grpc_chat(stack, "team-a", _chat(temperature=0.0))
    assert isinstance(cached[0], DecisionEvent) and cached[0].cache == "hit"
    assert stack.sample("semroute_cache_requests_total", result="bypass") == 4


async def test_interrupted_stream_is_not_cached(make_ledger_stack: LedgerFactory) -> None:
    """A stream that broke after the commit point stores nothing: the next identical chat is
    a miss answered by the backend."""
    stack = await make_ledger_stack(cache__exact=True)
    stack.llms["gpt-4o-mini"].script([FaultSpec("drop", chunks=CHUNKS, after=2)])
    with pytest.raises(StreamInterrupted):
        await _grpc_chat(stack, "team-a", _chat())
    again = await _grpc_chat(stack, "team-a", _chat())
    assert isinstance(again[0], DecisionEvent) and again[0].cache == "miss"
    assert isinstance(again[-1], DoneEvent) and again[-1].attempts == 1


async def test_counterfactual_prices_the_routes_most_expensive_target(
    make_ledger_stack: LedgerFactory,
) -> None:
    """When the cheap fallback answers, the counterfactual is the same tokens at the route's
    dearest target; the counters split by tenant, route and answering target."""
    stack = await make_ledger_stack()
    stack.llms["gpt-4o-mini"].set_default(FaultSpec("500"))
    events = await _grpc_chat(stack, "team-b", _chat())
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.target == "local-small"
    assert done.cache == ""  # cache off
    cin, cout = PRICES["gpt-4o-mini"]
    expected = (done.prompt_tokens * cin + done.completion_tokens * cout) / 1e6
    assert done.counterfactual_cost_usd == pytest.approx(expected)
    assert done.counterfactual_cost_usd > done.cost_usd > 0
    labels = {"tenant": "team-b", "route": "general", "target": "local-small"}
    assert stack.sample("semroute_counterfactual_cost_usd_total", **labels) == pytest.approx(expected)
    assert stack.sample("semroute_cost_usd_total", **labels) == pytest.approx(done.cost_usd)
