"""The generated gRPC code in semroute/_proto/ is committed: it must match protos/ exactly."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from semroute import _proto_gen


def test_committed_code_matches_protos() -> None:
    """A fresh generation from protos/ equals the committed semroute/_proto/ (run `make proto`
    after editing a .proto)."""
    assert _proto_gen.check() == []


def test_check_reports_a_changed_proto(tmp_path: Path) -> None:
    """Adding a field to a copy of the protos makes check() name the drifting file."""
    protos = tmp_path / "protos"
    shutil.copytree(_proto_gen.PROTO_DIR, protos)
    router = protos / "semroute" / "v1" / "router.proto"
    text = router.read_text().replace(
        "  bool explain = 4;\n", "  bool explain = 4;\n  string tenant = 99;\n", 1
    )
    router.write_text(text)
    problems = _proto_gen.check(proto_dir=protos)
    assert any("router_pb2.py" in p and "differs" in p for p in problems), problems


def test_check_reports_stale_and_missing_files(tmp_path: Path) -> None:
    """A generated file nobody generates any more, and a missing one, are both reported."""
    out = tmp_path / "_proto"
    shutil.copytree(_proto_gen.OUT_DIR, out, ignore=shutil.ignore_patterns("__pycache__"))
    (out / "semroute" / "v1" / "old_pb2.py").write_text("# stale\n")
    (out / "semroute" / "v1" / "router_pb2_grpc.py").unlink()
    problems = _proto_gen.check(out_dir=out)
    assert any("old_pb2.py" in p and "no .proto generates it" in p for p in problems)
    assert any("router_pb2_grpc.py" in p and "missing" in p for p in problems)


def test_generated_imports_are_package_relative(tmp_path: Path) -> None:
    """Generated modules import each other through semroute._proto, never a top-level
    `semroute.v1` package (which does not exist)."""
    files = _proto_gen.generate(tmp_path, _proto_gen.PROTO_DIR)
    grpc_module = (tmp_path / "semroute" / "v1" / "router_pb2_grpc.py").read_text()
    assert "from semroute._proto.semroute.v1 import router_pb2" in grpc_module
    assert "from semroute.v1 import" not in grpc_module
    assert Path("semroute/v1/__init__.py") in files
    module = importlib.import_module("semroute._proto.semroute.v1.router_pb2_grpc")
    assert hasattr(module, "RouterStub")


def test_protoc_error_names_the_file(tmp_path: Path) -> None:
    """A syntax error in a .proto raises ProtoGenError instead of writing half a package."""
    protos = tmp_path / "protos" / "x" / "v1"
    protos.mkdir(parents=True)
    (protos / "bad.proto").write_text('syntax = "proto3";\nmessage Broken { string a = ; }\n')
    try:
        _proto_gen.generate(tmp_path / "out", tmp_path / "protos")
    except _proto_gen.ProtoGenError as exc:
        assert "bad.proto" in str(exc)
    else:
        raise AssertionError("protoc accepted a broken proto")


def test_router_contract_field_names() -> None:
    """The field names and numbers other languages rely on are the ones the issue fixed."""
    from semroute._proto.semroute.v1 import router_pb2 as pb

    req = pb.RouteRequest.DESCRIPTOR.fields_by_name
    assert req["query"].number == 1
    assert {"history", "policy", "explain"} <= set(req)
    policy = pb.Policy.DESCRIPTOR.fields_by_name
    assert {"allowed_targets", "require_local", "max_cost", "quality_tolerance"} <= set(policy)
    assert policy["max_cost"].has_presence  # optional: "unset" differs from 0
    resp = set(pb.RouteResponse.DESCRIPTOR.fields_by_name)
    assert {"route", "target", "confidence", "fallback", "reason", "scores", "targets",
            "neighbors", "index_version"} <= resp
    service = pb.DESCRIPTOR.services_by_name["Router"]
    assert service.full_name == "semroute.v1.Router"
    assert set(service.methods_by_name) == {"Route", "RouteBatch", "GetIndexInfo", "ReloadIndex",
                                            "SetCandidate"}
    # Shadow and A/B (issue 13): added fields, never renumbered.
    assert req["ab_key"].number == 5
    assert pb.RouteResponse.DESCRIPTOR.fields_by_name["arm"].number == 10
    info = pb.GetIndexInfoResponse.DESCRIPTOR.fields_by_name
    assert (info["candidate"].number, info["candidate_mode"].number) == (2, 3)
