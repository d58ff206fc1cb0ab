"""Exploration (semroute.explore): off by default, serves the asked share of requests, only
plausible alternatives, and is recorded in the decision log."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from semroute.config import DispatcherSettings
from semroute.dispatch.dispatcher import Dispatcher
from semroute.dispatch.pool import BackendPool
from semroute.errors import SemrouteError
from semroute.explore import alternatives, explore, win_probabilities
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
    """A chat served by exploration is an ``explored`` row in the decision log, with its
    propensity."""
    sink = LogSink(DecisionLog(open_store(f"sqlite:{tmp_path / 'd.db'}")))
    for rid, explored, p in (("a", True, 0.07), ("b", False, 0.9)):
        sink.record(ChatSummary(rid, "q", "r", "local-large", "local-large", 0.8, False, "ok",
                                explored=explored, propensity=p))
    assert sink.log.flush()
    rows = {r.request_id: (r.explored, r.propensity) for r in sink.log.store.decisions()}
    sink.close()
    assert rows == {"a": (True, 0.07), "b": (False, 0.9)}


def test_the_propensity_is_the_chance_of_being_served_first() -> None:
    """The logged propensity of whatever ``explore`` serves first matches how often it is
    served first over many draws: 1 - rate for the decided target when an alternative is near,
    rate x its Thompson win probability for an alternative, 1 when nothing can be explored."""
    rng = random.Random(3)
    scores = {"gpt-4o": 0.8, "local-large": 0.78, "local-small": 0.7}
    n, rate = 40_000, 0.3
    counts: dict[str, int] = {}
    logged: dict[str, float] = {}
    for _ in range(n):
        got = explore(CHAIN, scores, rate=rate, tolerance=0.2, rng=rng)
        counts[got.chain[0]] = counts.get(got.chain[0], 0) + 1
        logged.setdefault(got.chain[0], got.propensity)
        assert logged[got.chain[0]] == got.propensity  # the same decision, the same odds
    assert logged["gpt-4o"] == pytest.approx(1 - rate)
    for target, seen in counts.items():
        assert seen / n == pytest.approx(logged[target], abs=0.01)
    assert logged["local-large"] > logged["local-small"] > 0.05
    assert sum(win_probabilities([0.8, 0.7])) == pytest.approx(1)
    assert win_probabilities([0.5, 0.5]) == pytest.approx([0.5, 0.5])
    alone = explore(CHAIN, {**scores, "local-large": 0.1, "local-small": 0.1}, rate=rate,
                    tolerance=0.1, rng=rng)
    assert alone.propensity == 1.0 and not alone.explored
    assert explore(CHAIN, scores, rate=0.0, tolerance=0.2, rng=rng).propensity == 1.0


async def test_the_dispatcher_logs_the_propensity() -> None:
    """What the dispatcher reports to the decision log carries the propensity of the target it
    served first: 1 - rate when it kept the decided one, rate x win probability otherwise."""
    seen: list[ChatSummary] = []

    class ListSink:
        def record(self, summary: ChatSummary) -> None:
            seen.append(summary)

        def close(self) -> None:
            pass

    dispatcher = Dispatcher(QualityRouter(), BackendPool(CONFIGS, environ={}),
                            DispatcherSettings(explore_rate=0.5), rng=random.Random(5),
                            sink=ListSink())  # type: ignore[arg-type]
    for _ in range(40):
        with contextlib.suppress(SemrouteError):  # no backend answers: logged as failed
            async for _event in dispatcher.chat(ChatRequest((Message("user", "hello"),))):
                pass
    assert {s.explored for s in seen} == {True, False}
    for summary in seen:
        # one alternative within the default tolerance: it always wins its draw
        assert summary.propensity == pytest.approx(0.5)
        assert summary.explored == (summary.decided_target == "local-large")
