"""Dispatcher hardening (issue 18 items 1, 2, 7, 10, 11; issue 17 item 2: the router fallback).

Real gRPC and fault servers on loopback; the router is the real in-process one, a small fake
gRPC router (for outages and comebacks) or a fake object. No test sleeps to prove a speed:
waits the dispatcher makes go through ``Dispatcher.sleep``, which the tests record.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import uuid
from typing import Any

import grpc
import httpx
import pytest
from structlog.testing import capture_logs

from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc
from semroute.auth import TokenSet
from semroute.config import load_settings
from semroute.dispatch.breaker import CircuitBreaker
from semroute.dispatch.dispatcher import Dispatcher
from semroute.dispatch.metrics import DispatchMetrics
from semroute.dispatch.pool import BackendPool
from semroute.dispatch.router_guard import GuardedRouter
from semroute.errors import (
    DispatchFailed,
    InvalidRequest,
    RequestRejected,
    SemrouteError,
    ServiceUnreachable,
)
from semroute.grpc.interceptors import standard_interceptors
from semroute.grpc.router_client import RouterClient
from semroute.http.app import start_http_door
from semroute.logs import add_request_id
from semroute.testing.faultserver import FaultSpec
from semroute.types import ChatEvent, ChatRequest, Decision, GenerationParams, Message
from tests.integration.dispatcher_fixtures import (
    CHUNKS,
    CLOUD_KEY_ENV,
    CODE_PROMPT,
    CREATIVE_PROMPT,
    FAST,
    StackFactory,
    backend_configs,
    collect,
    llms,
    make_stack,
    split,
    user,
)

pytestmark = pytest.mark.integration
__all__ = ["llms", "make_stack"]  # fixtures, imported for pytest

TEXT = "".join(CHUNKS)


async def run(stack: Any, req: ChatRequest) -> tuple[list[ChatEvent], SemrouteError | None]:
    events: list[ChatEvent] = []
    try:
        async for event in stack.client.chat(req):
            events.append(event)
    except SemrouteError as exc:
        return events, exc
    return events, None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- item 1: a client's request id never decides a backend's answer ---------------------------


@pytest.mark.parametrize("client_id", ["my-trace-42", "é-trace", "x" * 100_000])
async def test_client_request_id_never_breaks_a_strict_backend(
    make_stack: StackFactory, client_id: str
) -> None:
    """Backends that refuse non-UUID X-Request-ID (llama.cpp) still answer whatever id the
    client sent (a plain trace id, non-ASCII, 100 KB): they get a UUID; a bad id is replaced,
    never fatal."""
    stack = await make_stack()
    for server in stack.llms.values():
        server.strict_request_id = True
    req = dataclasses.replace(user(CREATIVE_PROMPT), request_id=client_id)
    events, error = await run(stack, req)
    assert error is None, error
    _, text, done = split(events)
    assert (done.target, text) == ("local-small", TEXT)
    sent = stack.llms["local-small"].chat_requests()[0].headers["x-request-id"]
    assert uuid.UUID(sent)


async def test_huge_request_id_metadata_is_replaced_not_fatal(make_stack: StackFactory) -> None:
    """A 100 KB x-request-id in gRPC metadata reaches the interceptor (which replaces it)
    instead of failing the call."""
    stack = await make_stack()
    req = user(CREATIVE_PROMPT)
    from semroute._proto.semroute.v1 import dispatcher_pb2_grpc as dpb_grpc
    from semroute.grpc.convert import request_to_proto

    async with grpc.aio.insecure_channel(stack.addr) as ch:
        stub = dpb_grpc.DispatcherStub(ch)
        call = stub.Chat(request_to_proto(req), metadata=(("x-request-id", "r" * 100_000),),
                         timeout=10)
        replies = [r async for r in call]
        trailers = dict(await call.trailing_metadata() or ())
    assert len(replies) >= 3
    assert len(str(trailers.get("x-request-id", ""))) <= 128


# ---- item 2: client-caused 4xx are the client's, not the backend's ------------------------------


async def test_context_overflow_is_a_400_not_a_breaker_trip_nor_a_failover(
    make_stack: StackFactory,
) -> None:
    """A backend's 400 for a prompt over its context goes back as InvalidRequest naming the
    limit; no other target is tried and the breaker stays closed after many such requests."""
    stack = await make_stack(retries=1, breaker_failures=2)
    stack.llms["local-large"].set_default(FaultSpec("400"))
    for _ in range(4):
        _, error = await run(stack, user(CODE_PROMPT))
        assert isinstance(error, InvalidRequest), error
        assert error.field == "messages" and "2048" in str(error)
    assert len(stack.llms["local-large"].chat_requests()) == 4  # no retries either
    assert all(not stack.llms[t].chat_requests() for t in ("gpt-4o", "local-small"))
    assert stack.sample("semroute_dispatcher_breaker_state", target="local-large") == 0


async def test_known_context_is_checked_before_the_call(llms: Any, default_router: Any) -> None:
    """With backends.X.context_tokens configured, a prompt or max_tokens that cannot fit is
    refused (400 naming the limit) before any backend is called."""
    from semroute.dispatch.dispatcher import InProcessRouter

    configs = {
        name: dataclasses.replace(cfg, context_tokens=64)
        for name, cfg in backend_configs(llms).items()
    }
    settings = load_settings(None)
    pool = BackendPool(configs, environ={CLOUD_KEY_ENV: "k"})
    disp = Dispatcher(InProcessRouter(default_router), pool, settings.dispatcher)
    try:
        long_prompt = ChatRequest((Message("user", "word " * 400),))
        with pytest.raises(InvalidRequest) as info:
            await collect(disp.chat(long_prompt))
        assert info.value.field == "messages" and "64 tokens" in str(info.value)
        forced = ChatRequest(
            (Message("user", "hi"),), GenerationParams(max_tokens=100),
            overrides=dataclasses.replace(user("x").overrides, force_target="local-small"),
        )
        with pytest.raises(InvalidRequest) as info:
            await collect(disp.chat(forced))
        assert info.value.field == "params.max_tokens" and "64" in str(info.value)
        assert all(not s.chat_requests() for s in llms.values())
    finally:
        await disp.aclose()


# ---- item 10: one budget for the time to first token across the chain ---------------------------


async def test_first_token_budget_caps_the_whole_chain(make_stack: StackFactory) -> None:
    """Every target hanging: the chat ends when the chain's budget is spent, not after each
    target's full first-token timeout twice; the rest of the chain is skipped and says why."""
    stack = await make_stack(retries=1, first_token_budget_s=0.3)
    for server in stack.llms.values():
        server.set_default(FaultSpec("hang"))
    with pytest.raises(DispatchFailed) as info:
        await asyncio.wait_for(collect(stack.dispatcher.chat(user(CODE_PROMPT))), 10)
    kinds = [a.kind for a in info.value.attempts]
    assert kinds[0] == "BackendTimeout" and "budget" in info.value.attempts[0].message
    assert set(kinds[1:]) == {"Skipped"} and "budget" in info.value.attempts[-1].message
    assert len(stack.llms["local-large"].chat_requests()) == 1
    assert not stack.llms["local-small"].chat_requests()


