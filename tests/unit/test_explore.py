"""Exploration (semroute.explore): off by default, serves the asked share of requests, only
plausible alternatives, and is recorded in the decision log."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from semroute.config import DispatcherSettings
from semroute.dispatch.dispatcher import Dispatcher
from semroute.dispatch.pool import BackendPool
from semroute.explore import alternatives, explore
from semroute.loop.decision_log import DecisionLog
from semroute.loop.sink import LogSink
from semroute.loop.store import open_store
from semroute.types import ChatRequest, ChatSummary, Decision, DecisionEvent, Message, Policy
from tests.unit.test_dispatcher_plan import CONFIGS

CHAIN = ("gpt-4o", "local-large", "local-small")
QUALITY = {"gpt-4o": 0.80, "local-large": 0.75, "local-small": 0.40}


def test_off_by_default_and_at_rate_zero() -> None:
    """The dispatcher's default rate is 0, and a zero rate never changes a chain."""
    assert DispatcherSettings().explore_rate == 0.0
    rng = random.Random(0)
    for _ in range(2000):
        got = explore(CHAIN, QUALITY, rate=0.0, tolerance=1.0, rng=rng)
        assert got.chain == CHAIN and not got.explored


def test_the_rate_is_respected_with_a_seeded_rng() -> None:
    """About the asked share of decisions explores; the same seed explores the same ones."""
    def run(seed: int) -> list[bool]:
        rng = random.Random(seed)
        return [explore(CHAIN, QUALITY, rate=0.2, tolerance=0.1, rng=rng).explored
                for _ in range(5000)]

    first = run(7)
    assert 0.18 < sum(first) / len(first) < 0.22
    assert first == run(7)


def test_only_targets_within_the_tolerance_are_served() -> None:
    """An alternative predicted more than the tolerance below the chosen target is never
    served; the rest of the chain keeps its order behind the explored one."""
    rng = random.Random(1)
    seen = set()
    for _ in range(500):
        got = explore(CHAIN, QUALITY, rate=1.0, tolerance=0.1, rng=rng)
        assert got.explored and got.chain == ("local-large", "gpt-4o", "local-small")
        seen.add(got.chain[0])
    assert seen == {"local-large"}
    assert alternatives(CHAIN, QUALITY, 0.5) == ["local-large", "local-small"]
    lonely = explore(CHAIN, {**QUALITY, "local-large": 0.1}, rate=1.0, tolerance=0.1, rng=rng)
    assert lonely.chain == CHAIN and not lonely.explored


def test_thompson_draws_favour_the_closer_alternative() -> None:
    """Within the tolerance, the alternative predicted better is drawn more often; a labelled
    decision (route shares, no per-target quality) may serve any other target of the route."""
    rng = random.Random(2)
    scores = {"gpt-4o": 0.8, "local-large": 0.78, "local-small": 0.6}
    picks = [explore(CHAIN, scores, rate=1.0, tolerance=0.3, rng=rng).chain[0]
             for _ in range(2000)]
    assert picks.count("local-large") > picks.count("local-small") > 0
    shares = {"code": 0.9, "chat": 0.1}
    labelled = {explore(CHAIN, shares, rate=1.0, tolerance=0.0, rng=rng).chain[0]
                for _ in range(200)}
    assert labelled == {"local-large", "local-small"}


class QualityRouter:
    """A RouterLike deciding CHAIN with per-target predicted quality (an outcome index)."""

    async def route(
        self, text: str, *, history: Sequence[str] = (), policy: Policy = Policy(),
        explain: bool = False,
    ) -> Decision:
        return Decision(CHAIN[0], CHAIN[0], 0.8, False, "scripted", QUALITY, CHAIN)


async def _first_target(dispatcher: Dispatcher) -> DecisionEvent:
    events = dispatcher.chat(ChatRequest((Message("user", "hello"),)))
    try:
        first = await anext(events)
    finally:
        await events.aclose()
    assert isinstance(first, DecisionEvent)
    return first


async def test_the_dispatcher_explores_only_when_configured() -> None:
    """Default settings serve the decided target; with ``explore_rate`` 1 the dispatcher serves
    the alternative within the tolerance and says so in the decision's reason."""
    pool = BackendPool(CONFIGS, environ={})
    plain = Dispatcher(QualityRouter(), pool, DispatcherSettings(), rng=random.Random(0))
    for _ in range(20):
        assert (await _first_target(plain)).chain == CHAIN
    exploring = Dispatcher(QualityRouter(), BackendPool(CONFIGS, environ={}),
                           DispatcherSettings(explore_rate=1.0), rng=random.Random(0))
    event = await _first_target(exploring)
    assert event.chain == ("local-large", "gpt-4o", "local-small")
    assert "exploring 'local-large' instead of 'gpt-4o'" in event.reason


def test_the_log_records_explored(tmp_path: Path) -> None:
    """A chat served by exploration is an ``explored`` row in the decision log."""
    sink = LogSink(DecisionLog(open_store(f"sqlite:{tmp_path / 'd.db'}")))
    for rid, explored in (("a", True), ("b", False)):
        sink.record(ChatSummary(rid, "q", "r", "local-large", "local-large", 0.8, False, "ok",
                                explored=explored))
    assert sink.log.flush()
    rows = {r.request_id: r.explored for r in sink.log.store.decisions()}
    sink.close()
    assert rows == {"a": True, "b": False}
