"""The dispatcher over real gRPC with the real router and fault servers as LLM backends.

Covers the event order, every failure mode before and after the commit point, failover order,
retries with jittered backoff, the circuit breaker, concurrency limits, cancellation and
deadlines closing the upstream request, skipped cloud targets, bad input and the CLI.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from semroute.cli import main as cli_main
from semroute.dispatch.sse_client import upstream_request_id
from semroute.errors import InvalidRequest, NoTargetAvailable, SemrouteError, StreamInterrupted
from semroute.testing.faultserver import FaultSpec
from semroute.types import (
    ChatEvent,
    ChatRequest,
    DeltaEvent,
    GenerationParams,
    Message,
    RoutingOverrides,
)
from tests.integration.dispatcher_fixtures import (
    CHUNKS,
    CODE_PROMPT,
    CREATIVE_PROMPT,
    Stack,
    StackFactory,
    Timeouts,
    llms,
    make_stack,
    split,
    user,
)

pytestmark = pytest.mark.integration
__all__ = ["llms", "make_stack"]  # fixtures, imported for pytest

TEXT = "".join(CHUNKS)
CODE_CHAIN = ("local-large", "gpt-4o", "local-small")


async def run(
    stack: Stack, req: ChatRequest, **kw: float
) -> tuple[list[ChatEvent], SemrouteError | None]:
    """All events the client received, and the error that ended the call (None: success)."""
    events: list[ChatEvent] = []
    try:
        async for event in stack.client.chat(req, **kw):
            events.append(event)
    except SemrouteError as exc:
        return events, exc
    return events, None


def test_real_router_chains(default_router: Any) -> None:
    """The prompts these tests rely on route as assumed under the default index."""
    router = default_router
    assert router.route(CODE_PROMPT).targets == CODE_CHAIN
    assert router.route(CREATIVE_PROMPT).targets == ("local-small", "gpt-4o-mini")


async def test_decision_first_deltas_then_done(make_stack: StackFactory) -> None:
    """One decision, the text once in order, then done with target, attempts, usage-based cost,
    TTFT; the backend got the model name, the messages and our request id."""
    stack = await make_stack()
    req = ChatRequest((Message("user", CODE_PROMPT),), GenerationParams(max_tokens=16),
                      request_id="req-abc-123")
    events, error = await run(stack, req)
    assert error is None
    decision, text, done = split(events)
    assert (decision.route, decision.target, decision.chain) == ("code", "local-large", CODE_CHAIN)
    assert 0.5 < decision.confidence <= 1.0 and not decision.fallback
    assert text == TEXT
    assert (done.target, done.attempts, done.finish_reason) == ("local-large", 1, "stop")
    assert (done.prompt_tokens, done.completion_tokens) == (9, 4)  # fault server counts words
    assert done.cost_usd == pytest.approx((9 * 0.05 + 4 * 0.05) / 1e6)
    assert done.ttft_s > 0
    [rec] = stack.llms["local-large"].chat_requests()
    assert rec.body["model"] == "local-large" and rec.body["max_tokens"] == 16
    assert rec.text == CODE_PROMPT
    # The backend gets a UUID derived from the client's id (llama.cpp refuses any other).
    assert rec.headers["x-request-id"] == upstream_request_id("req-abc-123")
    for other in ("gpt-4o", "local-small", "gpt-4o-mini"):
        assert stack.llms[other].requests == []


async def test_backend_connections_are_reused(make_stack: StackFactory) -> None:
    """Sequential chats to one backend travel over one pooled keep-alive connection (the stream
    is read to its end, so the connection goes back to the pool)."""
    stack = await make_stack()
    for _ in range(3):
        events, error = await run(stack, user(CODE_PROMPT))
        assert error is None and split(events)[2].target == "local-large"
    peers = {r.peer for r in stack.llms["local-large"].chat_requests()}
    assert len(peers) == 1


PRE_COMMIT = [
    (FaultSpec("refuse"), "BackendUnavailable", 0),
    (FaultSpec("500"), "BackendUnavailable", 2),
    (FaultSpec("429"), "BackendRateLimited", 2),
    (FaultSpec("slow", delay_s=2.0), "BackendTimeout", 2),
    (FaultSpec("malformed", after=0), "BackendProtocolError", 2),
    (FaultSpec("drop", after=0), "BackendUnavailable", 2),
    (FaultSpec("hang", after=0), "BackendTimeout", 2),
]


@pytest.mark.parametrize(("spec", "kind", "received"), PRE_COMMIT,
                         ids=[s.mode for s, _, _ in PRE_COMMIT])
async def test_failure_before_first_token_fails_over(
    make_stack: StackFactory, spec: FaultSpec, kind: str, received: int
) -> None:
    """Before the commit point each failure mode is retried once on the same target, then the
    next target answers; the client sees the text exactly once."""
    stack = await make_stack()
    stack.llms["local-large"].set_default(spec)
    events, error = await run(stack, user(CODE_PROMPT))
    assert error is None
    decision, text, done = split(events)
    assert decision.target == "local-large"
    assert text == TEXT
    assert (done.target, done.attempts) == ("gpt-4o", 3)
    assert len(stack.llms["local-large"].chat_requests()) == received
    assert len(stack.llms["gpt-4o"].chat_requests()) == 1
    assert stack.sample("semroute_dispatcher_backend_failures_total",
                        target="local-large", kind=kind) == 2
    assert stack.sample("semroute_dispatcher_fallbacks_total",
                        from_target="local-large", to_target="gpt-4o") == 1
    assert stack.sample("semroute_dispatcher_cost_usd_total", target="gpt-4o") == \
        pytest.approx(done.cost_usd)


POST_COMMIT = [
    FaultSpec("drop", after=2),
    FaultSpec("malformed", after=2),
    FaultSpec("hang", after=2),
]


@pytest.mark.parametrize("spec", POST_COMMIT, ids=[s.mode for s in POST_COMMIT])
async def test_failure_after_first_token_ends_with_aborted(
    make_stack: StackFactory, spec: FaultSpec
) -> None:
    """After the commit point the stream ends with ABORTED; what was sent is not repeated and no
    other target (nor a retry) is called."""
    stack = await make_stack()
    stack.llms["local-large"].set_default(spec)
    events, error = await run(stack, user(CODE_PROMPT))
    assert isinstance(error, StreamInterrupted)
    assert error.grpc_code == grpc.StatusCode.ABORTED  # type: ignore[attr-defined]
    assert "after 2 chunk(s)" in str(error)
    assert [e.text for e in events[1:]] == ["Hello", ","]  # type: ignore[union-attr]
    assert len(stack.llms["local-large"].chat_requests()) == 1
    assert stack.llms["gpt-4o"].requests == [] and stack.llms["local-small"].requests == []
    assert stack.sample("semroute_dispatcher_chats_total", outcome="interrupted") == 1


async def test_all_targets_failing_lists_every_attempt_in_chain_order(
    make_stack: StackFactory,
) -> None:
    """When every target fails the call is UNAVAILABLE and names each attempt, in the route's
    order; the backends were called in that order."""
    stack = await make_stack()
    for name in CODE_CHAIN:
        stack.llms[name].set_default(FaultSpec("500"))
    events, error = await run(stack, user(CODE_PROMPT))
    assert isinstance(error, NoTargetAvailable)
    assert error.grpc_code == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert len(events) == 1  # the decision only
    lines = [line.strip() for line in str(error).splitlines()[1:]]
    assert [line.split(":")[0] for line in lines] == [
        "1. local-large", "2. local-large", "3. gpt-4o", "4. gpt-4o", "5. local-small",
        "6. local-small",
    ]
    assert all("HTTP 500" in line for line in lines)
    times = {n: [r.received_at for r in stack.llms[n].chat_requests()] for n in CODE_CHAIN}
    assert max(times["local-large"]) < min(times["gpt-4o"])
    assert max(times["gpt-4o"]) < min(times["local-small"])


async def test_retry_on_same_target_after_jittered_backoff(make_stack: StackFactory) -> None:
    """One 500 then success: the same target answers on its second attempt, after a backoff of
    at least half the base delay; the delays are jittered around an exponential base."""
    stack = await make_stack(backoff_s=0.05, retries=2)
    stack.llms["local-large"].script([FaultSpec("500")])
    events, error = await run(stack, user(CODE_PROMPT))
    assert error is None
    _, text, done = split(events)
    assert (done.target, done.attempts, text) == ("local-large", 2, TEXT)
    first, second = stack.llms["local-large"].chat_requests()
    assert second.received_at - first.received_at >= 0.025
    delays = [stack.dispatcher._backoff(k) for k in (1, 1, 1, 2, 2, 2)]
    assert all(0.025 <= d <= 0.075 for d in delays[:3])
    assert all(0.05 <= d <= 0.15 for d in delays[3:])
    assert len(set(delays)) == len(delays)


async def test_breaker_opens_then_half_open_probe_closes_it(make_stack: StackFactory) -> None:
    """After breaker_failures consecutive failures the target is skipped without a request;
    after the cooldown one probe goes through and, succeeding, closes the breaker. The breakers
    read an injected clock, so the cooldown passes without sleeping."""
    now = [1000.0]
    stack = await make_stack(retries=0, breaker_failures=2, breaker_cooldown_s=30.0,
                             clock=lambda: now[0])
    large = stack.llms["local-large"]
    large.set_default(FaultSpec("500"))
    for _ in range(2):
        _, _, done = split((await run(stack, user(CODE_PROMPT)))[0])
        assert done.target == "gpt-4o"
    assert stack.sample("semroute_dispatcher_breaker_state", target="local-large") == 2
    _, _, done = split((await run(stack, user(CODE_PROMPT)))[0])
    assert (done.target, done.attempts) == ("gpt-4o", 1)
    assert len(large.chat_requests()) == 2  # skipped: no third request
    assert stack.sample("semroute_dispatcher_backend_failures_total",
                        target="local-large", kind="CircuitOpen") == 1
    large.set_default(FaultSpec(chunks=CHUNKS))
    assert stack.sample("semroute_dispatcher_breaker_state", target="local-large") == 2
    now[0] += 30.5  # the cooldown passes
    # the gauge follows the cooldown by itself: half-open before any new request
    assert stack.sample("semroute_dispatcher_breaker_state", target="local-large") == 1
    _, text, done = split((await run(stack, user(CODE_PROMPT)))[0])
    assert (done.target, text) == ("local-large", TEXT)
    assert stack.sample("semroute_dispatcher_breaker_state", target="local-large") == 0


async def test_concurrency_limit_sends_overflow_to_next_target(make_stack: StackFactory) -> None:
    """With max_concurrency 1 a second concurrent chat does not queue behind the first for
    longer than the connect timeout: it moves on to the next target."""
    stack = await make_stack(
        timeouts=Timeouts(connect=0.1, first_token=2.0, idle=2.0, total=5.0), max_concurrency=1
    )
    stack.llms["local-large"].set_default(FaultSpec(chunks=CHUNKS, chunk_delay_s=0.2))
    results = await asyncio.gather(run(stack, user(CODE_PROMPT)), run(stack, user(CODE_PROMPT)))
    targets = sorted(split(events)[2].target for events, _ in results)
    assert targets == ["gpt-4o", "local-large"]
    assert len(stack.llms["local-large"].chat_requests()) == 1
    assert stack.sample("semroute_dispatcher_breaker_state", target="local-large") == 0


async def test_client_cancel_closes_upstream_at_once(make_stack: StackFactory) -> None:
    """Cancelling the gRPC call after the first token closes the backend connection long before
    the backend would have finished."""
    stack = await make_stack(timeouts=Timeouts(connect=0.5, first_token=2, idle=10, total=60))
    large = stack.llms["local-large"]
    large.set_default(FaultSpec(chunks=("tok",) * 50, chunk_delay_s=0.5))
    events = stack.client.chat(user(CODE_PROMPT))
    async for event in events:
        if isinstance(event, DeltaEvent):
            break
    await events.aclose()  # type: ignore[attr-defined]
    assert await asyncio.to_thread(
        large.wait_for, lambda s: s.requests and s.requests[0].disconnected_at is not None, 3.0
    )
    assert large.requests[0].chunks_sent < 10
    assert stack.llms["gpt-4o"].requests == []


async def test_closing_the_chat_iterator_closes_upstream(make_stack: StackFactory) -> None:
    """In-process callers (the HTTP door) that close ``Dispatcher.chat`` after a delta close the
    backend connection at once, without waiting for garbage collection."""
    stack = await make_stack(timeouts=Timeouts(connect=0.5, first_token=2, idle=10, total=60))
    large = stack.llms["local-large"]
    large.set_default(FaultSpec(chunks=("tok",) * 50, chunk_delay_s=0.5))
    chat = stack.dispatcher.chat(user(CODE_PROMPT))
    async for event in chat:
        if isinstance(event, DeltaEvent):
            break
    await chat.aclose()
    assert await asyncio.to_thread(
        large.wait_for, lambda s: s.requests and s.requests[0].disconnected_at is not None, 3.0
    )
    assert large.requests[0].chunks_sent < 10


async def test_deadline_closes_upstream(make_stack: StackFactory) -> None:
    """A client deadline ends the call with DEADLINE_EXCEEDED and closes the backend request."""
    stack = await make_stack(timeouts=Timeouts(connect=0.5, first_token=5, idle=10, total=60))
    large = stack.llms["local-large"]
    large.set_default(FaultSpec(chunks=("tok",) * 50, chunk_delay_s=1.0))
    events, error = await run(stack, user(CODE_PROMPT), timeout=0.5)
    assert len(events) >= 1  # the decision came before the deadline
    assert error is not None
    assert error.grpc_code == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert await asyncio.to_thread(
        large.wait_for, lambda s: s.requests and s.requests[0].disconnected_at is not None, 3.0
    )
    assert large.requests[0].chunks_sent < 5


async def test_cloud_target_without_key_is_skipped(make_stack: StackFactory) -> None:
    """Unset key variable: the cloud target is never called, the chain moves on, and forcing it
    fails with the variable named."""
    stack = await make_stack(environ={})
    assert stack.dispatcher.target_names() == ["local-small", "local-large"]
    stack.llms["local-large"].set_default(FaultSpec("500"))
    _, _, done = split((await run(stack, user(CODE_PROMPT)))[0])
    assert done.target == "local-small"
    assert stack.llms["gpt-4o"].requests == []
    assert stack.sample("semroute_dispatcher_backend_failures_total",
                        target="gpt-4o", kind="Skipped") == 1
    _, error = await run(stack, user("hi", force_target="gpt-4o"))
    assert isinstance(error, NoTargetAvailable)
    assert "SEMROUTE_TEST_CLOUD_KEY" in str(error) and "is not set" in str(error)


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (ChatRequest(()), "messages"),
        (ChatRequest((Message("robot", "hi"),)), "messages[0].role"),
        (ChatRequest((Message("system", "only a system prompt"),)), "messages"),
        (ChatRequest((Message("user", "hi"), Message("assistant", "hello"), Message("user", " "))),
         "messages[2].content"),
        (ChatRequest((Message("user", "hi"),), GenerationParams(temperature=3.0)),
         "params.temperature"),
        (ChatRequest((Message("user", "hi"),), GenerationParams(max_tokens=0)), "params.max_tokens"),
        (ChatRequest((Message("user", "hi"),), overrides=RoutingOverrides(force_target="gpt-9")),
         "overrides.force_target"),
        (ChatRequest((Message("user", "hi"),),
                     overrides=RoutingOverrides(allowed_targets=("local-small", "nope"))),
         "overrides.allowed_targets"),
        (ChatRequest((Message("user", "hi"),), overrides=RoutingOverrides(max_cost=-1.0)),
         "overrides.max_cost"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    make_stack: StackFactory, req: ChatRequest, field: str
) -> None:
    """Bad requests fail with INVALID_ARGUMENT naming the field; no backend is called."""
    stack = await make_stack()
    events, error = await run(stack, req)
    assert events == []
    assert isinstance(error, InvalidRequest)
    assert error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert error.field == field
    assert all(s.requests == [] for s in stack.llms.values())


async def test_long_prompt_is_routed_on_its_beginning_and_sent_whole(
    make_stack: StackFactory,
) -> None:
    """A prompt far beyond the router's query limit is still routed (on its beginning) and the
    backend receives all of it."""
    stack = await make_stack()
    document = "Summarize the following meeting notes in three bullet points. " + (
        "The team discussed the quarterly roadmap and agreed on the next release date. " * 400
    )
    assert len(document) > 20_000
    events, error = await run(stack, user(document))
    assert error is None
    decision, text, done = split(events)
    assert decision.route and text == TEXT
    [rec] = stack.llms[done.target].chat_requests()
    assert rec.text == document


async def test_overrides_constrain_the_chain(make_stack: StackFactory) -> None:
    """allowed_targets and max_cost remove targets from the router's chain (the dispatcher checks
    them against backends.yaml itself); force_target skips the router."""
    stack = await make_stack()
    events, _ = await run(stack, user(CODE_PROMPT, allowed_targets=("gpt-4o", "local-small")))
    assert events[0].chain == ("gpt-4o", "local-small")  # type: ignore[union-attr]
    events, _ = await run(stack, user(CODE_PROMPT, max_cost=1.0))
    assert events[0].chain == ("local-large", "local-small")  # type: ignore[union-attr]
    events, _ = await run(stack, user(CODE_PROMPT, force_target="gpt-4o-mini"))
    decision, text, done = split(events)
    assert (decision.route, decision.chain, done.target) == ("forced", ("gpt-4o-mini",),
                                                             "gpt-4o-mini")
    assert text == TEXT


async def test_cli_chat_prints_decision_then_streams(
    make_stack: StackFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """`semroute chat` prints the decision line, the streamed answer, and a done summary."""
    stack = await make_stack()
    capsys.readouterr()  # drop what the server logged while starting
    with capture_logs():  # keep the in-process server's log lines out of stdout
        code = await asyncio.to_thread(
            cli_main, ["chat", "--server", stack.addr, CREATIVE_PROMPT]
        )
    out, err = capsys.readouterr()
    assert code == 0
    first, rest = out.split("\n", 1)
    assert first.startswith("[route=creative target=local-small confidence=")
    assert "chain=local-small > gpt-4o-mini]" in first
    assert rest == TEXT + "\n"
    assert "[done target=local-small finish=stop" in err


async def test_cli_chat_reports_failures(
    make_stack: StackFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failing chat exits 2 with the dispatcher's explanation on stderr."""
    stack = await make_stack()
    for server in stack.llms.values():
        server.set_default(FaultSpec("500"))
    with capture_logs():
        code = await asyncio.to_thread(
            cli_main, ["chat", "--server", stack.addr, CREATIVE_PROMPT]
        )
    _, err = capsys.readouterr()
    assert code == 2
    assert "no target could answer" in err and "local-small: BackendUnavailable" in err
