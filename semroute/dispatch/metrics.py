"""Prometheus metrics of the dispatcher (namespace ``semroute_dispatcher``).

Like the router's, they live in a registry of their own so tests and several servers can share a
process. The dispatcher calls the ``record_*`` methods; nothing here knows about HTTP or gRPC.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from semroute.dispatch.breaker import BreakerState
from semroute.metrics import RpcMetrics

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPS_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 400, 800)
_BREAKER_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class DispatchMetrics:
    NAMESPACE = "semroute_dispatcher"

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        ns, reg = self.NAMESPACE, self.registry
        self.rpc = RpcMetrics(ns, reg)
        self.chats = Counter(
            "chats",
            "Chat requests by outcome (ok, failed, interrupted, invalid, cancelled)",
            ["outcome"],
            namespace=ns,
            registry=reg,
        )
        self.attempts = Counter(
            "backend_requests",
            "Backend attempts by target and result (ok or the error kind)",
            ["target", "result"],
            namespace=ns,
            registry=reg,
        )
        self.failures = Counter(
            "backend_failures",
            "Failed backend attempts by target and kind (error class)",
            ["target", "kind"],
            namespace=ns,
            registry=reg,
        )
        self.fallbacks = Counter(
            "fallbacks",
            "Chats answered by a later target than the first of the chain",
            ["from_target", "to_target"],
            namespace=ns,
            registry=reg,
        )
        self.breaker = Gauge(
            "breaker_state",
            "Circuit breaker per target: 0 closed, 1 half-open, 2 open",
            ["target"],
            namespace=ns,
            registry=reg,
        )
        self.ttft = Histogram(
            "ttft_seconds",
            "Time from request to first token sent, by target",
            ["target"],
            namespace=ns,
            registry=reg,
            buckets=TTFT_BUCKETS,
        )
        self.tokens_per_second = Histogram(
            "tokens_per_second",
            "Completion tokens per second after the first token",
            ["target"],
            namespace=ns,
            registry=reg,
            buckets=TPS_BUCKETS,
        )
        self.tokens = Counter(
            "tokens",
            "Tokens by target and kind (prompt, completion)",
            ["target", "kind"],
            namespace=ns,
            registry=reg,
        )
        self.cost = Counter(
            "cost_usd",
            "Cost in USD by target (from backends.yaml prices)",
            ["target"],
            namespace=ns,
            registry=reg,
        )
        self.router_fallbacks = Counter(
            "router_fallbacks",
            "Chats routed with the static fallback chain because the router could not be had, "
            "by why (ServiceUnreachable, NotReady...)",
            ["kind"],
            namespace=ns,
            registry=reg,
        )
        self.prefilter = Counter(
            "prefilter_matches",
            "Pre-filter hits by kind (rule:<name> or pii:<kind>)",
            ["match"],
            namespace=ns,
            registry=reg,
        )

        # Cache, cost and tenant metrics carry the plain ``semroute_`` prefix (their names are
        # the ones the docs and dashboards use).
        self.cache_requests = Counter(
            "cache_requests", "Chats by response-cache result (hit, miss, bypass)", ["result"],
            namespace="semroute", registry=reg,
        )
        self.cost_usd = Counter(
            "cost_usd", "Spend in USD by tenant, route and answering target (cache hits: 0)",
            ["tenant", "route", "target"], namespace="semroute", registry=reg,
        )
        self.counterfactual_usd = Counter(
            "counterfactual_cost_usd",
            "What the same tokens would have cost on the route's most expensive target, by "
            "tenant, route and answering target (minus cost_usd: what routing and the cache saved)",
            ["tenant", "route", "target"], namespace="semroute", registry=reg,
        )
        self.answers = Counter(
            "answers", "Chats answered (cache hits included) by tenant, route and target",
            ["tenant", "route", "target"], namespace="semroute", registry=reg,
        )
        self.semantic_hits = Counter(
            "cache_semantic_hits", "Cache hits found by the semantic tier (also counted in "
            "cache_requests as hits)", namespace="semroute", registry=reg,
        )
        self.cache_saved_usd = Counter(
            "cache_saved_usd", "Cost of the stored answers that cache hits replayed instead",
            ["tenant", "route", "target"], namespace="semroute", registry=reg,
        )
        self.tenant_refusals = Counter(
            "tenant_refusals", "Chats refused by a tenant's limit (budget, rate)",
            ["tenant", "limit"], namespace="semroute", registry=reg,
        )
        self.state_errors = Counter(
            "state_backend_errors", "Failed calls to the shared state backend (Redis) by "
            "operation; the dispatcher then serves from its local view", ["op"],
            namespace="semroute", registry=reg,
        )
        self.state_up = Gauge(
            "state_backend_up", "1 while the shared state backend answers (always 1 in process)",
            namespace="semroute", registry=reg,
        )
        self.state_up.set(1)

    def watch_breaker(self, target: str, state: Callable[[], BreakerState]) -> None:
        """Read ``target``'s breaker state at scrape time (open turns half-open with time alone,
        without any request to record it)."""
        self.breaker.labels(target=target).set_function(lambda: float(_BREAKER_VALUE[state()]))

    def record_failure(self, target: str, kind: str) -> None:
        self.attempts.labels(target=target, result=kind).inc()
        self.failures.labels(target=target, kind=kind).inc()

    def record_success(
        self,
        target: str,
        *,
        first_target: str,
        ttft_s: float,
        stream_s: float,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float,
    ) -> None:
        self.attempts.labels(target=target, result="ok").inc()
        if target != first_target:
            self.fallbacks.labels(from_target=first_target, to_target=target).inc()
        if ttft_s >= 0:
            self.ttft.labels(target=target).observe(ttft_s)
        if stream_s > 0 and completion_tokens > 1:
            self.tokens_per_second.labels(target=target).observe((completion_tokens - 1) / stream_s)
        self.tokens.labels(target=target, kind="prompt").inc(prompt_tokens)
        self.tokens.labels(target=target, kind="completion").inc(completion_tokens)
        self.cost.labels(target=target).inc(cost_usd)
