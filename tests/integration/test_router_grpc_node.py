"""The contract is language-neutral: Node's @grpc/grpc-js, reading protos/ directly with
@grpc/proto-loader, calls the in-process router server and gets every field back."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from semroute.auth import TokenSet
from semroute.testing.devstack import die_with_parent
from tests.integration.router_grpc_support import ROOT, running_router, small_index

__all__ = ["small_index"]

pytestmark = pytest.mark.integration

NODE_DIR = ROOT / "tests" / "node"
NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="`node` is not installed (needed for the Node client)")
async def test_node_client_speaks_the_contract(small_index: Path) -> None:
    """Route (with history, policy and explain), RouteBatch, GetIndexInfo and an invalid call,
    made from Node with a bearer token, return the proto's field names and status codes."""
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(f"{NODE_DIR}/node_modules is missing: run `make setup` (npm install there)")
    assert NODE is not None
    tokens = TokenSet.of(user=["node-token"])
    async with running_router(small_index, tokens=tokens) as r:
        proc = await asyncio.create_subprocess_exec(
            NODE, str(NODE_DIR / "route_client.js"), r.addr,
            "What is the derivative of x to the fourth?", "node-token",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=NODE_DIR,
            preexec_fn=die_with_parent(),
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
        assert proc.returncode == 0, stderr.decode()
        info = r.handle.current().info
    out = json.loads(stdout)

    route = out["route"]
    assert route["code"] == "OK", route
    reply = route["reply"]
    assert reply["route"] == "math"
    assert reply["target"] == reply["targets"][0]
    assert all(t.startswith("local-") for t in reply["targets"])  # require_local honoured
    assert 0.0 <= reply["confidence"] <= 1.0 and reply["fallback"] is False
    # scores are the vote shares; confidence is the index's abstention score (issue 11)
    assert reply["reason"] and reply["scores"]["math"] == max(reply["scores"].values())
    assert reply["neighbors"] and {"id", "text", "label", "similarity"} <= set(
        reply["neighbors"][0]
    )
    assert reply["index_version"] == info.version

    batch = out["batch"]
    assert batch["code"] == "OK"
    assert [x["route"] for x in batch["reply"]["responses"]] == ["math", "creative"]

    assert out["info"]["code"] == "OK"
    index = out["info"]["reply"]["index"]
    assert index["version"] == info.version and index["exemplars"] == info.exemplars
    assert index["kind"] == "labelled" and index["dimension"] == 384

    invalid = out["invalid"]
    assert invalid["code"] == "INVALID_ARGUMENT" and invalid["details"].startswith("query:")
