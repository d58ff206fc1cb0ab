"""What the dispatcher does around each backend call for money and repeats: rate limits, the
response cache, the budget reservation, and cost accounting.

Per chat, in order (``Dispatcher._chat`` calls these):

1. ``open(req, pii)``: the tenant's rate limits (RateLimitExceeded), then the cache lookup; the
   ``Ticket`` says hit/miss/bypass and carries the stored answer on a hit;
2. ``semantic_lookup`` after routing (semantic tier on): an exact miss whose question is close
   enough to one answered before becomes a hit (``semroute.dispatch.semantic``);
3. on a hit, ``replay(ticket, start)`` yields the stored chunks and the done event (cost 0) and
   counts the saved cost;
4. on a miss or bypass, ``reserve(ticket, chain)`` after routing: the estimated cost at the
   chain's most expensive target is reserved from the tenant's budget (InsufficientQuota);
5. ``settle(ticket, route, chain, done)`` when the answer is complete: actual cost replaces the
   estimate, the cost and counterfactual counters move, the answer is stored in the cache;
6. ``release(ticket, charged)`` when the chat ended otherwise: the estimate is refunded when
   nothing was generated and kept (charged) when a stream broke after text was sent.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from semroute.config import Settings
from semroute.dispatch.backend_config import BackendConfig
from semroute.dispatch.cache import BYPASS, HIT, MISS, CachedAnswer, ResponseCache, request_key
from semroute.dispatch.metrics import DispatchMetrics
from semroute.dispatch.redis_state import RedisState, SharedState
from semroute.dispatch.semantic import SemanticIndex, eligible, scope_of
from semroute.dispatch.sse_client import estimate_tokens
from semroute.dispatch.state import LocalState, StateBackend
from semroute.dispatch.tenants import ANONYMOUS, TenantGuard
from semroute.errors import TenantLimited
from semroute.logs import get_logger
from semroute.types import ChatEvent, ChatRequest, DecisionEvent, DeltaEvent, DoneEvent

log = get_logger(__name__)
MESSAGE_OVERHEAD_TOKENS = 4


@dataclass
class Ticket:
    """One chat's bookkeeping between ``open`` and ``settle``/``release``."""

    tenant: str
    status: str  # hit, miss, bypass; "" with the cache off
    key: str = ""
    answer: CachedAnswer | None = None
    reserved: int = 0  # nano-USD
    chunks: list[str] = field(default_factory=list)
    closed: bool = False
    reason: str = "response cache: exact match"
    scope: str = ""  # semantic tier: where this question's embedding goes once answered
    vector: np.ndarray | None = None

    @property
    def storing(self) -> bool:
        return self.status == MISS


