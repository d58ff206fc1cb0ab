"""Router server hardening (issue 18 items 3, 5, 8, 12): broken index versions never stop the
watch, reload paths stay inside the index root, malformed protobuf is INVALID_ARGUMENT, one
``max_cost`` rule, and big RouteBatch calls cannot starve single Route calls."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc
from semroute.grpc.router_handle import batch_slices
from semroute.index import switch_current
from semroute.types import Query
from tests.integration.router_grpc_support import (
    router_settings,
    running_router,
    small_index,
)

pytestmark = pytest.mark.integration
__all__ = ["small_index"]  # fixtures, imported for pytest


def _rechecksum(version: Path) -> None:
    """Make the manifest's checksums match the (tampered) files again."""
    manifest = json.loads((version / "manifest.json").read_text())
    for name in manifest.get("checksums", {}):
        manifest["checksums"][name] = hashlib.sha256((version / name).read_bytes()).hexdigest()
    (version / "manifest.json").write_text(json.dumps(manifest))


def _no_encoder(v: Path) -> None:
    manifest = json.loads((v / "manifest.json").read_text())
    del manifest["encoder"]
    (v / "manifest.json").write_text(json.dumps(manifest))


def _bad_exemplar_line(v: Path) -> None:
    with (v / "exemplars.jsonl").open("a") as fh:
        fh.write("{not json\n")
    _rechecksum(v)


def _garbage_faiss(v: Path) -> None:
    (v / "index.faiss").write_bytes(b"garbage, not a FAISS index" * 10)
    _rechecksum(v)


def _manifest_is_a_list(v: Path) -> None:
    (v / "manifest.json").write_text("[1, 2, 3]")


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "manifest_without_encoder": _no_encoder,
    "bad_exemplars_line": _bad_exemplar_line,
    "garbage_faiss_with_matching_checksum": _garbage_faiss,
    "manifest_is_a_list": _manifest_is_a_list,
}


def _copy_index(src_root: Path, dst_root: Path) -> Path:
    """A fresh index root holding a copy of ``src_root``'s current version."""
    version = (src_root / "current").resolve()
    dst = dst_root / "versions" / version.name
    shutil.copytree(version, dst)
    switch_current(dst_root, dst)
    return dst


async def _until(predicate: Callable[[], bool], tries: int = 200) -> bool:
    for _ in range(tries):
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
async def test_watch_survives_broken_content_and_picks_up_the_next_good_build(
    small_index: Path, tmp_path: Path, kind: str
) -> None:
    """A version whose checksums match but whose content is broken is refused (logged,
    counted), ReloadIndex reports it as ok=false with a message, and the watch keeps
    watching: the next good version is served."""
    root = tmp_path / "idx"
    good = _copy_index(small_index, root)
    settings = router_settings(router_server__watch_interval_s=0.05)
    async with running_router(root, settings=settings) as r:
        broken = root / "versions" / f"broken-{kind}"
        shutil.copytree(good, broken)
        CORRUPTIONS[kind](broken)
        async with grpc.aio.insecure_channel(r.addr) as ch:
            reply = await pb_grpc.RouterStub(ch).ReloadIndex(
                pb.ReloadIndexRequest(path=str(broken)), timeout=30
            )
        assert not reply.ok and reply.error, reply
        reg = r.metrics.registry

        def errors() -> float:
            return reg.get_sample_value("semroute_router_reloads_total", {"result": "error"}) or 0

        switch_current(root, broken)
        assert await _until(lambda: errors() >= 2)
        again = root / "versions" / "good-again"
        shutil.copytree(good, again)
        switch_current(root, again)
        router = r.handle
        assert await _until(
            lambda: router.router is not None and router.router.index.path.resolve() == again
        ), "the watch stopped after a broken version"


