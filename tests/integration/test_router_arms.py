"""Shadow and A/B in the router: real encoder, real small indexes, real aio server on
127.0.0.1:0, the real SetCandidate RPC and a real SQLite decision log."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc
from semroute.auth import TokenSet
from semroute.loop.arms import CANDIDATE, SERVING, choose_arm, sampled
from tests.integration.router_grpc_support import (
    ROWS_V1,
    build_small_index,
    router_settings,
    running_router,
)

pytestmark = pytest.mark.integration

# The candidate swaps the code and math labels: its decisions on those queries must differ.
SWAPPED = [(text, {"code": "math", "math": "code"}.get(label, label)) for text, label in ROWS_V1]
QUERIES = [
    "Write a Java function that reverses an array",
    "What is the integral of 2x from 0 to 3?",
    "Write a limerick about a cat",
    "Hey, good evening, how's it going?",
]
_ROOTS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def served_root(tmp_path_factory: pytest.TempPathFactory, encoder_dir: Path) -> Path:
    """ROOT (ROWS_V1) with a candidate root inside it, ROOT/candidates (labels swapped).
    Shared by this module's tests; none of them moves ROOT/current."""
    if "root" not in _ROOTS:
        root = tmp_path_factory.mktemp("arms") / "idx"
        build_small_index(root, ROWS_V1)
        build_small_index(root / "candidates", SWAPPED)
        _ROOTS["root"] = root
    return _ROOTS["root"]


def _md(rid: str) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", rid),)