class Ledger:
    def __init__(
        self,
        configs: Mapping[str, BackendConfig],
        guard: TenantGuard,
        cache: ResponseCache | None,
        metrics: DispatchMetrics,
        completion_estimate_tokens: int = 512,
    ) -> None:
        self.configs = configs
        self.guard = guard
        self.cache = cache if cache is not None and cache.enabled else None
        self.semantic = (
            SemanticIndex(self.cache.settings)
            if self.cache is not None and self.cache.settings.semantic else None
        )
        self.metrics = metrics
        self.completion_estimate_tokens = completion_estimate_tokens
        # (target, seconds to first token) of the latest answers: the dashboard's percentiles.
        self.recent_ttft: deque[tuple[str, float]] = deque(maxlen=2048)

    async def open(self, req: ChatRequest, pii: bool) -> Ticket:
        tenant = req.tenant or ANONYMOUS
        try:
            await self.guard.admit(tenant)
        except TenantLimited:
            self.metrics.tenant_refusals.labels(tenant=tenant, limit="rate").inc()
            raise
        if self.cache is None:
            return Ticket(tenant, "")
        why = self.cache.bypass_reason(req, pii)
        if why is not None:
            self.metrics.cache_requests.labels(result=BYPASS).inc()
            return Ticket(tenant, BYPASS)
        key = request_key(req)
        status, answer = await self.cache.get(key)
        if status != MISS or self.semantic is None:
            self.metrics.cache_requests.labels(result=status).inc()
        # else counted by semantic_lookup, once routing has had its say
        return Ticket(tenant, status, key, answer)

    async def semantic_lookup(
        self,
        ticket: Ticket,
        req: ChatRequest,
        route: str,
        embed: Callable[[], Awaitable[np.ndarray | None]] | None,
    ) -> None:
        """After routing, an exact miss may still be a semantic hit (then ``ticket.answer`` is
        set). ``embed`` gives the router's embedding of the question; None when the router did
        not embed it (a rule or a forced target decided)."""
        if self.semantic is None or self.cache is None or ticket.status != MISS:
            return
        vector = await embed() if embed is not None and eligible(req) else None
        if vector is not None:
            ticket.scope, ticket.vector = scope_of(req, route), vector
            found = self.semantic.search(ticket.scope, vector, route)
            if found is not None:
                key, similarity = found
                status, answer = await self.cache.get(key)
                if status == MISS:  # the answer expired or was evicted (BYPASS: store down)
                    self.semantic.drop(ticket.scope, key)
                elif answer is not None:
                    ticket.status, ticket.answer = HIT, answer
                    ticket.reason = f"response cache: semantic match (similarity {similarity:.3f})"
                    self.metrics.semantic_hits.inc()
        self.metrics.cache_requests.labels(result=ticket.status).inc()

    async def replay(self, ticket: Ticket, start: float) -> AsyncIterator[ChatEvent]:
        """The stored answer as a chat: decision, the original chunks, done (cost 0)."""
        a = ticket.answer
        assert a is not None
        yield DecisionEvent(a.route, a.target, 1.0, ticket.reason, False, (a.target,), cache=HIT)
        ttft = time.monotonic() - start
        for text in a.chunks:
            yield DeltaEvent(text)
        labels = {"tenant": ticket.tenant, "route": a.route, "target": a.target}
        self.metrics.answers.labels(**labels).inc()
        self.recent_ttft.append((a.target, ttft))
        self.metrics.cost_usd.labels(**labels).inc(0)
        self.metrics.counterfactual_usd.labels(**labels).inc(a.counterfactual_cost_usd)
        self.metrics.cache_saved_usd.labels(**labels).inc(a.cost_usd)
        ticket.closed = True
        yield DoneEvent(
            a.finish_reason, a.prompt_tokens, a.completion_tokens, 0.0, a.target, 0, ttft,
            cache=HIT, counterfactual_cost_usd=a.counterfactual_cost_usd,
        )

    def estimate_usd(self, req: ChatRequest, chain: Sequence[str]) -> float:
        """Upper estimate of the request's cost: at the chain's most expensive target, the
        prompt from its characters and the completion at max_tokens (or the configured
        estimate)."""
        prompt = sum(estimate_tokens(m.content) + MESSAGE_OVERHEAD_TOKENS for m in req.messages)
        completion = req.params.max_tokens or self.completion_estimate_tokens
        prices = [self.configs[t].cost_usd(prompt, completion) for t in chain if t in self.configs]
        return max(prices, default=0.0)

    async def reserve(self, ticket: Ticket, req: ChatRequest, chain: Sequence[str]) -> None:
        if not self.guard.has_budget(ticket.tenant):
            return
        try:
            ticket.reserved = await self.guard.reserve(
                ticket.tenant, self.estimate_usd(req, chain)
            )
        except TenantLimited:
            self.metrics.tenant_refusals.labels(tenant=ticket.tenant, limit="budget").inc()
            ticket.closed = True
            raise

    def _counterfactual(self, chain: Sequence[str], done: DoneEvent) -> float:
        costs = [
            self.configs[t].cost_usd(done.prompt_tokens, done.completion_tokens)
            for t in (*chain, done.target) if t in self.configs
        ]
        return max(costs, default=done.cost_usd)

    async def settle(
        self, ticket: Ticket, route: str, chain: Sequence[str], done: DoneEvent
    ) -> DoneEvent:
        """The done event with cache status and counterfactual cost; accounts and stores."""
        ticket.closed = True
        counterfactual = self._counterfactual(chain, done)
        labels = {"tenant": ticket.tenant, "route": route, "target": done.target}
        self.metrics.answers.labels(**labels).inc()
        self.recent_ttft.append((done.target, done.ttft_s))
        self.metrics.cost_usd.labels(**labels).inc(done.cost_usd)
        self.metrics.counterfactual_usd.labels(**labels).inc(counterfactual)
        await self.guard.settle(
            ticket.tenant, ticket.reserved, done.cost_usd,
            done.prompt_tokens + done.completion_tokens,
        )
        if self.cache is not None and ticket.storing:
            answer = CachedAnswer(
                tuple(ticket.chunks), done.finish_reason, done.prompt_tokens,
                done.completion_tokens, done.cost_usd, counterfactual, route, done.target,
            )
            stored = await self.cache.put(ticket.key, answer)
            if stored and self.semantic is not None and ticket.vector is not None:
                self.semantic.add(ticket.scope, ticket.vector, ticket.key)
        return replace(done, cache=ticket.status, counterfactual_cost_usd=counterfactual)

    async def aclose(self) -> None:
        """Close the state backend (the Redis connection pool)."""
        await self.guard.state.aclose()

    async def release(self, ticket: Ticket, charged: bool) -> None:
        """A chat that ended without a done event: refund its reservation unless text was
        generated (the backend charged for it: the estimate stands)."""
        if ticket.closed:
            return
        ticket.closed = True
        if ticket.reserved and not charged:
            await self.guard.settle(ticket.tenant, ticket.reserved, 0.0, 0)


def open_state(settings: Settings, metrics: DispatchMetrics) -> StateBackend:
    """The state backend ``state.url`` names: in process ('') or Redis with the local view as
    its stand-in. Raises ConfigError for a bad URL (nothing is connected yet: Redis may come
    up after the dispatcher)."""
    local = LocalState(max_entries=settings.cache.max_entries)
    url = settings.state.url
    if not url:
        return local
    remote = RedisState(url, prefix=settings.state.key_prefix, timeout_s=settings.state.timeout_s)
    shared = SharedState(
        remote, local, retry_s=settings.state.retry_s,
        on_error=lambda op: metrics.state_errors.labels(op=op).inc(),
    )
    metrics.state_up.set_function(lambda: 1.0 if shared.up else 0.0)
    return shared


def build_ledger(
    settings: Settings,
    configs: Mapping[str, BackendConfig],
    metrics: DispatchMetrics,
    tenant_names: set[str] | None,
) -> Ledger:
    """The ledger the settings describe (``cache``, ``budgets``, ``state``). ``tenant_names``:
    the names the token files define (None when auth is off); a budget for another name is a
    ConfigError."""
    state = open_state(settings, metrics)
    guard = TenantGuard(settings.budgets, state)
    guard.check_names(tenant_names)
    cache = ResponseCache(settings.cache, state)
    log.info("ledger", state=state.where, cache=settings.cache.exact,
             budgets=sorted(settings.budgets.tenants))
    return Ledger(
        configs, guard, cache, metrics, settings.budgets.completion_estimate_tokens
    )
