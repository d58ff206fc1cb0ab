"""Opt-in FAISS index types (``index build --faiss KIND``, semroute.index_types) and the
client's load-balancing choice (semroute.grpc.balancing), without a model or a network."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from semroute.config import IndexSettings
from semroute.grpc.balancing import balancing_options, may_name_several, resolve_policy
from semroute.index import ExemplarIndex, build_index, read_manifest
from semroute.index_types import KINDS, factory, ivf_lists
from tests.conftest import HashEncoder, write

WORDS = [f"w{i}" for i in range(400)]


def exemplar_csv(path: Path, n: int) -> Path:
    rng = random.Random(7)
    rows = ["text,label"]
    for i in range(n):
        label = f"r{i % 5}"
        rows.append(f"{' '.join(rng.sample(WORDS, 6))} {label}word,{label}")
    return write(path, "\n".join(rows) + "\n")


def test_ivf_lists_grow_with_the_square_root_and_keep_39_points_per_list() -> None:
    """About sqrt(n) lists, a power of two, never so many that a list trains on < 39 points."""
    assert ivf_lists(1_000_000) == 1024
    assert ivf_lists(3000) == 64 and 3000 / 64 >= 39
    assert ivf_lists(50) == 1


def test_auto_keeps_the_old_behaviour_and_named_kinds_are_fixed() -> None:
    """``auto`` is flat up to exact_max and the approx factory above; the others do not depend
    on exact_max."""
    assert factory("auto", 10, 384, exact_max=5000, approx_factory="HNSW32") == ("Flat", True)
    assert factory("auto", 9000, 384, exact_max=5000, approx_factory="HNSW32") == ("HNSW32", False)
    assert factory("hnsw-sq", 10, 384, exact_max=5000, approx_factory="x") == ("HNSW32,SQ8", False)
    assert factory("ivfpq", 1_000_000, 384, exact_max=5000, approx_factory="x")[0] == (
        "IVF1024,PQ96x4fs,Refine(SQ8)"
    )
    with pytest.raises(ValueError, match="unknown kind"):
        factory("ivf", 10, 384, exact_max=1, approx_factory="x")


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "auto"])
def test_each_kind_builds_records_itself_and_loads_mapped(
    tmp_path: Path, kind: str
) -> None:
    """A 2,000-exemplar build with ``faiss=KIND`` records the kind, factory and search setting
    in the manifest, loads back (memory-mapped for the quantised kinds) and finds an
    exemplar's own text first."""
    encoder = HashEncoder(dimension=64)
    csv_file = exemplar_csv(tmp_path / "ex.csv", 2000)
    version = build_index([csv_file], tmp_path / "idx", encoder, progress=False, tune=False,
                          settings=IndexSettings(faiss=kind))
    record = read_manifest(version).faiss
    assert record.kind == kind
    assert record.nprobe == (8 if kind.startswith("ivf") else 0)
    index = ExemplarIndex.load(tmp_path / "idx", expect_fingerprint=encoder.fingerprint)
    assert index.info.faiss_factory == record.factory
    hits = 0
    for row in range(0, 2000, 100):
        _, ids = index.search(encoder.encode([index.texts[row]]), 5)
        hits += index.texts[int(ids[0, 0])] == index.texts[row]
    assert hits >= 18


def test_old_manifests_read_as_auto(tmp_path: Path) -> None:
    """A manifest without the new fields (every index built before them) reads as kind auto,
    nprobe 0, and loads as before."""
    encoder = HashEncoder()
    version = build_index([exemplar_csv(tmp_path / "ex.csv", 20)], tmp_path / "idx", encoder,
                          progress=False, tune=False)
    manifest_file = version / "manifest.json"
    text = manifest_file.read_text()
    stripped = text.replace('"kind": "auto",', "").replace(',\n    "nprobe": 0', "")
    assert stripped != text
    manifest_file.write_text(stripped)
    record = read_manifest(version).faiss
    assert (record.kind, record.nprobe) == ("auto", 0)
    assert ExemplarIndex.load(version).size == 20


def test_round_robin_is_the_default_only_for_targets_naming_several_replicas() -> None:
    """auto: round_robin for dns: and multi-address ipv4:/ipv6: targets, gRPC's default
    (pick_first) for host:port; an explicit policy wins; an unknown one is refused."""
    assert may_name_several("dns:///semroute-router:50051")
    assert may_name_several("ipv4:127.0.0.1:1,127.0.0.1:2")
    assert may_name_several("ipv6:[::1]:1,[::1]:2")
    assert not may_name_several("ipv4:127.0.0.1:1")
    assert not may_name_several("127.0.0.1:50051")
    assert not may_name_several("unix:/run/router.sock")
    assert resolve_policy("127.0.0.1:50051") is None and balancing_options("127.0.0.1:1") == []
    assert balancing_options("dns:///r:1") == [("grpc.lb_policy_name", "round_robin")]
    assert resolve_policy("dns:///r:1", "pick_first") == "pick_first"
    assert resolve_policy("127.0.0.1:1", "round_robin") == "round_robin"
    with pytest.raises(ValueError, match="choose one of"):
        resolve_policy("127.0.0.1:1", "random")