async def test_reload_paths_are_confined_to_the_index_root(small_index: Path) -> None:
    """Paths outside the served root are refused alike whether they exist or not (no oracle);
    a component over 255 bytes is INVALID_ARGUMENT naming `path`, not UNKNOWN."""
    async with running_router(small_index) as r, grpc.aio.insecure_channel(r.addr) as ch:
        stub = pb_grpc.RouterStub(ch)
        details = []
        for path in ("/etc", "/nonexistent/semroute", "../../..", "x" * 300):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ReloadIndex(pb.ReloadIndexRequest(path=path), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
            trailers = dict(info.value.trailing_metadata() or ())
            assert trailers.get("semroute-field") == "path"
            details.append(info.value.details() or "")
        assert details[0] == details[1] == details[2]  # exists or not: the same answer
        assert "255" in details[3]


@pytest.mark.parametrize("method", ["Route", "RouteBatch", "ReloadIndex", "GetIndexInfo"])
async def test_malformed_protobuf_is_invalid_argument(small_index: Path, method: str) -> None:
    """Bytes that are not a valid request message (truncated; invalid UTF-8 in a string field)
    are INVALID_ARGUMENT naming `request`, never UNKNOWN with the exception class."""
    async with running_router(small_index) as r, grpc.aio.insecure_channel(r.addr) as ch:
        call = ch.unary_unary(f"/semroute.v1.Router/{method}")
        bad = [b"\x0a\x05ab"] + ([b"\x0a\x02\xff\xfe"] if method == "Route" else [])
        for raw in bad:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(raw, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert dict(info.value.trailing_metadata() or ()).get("semroute-field") == "request"


@pytest.mark.parametrize("value", [math.inf, -1.0, math.nan])
async def test_max_cost_has_one_rule_on_the_router(small_index: Path, value: float) -> None:
    """`policy.max_cost` must be finite and >= 0, as the dispatcher's overrides.max_cost."""
    async with running_router(small_index) as r, grpc.aio.insecure_channel(r.addr) as ch:
        req = pb.RouteRequest(query="hello", policy=pb.Policy(max_cost=value))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.RouterStub(ch).Route(req, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "finite number >= 0" in (info.value.details() or "")


async def test_huge_target_name_is_echoed_bounded(small_index: Path) -> None:
    """A 1 MB target name gets INVALID_ARGUMENT with a short message (not a reply whose
    metadata overflows into RESOURCE_EXHAUSTED)."""
    async with running_router(small_index) as r, grpc.aio.insecure_channel(r.addr) as ch:
        req = pb.RouteRequest(query="hello", policy=pb.Policy(allowed_targets=["t" * 1_000_000]))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.RouterStub(ch).Route(req, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(info.value.details() or "") < 3000


def test_batches_are_cut_by_estimated_tokens_in_order() -> None:
    """Slices hold at most the token budget (a single oversize query alone) and the query cap,
    and keep the queries' order."""
    queries = [Query("x" * 8192)] * 5 + [Query("short")] * 40
    slices = batch_slices(queries, max_tokens=600, max_queries=16)
    assert [q for s in slices for q in s] == queries
    # 256 estimated tokens per long query (the encoder's window), 3 per short one.
    assert [len(s) for s in slices[:3]] == [2, 2, 16]
    assert all(len(s) <= 16 for s in slices)


async def test_single_route_is_not_starved_by_two_big_batches(small_index: Path) -> None:
    """Two concurrent RouteBatch calls of long queries: a single Route sent meanwhile is
    answered before either batch (slices interleave; one worker is kept for single calls)."""
    settings = router_settings(router_server__workers=2)
    async with (
        running_router(small_index, settings=settings) as r,
        grpc.aio.insecure_channel(r.addr) as ch,
    ):
        stub = pb_grpc.RouterStub(ch)
        big = pb.RouteBatchRequest(requests=[
            pb.RouteRequest(query=f"question {i}: " + "please explain this " * 400)
            for i in range(48)
        ])
        order: list[str] = []

        async def batch(name: str) -> None:
            await stub.RouteBatch(big, timeout=120)
            order.append(name)

        tasks = [asyncio.create_task(batch("batch1")), asyncio.create_task(batch("batch2"))]
        await _until(lambda: (r.metrics.registry.get_sample_value(
            "semroute_router_batch_size_count") or 0) >= 1)
        await stub.Route(pb.RouteRequest(query="Hi there!"), timeout=120)
        order.append("single")
        await asyncio.gather(*tasks)
    assert order[0] == "single", order
