"""Route a chat, call the chosen LLM backend, stream the answer back, fail over safely.

``Dispatcher.chat(request)`` is an async iterator of ``ChatEvent``:

1. one ``DecisionEvent`` (route, first target, confidence, reason, the fallback chain);
2. ``DeltaEvent``s with the generated text;
3. one ``DoneEvent`` (finish reason, tokens, cost, the target that answered, attempts, TTFT).

How the chain is chosen, in order: ``overrides.force_target`` (that target alone); else the first
matching pre-filter rule (``semroute.dispatch.rules``); else the router. Personal data anywhere in the
messages forces ``require_local``; the dispatcher then keeps only targets whose backend is marked
``local: true`` in backends.yaml, whatever the router or a rule said, so a sensitive prompt is
never sent to a non-local backend (a forced non-local target is refused with InvalidRequest).

The **commit point** is the first delta handed to the caller. Before it, a retriable failure
(refused, 5xx, 429, timeouts, malformed stream) is retried ``settings.retries`` times on the same
target with jittered exponential backoff, then the next target is tried; if none answers,
``DispatchFailed`` (a ``NoTargetAvailable``) carries every attempt's failure. After it, a failure
raises ``StreamInterrupted`` and nothing is retried, repeated or duplicated. Closing the iterator
early (client gone, deadline) closes the upstream HTTP request at once.

Around all this the ``Ledger`` (``semroute.dispatch.ledger``) applies the tenant's rate limits
and the response cache before routing (a cache hit is replayed without routing or calling a
backend), reserves the estimated cost from the tenant's budget after routing, and settles the
actual cost and the accounting when the done event passes (docs/CACHE.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from semroute.config import BudgetSettings, DispatcherSettings
from semroute.dispatch.backend_config import BackendConfig
from semroute.dispatch.cache import MISS
from semroute.dispatch.ledger import Ledger, Ticket
from semroute.dispatch.metrics import DispatchMetrics
from semroute.dispatch.pool import Backend, BackendPool
from semroute.dispatch.router_guard import fallback_chain
from semroute.dispatch.rules import Prefilter, RuleEngine
from semroute.dispatch.semantic import (
    QueryEmbedder,
    RouteCall,
    eligible,
    query_vector,
    route_call,
)
from semroute.dispatch.sse_client import StreamResult, estimate_tokens
from semroute.dispatch.state import LocalState
from semroute.dispatch.tenants import TenantGuard
from semroute.dispatch.validate import ChatLimits, validate_chat
from semroute.errors import (
    Attempt,
    BackendError,
    BackendRateLimited,
    BackendRejected,
    CircuitOpen,
    ConcurrencyLimited,
    DispatchFailed,
    InvalidRequest,
    NoTargetAvailable,
    NotFound,
    NotReady,
    PermissionDenied,
    RequestRejected,
    RoutingUnavailable,
    ShuttingDown,
    StreamInterrupted,
    TenantLimited,
    Unauthenticated,
)
from semroute.explore import explore
from semroute.logs import (
    bind_request_id,
    clean_request_id,
    get_logger,
    get_request_id,
    new_request_id,
    reset_request_id,
)
from semroute.types import (
    ChatEvent,
    ChatRequest,
    ChatSummary,
    Decision,
    DecisionEvent,
    DecisionSink,
    DeltaEvent,
    DoneEvent,
    Message,
    Policy,
    RouterLike,
)

log = get_logger("semroute.dispatch.dispatcher")

_NO_POLICY = Policy()
# Backend statuses that mean "this request is wrong" (context overflow, a refused role or
# parameter), not "this backend is down": the client hears about it, no other target is tried.
CLIENT_STATUSES = frozenset({400, 413, 422})
# Tokens a chat template adds around each message (role markers): counted before the call.
MESSAGE_OVERHEAD_TOKENS = 4
# The client's A/B key (HTTP header and gRPC metadata key alike): which arm of an A/B split in
# the router serves it (router.proto ``ab_key``). Without one, the tenant is the key.
AB_KEY_HEADER = "x-semroute-ab-key"


class InProcessRouter:
    """Adapter: a sync ``semroute.router.Router`` (or anything with its ``route``) as a
    ``RouterLike``, running each call off the event loop."""

    def __init__(self, router: Any) -> None:
        self.router = router

    async def route(
        self,
        text: str,
        *,
        history: Sequence[str] = (),
        policy: Policy = _NO_POLICY,
        explain: bool = False,
    ) -> Decision:
        result: Decision = await asyncio.to_thread(
            self.router.route, text, history=tuple(history), policy=policy, explain=explain
        )
        return result

    async def query_embedding(self, text: str) -> np.ndarray | None:
        """The router's embedding of ``text`` (``QueryEmbedder``): read from the router's own
        encoder cache, which holds it once ``route`` embedded the text (with the cache off,
        this embeds again)."""
        encoder = getattr(self.router, "encoder", None)
        if encoder is None:
            return None
        vectors = await asyncio.to_thread(encoder.encode, [text])
        return query_vector(vectors[0], str(getattr(encoder, "fingerprint", "")))


@dataclass(frozen=True)
class _Plan:
    route: str
    confidence: float
    reason: str
    fallback: bool
    chain: tuple[str, ...]
    index_version: str = ""
    routed_text: str = ""  # what the router embedded ("" when a rule or a force decided)
    embedding: np.ndarray | None = None  # the router's embedding of it, when it returned one
    explored: bool = False  # chain[0] was put first by exploration (semroute.explore)
    propensity: float = 1.0  # P(chain[0] first | the decision), with exploration (ditto)


class Dispatcher:
    """See the module docstring. Build one per process with ``semroute.serve.build_dispatcher``
    (or directly in tests), share it between the gRPC servicer and the HTTP door, ``aclose()`` at
    shutdown."""

    def __init__(
        self,
        router: RouterLike,
        backends: BackendPool,
        settings: DispatcherSettings,
        rules: RuleEngine | None = None,
        *,
        metrics: DispatchMetrics | None = None,
        rng: random.Random | None = None,
        owns_router: bool = False,
        limits: ChatLimits | None = None,
        sink: DecisionSink | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.router = router
        # Finished chats and feedback go here (the decision log); None: not recorded.
        self.sink = sink
        self.limits = limits if limits is not None else ChatLimits()
        self.backends = backends
        self.settings = settings
        # No rules file still means PII detection: the locality guarantee is on by default.
        self.rules = rules if rules is not None else RuleEngine.default()
        self.metrics = metrics if metrics is not None else DispatchMetrics()
        # Rate limits, budgets, the response cache, cost accounting (semroute.dispatch.ledger);
        # the default has no limits and no cache.
        self.ledger = ledger if ledger is not None else Ledger(
            backends.configs, TenantGuard(BudgetSettings(), LocalState()), None, self.metrics
        )
        self._rng = rng or random.Random()
        self._owns_router = owns_router
        # Injectable so tests see the waits (backoff, Retry-After) without sleeping.
        self.sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
        self._draining = False
        self._cut = False
        self._active: dict[int, asyncio.Task[Any] | None] = {}
        self._fallback = fallback_chain(
            settings.fallback_targets, self.backends.names(), self.backends.local_names()
        )
        self._told_no_embedding = False  # semantic_cache_no_embedding is logged once
        for name, backend in self.backends.backends.items():
            self.metrics.watch_breaker(name, lambda b=backend: b.breaker.state)  # type: ignore[misc]

    def target_names(self) -> list[str]:
        """Targets that can answer now (configured and not skipped), in backends-file order."""
        return [n for n in self.backends.names() if n in self.backends.backends]

    # ---- draining (SIGTERM) ----

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def active_chats(self) -> int:
        """Chats started and not finished (what a drain waits for)."""
        return len(self._active)

    def begin_drain(self) -> None:
        """Refuse new chats from now on (ShuttingDown: 503 / UNAVAILABLE, nothing was sent, a
        client may retry elsewhere); chats in flight go on."""
        self._draining = True

    def cut_streams(self) -> int:
        """End every chat in flight now (the drain period is over): one that already sent text
        ends with StreamInterrupted (ABORTED / an SSE error event), one that had not with
        ShuttingDown. Returns how many were cut."""
        self._draining = True
        self._cut = True
        tasks = [t for t in self._active.values() if t is not None and not t.done()]
        for task in tasks:
            task.cancel("semroute: server shutting down")
        return len(tasks)

    async def aclose(self) -> None:
        """Close every backend's HTTP pool (and the router client if built here); the decision
        sink writes what it holds and closes."""
        await self.backends.aclose()
        await self.ledger.aclose()
        if self._owns_router:
            close = getattr(self.router, "aclose", None) or getattr(self.router, "close", None)
            if close is not None:
                await close()
        if self.sink is not None:
            await asyncio.to_thread(self.sink.close)

    async def chat(
        self, req: ChatRequest, *, deadline_s: float | None = None, ab_key: str = ""
    ) -> AsyncGenerator[ChatEvent, None]:
        """Decision, deltas, done (see the module docstring for the guarantees).

        ``ab_key``: the client's A/B key (``AB_KEY_HEADER``; the doors check its length). The
        router gets it, else the tenant, else the request id, so one tenant's requests are
        served by one arm of an A/B split.

        Raises InvalidRequest/UnknownTarget (bad request, naming the field) before anything is
        yielded; DispatchFailed when no target answers before the commit point (within
        ``dispatcher.first_token_budget_s``, or ``deadline_s``, the client's remaining
        deadline, when shorter); StreamInterrupted after it. When the router cannot be reached
        the chain is the static fallback (``fallback=True``); a router refusing our
        credentials is RoutingUnavailable. ShuttingDown once the server drains.
        """
        start = time.monotonic()
        if self._draining:
            raise ShuttingDown("the dispatcher is shutting down; retry on another replica")
        budget = self.settings.first_token_budget_s
        if deadline_s is not None:
            budget = min(budget, max(deadline_s, 0.0))
        rid = (
            clean_request_id(req.request_id) if req.request_id
            else get_request_id() or new_request_id()
        )
        key = id(req)
        while key in self._active:  # the same request object sent twice at once
            key += 1
        self._active[key] = asyncio.current_task()
        try:
            # aclosing: a caller closing us at a yield closes the inner chat (and the upstream
            # HTTP response) now, not when the garbage collector gets to it.
            async with contextlib.aclosing(
                self._chat(req, rid, start, start + budget, key, ab_key)
            ) as events:
                async for event in events:
                    yield event
                    self._active[key] = None  # set again when resumed (by whichever task)
        finally:
            self._active.pop(key, None)

    async def _chat(
        self, req: ChatRequest, rid: str, start: float, budget_end: float, key: int,
        ab_key: str,
    ) -> AsyncGenerator[ChatEvent, None]:
        self._active[key] = asyncio.current_task()
        try:
            req = validate_chat(req, self.backends.names(), self.limits)
            pre = self.rules.evaluate(req.messages)
            for kind in pre.pii_kinds:
                self.metrics.prefilter.labels(match=f"pii:{kind}").inc()
            if pre.rule is not None:
                self.metrics.prefilter.labels(match=f"rule:{pre.rule.name}").inc()
            ticket = await self.ledger.open(req, bool(pre.pii_kinds))
            if ticket.answer is not None:
                async for event in self._replay(req, ticket, rid, start):
                    yield event
                return
            # The embedding is asked for only when the semantic tier will look it up.
            call = RouteCall(
                ab_key=ab_key or req.tenant or rid,
                want_embedding=(self.ledger.semantic is not None and ticket.status == MISS
                                and eligible(req)),
            )
            plan = await self._plan(req, pre, rid, call)
            await self.ledger.semantic_lookup(
                ticket, req, plan.route,
                (lambda: self._query_embedding(plan)) if plan.routed_text else None,
            )
            if ticket.answer is not None:
                async for event in self._replay(req, ticket, rid, start):
                    yield event
                return
            # Estimated at the dearest target that can be called (configured, key present).
            callable_chain = [t for t in plan.chain if t in self.backends.backends]
            await self.ledger.reserve(ticket, req, callable_chain or plan.chain)
        except InvalidRequest:
            self.metrics.chats.labels(outcome="invalid").inc()
            raise
        except NoTargetAvailable:
            self.metrics.chats.labels(outcome="failed").inc()
            raise
        except TenantLimited:
            self.metrics.chats.labels(outcome="refused").inc()
            raise
        log.info(
            "decided",
            request_id=rid,
            route=plan.route,
            chain=list(plan.chain),
            confidence=round(plan.confidence, 4),
            fallback=plan.fallback,
            pii=list(pre.pii_kinds),
            rule=pre.rule.name if pre.rule else None,
        )
        try:
            yield DecisionEvent(
                plan.route, plan.chain[0], plan.confidence, plan.reason, plan.fallback,
                plan.chain, cache=ticket.status,
            )
        except BaseException:  # closed before any backend call: give the reservation back
            await self.ledger.release(ticket, charged=False)
            raise
        self._active[key] = asyncio.current_task()
        outcome = "cancelled"
        sent = 0
        done: DoneEvent | None = None
        try:
            # aclosing: when the caller closes us at a yield, the inner stream (and with it the
            # upstream HTTP response) is closed now, not whenever it is garbage-collected.
            async with contextlib.aclosing(
                self._stream(req, plan, rid, start, budget_end)
            ) as events:
                async for event in events:
                    if isinstance(event, DeltaEvent):
                        sent += 1
                        if ticket.storing:
                            ticket.chunks.append(event.text)
                    elif isinstance(event, DoneEvent):
                        event = await self.ledger.settle(ticket, plan.route, plan.chain, event)
                        done = event
                    yield event
                    self._active[key] = asyncio.current_task()
            outcome = "ok"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._cut or task is None or not task.cancelling():
                raise
            # Our own cut at the end of the drain, not the caller's: say so, as an error.
            task.uncancel()
            outcome = "interrupted" if sent else "failed"
            log.warning("chat_cut_at_shutdown", request_id=rid, chunks=sent)
            if sent:
                raise StreamInterrupted(
                    plan.chain[0],
                    f"the server is shutting down: the stream was cut after {sent} chunk(s) at "
                    "the end of the drain period (dispatcher.grace_s); nothing will be repeated",
                ) from None
            raise ShuttingDown(
                "the dispatcher is shutting down; nothing was generated, retry on another replica"
            ) from None
        except StreamInterrupted:
            outcome = "interrupted"
            raise
        except InvalidRequest:
            outcome = "invalid"
            raise
        except NoTargetAvailable:
            outcome = "failed"
            raise
        finally:
            await self.ledger.release(ticket, charged=sent > 0)
            self.metrics.chats.labels(outcome=outcome).inc()
            if self.sink is not None:
                self.sink.record(ChatSummary(
                    request_id=rid, query=_last_user(req), route=plan.route, tenant=req.tenant,
                    decided_target=plan.chain[0], target=done.target if done else "",
                    confidence=plan.confidence, fallback=plan.fallback, status=outcome,
                    index_version=plan.index_version,
                    cost_usd=done.cost_usd if done else 0.0,
                    latency_s=time.monotonic() - start, ttft_s=done.ttft_s if done else 0.0,
                    explored=plan.explored, propensity=plan.propensity,
                ))

    async def _query_embedding(self, plan: _Plan) -> np.ndarray | None:
        """The router's embedding of the routed question: the one its reply carried, else
        one a ``QueryEmbedder`` hands over (the in-process router), else None (the semantic
        tier is bypassed, e.g. a router older than ``RouteResponse.query_embedding``)."""
        if plan.embedding is not None:
            return plan.embedding
        if isinstance(self.router, QueryEmbedder):
            return await self.router.query_embedding(plan.routed_text)
        if not self._told_no_embedding:
            self._told_no_embedding = True
            log.warning(
                "semantic_cache_no_embedding",
                reason="the router's reply carried no query embedding (a router that predates "
                "RouteResponse.query_embedding?): the semantic tier is bypassed, the exact tier "
                "still works",
            )
        return None

    async def _replay(
        self, req: ChatRequest, ticket: Ticket, rid: str, start: float
    ) -> AsyncGenerator[ChatEvent, None]:
        """A cache hit: the stored answer, recorded like any answered chat."""
        done: DoneEvent | None = None
        async for event in self.ledger.replay(ticket, start):
            if isinstance(event, DoneEvent):
                done = event
            yield event
        assert done is not None and ticket.answer is not None
        log.info("answered_from_cache", request_id=rid, route=ticket.answer.route,
                 target=done.target, saved_usd=ticket.answer.cost_usd)
        self.metrics.chats.labels(outcome="ok").inc()
        if self.sink is not None:
            self.sink.record(ChatSummary(
                request_id=rid, query=_last_user(req), route=ticket.answer.route,
                decided_target=done.target, target=done.target, confidence=1.0,
                fallback=False, status="ok", tenant=req.tenant, cost_usd=0.0,
                latency_s=time.monotonic() - start, ttft_s=done.ttft_s,
            ))

    async def feedback(
        self, request_id: str, score: float, target: str | None = None,
        comment: str | None = None,
    ) -> None:
        """Record a client's score for an answer (``request_id``: its x-request-id). Raises
        NotFound for an id the decision log does not know (or no log configured),
        InvalidRequest for a bad field."""
        if self.sink is None:
            raise NotFound("feedback needs the decision log (loop.decision_log is off here)")
        await self.sink.feedback(request_id, score, target, comment)

    # ---- validation and planning ----

    async def _plan(self, req: ChatRequest, pre: Prefilter, rid: str, call: RouteCall) -> _Plan:
        o = req.overrides
        require_local = o.require_local or pre.require_local
        why_local = _why_local(o.require_local, pre)
        configs = self.backends.configs
        if o.force_target:
            cfg = configs[o.force_target]
            if require_local and not cfg.local:
                raise InvalidRequest(
                    "overrides.force_target",
                    f"target {o.force_target!r} is not local but this request must stay on a "
                    f"local target ({why_local}); force a local target or drop force_target",
                )
            if o.max_cost is not None and cfg.cost > o.max_cost:
                raise InvalidRequest(
                    "overrides.force_target",
                    f"target {o.force_target!r} costs {cfg.cost:g} USD/1M tokens, above "
                    f"overrides.max_cost {o.max_cost:g}",
                )
            problem = self._context_problem(o.force_target, req)
            if problem is not None:
                raise InvalidRequest(*problem)
            return _Plan(
                "forced", 1.0, "forced by overrides.force_target", False, (o.force_target,)
            )
        decision: Decision | None = None
        explored_target = ""
        first, propensity = "", 1.0  # exploration's view of who goes first, and its odds
        if pre.rule is not None:
            route, confidence, fallback = pre.rule.route, 1.0, False
            reason = f"{pre.rule.describe()} matched"
            proposed: tuple[str, ...] = pre.rule.targets
        else:
            # Routing needs the gist, not the whole document: the router gets the beginning of
            # each turn (its own length limits must not reject a long summarisation prompt).
            limit = self.settings.route_max_chars
            user_turns = [m.content[:limit] for m in req.messages if m.role == "user"]
            keep = self.settings.route_history_turns
            policy = Policy(
                allowed_targets=tuple(o.allowed_targets),
                require_local=require_local,
                max_cost=o.max_cost,
            )
            history = tuple(user_turns[:-1][-keep:]) if keep else ()
            decision = await self._ask_router(user_turns[-1], history, policy, rid, call)
            if decision is None:
                route, confidence, fallback = "default", 0.0, True
                reason = "router unavailable: static fallback chain (dispatcher.fallback_targets)"
                proposed = self._fallback
            else:
                route, confidence = decision.route, decision.confidence
                fallback, reason = decision.fallback, decision.reason
                proposed = tuple(decision.targets) or (decision.target,)
                tried = explore(proposed, decision.scores, rate=self.settings.explore_rate,
                                tolerance=self.settings.explore_tolerance, rng=self._rng)
                first, propensity = tried.chain[0], tried.propensity
                if tried.explored:
                    reason += f"; exploring {tried.chain[0]!r} instead of {proposed[0]!r}"
                    explored_target, proposed = tried.chain[0], tried.chain
        chain, excluded = self._filter(proposed, req, require_local)
        if not chain and require_local and not o.allowed_targets:
            chain, _ = self._filter(tuple(self.backends.local_names()), req, True)
            if chain:
                reason += "; no local target in the chain, moved to the local backends"
        if require_local:
            reason += f"; kept on local targets ({why_local})"
        if not chain:
            too_small = [p for p in (self._context_problem(n, req) for n in proposed) if p]
            if too_small and set(excluded) <= {m for _, m in too_small}:
                # Only the context windows excluded them: the request is too big, say the limit.
                field, _ = too_small[0]
                raise InvalidRequest(field, "; ".join(m for _, m in too_small[:4]))
            if excluded:
                # The request's own constraints left nothing: the client's to change.
                raise InvalidRequest(
                    "overrides",
                    f"no target left for route {route!r} after the request's constraints: "
                    + "; ".join(excluded[:8]),
                )
            raise DispatchFailed(f"no target left for route {route!r}: the chain was empty")
        version = decision.index_version if decision is not None and not pre.rule else ""
        routed = user_turns[-1] if decision is not None and not pre.rule else ""
        return _Plan(route, confidence, reason, fallback, chain, version, routed,
                     call.embedding if routed else None,
                     explored=bool(explored_target) and chain[0] == explored_target,
                     propensity=propensity if chain[0] == first else 1.0)

    async def _ask_router(
        self, text: str, history: tuple[str, ...], policy: Policy, rid: str, call: RouteCall
    ) -> Decision | None:
        """The router's decision, or None when it cannot be had (unreachable, not ready, its
        breaker open): the caller then uses the static fallback chain. ``call`` carries the
        A/B key to the router client and brings back the query embedding, if asked for."""
        # Bind the id and the call around the call only (never across a yield) so the router
        # client forwards them and both services log the same request id.
        token = bind_request_id(rid)
        try:
            with route_call(call):
                decision: Decision = await self.router.route(text, history=history,
                                                             policy=policy)
            return decision
        except (Unauthenticated, PermissionDenied) as exc:
            log.error(
                "router_refused_credentials",
                request_id=rid,
                error=str(exc),
                hint="set the router's token: dispatcher.router_token_file or "
                "SEMROUTE_DISPATCHER__ROUTER_TOKEN (a token the router's auth.tokens lists)",
            )
            raise RoutingUnavailable(
                "routing is unavailable: the dispatcher is misconfigured (the operator will find "
                "the details in its log); name a target as `model` to bypass routing"
            ) from exc
        except NotReady as exc:
            self.metrics.router_fallbacks.labels(kind=type(exc).__name__).inc()
            log.warning(
                "router_unavailable", request_id=rid, kind=type(exc).__name__, error=str(exc),
                fallback_chain=list(self._fallback),
            )
            return None
        finally:
            reset_request_id(token)

    def _context_problem(self, name: str, req: ChatRequest) -> tuple[str, str] | None:
        """(field, message) when ``name``'s configured context window cannot hold the request
        (prompt estimated at 4 characters a token, plus max_tokens); None when it can or the
        window is not configured."""
        cfg: BackendConfig | None = self.backends.configs.get(name)
        if cfg is None or cfg.context_tokens is None:
            return None
        limit = cfg.context_tokens
        wanted = req.params.max_tokens or 0
        if wanted >= limit:
            return (
                "params.max_tokens",
                f"max_tokens {wanted} is not below target {name!r}'s context window of {limit} "
                f"tokens (backends.{name}.context_tokens)",
            )
        prompt = sum(estimate_tokens(m.content) + MESSAGE_OVERHEAD_TOKENS for m in req.messages)
        if prompt + wanted > limit:
            return (
                "messages",
                f"about {prompt} prompt tokens + max_tokens {wanted} exceed target {name!r}'s "
                f"context window of {limit} tokens (backends.{name}.context_tokens): shorten "
                "the messages",
            )
        return None

    def _filter(
        self, proposed: Sequence[str], req: ChatRequest, require_local: bool
    ) -> tuple[tuple[str, ...], list[str]]:
        """The proposed chain minus targets the request's constraints exclude (our own check:
        the router or a rule may not know backends.yaml's locality and prices)."""
        o = req.overrides
        chain: list[str] = []
        excluded: list[str] = []
        for name in proposed:
            if name in chain:
                continue
            cfg = self.backends.configs.get(name)
            if o.allowed_targets and name not in o.allowed_targets:
                excluded.append(f"{name} not in overrides.allowed_targets")
            elif require_local and (cfg is None or not cfg.local):
                excluded.append(f"{name} is not a local backend")
            elif o.max_cost is not None and cfg is not None and cfg.cost > o.max_cost:
                excluded.append(f"{name} costs {cfg.cost:g} > overrides.max_cost {o.max_cost:g}")
            elif (problem := self._context_problem(name, req)) is not None:
                excluded.append(problem[1])
            else:
                chain.append(name)
        return tuple(chain), excluded

    # ---- calling backends ----

    async def _stream(
        self, req: ChatRequest, plan: _Plan, rid: str, start: float, budget_end: float
    ) -> AsyncGenerator[ChatEvent, None]:
        attempts: list[Attempt] = []
        calls = 0
        for target in plan.chain:
            backend = self.backends.get(target)
            if backend is None:
                reason = self.backends.skipped.get(target) or (
                    f"no backend configured for target {target!r} "
                    f"(add it to {self.settings.backends_file})"
                )
                attempts.append(Attempt(target, "Skipped", reason))
                self.metrics.record_failure(target, "Skipped")
                continue
            wait = 0.0
            for retry in range(self.settings.retries + 1):
                if retry:
                    wait = max(wait, self._backoff(retry))
                    if time.monotonic() + wait >= budget_end:
                        break
                    await self.sleep(wait)
                    wait = 0.0
                if time.monotonic() >= budget_end:
                    break
                t0 = time.monotonic()
                try:
                    backend.check_breaker()
                except CircuitOpen as exc:
                    attempts.append(Attempt(target, "CircuitOpen", _message(exc)))
                    self.metrics.record_failure(target, "CircuitOpen")
                    break
                calls += 1
                result = StreamResult()
                sent = 0
                first_at = -1.0
                try:
                    async with backend.slot():
                        chunks = backend.client.stream(
                            req.messages, req.params, result, request_id=rid,
                            first_token_by=budget_end,
                        )
                        try:
                            async for text in chunks:
                                if sent == 0:
                                    first_at = time.monotonic()
                                sent += 1
                                yield DeltaEvent(text)
                        finally:
                            await chunks.aclose()
                except BackendError as exc:
                    kind = type(exc).__name__
                    self._health(backend, exc)
                    self.metrics.record_failure(target, "StreamInterrupted" if sent else kind)
                    if sent:
                        log.warning(
                            "stream_interrupted",
                            request_id=rid,
                            target=target,
                            kind=kind,
                            chunks=sent,
                            error=_message(exc),
                        )
                        raise StreamInterrupted(
                            target,
                            f"stream broke after {sent} chunk(s) were sent; nothing was retried "
                            f"or repeated ({kind}: {_message(exc)})",
                        ) from exc
                    rejected = _client_caused(exc)
                    if rejected is not None:
                        log.info("request_rejected_by_backend", request_id=rid, target=target,
                                 error=_message(exc))
                        raise rejected from exc
                    attempts.append(Attempt(target, kind, _message(exc), time.monotonic() - t0))
                    log.warning(
                        "attempt_failed",
                        request_id=rid,
                        target=target,
                        kind=kind,
                        attempt=len(attempts),
                        error=_message(exc),
                    )
                    if isinstance(exc, BackendRateLimited) and result.retry_after_s is not None:
                        wait = result.retry_after_s
                        last = retry == self.settings.retries
                        if (
                            last
                            or wait > self.settings.max_retry_after_s
                            or time.monotonic() + wait >= budget_end
                        ):
                            # Not worth waiting here: hold the backend off for as long as it
                            # asked and go on down the chain.
                            if wait > 0:
                                backend.breaker.hold_for(wait)
                            break
                    if isinstance(exc, BackendRejected) or not exc.retriable:
                        break
                    continue
                except BaseException:
                    # Cancelled or closed by the caller: says nothing about the backend's health.
                    backend.breaker.release()
                    raise
                backend.breaker.record_success()
                done = self._done(backend, result, calls, start, first_at)
                self.metrics.record_success(
                    target,
                    first_target=plan.chain[0],
                    ttft_s=done.ttft_s,
                    stream_s=time.monotonic() - first_at if first_at > 0 else 0.0,
                    prompt_tokens=done.prompt_tokens,
                    completion_tokens=done.completion_tokens,
                    cost_usd=done.cost_usd,
                )
                log.info(
                    "answered",
                    request_id=rid,
                    target=target,
                    attempts=calls,
                    ttft_ms=round(done.ttft_s * 1000, 2),
                    prompt_tokens=done.prompt_tokens,
                    completion_tokens=done.completion_tokens,
                    usage_reported=result.usage_reported,
                    cost_usd=done.cost_usd,
                    finish_reason=done.finish_reason,
                )
                yield done
                return
            if time.monotonic() >= budget_end:
                spent = time.monotonic() - start
                rest = plan.chain[plan.chain.index(target) + 1 :]
                attempts.extend(
                    Attempt(t, "Skipped", f"first-token budget spent after {spent:.1f} s")
                    for t in rest
                )
                break
        raise DispatchFailed(
            f"no target could answer (route {plan.route!r}, chain {', '.join(plan.chain)})",
            attempts,
        )

    def _health(self, backend: Backend, exc: BackendError) -> None:
        """Feed the breaker: a rejected request or our own concurrency limit says nothing about
        the backend being down."""
        if isinstance(exc, BackendRejected | ConcurrencyLimited):
            backend.breaker.release()
        else:
            backend.breaker.record_failure()

    def _done(
        self, backend: Backend, result: StreamResult, calls: int, start: float, first_at: float
    ) -> DoneEvent:
        cost = backend.config.cost_usd(result.prompt_tokens, result.completion_tokens)
        ttft = first_at - start if first_at > 0 else time.monotonic() - start
        return DoneEvent(
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            cost_usd=cost,
            target=backend.name,
            attempts=calls,
            ttft_s=ttft,
        )

    def _backoff(self, retry: int) -> float:
        """Exponential backoff with jitter: base * 2^(retry-1), scaled by a uniform 0.5..1.5 so
        clients that failed together do not retry together."""
        base = self.settings.backoff_s * 2.0 ** (retry - 1)
        return base * self._rng.uniform(0.5, 1.5)


