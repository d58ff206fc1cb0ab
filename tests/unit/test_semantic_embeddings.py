"""The semantic tier's embeddings without a model: vectors carry their encoder's fingerprint
and the index never compares vectors of different fingerprints; the router reply's embedding
survives the wire (little-endian float32) and a malformed or absent one reads as None; the
``RouteCall`` is bound for one call only."""

from __future__ import annotations

import numpy as np
import pytest

from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute.config import CacheSettings
from semroute.dispatch.semantic import (
    QueryVector,
    RouteCall,
    SemanticIndex,
    current_route_call,
    fingerprint_of,
    query_vector,
    route_call,
)
from semroute.grpc.convert import embedding_from_proto, embedding_to_proto


def _unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_a_query_vector_keeps_its_fingerprint_through_numpy_operations() -> None:
    """Copies, casts and reshapes of a QueryVector keep the fingerprint; plain arrays have
    none."""
    vector = query_vector([3.0, 4.0], "sha256:a")
    assert isinstance(vector, QueryVector) and vector.dtype == np.float32
    assert fingerprint_of(vector) == "sha256:a"
    assert fingerprint_of(vector.astype(np.float32).reshape(1, -1)) == "sha256:a"
    assert fingerprint_of(vector.copy()) == "sha256:a"
    assert fingerprint_of(np.array([1.0])) == ""


def test_vectors_of_different_encoders_never_match() -> None:
    """The same vector stored under one fingerprint is not found under another (nor under none);
    under its own it is."""
    index = SemanticIndex(CacheSettings(semantic_threshold=0.95))
    index.add("s", query_vector(_unit(1, 0, 0), "sha256:old"), "k-old")
    assert index.search("s", query_vector(_unit(1, 0, 0), "sha256:new"), "r") is None
    assert index.search("s", _unit(1, 0, 0), "r") is None
    found = index.search("s", query_vector(_unit(1, 0.1, 0), "sha256:old"), "r")
    assert found is not None and found[0] == "k-old"
    index.add("s", query_vector(_unit(1, 0, 0), "sha256:new"), "k-new")
    assert len(index) == 2
    found = index.search("s", query_vector(_unit(1, 0, 0), "sha256:new"), "r")
    assert found is not None and found[0] == "k-new"


def test_drop_forgets_a_key_under_every_encoder() -> None:
    """An answer gone from the store is dropped from every fingerprint's vectors."""
    index = SemanticIndex(CacheSettings())
    for fingerprint in ("sha256:a", "sha256:b"):
        index.add("s", query_vector(_unit(1, 0), fingerprint), "k")
        index.add("s", query_vector(_unit(0, 1), fingerprint), "k2")
    index.drop("s", "k")
    assert len(index) == 2
    assert index.search("s", query_vector(_unit(1, 0), "sha256:a"), "r") is None
    assert index.search("s", query_vector(_unit(0, 1), "sha256:b"), "r") == ("k2", 1.0)


def test_untagged_vectors_of_another_dimension_start_the_scope_again() -> None:
    """Vectors without a fingerprint whose dimension changed (an unknown encoder changed) are
    neither compared nor stacked with the old ones."""
    index = SemanticIndex(CacheSettings())
    index.add("s", _unit(1, 0, 0), "k3")
    assert index.search("s", _unit(1, 0), "r") is None
    index.add("s", _unit(1, 0), "k2")
    assert len(index) == 1 and index.search("s", _unit(1, 0), "r") == ("k2", 1.0)


def test_the_embedding_crosses_the_wire_as_little_endian_float32() -> None:
    """Bytes are 4 per value, little-endian; the reader gets the same values and fingerprint."""
    vector = _unit(1, 2, 3, 4)
    reply = pb.RouteResponse(route="r")
    embedding_to_proto(reply, vector, "sha256:enc")
    assert reply.embedding_dimension == 4 and len(reply.query_embedding) == 16
    assert reply.query_embedding == vector.astype("<f4").tobytes()
    back = embedding_from_proto(pb.RouteResponse.FromString(reply.SerializeToString()))
    assert back is not None and fingerprint_of(back) == "sha256:enc"
    assert np.array_equal(back, vector)


@pytest.mark.parametrize(
    "fields",
    [
        {},  # not asked for, or a router that predates the field
        {"query_embedding": b"\x00" * 12, "embedding_dimension": 4,
         "encoder_fingerprint": "sha256:x"},  # bytes do not match the dimension
        {"query_embedding": b"\x00" * 16, "embedding_dimension": 4},  # no fingerprint
        {"query_embedding": np.array([np.nan, 0, 0, 1], "<f4").tobytes(),
         "embedding_dimension": 4, "encoder_fingerprint": "sha256:x"},  # not finite
        {"query_embedding": b"", "embedding_dimension": 4, "encoder_fingerprint": "sha256:x"},
    ],
)
def test_an_absent_or_malformed_embedding_reads_as_none(fields: dict[str, object]) -> None:
    """Anything but a complete, finite, fingerprinted embedding is no embedding at all."""
    assert embedding_from_proto(pb.RouteResponse(route="r", **fields)) is None  # type: ignore[arg-type]


def test_a_route_call_is_bound_for_one_call_only() -> None:
    """Inside ``route_call`` the call is current; after it (even after an error) none is."""
    assert current_route_call() is None
    call = RouteCall(ab_key="team-a", want_embedding=True)
    with route_call(call):
        assert current_route_call() is call
    with pytest.raises(RuntimeError), route_call(RouteCall()):
        raise RuntimeError("boom")
    assert current_route_call() is None