async def _error(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def _until(predicate: Any, timeout: float = 30.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


async def test_a_stalled_shadow_candidate_does_not_hold_served_decisions(
    served_root: Path, tmp_path: Path
) -> None:
    """While the shadow lane is blocked (its thread waits on an event), every Route call is
    answered by the serving index and nothing has been compared yet; once released, each
    query is compared, agreement is counted per route, and the differing decisions are in the
    decision log under the request ids the calls carried."""
    db = tmp_path / "log.db"
    settings = router_settings(loop__decision_log=f"sqlite:{db}",
                               router_server__shadow_log_share=1.0)
    async with (
        running_router(served_root, settings=settings) as r,
        grpc.aio.insecure_channel(r.addr) as ch,
    ):
        stub = pb_grpc.RouterStub(ch)
        reply = await stub.SetCandidate(pb.SetCandidateRequest(mode="shadow", path="candidates"),
                                        timeout=60)
        candidate_version = reply.candidate.version
        serving_version = r.handle.current().index.version
        assert reply.mode == "shadow" and candidate_version != serving_version
        info = await stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=5)
        assert info.candidate_mode == "shadow" and info.candidate.version == candidate_version

        stall = threading.Event()
        blocker = r.handle.arms.lane.executor.submit(stall.wait, 60)
        try:
            served = {}
            for i in range(3):
                for j, query in enumerate(QUERIES):
                    rid = f"shadow-{i}-{j}"
                    out = await stub.Route(pb.RouteRequest(query=query), metadata=_md(rid),
                                           timeout=10)
                    assert out.arm == SERVING and out.index_version == serving_version
                    served[rid] = out
            # Ordering, not timing: every answer is back while the candidate could not run.
            assert r.handle.arms.agreement.overall.compared == 0
        finally:
            stall.set()
        blocker.result(timeout=10)
        assert await _until(lambda: r.handle.arms.agreement.overall.compared == len(served))
        snap = r.handle.arms.agreement.snapshot()
        assert snap["code"].agreed == 0 and snap["code"].compared == 3  # swapped labels
        assert snap["chitchat"].agreed == snap["chitchat"].compared == 3
        reg = r.metrics.registry
        assert reg.get_sample_value("semroute_router_shadow_agreement", {"route": "code"}) == 0
        assert reg.get_sample_value("semroute_router_shadow_agreement",
                                    {"route": "chitchat"}) == 1
        assert reg.get_sample_value("semroute_router_arm_requests_total",
                                    {"arm": SERVING, "version": serving_version}) == len(served)
        differing = reg.get_sample_value("semroute_router_shadow_decisions_total",
                                         {"route": "code", "agree": "false"})
        assert differing == 3
        decision_log = r.handle.arms.decision_log
        assert decision_log is not None
        await asyncio.to_thread(decision_log.flush)
        logged = {row.request_id: row for row in decision_log.store.shadow_decisions()}
        for rid, row in logged.items():
            assert row.route == served[rid].route
            assert (row.shadow_route, row.shadow_target) != (row.route, row.target)
            assert (row.serving_version, row.candidate_version) == (
                serving_version, candidate_version)
            assert row.query_text is None and row.query_chars > 0  # text logging is off
        logged_code = {rid for rid, row in logged.items() if row.route == "code"}
        assert logged_code == {f"shadow-{i}-0" for i in range(3)}
        # Removing the candidate reports what it scored and stops comparing.
        off = await stub.SetCandidate(pb.SetCandidateRequest(mode="off"), timeout=10)
        assert off.mode == "off" and not off.HasField("candidate")
        assert {a.route: (a.compared, a.agreed) for a in off.agreement}["code"] == (3, 0)
        await stub.Route(pb.RouteRequest(query=QUERIES[0]), timeout=10)
        assert r.handle.arms.lane.pending == 0 and r.handle.arms.agreement.overall.compared == 0


async def test_a_full_shadow_lane_drops_comparisons_and_counts_them(served_root: Path) -> None:
    """With the lane blocked and room for 4 jobs, 10 calls are all answered; the jobs that do
    not fit are dropped and counted, and after release compared + dropped == 10."""
    settings = router_settings(router_server__shadow_max_pending=4, router_server__batch_max=1,
                               loop__decision_log="")
    async with (
        running_router(served_root, settings=settings) as r,
        grpc.aio.insecure_channel(r.addr) as ch,
    ):
        stub = pb_grpc.RouterStub(ch)
        await stub.SetCandidate(pb.SetCandidateRequest(mode="shadow", path="candidates"),
                                timeout=60)
        stall = threading.Event()
        blocker = r.handle.arms.lane.executor.submit(stall.wait, 60)
        try:
            for i in range(10):
                out = await stub.Route(pb.RouteRequest(query=QUERIES[i % 4]), timeout=10)
                assert out.arm == SERVING
        finally:
            stall.set()
        blocker.result(timeout=10)
        dropped = r.metrics.registry.get_sample_value("semroute_router_shadow_dropped_total")
        assert dropped is not None and dropped >= 5
        assert await _until(
            lambda: r.handle.arms.agreement.overall.compared + dropped == 10)


async def test_ab_serves_each_key_from_one_arm_and_says_which(served_root: Path) -> None:
    """In ab mode at share 0.5 each ab_key is served by the arm its hash picks, every time;
    the reply names the arm and the version that decided; without a key the request id
    decides; both arms are counted in the per-arm metrics."""
    async with (
        running_router(served_root) as r,
        grpc.aio.insecure_channel(r.addr) as ch,
    ):
        stub = pb_grpc.RouterStub(ch)
        reply = await stub.SetCandidate(
            pb.SetCandidateRequest(mode="ab", path="candidates", share=0.5), timeout=60)
        versions = {SERVING: r.handle.current().index.version, CANDIDATE: reply.candidate.version}
        seen: dict[str, int] = {SERVING: 0, CANDIDATE: 0}
        for k in range(24):
            key = f"tenant-{k}"
            expected = choose_arm("ab", 0.5, key)
            for _ in range(3):
                out = await stub.Route(pb.RouteRequest(query=QUERIES[k % 4], ab_key=key),
                                       timeout=10)
                assert (out.arm, out.index_version) == (expected, versions[expected])
                seen[out.arm] += 1
        assert seen[SERVING] > 0 and seen[CANDIDATE] > 0
        for rid in ("req-a", "req-b", "req-c", "req-d"):
            out = await stub.Route(pb.RouteRequest(query=QUERIES[0]), metadata=_md(rid),
                                   timeout=10)
            assert out.arm == choose_arm("ab", 0.5, rid)
        batch = await stub.RouteBatch(pb.RouteBatchRequest(requests=[
            pb.RouteRequest(query=QUERIES[k % 4], ab_key=f"tenant-{k}") for k in range(8)
        ]), timeout=10)
        assert [x.arm for x in batch.responses] == [
            choose_arm("ab", 0.5, f"tenant-{k}") for k in range(8)]
        reg = r.metrics.registry
        for arm in (SERVING, CANDIDATE):
            count = reg.get_sample_value("semroute_router_arm_requests_total",
                                         {"arm": arm, "version": versions[arm]})
            assert count is not None and count >= seen[arm]
        assert reg.get_sample_value("semroute_router_candidate_share",
                                    {"mode": "ab", "version": versions[CANDIDATE]}) == 0.5
        # Changing only the share keeps the loaded candidate; share 1 sends every key to it.
        await stub.SetCandidate(pb.SetCandidateRequest(mode="ab", share=1.0), timeout=10)
        out = await stub.Route(pb.RouteRequest(query=QUERIES[1], ab_key="x"), timeout=10)
        assert out.arm == CANDIDATE


async def test_set_candidate_refuses_bad_input_with_the_field_and_status(
    served_root: Path, tmp_path: Path, hash_encoder: Any
) -> None:
    """Bad mode or share, a path outside the root, a missing index, another encoder's index,
    a mode without any candidate loaded and an oversize ab_key each get their status and name
    what was wrong; the arms stay as they were; a user token may not call SetCandidate."""
    from semroute.index import build_index
    from tests.integration.router_grpc_support import write_csv

    other = served_root / "other-encoder"
    if not other.exists():
        build_index([write_csv(tmp_path / "o.csv", ROWS_V1)], other, hash_encoder,
                    progress=False, tune=False)
    tokens = TokenSet.of(user=["user-token"], admin=["admin-token"])
    admin = (("authorization", "Bearer admin-token"),)
    async with (
        running_router(served_root, tokens=tokens) as r,
        grpc.aio.insecure_channel(r.addr) as ch,
    ):
        stub = pb_grpc.RouterStub(ch)

        def call(**kw: Any) -> Any:
            return stub.SetCandidate(pb.SetCandidateRequest(**kw), metadata=admin, timeout=30)

        cases = [
            (dict(mode="canary"), grpc.StatusCode.INVALID_ARGUMENT, "mode:"),
            (dict(mode="ab", path="candidates", share=1.5), grpc.StatusCode.INVALID_ARGUMENT,
             "share:"),
            (dict(mode="shadow", path=str(tmp_path)), grpc.StatusCode.INVALID_ARGUMENT,
             "path:"),
            (dict(mode="shadow", path="nope"), grpc.StatusCode.FAILED_PRECONDITION,
             "no such index"),
            (dict(mode="shadow", path="other-encoder"), grpc.StatusCode.FAILED_PRECONDITION,
             "encoder"),
            (dict(mode="shadow"), grpc.StatusCode.FAILED_PRECONDITION, "no candidate is loaded"),
        ]
        for kw, code, text in cases:
            got, details = await _error(call(**kw))
            assert (got, text in details) == (code, True), (kw, got, details)
            assert r.handle.arms.state.mode == "off"
        user = (("authorization", "Bearer user-token"),)
        got, _ = await _error(stub.SetCandidate(pb.SetCandidateRequest(mode="off"),
                                                metadata=user, timeout=10))
        assert got == grpc.StatusCode.PERMISSION_DENIED
        got, details = await _error(stub.Route(pb.RouteRequest(query="hi", ab_key="k" * 300),
                                               metadata=user, timeout=10))
        assert got == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("ab_key:")


async def test_promoting_the_candidate_removes_it(tmp_path: Path) -> None:
    """When `current` moves to the candidate's version and the router reloads, the candidate
    is dropped (an index compared with itself says nothing) and mode goes off."""
    from semroute.index import switch_current

    root = tmp_path / "idx"
    build_small_index(root, ROWS_V1)
    candidate = build_small_index(root / "candidates", SWAPPED)
    async with running_router(root, settings=router_settings(loop__decision_log="")) as r:
        await r.handle.set_candidate("shadow", candidate, 0.0)
        assert r.handle.arms.state.mode == "shadow"
        switch_current(root, candidate)
        result = await r.handle.reload()
        assert result.ok and result.info is not None
        assert result.info.version == candidate.name
        assert r.handle.arms.state.mode == "off" and r.handle.arms.state.candidate is None


async def test_serve_router_starts_with_a_candidate_and_the_cli_changes_it(
    served_root: Path,
) -> None:
    """`serve router --candidate DIR --mode ab --share 0.25` settings start with the candidate
    in place; `semroute candidate --mode off` over gRPC removes it."""
    from semroute.grpc.router_client import RouterClient
    from semroute.serve import serve_router
    from tests.conftest import ENCODER_DIR, run_cli

    settings = router_settings(router_server__port=0, router_server__candidate=served_root /
                               "candidates", router_server__candidate_mode="ab",
                               router_server__candidate_share=0.25)
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_router(settings, served_root, encoder_path=ENCODER_DIR,
                                            stop=stop, on_ready=lambda p, _: ready.set_result(p)))
    try:
        port = await asyncio.wait_for(ready, 120)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            info = await pb_grpc.RouterStub(ch).GetIndexInfo(pb.GetIndexInfoRequest(), timeout=5)
            assert (info.candidate_mode, info.candidate_share) == ("ab", 0.25)
            assert info.candidate.version == (served_root / "candidates" / "current").resolve().name
        out = await asyncio.to_thread(run_cli, "candidate", "--server", f"127.0.0.1:{port}",
                                      "--mode", "off")
        assert '"mode": "off"' in out.stdout
        async with RouterClient(f"127.0.0.1:{port}") as client:
            decision = await client.route(QUERIES[0], ab_key="tenant-1")
            assert decision.index_version == (served_root / "current").resolve().name
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def test_live_drift_metrics_follow_the_last_decisions(served_root: Path) -> None:
    """With a window of 4, the fallback share and the route mix's divergence from the
    exemplars' mix are those of the last 4 answers; every answer's confidence is observed."""
    from collections import Counter

    from semroute.loop.drift import js_divergence

    settings = router_settings(router_server__drift_window=4)
    async with (
        running_router(served_root, settings=settings) as r,
        grpc.aio.insecure_channel(r.addr) as ch,
    ):
        stub = pb_grpc.RouterStub(ch)
        queries = [*QUERIES, "zxqv blorp frobnicate", QUERIES[1], QUERIES[1]]
        answers = [await stub.Route(pb.RouteRequest(query=q), timeout=10) for q in queries]
        last = answers[-4:]
        reg = r.metrics.registry
        assert reg.get_sample_value("semroute_router_window_fallback_share") == (
            sum(a.fallback for a in last) / 4)
        exemplars = Counter(label for _, label in ROWS_V1)
        expected = js_divergence(Counter(a.route for a in last), exemplars)
        assert expected > 0
        assert reg.get_sample_value("semroute_router_window_route_divergence") == (
            pytest.approx(expected))
        assert reg.get_sample_value("semroute_router_confidence_count") == len(queries)


