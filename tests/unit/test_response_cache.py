"""The response cache's exact tier without a network: what makes the key, what is never cached,
the in-process store's TTL and LRU bound, and entries that are not ours."""

from __future__ import annotations

import pytest

from semroute.config import CacheSettings
from semroute.dispatch.cache import BYPASS, HIT, MISS, CachedAnswer, ResponseCache, request_key
from semroute.dispatch.state import LocalState
from semroute.types import ChatRequest, GenerationParams, Message, RoutingOverrides


def _req(text: str = "What is a semantic router?", **kw: object) -> ChatRequest:
    params = kw.pop("params", GenerationParams())
    overrides = kw.pop("overrides", RoutingOverrides())
    return ChatRequest(
        (Message("system", "Be brief."), Message("user", text)),
        params=params, overrides=overrides, **kw,  # type: ignore[arg-type]
    )


def _answer(**kw: object) -> CachedAnswer:
    base: dict[str, object] = dict(
        chunks=("A ", "router."), finish_reason="stop", prompt_tokens=12, completion_tokens=2,
        cost_usd=0.001, counterfactual_cost_usd=0.01, route="general", target="gpt-4o-mini",
    )
    base.update(kw)
    return CachedAnswer(**base)  # type: ignore[arg-type]


def test_key_ignores_surrounding_whitespace_line_endings_and_request_id() -> None:
    """Normalisation: the same conversation typed slightly differently, or sent with another
    request id, is the same entry."""
    assert request_key(_req()) == request_key(_req("  What is a semantic router?\r\n"))
    assert request_key(_req()) == request_key(_req(request_id="other-id"))


@pytest.mark.parametrize(
    "changed",
    [
        _req("What is a semantic cache?"),
        _req(tenant="team-b"),
        _req(params=GenerationParams(max_tokens=5)),
        _req(params=GenerationParams(temperature=0.0)),
        _req(params=GenerationParams(stop=("\n",))),
        _req(params=GenerationParams(seed=3)),
        _req(params=GenerationParams(top_p=0.5)),
        _req(overrides=RoutingOverrides(force_target="gpt-4o")),
        _req(overrides=RoutingOverrides(require_local=True)),
        _req(overrides=RoutingOverrides(allowed_targets=("local-small",))),
        _req(overrides=RoutingOverrides(max_cost=1.0)),
    ],
    ids=["text", "tenant", "max_tokens", "temperature", "stop", "seed", "top_p", "model",
         "require_local", "allowed_targets", "max_cost"],
)
def test_every_answer_changing_field_changes_the_key(changed: ChatRequest) -> None:
    """Tenants never share entries, and neither do requests whose answer may differ."""
    assert request_key(changed) != request_key(_req())


def test_bypass_for_personal_data_and_sampling() -> None:
    """PII-flagged and sampled requests are never cached unless sampling is allowed."""
    cache = ResponseCache(CacheSettings(exact=True), LocalState())
    assert cache.bypass_reason(_req(), pii=True) == "personal data"
    sampled = _req(params=GenerationParams(temperature=0.7))
    assert cache.bypass_reason(sampled, pii=False) is not None
    assert cache.bypass_reason(_req(params=GenerationParams(temperature=0.0)), pii=False) is None
    assert cache.bypass_reason(_req(), pii=False) is None
    allowing = ResponseCache(CacheSettings(exact=True, sampled=True), LocalState())
    assert allowing.bypass_reason(sampled, pii=False) is None
    assert allowing.bypass_reason(sampled, pii=True) == "personal data"


async def test_incomplete_or_oversized_answers_are_not_stored() -> None:
    """Only complete answers (finish stop/length) within max_answer_chars are stored."""
    cache = ResponseCache(CacheSettings(exact=True, max_answer_chars=10), LocalState())
    assert not await cache.put("k1", _answer(finish_reason="content_filter"))
    assert not await cache.put("k2", _answer(chunks=()))
    assert not await cache.put("k3", _answer(chunks=("x" * 11,)))
    assert await cache.put("k4", _answer())
    assert [(await cache.get(k))[0] for k in ("k1", "k2", "k3", "k4")] == [MISS, MISS, MISS, HIT]
    assert (await cache.get("k4"))[1] == _answer()


async def test_local_store_expires_and_evicts_least_recently_used() -> None:
    """Entries live ttl_s seconds of the injected clock; past max_entries the least recently
    used goes first (a read counts as a use)."""
    now = [0.0]
    state = LocalState(max_entries=2, clock=lambda: now[0])
    cache = ResponseCache(CacheSettings(exact=True, ttl_s=10), state)
    await cache.put("a", _answer())
    await cache.put("b", _answer())
    assert (await cache.get("a"))[0] == HIT  # a is now more recent than b
    await cache.put("c", _answer())
    assert [(await cache.get(k))[0] for k in ("a", "b", "c")] == [HIT, MISS, HIT]
    now[0] = 10.0
    assert (await cache.get("a"))[0] == MISS


async def test_foreign_or_corrupt_entries_are_misses() -> None:
    """A value that is not one of our entries (another version, garbage) is a miss."""
    state = LocalState()
    cache = ResponseCache(CacheSettings(exact=True), state)
    await state.cache_put("x", b"not json", 10)
    await state.cache_put("y", b'{"chunks": ["a"]}', 10)
    assert (await cache.get("x"))[0] == MISS
    assert (await cache.get("y"))[0] == MISS


async def test_unavailable_store_is_a_bypass() -> None:
    """When the store cannot be asked the request bypasses the cache (it is still served)."""

    class Down(LocalState):
        async def cache_get(self, key: str) -> tuple[bool, bytes | None]:
            return False, None

    cache = ResponseCache(CacheSettings(exact=True), Down())
    assert await cache.get("k") == (BYPASS, None)
