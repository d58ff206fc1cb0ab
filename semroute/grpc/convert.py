"""proto messages <-> ``semroute.types`` records, for both services. The only module that knows
both shapes.

Conversions are total and lossless for every field the proto carries; validation (blank query,
size limits, unknown targets) is the core's job (``Router.validate``), not this module's.
"""

from __future__ import annotations

import numpy as np

from semroute._proto.semroute.v1 import dispatcher_pb2 as dpb
from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute.dispatch.semantic import QueryVector, query_vector
from semroute.errors import SemrouteError
from semroute.logs import get_request_id
from semroute.types import (
    ChatEvent,
    ChatRequest,
    Decision,
    DecisionEvent,
    DeltaEvent,
    DoneEvent,
    ExemplarKind,
    GenerationParams,
    IndexInfo,
    Message,
    Neighbor,
    Policy,
    Query,
    RoutingOverrides,
)


def policy_from_proto(msg: pb.Policy) -> Policy:
    return Policy(
        allowed_targets=tuple(msg.allowed_targets),
        require_local=msg.require_local,
        max_cost=msg.max_cost if msg.HasField("max_cost") else None,
        quality_tolerance=msg.quality_tolerance,
    )


def policy_to_proto(policy: Policy) -> pb.Policy:
    msg = pb.Policy(
        allowed_targets=list(policy.allowed_targets),
        require_local=policy.require_local,
        quality_tolerance=policy.quality_tolerance,
    )
    if policy.max_cost is not None:
        msg.max_cost = policy.max_cost
    return msg


# Most requests carry no history and no policy: the conversions of the Route path skip what is
# absent instead of building empty records and messages (a few microseconds a call each way).
_NO_POLICY = Policy()


def query_from_proto(msg: pb.RouteRequest) -> Query:
    return Query(
        text=msg.query,
        history=tuple(msg.history) if msg.history else (),
        policy=policy_from_proto(msg.policy) if msg.HasField("policy") else _NO_POLICY,
        explain=msg.explain,
    )


def query_to_proto(query: Query) -> pb.RouteRequest:
    msg = pb.RouteRequest(query=query.text, explain=query.explain)
    if query.history:
        msg.history.extend(query.history)
    if query.policy != _NO_POLICY:
        msg.policy.CopyFrom(policy_to_proto(query.policy))
    return msg


def decision_to_proto(decision: Decision) -> pb.RouteResponse:
    return pb.RouteResponse(
        route=decision.route,
        target=decision.target,
        confidence=decision.confidence,
        fallback=decision.fallback,
        reason=decision.reason,
        scores=dict(decision.scores),
        targets=list(decision.targets),
        neighbors=[
            pb.Neighbor(id=n.id, text=n.text, label=n.label, similarity=n.similarity)
            for n in decision.neighbors
        ] if decision.neighbors else None,
        index_version=decision.index_version,
    )


def decision_from_proto(msg: pb.RouteResponse) -> Decision:
    return Decision(
        route=msg.route,
        target=msg.target,
        confidence=msg.confidence,
        fallback=msg.fallback,
        reason=msg.reason,
        scores=dict(msg.scores),
        targets=tuple(msg.targets),
        neighbors=tuple(
            Neighbor(id=n.id, text=n.text, label=n.label, similarity=n.similarity)
            for n in msg.neighbors
        ) if msg.neighbors else (),
        index_version=msg.index_version,
    )


def embedding_to_proto(reply: pb.RouteResponse, vector: np.ndarray, fingerprint: str) -> None:
    """Put the query embedding ``vector`` (made by the encoder ``fingerprint``) on ``reply``:
    little-endian float32 bytes and their count (router.proto ``query_embedding``)."""
    flat = np.asarray(vector, dtype="<f4").reshape(-1)
    reply.query_embedding = flat.tobytes()
    reply.embedding_dimension = int(flat.size)
    reply.encoder_fingerprint = fingerprint


def embedding_from_proto(msg: pb.RouteResponse) -> QueryVector | None:
    """The reply's query embedding tagged with its encoder's fingerprint; None when it carries
    none (not asked for, an older router) or one that cannot be trusted: no fingerprint, a
    byte length that is not 4 x ``embedding_dimension``, or values that are not finite."""
    raw, dimension = msg.query_embedding, msg.embedding_dimension
    if not raw or dimension <= 0 or len(raw) != 4 * dimension or not msg.encoder_fingerprint:
        return None
    values = np.frombuffer(raw, dtype="<f4")
    if not np.isfinite(values).all():
        return None
    return query_vector(values, msg.encoder_fingerprint)


