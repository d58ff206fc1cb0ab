"""The dispatcher's plan and filter, read from the first event of a chat (the decision is made
before any backend is called): forced targets, rules, router chains narrowed by the request's
constraints, personal data kept local, and empty chains refused with the reasons."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from semroute.config import DispatcherSettings
from semroute.dispatch.backend_config import BackendConfig
from semroute.dispatch.dispatcher import Dispatcher
from semroute.dispatch.pool import BackendPool
from semroute.dispatch.rules import Rule, RuleEngine
from semroute.errors import InvalidRequest
from semroute.types import (
    ChatRequest,
    Decision,
    DecisionEvent,
    Message,
    Policy,
    RoutingOverrides,
)

CONFIGS = {
    "local-small": BackendConfig("local-small", "http://127.0.0.1:1/v1", "m", local=True),
    "local-large": BackendConfig("local-large", "http://127.0.0.1:2/v1", "m", local=True,
                                 input_cost=0.5, output_cost=0.5),
    "gpt-4o": BackendConfig("gpt-4o", "http://127.0.0.1:3/v1", "m",
                            input_cost=2.5, output_cost=10.0),
}


class ScriptedRouter:
    """A RouterLike that always proposes ``chain`` and records what it was asked."""

    def __init__(self, chain: Sequence[str], route: str = "code") -> None:
        self.chain = tuple(chain)
        self.route_name = route
        self.calls: list[tuple[str, tuple[str, ...], Policy]] = []

    async def route(
        self, text: str, *, history: Sequence[str] = (), policy: Policy = Policy(),
        explain: bool = False,
    ) -> Decision:
        self.calls.append((text, tuple(history), policy))
        return Decision(self.route_name, self.chain[0], 0.9, False, "scripted", {}, self.chain)


def _dispatcher(router: Any, rules: RuleEngine | None = None) -> Dispatcher:
    pool = BackendPool(CONFIGS, environ={})
    return Dispatcher(router, pool, DispatcherSettings(), rules)


async def _decide(dispatcher: Dispatcher, text: str, **overrides: Any) -> DecisionEvent:
    req = ChatRequest((Message("user", text),), overrides=RoutingOverrides(**overrides))
    events = dispatcher.chat(req)
    try:
        first = await anext(events)
    finally:
        await events.aclose()  # stop before any backend is called
    assert isinstance(first, DecisionEvent)
    return first


async def test_router_chain_is_kept_in_order() -> None:
    """Without constraints the router's chain is the plan, and the router sees the text."""
    router = ScriptedRouter(["gpt-4o", "local-large"])
    decision = await _decide(_dispatcher(router), "write a sort in Rust")
    assert decision.chain == ("gpt-4o", "local-large")
    assert (decision.route, decision.fallback) == ("code", False)
    assert router.calls[0][0] == "write a sort in Rust"


async def test_constraints_narrow_the_chain() -> None:
    """allowed_targets and max_cost remove targets from the router's chain (our own check:
    the router need not know the backends' prices), and reach the router as its policy."""
    router = ScriptedRouter(["gpt-4o", "local-large", "local-small"])
    dispatcher = _dispatcher(router)
    capped = await _decide(dispatcher, "hello there", max_cost=1.0)
    assert capped.chain == ("local-large", "local-small")
    allowed = await _decide(dispatcher, "hello there", allowed_targets=("local-small", "gpt-4o"))
    assert allowed.chain == ("gpt-4o", "local-small")
    assert router.calls[-1][2].allowed_targets == ("local-small", "gpt-4o")


async def test_personal_data_keeps_the_chain_local() -> None:
    """An email in the prompt forces require_local: non-local targets leave the chain, and a
    chain with no local target moves to the local backends, saying why."""
    dispatcher = _dispatcher(ScriptedRouter(["gpt-4o"]))
    decision = await _decide(dispatcher, "mail bob@example.com the report")
    assert decision.chain == ("local-small", "local-large")
    assert "moved to the local backends" in decision.reason
    assert "personal data detected: email" in decision.reason


async def test_forced_target_skips_the_router_but_not_the_locality_rule() -> None:
    """force_target is the plan on its own; forcing a cloud target with personal data in the
    prompt is refused, naming the field."""
    router = ScriptedRouter(["gpt-4o"])
    dispatcher = _dispatcher(router)
    forced = await _decide(dispatcher, "plain question", force_target="gpt-4o")
    assert (forced.route, forced.chain) == ("forced", ("gpt-4o",))
    assert router.calls == []
    with pytest.raises(InvalidRequest) as info:
        await _decide(dispatcher, "mail bob@example.com", force_target="gpt-4o")
    assert info.value.field == "overrides.force_target"


async def test_a_matching_rule_decides_before_the_router() -> None:
    """The first matching rule's chain is used and the router is not asked."""
    rule = Rule("sql", "code", ("local-large",), min_chars=1)
    router = ScriptedRouter(["gpt-4o"])
    decision = await _decide(_dispatcher(router, RuleEngine([rule])), "select * from t")
    assert (decision.route, decision.chain) == ("code", ("local-large",))
    assert "rule 'sql'" in decision.reason
    assert router.calls == []


async def test_an_empty_chain_is_refused_with_every_reason() -> None:
    """When the request's own constraints leave nothing, it is the client's error (400 /
    INVALID_ARGUMENT naming `overrides`) listing why each target went."""
    dispatcher = _dispatcher(ScriptedRouter(["gpt-4o", "local-large"]))
    with pytest.raises(InvalidRequest) as info:
        await _decide(dispatcher, "hello there", max_cost=0.01, allowed_targets=("gpt-4o",))
    assert info.value.field == "overrides"
    message = str(info.value)
    assert "gpt-4o costs 6.25 > overrides.max_cost 0.01" in message
    assert "local-large not in overrides.allowed_targets" in message
