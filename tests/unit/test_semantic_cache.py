"""The semantic tier's index without a model: thresholds (global and per route), scopes that
keep tenants, routes, system prompts and parameters apart, the size bounds, and which
conversations are eligible."""

from __future__ import annotations

import numpy as np
import pytest

from semroute.config import CacheSettings
from semroute.dispatch import semantic
from semroute.dispatch.semantic import SemanticIndex, eligible, scope_of
from semroute.types import ChatRequest, GenerationParams, Message


def _unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def _req(*messages: tuple[str, str], tenant: str = "t", **params: object) -> ChatRequest:
    return ChatRequest(tuple(Message(r, c) for r, c in messages),
                       params=GenerationParams(**params), tenant=tenant)  # type: ignore[arg-type]


def test_search_returns_the_closest_at_or_above_the_routes_threshold() -> None:
    """The closest stored question wins if it reaches the threshold; a route's own threshold
    overrides the default."""
    index = SemanticIndex(CacheSettings(semantic_threshold=0.95,
                                        semantic_route_thresholds={"strict": 0.999}))
    index.add("s", _unit(1, 0, 0), "k-x")
    index.add("s", _unit(0, 1, 0), "k-y")
    query = _unit(1, 0.2, 0)  # cos to x: 0.981
    assert index.search("s", query, "general") == ("k-x", np.float32(query[0]))
    assert index.search("s", query, "strict") is None
    assert index.search("s", _unit(1, 1, 0), "general") is None  # 0.707 to both
    assert index.search("other-scope", query, "general") is None


def test_scope_separates_tenants_routes_system_prompts_and_parameters() -> None:
    """Only the user's question may differ between two requests that share answers."""
    base = _req(("system", "Be brief."), ("user", "q"))
    same = _req(("system", "Be brief. "), ("user", "another wording"))
    assert scope_of(base, "r") == scope_of(same, "r")
    assert scope_of(base, "r") != scope_of(base, "other-route")
    assert scope_of(base, "r") != scope_of(_req(("system", "Be brief."), ("user", "q"),
                                                tenant="u"), "r")
    assert scope_of(base, "r") != scope_of(_req(("system", "Be long."), ("user", "q")), "r")
    assert scope_of(base, "r") != scope_of(_req(("system", "Be brief."), ("user", "q"),
                                                max_tokens=5), "r")


def test_only_single_question_conversations_are_eligible() -> None:
    """One user message, optionally with system messages; no earlier turns."""
    assert eligible(_req(("user", "q")))
    assert eligible(_req(("system", "s"), ("user", "q")))
    assert not eligible(_req(("user", "q"), ("assistant", "a"), ("user", "q2")))
    assert not eligible(_req(("user", "q"), ("user", "q2")))


def test_bounds_per_scope_and_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the per-scope bound the oldest vector goes; past max_entries the least recently
    used scope goes; dropping a vector forgets it; re-adding a key is a no-op."""
    monkeypatch.setattr(semantic, "MAX_PER_SCOPE", 2)
    index = SemanticIndex(CacheSettings(max_entries=3))
    index.add("a", _unit(1, 0), "a1")
    index.add("a", _unit(1, 0), "a1")
    assert len(index) == 1
    index.add("a", _unit(0, 1), "a2")
    index.add("a", _unit(1, 1), "a3")  # a1 (oldest) leaves scope a
    assert len(index) == 2
    assert index.search("a", _unit(1, 0), "r") is None
    index.add("b", _unit(1, 0), "b1")
    index.search("a", _unit(0, 1), "r")  # a is now more recent than b
    index.add("c", _unit(1, 0), "c1")  # 4 > 3: b, least recently used, goes
    assert index.search("b", _unit(1, 0), "r") is None
    assert index.search("c", _unit(1, 0), "r") is not None
    index.drop("c", "c1")
    assert index.search("c", _unit(1, 0), "r") is None
    assert len(index) == 2