async def test_ab_query_the_candidate_cannot_take_is_served_by_the_serving_index(
    tmp_path: Path,
) -> None:
    """A candidate without gpt-4o cannot honour a policy allowing only gpt-4o: at share 1 such
    a query is still answered, by the serving index (arm "serving"); others go to the
    candidate."""
    from semroute.index import build_index
    from tests.integration.router_grpc_support import ROUTES_FILE, shared_encoder, write_csv

    lines = [ln for ln in ROUTES_FILE.read_text().splitlines() if not ln.startswith("  gpt-4o:")]
    routes = tmp_path / "routes-no-gpt4o.yaml"
    routes.write_text("\n".join(lines).replace(", gpt-4o,", ",").replace(", gpt-4o]", "]"))
    root = tmp_path / "idx"
    build_small_index(root, ROWS_V1)
    candidate = build_index([write_csv(tmp_path / "c.csv", ROWS_V1)], root / "cand",
                            shared_encoder(), routes_file=routes, progress=False)
    async with running_router(root) as r, grpc.aio.insecure_channel(r.addr) as ch:
        stub = pb_grpc.RouterStub(ch)
        await r.handle.set_candidate("ab", candidate, 1.0)
        only_4o = pb.Policy(allowed_targets=["gpt-4o"])
        out = await stub.Route(pb.RouteRequest(query=QUERIES[0], policy=only_4o, ab_key="k"),
                               timeout=10)
        assert (out.arm, out.target) == (SERVING, "gpt-4o")
        out = await stub.Route(pb.RouteRequest(query=QUERIES[0], ab_key="k"), timeout=10)
        assert (out.arm, out.index_version) == (CANDIDATE, candidate.name)


