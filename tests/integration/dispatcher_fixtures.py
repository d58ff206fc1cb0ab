"""Fixtures for the dispatcher integration tests (imported by test_dispatcher*.py).

The stack under test is real end to end on loopback: the in-process ``Router`` over the
default index (tests/conftest.py's ``default_router``: real ONNX encoder, real FAISS), the
dispatcher behind its real gRPC server on a free port, and one fault server (a real HTTP server
of ours) per target of index_data/routes.yaml standing in for the LLMs. Timeouts are tens to
hundreds of milliseconds so failures are quick.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from semroute.config import load_settings
from semroute.dispatch.backend_config import BackendConfig, Timeouts
from semroute.dispatch.dispatcher import Dispatcher, InProcessRouter
from semroute.dispatch.metrics import DispatchMetrics
from semroute.dispatch.pool import BackendPool
from semroute.dispatch.rules import RuleEngine
from semroute.grpc.dispatcher_client import DispatcherClient
from semroute.grpc.dispatcher_service import create_dispatcher_server
from semroute.testing.faultserver import FaultServer, FaultSpec
from semroute.types import ChatEvent, ChatRequest, DecisionEvent, DeltaEvent, DoneEvent, Message

# target -> (local, input_cost, output_cost), as in index_data/routes.yaml
TARGETS: dict[str, tuple[bool, float, float]] = {
    "local-small": (True, 0.02, 0.02),
    "local-large": (True, 0.05, 0.05),
    "gpt-4o-mini": (False, 0.15, 0.60),
    "gpt-4o": (False, 2.50, 10.00),
}
CLOUD = ("gpt-4o-mini", "gpt-4o")
CLOUD_KEY_ENV = "SEMROUTE_TEST_CLOUD_KEY"
CHUNKS = ("Hello", ",", " world", "!")
FAST = Timeouts(connect=1.0, first_token=0.5, idle=0.5, total=5.0)

# Prompts whose route under the default index is stable (checked in test_real_router_chains).
CODE_PROMPT = "Write a Python function that reverses a linked list"  # local-large, gpt-4o, local-small
CREATIVE_PROMPT = "Write a short poem about autumn leaves"  # local-small, gpt-4o-mini

@pytest.fixture
def llms() -> Iterator[dict[str, FaultServer]]:
    """One fault server per target, all streaming CHUNKS normally until told otherwise."""
    servers: dict[str, FaultServer] = {}
    try:
        for name in TARGETS:
            servers[name] = FaultServer(FaultSpec(chunks=CHUNKS), model=name).start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@dataclass
class Stack:
    dispatcher: Dispatcher
    client: DispatcherClient
    addr: str
    llms: dict[str, FaultServer]
    metrics: DispatchMetrics
    extra: dict[str, Any] = field(default_factory=dict)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


StackFactory = Callable[..., Awaitable[Stack]]


def backend_configs(
    llms: dict[str, FaultServer], timeouts: Timeouts = FAST, max_concurrency: int = 8
) -> dict[str, BackendConfig]:
    configs = {}
    for name, (local, cin, cout) in TARGETS.items():
        configs[name] = BackendConfig(
            name,
            llms[name].base_url,
            name,
            api_key_env=None if local else CLOUD_KEY_ENV,
            timeouts=timeouts,
            max_concurrency=max_concurrency,
            input_cost=cin,
            output_cost=cout,
            local=local,
        )
    return configs


@pytest.fixture
async def make_stack(
    llms: dict[str, FaultServer], default_router: Any
) -> AsyncIterator[StackFactory]:
    """Build a dispatcher + gRPC server + client. Keyword arguments: ``rules`` (RuleEngine),
    ``environ`` (cloud keys; default: the test key set), ``timeouts``, ``max_concurrency``,
    ``router`` (default: the real in-process router), ``sink`` (a decision sink), ``ledger``
    (a factory ``(configs, metrics) -> Ledger``: cache, budgets, accounting), ``clock``
    (the backends' breakers read it: tests move time instead of sleeping) and any
    DispatcherSettings field."""
    built: list[tuple[Any, Dispatcher, DispatcherClient]] = []

    async def factory(
        *,
        rules: RuleEngine | None = None,
        environ: dict[str, str] | None = None,
        timeouts: Timeouts = FAST,
        max_concurrency: int = 8,
        router: Any = None,
        sink: Any = None,
        clock: Any = None,
        ledger: Any = None,
        **dispatcher: Any,
    ) -> Stack:
        values = {"retries": 1, "backoff_s": 0.01, "breaker_failures": 50,
                  "breaker_cooldown_s": 0.2, **dispatcher}
        settings = load_settings(
            dispatcher__port=0, **{f"dispatcher__{k}": v for k, v in values.items()}
        )
        pool = BackendPool(
            backend_configs(llms, timeouts, max_concurrency),
            breaker_failures=settings.dispatcher.breaker_failures,
            breaker_cooldown_s=settings.dispatcher.breaker_cooldown_s,
            environ={CLOUD_KEY_ENV: "test-cloud-key"} if environ is None else environ,
            **({"clock": clock} if clock is not None else {}),
        )
        metrics = DispatchMetrics()
        disp = Dispatcher(
            router if router is not None else InProcessRouter(default_router),
            pool,
            settings.dispatcher,
            rules,
            metrics=metrics,
            rng=random.Random(7),
            sink=sink,
            ledger=ledger(pool.configs, metrics) if ledger is not None else None,
        )
        server, port = await create_dispatcher_server(settings, disp)
        await server.start()
        addr = f"127.0.0.1:{port}"
        client = DispatcherClient(addr, timeout=10.0)
        built.append((server, disp, client))
        return Stack(disp, client, addr, llms, metrics)

    try:
        yield factory
    finally:
        for server, disp, client in built:
            await client.close()
            await server.stop(0)
            await disp.aclose()


def user(text: str, **overrides: Any) -> ChatRequest:
    from semroute.types import RoutingOverrides

    return ChatRequest((Message("user", text),), overrides=RoutingOverrides(**overrides))


async def collect(events: AsyncIterator[ChatEvent]) -> list[ChatEvent]:
    return [e async for e in events]


def split(events: list[ChatEvent]) -> tuple[DecisionEvent, str, DoneEvent]:
    """Check the event order (decision, deltas, done) and return its parts."""
    assert isinstance(events[0], DecisionEvent), events
    assert isinstance(events[-1], DoneEvent), events
    middle = events[1:-1]
    assert all(isinstance(e, DeltaEvent) for e in middle), events
    return events[0], "".join(e.text for e in middle if isinstance(e, DeltaEvent)), events[-1]
