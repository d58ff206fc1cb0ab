"""A dispatcher with its ledger (cache, budgets, accounting) behind both real doors on loopback.

Backends are two fault servers (gpt-4o-mini, local-small); a catch-all pre-filter rule routes
every chat to ``gpt-4o-mini`` then ``local-small``, so no router (and no model) is needed.
Tenants come from a real token file (``team-a``, ``team-b``); settings from keyword overrides
as the CLI would pass them (``cache__exact=True``, ``budgets__tenants=...``, ``state__url=...``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from semroute.auth import TokenSet
from semroute.config import load_settings
from semroute.dispatch.backend_config import BackendConfig, Timeouts
from semroute.dispatch.dispatcher import Dispatcher
from semroute.dispatch.ledger import build_ledger
from semroute.dispatch.metrics import DispatchMetrics
from semroute.dispatch.pii import PiiDetector
from semroute.dispatch.pool import BackendPool
from semroute.dispatch.rules import Rule, RuleEngine
from semroute.grpc.dispatcher_client import DispatcherClient
from semroute.grpc.dispatcher_service import build_dispatcher_server
from semroute.http.app import HttpDoorHandle, start_http_door
from semroute.testing.faultserver import FaultServer, FaultSpec
from semroute.types import Decision

CHUNKS = ("Hello", ",", " world", "!")
TOKENS = {"team-a": "tok-team-a", "team-b": "tok-team-b"}
ADMIN_TOKEN = "tok-admin"
PRICES = {"gpt-4o-mini": (0.15, 0.60), "local-small": (0.02, 0.02)}
TIMEOUTS = Timeouts(connect=1.0, first_token=1.0, idle=1.0, total=10.0)


class NoRouter:
    """Every chat here is routed by the catch-all rule or forced."""

    async def route(self, text: str, **_: Any) -> Decision:
        raise AssertionError("router called although the catch-all rule should decide")


@dataclass
class LedgerStack:
    dispatcher: Dispatcher
    door: HttpDoorHandle
    grpc_addr: str
    llms: dict[str, FaultServer]
    metrics: DispatchMetrics

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def client(self, tenant: str) -> DispatcherClient:
        return DispatcherClient(self.grpc_addr, token=TOKENS[tenant], timeout=10.0)

    @staticmethod
    def headers(tenant: str) -> dict[str, str]:
        return {"authorization": f"Bearer {TOKENS[tenant]}"}


LedgerFactory = Callable[..., Awaitable[LedgerStack]]


@pytest.fixture
def ledger_llms() -> Iterator[dict[str, FaultServer]]:
    servers: dict[str, FaultServer] = {}
    try:
        for name in PRICES:
            servers[name] = FaultServer(FaultSpec(chunks=CHUNKS), model=name).start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture
async def make_ledger_stack(
    ledger_llms: dict[str, FaultServer], tmp_path: Path
) -> AsyncIterator[LedgerFactory]:
    started: list[tuple[Any, HttpDoorHandle, Dispatcher]] = []
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("".join(f"{name} {tok}\n" for name, tok in TOKENS.items()))

    async def factory(**overrides: Any) -> LedgerStack:
        settings = load_settings(
            auth__tokens_file=tokens_file, auth__admin_tokens=[ADMIN_TOKEN],
            dispatcher__retries=0, dispatcher__backoff_s=0.0,
            **overrides,
        )
        configs = {
            name: BackendConfig(
                name, ledger_llms[name].base_url, name, timeouts=TIMEOUTS, input_cost=cin,
                output_cost=cout, local=name.startswith("local"),
            )
            for name, (cin, cout) in PRICES.items()
        }
        rules = RuleEngine(
            [Rule("everything", "general", ("gpt-4o-mini", "local-small"), min_chars=1)],
            PiiDetector(),
        )
        metrics = DispatchMetrics()
        tokens = TokenSet.from_settings(settings.auth)
        ledger = build_ledger(settings, configs, metrics, tokens.tenant_names())
        dispatcher = Dispatcher(
            NoRouter(), BackendPool(configs, environ={}), settings.dispatcher, rules,
            metrics=metrics, ledger=ledger,
        )
        built = await build_dispatcher_server(settings, dispatcher, host="127.0.0.1", port=0)
        await built.server.start()
        door = await start_http_door(dispatcher, settings, 0, "127.0.0.1")
        started.append((built.server, door, dispatcher))
        return LedgerStack(dispatcher, door, f"127.0.0.1:{built.port}", ledger_llms, metrics)

    try:
        yield factory
    finally:
        for server, door, dispatcher in started:
            await door.stop()
            await server.stop(0)
            await dispatcher.aclose()