async def test_shadow_with_a_decision_log_that_cannot_open_changes_nothing(
    served_root: Path,
) -> None:
    """Shadow mode opens `loop.decision_log`; when that fails (nothing listens on the
    PostgreSQL port) SetCandidate is FAILED_PRECONDITION naming the log, and the arms stay
    off. The serve command refuses --mode without a candidate."""
    from tests.conftest import run_cli

    settings = router_settings(loop__decision_log="postgresql://semroute@127.0.0.1:1/none")
    async with (
        running_router(served_root, settings=settings) as r,
        grpc.aio.insecure_channel(r.addr) as ch,
    ):
        stub = pb_grpc.RouterStub(ch)
        code, details = await _error(stub.SetCandidate(
            pb.SetCandidateRequest(mode="shadow", path="candidates"), timeout=30))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "decision log" in details
        assert r.handle.arms.state.mode == "off" and r.handle.arms.decision_log is None
    bad = await asyncio.to_thread(run_cli, "serve", "router", "--index", str(served_root),
                                  "--mode", "ab", "--port", "0", check=False)
    assert bad.returncode == 2 and "--mode/--share: need a candidate" in bad.stderr


async def test_shadow_share_decides_a_stable_share_of_requests(served_root: Path) -> None:
    """With router_server.shadow_share 0.5 exactly the request ids the stable hash picks are
    compared; the others are neither compared nor dropped."""
    settings = router_settings(router_server__shadow_share=0.5, loop__decision_log="")
    async with (
        running_router(served_root, settings=settings) as r,
        grpc.aio.insecure_channel(r.addr) as ch,
    ):
        stub = pb_grpc.RouterStub(ch)
        await stub.SetCandidate(pb.SetCandidateRequest(mode="shadow", path="candidates"),
                                timeout=60)
        rids = [f"share-{i}" for i in range(40)]
        for i, rid in enumerate(rids):
            await stub.Route(pb.RouteRequest(query=QUERIES[i % 4]), metadata=_md(rid),
                             timeout=10)
        picked = sum(sampled(rid, 0.5, "shadow") for rid in rids)
        assert 0 < picked < len(rids)
        assert await _until(lambda: r.handle.arms.agreement.overall.compared == picked)
        await asyncio.sleep(0.2)  # nothing more arrives: the others were never queued
        assert r.handle.arms.agreement.overall.compared == picked
        assert r.handle.arms.lane.dropped == 0 and r.handle.arms.lane.pending == 0