def info_to_proto(info: IndexInfo) -> pb.IndexInfo:
    return pb.IndexInfo(
        version=info.version,
        path=info.path,
        kind=info.kind.value,
        exemplars=info.exemplars,
        dimension=info.dimension,
        routes=list(info.routes),
        targets=list(info.targets),
        encoder_fingerprint=info.encoder_fingerprint,
        faiss_factory=info.faiss_factory,
        built_at=info.built_at,
    )


def info_from_proto(msg: pb.IndexInfo) -> IndexInfo:
    return IndexInfo(
        version=msg.version,
        path=msg.path,
        kind=ExemplarKind(msg.kind),
        exemplars=msg.exemplars,
        dimension=msg.dimension,
        routes=tuple(msg.routes),
        targets=tuple(msg.targets),
        encoder_fingerprint=msg.encoder_fingerprint,
        faiss_factory=msg.faiss_factory,
        built_at=msg.built_at,
    )


# ---- dispatcher --------------------------------------------------------------------------------


def request_from_proto(msg: dpb.ChatRequest) -> ChatRequest:
    p, o = msg.params, msg.overrides
    params = GenerationParams(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
        temperature=p.temperature if p.HasField("temperature") else None,
        top_p=p.top_p if p.HasField("top_p") else None,
        stop=tuple(p.stop),
        seed=p.seed if p.HasField("seed") else None,
    )
    overrides = RoutingOverrides(
        force_target=o.force_target or None,
        allowed_targets=tuple(o.allowed_targets),
        require_local=o.require_local,
        max_cost=o.max_cost if o.HasField("max_cost") else None,
    )
    return ChatRequest(
        messages=tuple(Message(m.role, m.content) for m in msg.messages),
        params=params,
        overrides=overrides,
        request_id=msg.request_id or get_request_id() or "",
    )


def request_to_proto(req: ChatRequest) -> dpb.ChatRequest:
    p, o = req.params, req.overrides
    params = dpb.GenerationParams(stop=list(p.stop))
    if p.max_tokens is not None:
        params.max_tokens = p.max_tokens
    if p.temperature is not None:
        params.temperature = p.temperature
    if p.top_p is not None:
        params.top_p = p.top_p
    if p.seed is not None:
        params.seed = p.seed
    overrides = dpb.RoutingOverrides(
        force_target=o.force_target or "",
        allowed_targets=list(o.allowed_targets),
        require_local=o.require_local,
    )
    if o.max_cost is not None:
        overrides.max_cost = o.max_cost
    return dpb.ChatRequest(
        messages=[dpb.ChatMessage(role=m.role, content=m.content) for m in req.messages],
        params=params,
        overrides=overrides,
        request_id=req.request_id,
    )


def event_to_proto(event: ChatEvent) -> dpb.ChatEvent:
    if isinstance(event, DeltaEvent):
        return dpb.ChatEvent(delta=dpb.ChatDelta(text=event.text))
    if isinstance(event, DecisionEvent):
        return dpb.ChatEvent(
            decision=dpb.ChatDecision(
                route=event.route,
                target=event.target,
                confidence=event.confidence,
                reason=event.reason,
                fallback=event.fallback,
                chain=list(event.chain),
                cache=event.cache,
            )
        )
    return dpb.ChatEvent(
        done=dpb.ChatDone(
            finish_reason=event.finish_reason,
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            cost_usd=event.cost_usd,
            target=event.target,
            attempts=event.attempts,
            ttft_s=event.ttft_s,
            cache=event.cache,
            counterfactual_cost_usd=event.counterfactual_cost_usd,
        )
    )


def event_from_proto(msg: dpb.ChatEvent) -> ChatEvent:
    which = msg.WhichOneof("event")
    if which == "delta":
        return DeltaEvent(msg.delta.text)
    if which == "decision":
        d = msg.decision
        return DecisionEvent(
            d.route, d.target, d.confidence, d.reason, d.fallback, tuple(d.chain), d.cache
        )
    if which == "done":
        e = msg.done
        return DoneEvent(
            e.finish_reason,
            e.prompt_tokens,
            e.completion_tokens,
            e.cost_usd,
            e.target,
            e.attempts,
            e.ttft_s,
            e.cache,
            e.counterfactual_cost_usd,
        )
    raise SemrouteError(f"ChatEvent without an event (oneof unset): {msg!r}")