async def test_client_deadline_shortens_the_budget(make_stack: StackFactory) -> None:
    """``deadline_s`` (the gRPC door passes the client's remaining deadline) bounds the budget
    when shorter than dispatcher.first_token_budget_s."""
    stack = await make_stack(retries=1, first_token_budget_s=60)
    for server in stack.llms.values():
        server.set_default(FaultSpec("hang"))
    with pytest.raises(DispatchFailed) as info:
        await asyncio.wait_for(
            collect(stack.dispatcher.chat(user(CODE_PROMPT), deadline_s=0.2)), 10
        )
    assert "budget" in info.value.attempts[0].message


# ---- item 11: Retry-After ------------------------------------------------------------------------


def _record_sleeps(dispatcher: Dispatcher) -> list[float]:
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)

    dispatcher.sleep = fake_sleep
    return waits


async def test_retry_after_within_budget_is_waited_on_the_same_target(
    make_stack: StackFactory,
) -> None:
    """429 with Retry-After 3 (within max_retry_after_s and the budget): the retry on the same
    target waits at least that long instead of the 10 ms backoff."""
    stack = await make_stack(retries=1, max_retry_after_s=5)
    waits = _record_sleeps(stack.dispatcher)
    stack.llms["local-large"].script([FaultSpec("429", retry_after="3")])
    events = await collect(stack.dispatcher.chat(user(CODE_PROMPT)))
    _, text, done = split(events)
    assert (done.target, done.attempts, text) == ("local-large", 2, TEXT)
    assert waits and waits[0] >= 3.0


async def test_retry_after_beyond_the_limit_moves_on_and_holds_the_backend(
    make_stack: StackFactory,
) -> None:
    """Retry-After 7 over max_retry_after_s 1: no wait, the next target answers, and the backend
    is held off (breaker open) for the 7 s it asked for."""
    stack = await make_stack(retries=1, max_retry_after_s=1)
    waits = _record_sleeps(stack.dispatcher)
    stack.llms["local-large"].set_default(FaultSpec("429", retry_after="7"))
    _, _, done = split(await collect(stack.dispatcher.chat(user(CODE_PROMPT))))
    assert done.target == "gpt-4o" and waits == []
    assert len(stack.llms["local-large"].chat_requests()) == 1
    breaker = stack.dispatcher.backends.backends["local-large"].breaker
    assert breaker.state.value == "open" and 6.0 < breaker.retry_in() <= 7.0


# ---- issue 17 item 2: the router is not a single point of failure ---------------------------


class _FakeRouterServicer(pb_grpc.RouterServicer):
    """A router that always routes `creative` to gpt-4o-mini then local-small."""

    async def Route(self, request: pb.RouteRequest, context: Any) -> pb.RouteResponse:
        return pb.RouteResponse(route="creative", target="gpt-4o-mini", confidence=0.9,
                                targets=["gpt-4o-mini", "local-small"], reason="fake router")