def _why_local(requested: bool, pre: Prefilter) -> str:
    reasons = []
    if pre.pii_kinds:
        reasons.append(f"personal data detected: {', '.join(pre.pii_kinds)}")
    if pre.rule is not None and pre.rule.require_local:
        reasons.append(f"rule {pre.rule.name!r} requires local")
    if requested:
        reasons.append("overrides.require_local")
    return "; ".join(reasons)


def _client_caused(exc: BackendError) -> RequestRejected | None:
    """The client's error when a backend refused the request itself (400/413/422), else None."""
    status = getattr(exc, "status", None)
    if not isinstance(exc, BackendRejected) or status not in CLIENT_STATUSES:
        return None
    detail = _message(exc)
    lowered = detail.lower()
    if "context" in lowered or "token" in lowered or status == 413:
        return RequestRejected(
            "messages",
            f"target {exc.target!r} cannot take a request this long ({detail}); "
            "shorten the messages or lower max_tokens",
        )
    return RequestRejected(
        "request", f"target {exc.target!r} refused the request ({detail})"
    )


def _message(exc: BackendError) -> str:
    """The error text without the ``backend 'x': `` prefix (the target is shown beside it)."""
    text = str(exc)
    prefix = f"backend {exc.target!r}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


# Re-exported for callers that build requests.
__all__ = [
    "Attempt",
    "DispatchFailed",
    "Dispatcher",
    "InProcessRouter",
    "Message",
    "RouterLike",
]


def _last_user(req: ChatRequest) -> str:
    return next((m.content for m in reversed(req.messages) if m.role == "user"), "")
