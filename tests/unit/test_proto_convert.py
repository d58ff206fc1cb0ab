"""proto <-> record conversions are lossless for every field the contract carries."""

from __future__ import annotations

from semroute.grpc import convert
from semroute.types import Decision, ExemplarKind, IndexInfo, Neighbor, Policy, Query


def test_query_round_trip_keeps_unset_max_cost_distinct_from_zero() -> None:
    """max_cost None survives as "unset" and 0.0 as zero; all other fields round-trip."""
    for max_cost in (None, 0.0, 2.5):
        query = Query(
            text="write a haiku",
            history=("hi", "hello"),
            policy=Policy(("local-small", "gpt-4o"), True, max_cost, 0.05),
            explain=True,
        )
        assert convert.query_from_proto(convert.query_to_proto(query)) == query


def test_default_request_is_default_query() -> None:
    """An empty RouteRequest from another language means: no history, no policy, no explain."""
    from semroute._proto.semroute.v1 import router_pb2 as pb

    assert convert.query_from_proto(pb.RouteRequest(query="x")) == Query(text="x")


def test_absent_parts_are_left_out_and_read_back_as_defaults() -> None:
    """A query with no history and the default policy sends neither; any non-default policy
    (even max_cost 0.0 alone) is sent; an empty policy message set by another client reads as
    the default policy; a decision without neighbours comes back with none."""
    from semroute._proto.semroute.v1 import router_pb2 as pb

    plain = convert.query_to_proto(Query("x"))
    assert not plain.HasField("policy") and not plain.history
    assert convert.query_from_proto(plain) == Query("x")
    capped = Query("x", policy=Policy(max_cost=0.0))
    assert convert.query_to_proto(capped).HasField("policy")
    assert convert.query_from_proto(convert.query_to_proto(capped)) == capped
    explicit = pb.RouteRequest(query="x", policy=pb.Policy())
    assert explicit.HasField("policy")
    assert convert.query_from_proto(explicit) == Query("x")
    bare = Decision(route="a", target="t", confidence=1.0, fallback=False, reason="", scores={},
                    targets=("t",))
    assert convert.decision_from_proto(convert.decision_to_proto(bare)) == bare


def test_decision_round_trip() -> None:
    """Every Decision field, neighbours included, comes back equal."""
    decision = Decision(
        route="code", target="local-large", confidence=0.75, fallback=False,
        reason="3 of 5 neighbours", scores={"code": 0.75, "math": 0.25},
        targets=("local-large", "gpt-4o"),
        neighbors=(Neighbor(id=7, text="fix my bug", label="code", similarity=0.5),),
        index_version="v1",
    )
    assert convert.decision_from_proto(convert.decision_to_proto(decision)) == decision


def test_index_info_round_trip() -> None:
    """IndexInfo survives the wire, kind included."""
    info = IndexInfo(
        version="20260101-abc", path="/x", kind=ExemplarKind.OUTCOMES, exemplars=10,
        dimension=384, routes=(), targets=("a", "b"), encoder_fingerprint="sha256:1",
        faiss_factory="Flat", built_at="2026-01-01T00:00:00Z",
    )
    assert convert.info_from_proto(convert.info_to_proto(info)) == info