async def _fake_router(port: int, tokens: TokenSet | None = None) -> grpc.aio.Server:
    server = grpc.aio.server(interceptors=standard_interceptors(tokens or TokenSet()))
    pb_grpc.add_RouterServicer_to_server(_FakeRouterServicer(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _guarded_dispatcher(
    llms: Any, port: int, clock: _Clock, *, token: str | None = None
) -> tuple[Dispatcher, DispatchMetrics]:
    settings = load_settings(None, dispatcher__retries=0)
    client = RouterClient(f"127.0.0.1:{port}", token=token, timeout=2.0)
    router = GuardedRouter(client, breaker=CircuitBreaker(2, 5.0, clock), retry_backoff_s=0.01)
    metrics = DispatchMetrics()
    pool = BackendPool(backend_configs(llms, FAST), environ={CLOUD_KEY_ENV: "k"})
    return Dispatcher(router, pool, settings.dispatcher, metrics=metrics, owns_router=True), metrics


async def test_router_down_uses_the_static_fallback_and_resumes_when_back(llms: Any) -> None:
    """Router unreachable: chats are answered through the fallback chain (local backends
    first), flagged fallback=true with reason "router unavailable", counted and logged; the
    router's breaker then skips it; once it is back and the cooldown passed, routing resumes
    without a restart."""
    port = free_port()
    clock = _Clock()
    disp, metrics = await _guarded_dispatcher(llms, port, clock)
    try:
        with capture_logs(processors=[add_request_id]) as logs:
            for _ in range(3):
                decision, text, done = split(await collect(disp.chat(user(CREATIVE_PROMPT))))
                assert decision.fallback and "router unavailable" in decision.reason
                assert decision.chain[:2] == ("local-small", "local-large")
                assert (done.target, text) == ("local-small", TEXT)
        assert any(e["event"] == "router_unavailable" for e in logs)
        assert metrics.registry.get_sample_value(
            "semroute_dispatcher_router_fallbacks_total", {"kind": "ServiceUnreachable"}
        ) == 3
        server = await _fake_router(port)
        try:
            # Breaker still open: no call to the router yet.
            decision, _, _ = split(await collect(disp.chat(user(CREATIVE_PROMPT))))
            assert decision.fallback
            clock.now += 6.0  # past the router breaker's cooldown: one probe goes through
            for _ in range(40):  # the channel reconnects within its short backoff
                decision, _, done = split(await collect(disp.chat(user(CREATIVE_PROMPT))))
                if not decision.fallback:
                    break
                clock.now += 6.0
                await asyncio.sleep(0.1)
            assert not decision.fallback and decision.reason == "fake router"
            assert done.target == "gpt-4o-mini"
        finally:
            await server.stop(0)
    finally:
        await disp.aclose()


async def test_router_refusing_our_token_is_a_503_without_internal_details(llms: Any) -> None:
    """A dispatcher without the router's token: users get 503 (not 401, no WWW-Authenticate)
    and a message without the router's address; the log names the setting to fix."""
    port = free_port()
    server = await _fake_router(port, TokenSet.of(["router-secret"]))
    disp, _ = await _guarded_dispatcher(llms, port, _Clock())
    settings = load_settings(None)
    door = await start_http_door(disp, settings, 0, "127.0.0.1")
    try:
        with capture_logs() as logs:
            async with httpx.AsyncClient(base_url=door.base_url, timeout=10) as http:
                r = await http.post("/chat/completions", json={
                    "model": "auto", "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 503, r.text
        assert "www-authenticate" not in r.headers
        message = r.json()["error"]["message"]
        assert "127.0.0.1" not in message and str(port) not in message
        refused = [e for e in logs if e["event"] == "router_refused_credentials"]
        assert refused and "router_token" in refused[0]["hint"]
    finally:
        await door.stop(1)
        await disp.aclose()
        await server.stop(0)


async def test_guarded_router_retries_a_connect_failure_once() -> None:
    """One quick retry for a call that could not connect; a second failure counts against the
    breaker, which opens after `failures` of them and then fails fast without calling."""

    class Down:
        calls = 0

        async def route(self, text: str, **kw: Any) -> Decision:
            Down.calls += 1
            raise ServiceUnreachable("router at x: UNAVAILABLE: refused")

    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    guard = GuardedRouter(Down(), breaker=CircuitBreaker(2, 5.0, _Clock()), retry_backoff_s=0.1,
                          sleep=sleep)
    for _ in range(3):
        with pytest.raises(ServiceUnreachable):
            await guard.route("q")
    assert Down.calls == 4 and len(slept) == 2  # third call: breaker open, no call
    assert guard.breaker.state.value == "open"


async def test_request_rejected_is_an_invalid_request_class() -> None:
    """RequestRejected maps to 400 / INVALID_ARGUMENT like every other client error."""
    from semroute.errors import grpc_status_name, http_status

    exc = RequestRejected("messages", "too long")
    assert (http_status(exc), grpc_status_name(exc)) == (400, "INVALID_ARGUMENT")
