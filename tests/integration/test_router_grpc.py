"""The router gRPC service end to end: real encoder, real small index, real aio server on
127.0.0.1:0, real stubs and clients."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest

from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc
from semroute.errors import InvalidRequest, NotReady, ServiceUnreachable, UnknownTarget
from semroute.grpc.router_client import RouterClient, SyncRouterClient
from semroute.types import Decision, Policy, Query
from tests.integration.router_grpc_support import (
    ROWS_V1,
    ROWS_V2,
    build_small_index,
    health_status,
    router_settings,
    running_router,
    shared_encoder,
    small_index,
)

__all__ = ["small_index"]

pytestmark = pytest.mark.integration

QUERIES = [
    ("Write a Java function that reverses an array", "code"),
    ("What is the integral of 2x from 0 to 3?", "math"),
    ("Write a limerick about a cat", "creative"),
    ("Summarize these meeting notes in two bullets", "summarize"),
    ("Hey, good evening, how's it going?", "chitchat"),
    ("Here is my passport number and home address", "sensitive"),
]


async def _status(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_health_goes_serving_only_after_load(small_index: Path) -> None:
    """Before the index is loaded health is NOT_SERVING and routing answers UNAVAILABLE;
    after load() health is SERVING and the same call succeeds."""
    async with (
        running_router(small_index, load=False) as r,
        grpc.aio.insecure_channel(r.addr) as ch,
    ):
        stub = pb_grpc.RouterStub(ch)
        assert await health_status(ch) == "NOT_SERVING"
        code, details = await _status(stub.Route(pb.RouteRequest(query="hi"), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE and "no index loaded" in details
        code, _ = await _status(stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert r.metrics.registry.get_sample_value("semroute_router_ready") == 0
        await r.handle.load()
        assert await health_status(ch) == "SERVING"
        assert await health_status(ch, "") == "SERVING"
        reply = await stub.Route(pb.RouteRequest(query="Hi there, how are you?"), timeout=5)
        assert reply.route == "chitchat"
        assert r.metrics.registry.get_sample_value("semroute_router_ready") == 1


async def test_every_invalid_argument_names_field_and_limit(small_index: Path) -> None:
    """Blank query, oversize query, too many history turns, unknown target and an oversize
    batch are INVALID_ARGUMENT naming the field (and the limit where there is one)."""
    settings = router_settings(limits__max_query_chars=40, limits__max_batch=3,
                               limits__max_history_turns=2)
    async with (
        running_router(small_index, settings=settings) as r,
        grpc.aio.insecure_channel(r.addr) as ch,
    ):
        stub = pb_grpc.RouterStub(ch)
        cases = [
            (pb.RouteRequest(query=""), ["query", "empty"]),
            (pb.RouteRequest(query=" \n\t "), ["query", "blank"]),
            (pb.RouteRequest(query="x" * 41), ["query", "40"]),
            (pb.RouteRequest(query="ok", history=["a", "b", "c"]), ["history", "2"]),
            (pb.RouteRequest(query="ok", policy=pb.Policy(allowed_targets=["gpt-9"])),
             ["policy.allowed_targets", "gpt-9"]),
        ]
        for request, words in cases:
            code, details = await _status(stub.Route(request, timeout=5))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (request, details)
            for word in words:
                assert word in details, (word, details)
        batch = pb.RouteBatchRequest(requests=[pb.RouteRequest(query="ok")] * 4)
        code, details = await _status(stub.RouteBatch(batch, timeout=5))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "requests" in details and "3" in details and "limits.max_batch" in details
        batch = pb.RouteBatchRequest(requests=[pb.RouteRequest(query="ok"),
                                               pb.RouteRequest(query="  ")])
        code, details = await _status(stub.RouteBatch(batch, timeout=5))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("requests[1].query:"), details
    invalid = r.metrics.registry.get_sample_value(
        "semroute_router_requests_total", {"method": "Route", "code": "INVALID_ARGUMENT"}
    )
    assert invalid == len(cases)


async def test_explain_returns_neighbours_and_scores(small_index: Path) -> None:
    """explain=true returns the nearest exemplars (most similar first, from the index, at most
    decision.max_explain); without explain there are none. Scores cover the routes."""
    async with running_router(small_index) as r, RouterClient(r.addr) as client:
        info = await client.index_info()
        plain = await client.route("Hi there, how are you doing?")
        assert plain.neighbors == ()
        explained = await client.route("Hi there, how are you doing?", explain=True)
        assert explained.route == plain.route == "chitchat"
        assert 0 < len(explained.neighbors) <= r.handle.settings.decision.max_explain
        sims = [n.similarity for n in explained.neighbors]
        assert sims == sorted(sims, reverse=True)
        top = explained.neighbors[0]
        assert (top.text, top.label) == ("Hi there, how are you doing today?", "chitchat")
        assert {n.text for n in explained.neighbors} <= {t for t, _ in ROWS_V1}
        assert explained.index_version == info.version
        assert set(explained.scores) <= set(info.routes)
        # scores are the vote shares; confidence is the index's abstention score (issue 11)
        assert explained.scores["chitchat"] == max(explained.scores.values())
        assert 0.0 < explained.confidence <= 1.0
        assert explained.targets[0] == explained.target
        assert explained.reason


async def test_policy_is_applied_over_the_wire(small_index: Path) -> None:
    """allowed_targets and require_local reach the core: the chosen chain honours them."""
    async with running_router(small_index) as r, RouterClient(r.addr) as client:
        code_q = "Write a Python function that sorts a list of tuples"
        free = await client.route(code_q)
        assert free.route == "code"
        local = await client.route(code_q, policy=Policy(require_local=True))
        assert local.targets and all(t.startswith("local-") for t in local.targets)
        only = await client.route(code_q, policy=Policy(allowed_targets=("gpt-4o",)))
        assert only.targets == ("gpt-4o",)
        with pytest.raises(UnknownTarget) as info:
            await client.route(code_q, policy=Policy(allowed_targets=("nope",)))
        assert info.value.field.startswith("policy.allowed_targets")


async def test_concurrent_calls_are_batched_and_each_gets_its_own_answer(
    small_index: Path,
) -> None:
    """48 concurrent Route calls over 6 kinds of query are coalesced into fewer encoder
    batches, and every caller gets the decision the in-process Router gives for its query."""
    from semroute.router import Router

    async with running_router(small_index) as r, RouterClient(r.addr) as client:
        router = r.handle.current()
        texts = [f"{q} (variant {i})" for i in range(8) for q, _ in QUERIES]
        expected = Router(shared_encoder(), router.index, router.settings).route_batch(
            [Query(t) for t in texts]
        )
        coalescer = r.handle.coalescer
        run_batch = coalescer._run_batch

        held: list[bool] = []

        async def hold_first(router: Router, queries: list[Query]) -> list[Decision]:
            # The first batch waits (up to 2 s) for another call to queue behind it, so the
            # test does not depend on how quickly a loaded machine delivers the 48 calls.
            if not held:
                held.append(True)
                for _ in range(200):
                    if coalescer.queued:
                        break
                    await asyncio.sleep(0.01)
            return await run_batch(router, queries)

        coalescer._run_batch = hold_first
        before = r.metrics.registry.get_sample_value("semroute_router_batch_size_count") or 0
        got = await asyncio.gather(*(client.route(t) for t in texts))
        for text, want, have in zip(texts, expected, got, strict=True):
            assert (have.route, have.target) == (want.route, want.target), text
            assert have.confidence == pytest.approx(want.confidence, abs=1e-5), text
        batches = r.metrics.registry.get_sample_value("semroute_router_batch_size_count") - before
        assert batches < len(texts), "no two concurrent calls shared an encoder batch"
        batch = await client.route_batch([Query(t) for t in texts[:12]])
        assert [d.route for d in batch] == [d.route for d in expected[:12]]


async def test_reload_under_load_drops_nothing(tmp_path: Path) -> None:
    """8 clients keep routing while the index is rebuilt and reloaded (and a corrupt version is
    refused): zero failed calls, answers switch from v1 to v2, the refusal is in the reply and
    the metrics, and the old index keeps serving."""
    root = tmp_path / "idx"
    v1 = build_small_index(root, ROWS_V1)
    async with running_router(root) as r, RouterClient(r.addr, timeout=30) as client:
        assert (await client.index_info()).version == v1.name
        stop = asyncio.Event()
        failures: list[BaseException] = []
        versions: set[str] = set()
        calls = 0

        async def keep_routing(worker: int) -> None:
            nonlocal calls
            i = 0
            while not stop.is_set() or i < 3:
                text, _ = QUERIES[(worker + i) % len(QUERIES)]
                try:
                    decision = await client.route(f"{text} #{worker}.{i}")
                    versions.add(decision.index_version)
                    calls += 1
                except Exception as exc:
                    failures.append(exc)
                i += 1

        workers = [asyncio.create_task(keep_routing(w)) for w in range(8)]
        await asyncio.sleep(0.2)
        v2 = await asyncio.to_thread(build_small_index, root, ROWS_V2)
        async with grpc.aio.insecure_channel(r.addr) as ch:
            stub = pb_grpc.RouterStub(ch)
            reply = await stub.ReloadIndex(pb.ReloadIndexRequest(), timeout=60)
            assert reply.ok and reply.changed, reply.error
            assert reply.previous_version == v1.name and reply.index.version == v2.name
            await asyncio.sleep(0.2)
            broken = root / "versions" / "broken"
            shutil.copytree(v2, broken)
            (broken / "index.faiss").write_bytes(b"not a faiss index")
            reply = await stub.ReloadIndex(pb.ReloadIndexRequest(path=str(broken)), timeout=60)
            assert not reply.ok and not reply.changed
            assert "broken" in reply.error and reply.index.version == v2.name
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*workers)
        assert failures == []
        assert calls >= 8 * 3
        assert {v1.name, v2.name} <= versions
        assert (await client.index_info()).version == v2.name
    reg = r.metrics.registry
    assert reg.get_sample_value("semroute_router_reloads_total", {"result": "ok"}) == 1
    assert reg.get_sample_value("semroute_router_reloads_total", {"result": "error"}) == 1
    assert reg.get_sample_value("semroute_router_reload_failed") == 1
    assert reg.get_sample_value("semroute_router_index_version_info", {"version": v2.name}) == 1


async def test_watch_follows_current_and_survives_a_bad_version(tmp_path: Path) -> None:
    """With the watch on, rebuilding the index switches the server to it without any RPC; a
    `current` pointing at a corrupt version is refused and the good one keeps serving."""
    from semroute.index import switch_current

    root = tmp_path / "idx"
    build_small_index(root, ROWS_V1)
    settings = router_settings(router_server__watch_interval_s=0.1)
    async with running_router(root, settings=settings) as r, RouterClient(r.addr) as client:
        v2 = await asyncio.to_thread(build_small_index, root, ROWS_V2)
        for _ in range(100):
            if (await client.index_info()).version == v2.name:
                break
            await asyncio.sleep(0.1)
        assert (await client.index_info()).version == v2.name
        broken = root / "versions" / "broken"
        shutil.copytree(v2, broken)
        (broken / "index.faiss").write_bytes(b"garbage")
        switch_current(root, broken)
        for _ in range(100):
            if r.metrics.registry.get_sample_value("semroute_router_reload_failed") == 1:
                break
            await asyncio.sleep(0.1)
        assert r.metrics.registry.get_sample_value("semroute_router_reload_failed") == 1
        decision = await client.route("Solve 2x + 1 = 7")
        assert decision.index_version == v2.name
        failures = r.metrics.registry.get_sample_value(
            "semroute_router_reloads_total", {"result": "error"}
        )
        await asyncio.sleep(0.5)  # the watch must not retry the same bad version every poll
        again = r.metrics.registry.get_sample_value(
            "semroute_router_reloads_total", {"result": "error"}
        )
        assert failures == again == 1


async def test_deadline_is_honoured_and_server_keeps_serving(small_index: Path) -> None:
    """A call whose deadline passes gets DEADLINE_EXCEEDED; the next call is answered."""
    async with (
        running_router(small_index) as r,
        grpc.aio.insecure_channel(r.addr) as ch,
    ):
        stub = pb_grpc.RouterStub(ch)
        code, _ = await _status(stub.Route(pb.RouteRequest(query="hello"), timeout=1e-6))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        reply = await stub.Route(pb.RouteRequest(query="Hi there!"), timeout=5)
        assert reply.route == "chitchat"


async def test_sync_client_routes_and_maps_errors(small_index: Path) -> None:
    """SyncRouterClient (what `semroute route --server` uses) routes single queries and
    batches, and raises InvalidRequest naming the field for a blank query."""
    async with running_router(small_index) as r:
        queries = [Query(t) for t, _ in QUERIES]
        expected = [d.route for d in r.handle.current().route_batch(queries)]

        def use_sync_client() -> None:
            with SyncRouterClient(r.addr, timeout=10) as client:
                one = client.route("What is the derivative of x cubed?", explain=True)
                assert one.route == "math" and one.neighbors
                many = client.route_batch(queries)
                assert [d.route for d in many] == expected
                assert client.index_info().exemplars == len(ROWS_V1)
                with pytest.raises(InvalidRequest) as info:
                    client.route("   ")
                assert info.value.field == "query"

        await asyncio.to_thread(use_sync_client)


async def test_async_client_maps_unavailable_to_not_ready(small_index: Path) -> None:
    """An unloaded server surfaces as the server's own NotReady (its class from the trailers, its
    message), not as an unreachable server; a closed port is ServiceUnreachable naming it."""
    async with running_router(small_index, load=False) as r, RouterClient(r.addr) as client:
        with pytest.raises(NotReady, match="no index loaded yet") as info:
            await client.route("hello")
        assert type(info.value) is NotReady
    async with RouterClient(r.addr, timeout=2) as gone:
        with pytest.raises(ServiceUnreachable, match=r"router at 127\.0\.0\.1"):
            await gone.route("hello")


async def test_sync_client_maps_unavailable_like_the_async_one(small_index: Path) -> None:
    """SyncRouterClient (grpc's blocking stub, no event loop) raises what RouterClient raises:
    the unloaded server's own NotReady, then ServiceUnreachable naming a closed port; it can
    be shared between threads and opens the channels it is asked for."""
    async with running_router(small_index, load=False) as r:
        def unloaded() -> None:
            with SyncRouterClient(r.addr, timeout=5) as client:
                with pytest.raises(NotReady, match="no index loaded yet") as info:
                    client.route("hello")
                assert type(info.value) is NotReady

        await asyncio.to_thread(unloaded)
        await r.handle.load()

        def shared(client: SyncRouterClient, text: str) -> str:
            return client.route(text).route

        with SyncRouterClient(r.addr, timeout=10, channels=2) as client:
            routes = await asyncio.gather(
                *(asyncio.to_thread(shared, client, t) for t, _ in QUERIES))
        assert routes == [want for _, want in QUERIES]

    def gone() -> None:
        with (SyncRouterClient(r.addr, timeout=2) as client,
              pytest.raises(ServiceUnreachable, match=r"router at 127\.0\.0\.1")):
            client.route("hello")

    await asyncio.to_thread(gone)


async def test_one_unroutable_query_does_not_fail_its_batch_mates(small_index: Path) -> None:
    """A query whose policy leaves no target (cloud-only allow-list plus require_local) fails
    alone with UNAVAILABLE / NoTargetAvailable, while the calls batched with it succeed."""
    from semroute.errors import NoTargetAvailable

    impossible = Policy(allowed_targets=("gpt-4o",), require_local=True)
    async with running_router(small_index) as r, RouterClient(r.addr) as client:
        results = await asyncio.gather(
            *(client.route(f"{q} ({i})") for i in range(3) for q, _ in QUERIES),
            client.route("Write a Python function that reverses a list", policy=impossible),
            return_exceptions=True,
        )
        *good, bad = results
        assert all(not isinstance(x, BaseException) for x in good), good
        assert isinstance(bad, NoTargetAvailable), bad
        assert "no target" in str(bad).lower() or "target" in str(bad)
