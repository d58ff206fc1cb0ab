"""proto messages <-> ``semroute.types`` records. The only module that knows both shapes.

Conversions are total and lossless for every field the proto carries; validation (blank query,
size limits, unknown targets) is the core's job (``Router.validate``), not this module's.
"""

from __future__ import annotations

from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute.types import Decision, ExemplarKind, IndexInfo, Neighbor, Policy, Query


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


def query_from_proto(msg: pb.RouteRequest) -> Query:
    return Query(
        text=msg.query,
        history=tuple(msg.history),
        policy=policy_from_proto(msg.policy),
        explain=msg.explain,
    )


def query_to_proto(query: Query) -> pb.RouteRequest:
    return pb.RouteRequest(
        query=query.text,
        history=list(query.history),
        policy=policy_to_proto(query.policy),
        explain=query.explain,
    )


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
        ],
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
        ),
        index_version=msg.index_version,
    )


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
