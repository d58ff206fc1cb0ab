"""Route a chat, call the chosen LLM backend, stream the answer back, fail over safely.

``Dispatcher.chat(request)`` is an async iterator of ``ChatEvent``:

1. one ``DecisionEvent`` (route, first target, confidence, reason, the fallback chain);
2. ``DeltaEvent``s with the generated text;
3. one ``DoneEvent`` (finish reason, tokens, cost, the target that answered, attempts, TTFT).

How the chain is chosen, in order: ``overrides.force_target`` (that target alone); else the first
matching pre-filter rule (``semroute.rules``); else the router. Personal data anywhere in the
messages forces ``require_local``; the dispatcher then keeps only targets whose backend is marked
``local: true`` in backends.yaml, whatever the router or a rule said, so a sensitive prompt is
never sent to a non-local backend (a forced non-local target is refused with InvalidRequest).

The **commit point** is the first delta handed to the caller. Before it, a retriable failure
(refused, 5xx, 429, timeouts, malformed stream) is retried ``settings.retries`` times on the same
target with jittered exponential backoff, then the next target is tried; if none answers,
``DispatchFailed`` (a ``NoTargetAvailable``) carries every attempt's failure. After it, a failure
raises ``StreamInterrupted`` and nothing is retried, repeated or duplicated. Closing the iterator
early (client gone, deadline) closes the upstream HTTP request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from semroute.backends import (
    Backend,
    BackendPool,
    ConcurrencyLimited,
    StreamResult,
    load_backends,
)
from semroute.config import DispatcherSettings, Settings
from semroute.dispatch_metrics import DispatchMetrics
from semroute.errors import (
    BackendError,
    BackendRejected,
    CircuitOpen,
    ConfigError,
    InvalidRequest,
    NoTargetAvailable,
    StreamInterrupted,
    UnknownTarget,
)
from semroute.logs import (
    bind_request_id,
    get_logger,
    get_request_id,
    new_request_id,
    reset_request_id,
)
from semroute.rules import Prefilter, RuleEngine
from semroute.types import (
    ChatEvent,
    ChatRequest,
    Decision,
    DecisionEvent,
    DeltaEvent,
    DoneEvent,
    Message,
    Policy,
)

log = get_logger("semroute.dispatcher")

_NO_POLICY = Policy()
ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOP = 4


class RouterLike(Protocol):
    """What the dispatcher needs from a router. ``semroute.client.RouterClient`` fits; so does
    ``InProcessRouter`` around a ``semroute.router.Router``."""

    async def route(
        self,
        text: str,
        *,
        history: Sequence[str] = ...,
        policy: Policy = ...,
        explain: bool = False,
    ) -> Decision: ...


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


@dataclass(frozen=True)
class Attempt:
    """One try (or skip) of one target. ``kind`` is the error class name (``Skipped`` when the
    target was not called at all: no backend, key variable unset)."""

    target: str
    kind: str
    message: str
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"{self.target}: {self.kind}: {self.message}"


class DispatchFailed(NoTargetAvailable):
    """No target in the chain could answer before the commit point. ``attempts`` in order."""

    def __init__(self, message: str, attempts: Sequence[Attempt] = ()) -> None:
        self.attempts = tuple(attempts)
        if self.attempts:
            lines = "\n".join(f"  {i}. {a}" for i, a in enumerate(self.attempts, 1))
            message = f"{message}:\n{lines}"
        super().__init__(message)


@dataclass(frozen=True)
class _Plan:
    route: str
    confidence: float
    reason: str
    fallback: bool
    chain: tuple[str, ...]


class Dispatcher:
    """See the module docstring. Build one per process with ``build_dispatcher`` (or directly in
    tests), share it between the gRPC servicer and the HTTP door, ``aclose()`` at shutdown."""

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
    ) -> None:
        self.router = router
        self.backends = backends
        self.settings = settings
        # No rules file still means PII detection: the locality guarantee is on by default.
        self.rules = rules if rules is not None else RuleEngine.default()
        self.metrics = metrics if metrics is not None else DispatchMetrics()
        self._rng = rng or random.Random()
        self._owns_router = owns_router
        for name, backend in self.backends.backends.items():
            self.metrics.watch_breaker(name, lambda b=backend: b.breaker.state)  # type: ignore[misc]

    def target_names(self) -> list[str]:
        """Targets that can answer now (configured and not skipped), in backends-file order."""
        return [n for n in self.backends.names() if n in self.backends.backends]

    async def aclose(self) -> None:
        """Close every backend's HTTP pool (and the router client if built here)."""
        await self.backends.aclose()
        if self._owns_router:
            close = getattr(self.router, "aclose", None) or getattr(self.router, "close", None)
            if close is not None:
                await close()

    async def chat(self, req: ChatRequest) -> AsyncGenerator[ChatEvent, None]:
        """Decision, deltas, done (see the module docstring for the guarantees).

        Raises InvalidRequest/UnknownTarget (bad request, naming the field) before anything is
        yielded; DispatchFailed when no target answers before the commit point;
        StreamInterrupted after it. Router errors propagate unchanged.
        """
        start = time.monotonic()
        rid = req.request_id or get_request_id() or new_request_id()
        try:
            self._validate(req)
            pre = self.rules.evaluate(req.messages)
            for kind in pre.pii_kinds:
                self.metrics.prefilter.labels(match=f"pii:{kind}").inc()
            if pre.rule is not None:
                self.metrics.prefilter.labels(match=f"rule:{pre.rule.name}").inc()
            plan = await self._plan(req, pre, rid)
        except InvalidRequest:
            self.metrics.chats.labels(outcome="invalid").inc()
            raise
        except NoTargetAvailable:
            self.metrics.chats.labels(outcome="failed").inc()
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
        yield DecisionEvent(
            plan.route, plan.chain[0], plan.confidence, plan.reason, plan.fallback, plan.chain
        )
        outcome = "cancelled"
        try:
            # aclosing: when the caller closes us at a yield, the inner stream (and with it the
            # upstream HTTP response) is closed now, not whenever it is garbage-collected.
            async with contextlib.aclosing(self._stream(req, plan, rid, start)) as events:
                async for event in events:
                    yield event
            outcome = "ok"
        except StreamInterrupted:
            outcome = "interrupted"
            raise
        except NoTargetAvailable:
            outcome = "failed"
            raise
        finally:
            self.metrics.chats.labels(outcome=outcome).inc()

    # ---- validation and planning ----

    def _validate(self, req: ChatRequest) -> None:
        if not req.messages:
            raise InvalidRequest("messages", "at least one message is required")
        for i, m in enumerate(req.messages):
            if m.role not in ROLES:
                raise InvalidRequest(
                    f"messages[{i}].role", f"unknown role {m.role!r}; one of {', '.join(ROLES)}"
                )
        users = [i for i, m in enumerate(req.messages) if m.role == "user"]
        if not users:
            raise InvalidRequest("messages", "needs at least one message with role user")
        if not req.messages[users[-1]].content.strip():
            raise InvalidRequest(
                f"messages[{users[-1]}].content", "the last user message must not be blank"
            )
        p = req.params
        if p.max_tokens is not None and p.max_tokens < 1:
            raise InvalidRequest("params.max_tokens", f"must be >= 1, got {p.max_tokens}")
        if p.temperature is not None and not (0.0 <= p.temperature <= 2.0):
            raise InvalidRequest("params.temperature", f"must be in [0, 2], got {p.temperature}")
        if p.top_p is not None and not (0.0 < p.top_p <= 1.0):
            raise InvalidRequest("params.top_p", f"must be in (0, 1], got {p.top_p}")
        if len(p.stop) > MAX_STOP:
            raise InvalidRequest(
                "params.stop", f"at most {MAX_STOP} stop sequences, got {len(p.stop)}"
            )
        if any(not s for s in p.stop):
            raise InvalidRequest("params.stop", "stop sequences must be non-empty")
        o = req.overrides
        known = self.backends.names()
        if o.force_target and o.force_target not in known:
            raise UnknownTarget(
                "overrides.force_target",
                f"unknown target {o.force_target!r}; configured: {', '.join(known)}",
            )
        unknown = [t for t in o.allowed_targets if t not in known]
        if unknown:
            raise UnknownTarget(
                "overrides.allowed_targets",
                f"unknown target(s) {', '.join(map(repr, unknown))}; "
                f"configured: {', '.join(known)}",
            )
        if o.force_target and o.allowed_targets and o.force_target not in o.allowed_targets:
            raise InvalidRequest(
                "overrides.force_target", f"{o.force_target!r} is not in overrides.allowed_targets"
            )
        if o.max_cost is not None and not (math.isfinite(o.max_cost) and o.max_cost >= 0):
            raise InvalidRequest("overrides.max_cost", f"must be a number >= 0, got {o.max_cost}")

    async def _plan(self, req: ChatRequest, pre: Prefilter, rid: str) -> _Plan:
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
            return _Plan(
                "forced", 1.0, "forced by overrides.force_target", False, (o.force_target,)
            )
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
            # Bind the id around the call only (never across a yield) so the router client
            # forwards it and both services log the same request id.
            token = bind_request_id(rid)
            try:
                history = tuple(user_turns[:-1][-keep:]) if keep else ()
                decision = await self.router.route(user_turns[-1], history=history, policy=policy)
            finally:
                reset_request_id(token)
            route, confidence, fallback = decision.route, decision.confidence, decision.fallback
            reason = decision.reason
            proposed = tuple(decision.targets) or (decision.target,)
        chain, excluded = self._filter(proposed, req, require_local)
        if not chain and require_local and not o.allowed_targets:
            chain, _ = self._filter(tuple(self.backends.local_names()), req, True)
            if chain:
                reason += "; no local target in the chain, moved to the local backends"
        if require_local:
            reason += f"; kept on local targets ({why_local})"
        if not chain:
            detail = "; ".join(excluded) or "the chain was empty"
            raise DispatchFailed(
                f"no target left for route {route!r} after the request's constraints: {detail}"
            )
        return _Plan(route, confidence, reason, fallback, chain)

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
            else:
                chain.append(name)
        return tuple(chain), excluded

    # ---- calling backends ----

    async def _stream(
        self, req: ChatRequest, plan: _Plan, rid: str, start: float
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
            for retry in range(self.settings.retries + 1):
                if retry:
                    await asyncio.sleep(self._backoff(retry))
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
                            req.messages, req.params, result, request_id=rid
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
                    attempts.append(Attempt(target, kind, _message(exc), time.monotonic() - t0))
                    log.warning(
                        "attempt_failed",
                        request_id=rid,
                        target=target,
                        kind=kind,
                        attempt=len(attempts),
                        error=_message(exc),
                    )
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


def _message(exc: BackendError) -> str:
    """The error text without the ``backend 'x': `` prefix (the target is shown beside it)."""
    text = str(exc)
    prefix = f"backend {exc.target!r}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


async def build_dispatcher(
    settings: Settings, *, metrics: DispatchMetrics | None = None
) -> Dispatcher:
    """The dispatcher a server runs: backends from ``dispatcher.backends_file``, rules from
    ``dispatcher.rules_file`` (PII detection alone when unset), a RouterClient connected to
    ``dispatcher.router``. Raises ConfigError for bad files or a rule naming an unknown target."""
    ds = settings.dispatcher
    configs = load_backends(Path(ds.backends_file))
    rules = RuleEngine.load(Path(ds.rules_file)) if ds.rules_file else RuleEngine.default()
    missing = sorted(rules.targets() - set(configs))
    if missing:
        raise ConfigError(
            f"{ds.rules_file}: rules name target(s) not in {ds.backends_file}: {', '.join(missing)}"
        )
    pool = BackendPool(
        configs, breaker_failures=ds.breaker_failures, breaker_cooldown_s=ds.breaker_cooldown_s
    )
    for name, reason in pool.skipped.items():
        log.warning("backend_skipped", target=name, reason=reason)
    router = await _connect_router(settings)
    return Dispatcher(router, pool, ds, rules, metrics=metrics, owns_router=True)


async def _connect_router(settings: Settings) -> RouterLike:
    from semroute.client import RouterClient  # grpc only when a real server is built

    ds = settings.dispatcher
    client: RouterLike = RouterClient(
        ds.router, token=ds.router_token, tls_ca=ds.router_tls_ca, timeout=ds.router_timeout_s
    )
    return client


# Re-exported for callers that build requests.
__all__ = [
    "Attempt",
    "DispatchFailed",
    "Dispatcher",
    "InProcessRouter",
    "Message",
    "RouterLike",
    "build_dispatcher",
]
