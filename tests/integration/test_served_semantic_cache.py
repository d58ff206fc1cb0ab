"""The semantic cache tier with the router in another server, wired as `semroute serve
dispatcher` wires it (``build_dispatcher``: GuardedRouter around a RouterClient over gRPC on
loopback), with the real encoder and a small real index: a re-typed question is answered from
the cache with the embedding the router returned, a different question is not, tenants stay
apart, embeddings of another encoder never match, and a reply without an embedding (a router
older than the field) just bypasses the semantic tier."""

from __future__ import annotations

import contextlib
import csv
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from structlog.testing import capture_logs

from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc
from semroute.config import load_settings
from semroute.dispatch.breaker import CircuitBreaker
from semroute.dispatch.dispatcher import Dispatcher
from semroute.dispatch.router_guard import GuardedRouter
from semroute.encoder import CachedEncoder
from semroute.grpc.router_client import RouterClient
from semroute.grpc.router_handle import RouterHandle
from semroute.grpc.router_service import RouterServicer
from semroute.index import build_index
from semroute.serve import build_dispatcher
from semroute.testing.faultserver import FaultServer
from semroute.types import ChatEvent, ChatRequest, DecisionEvent, DoneEvent, Message
from tests.integration.dispatcher_fixtures import CREATIVE_PROMPT, llms
from tests.integration.router_grpc_support import (
    ROUTES_FILE,
    ROWS_V1,
    running_router,
    shared_encoder,
    small_index,
)

pytestmark = pytest.mark.integration
__all__ = ["llms", "small_index"]  # fixtures, imported for pytest

RETYPED = "write a short poem about autumn leaves please"  # cosine about 0.98 to CREATIVE_PROMPT
DIFFERENT = "Write a long essay about autumn leaves"  # cosine 0.877
EMBEDDING_FIELDS = ("query_embedding", "embedding_dimension", "encoder_fingerprint")

DispatcherFactory = Callable[..., Awaitable[Dispatcher]]


def write_local_backends(path: Path, servers: dict[str, FaultServer]) -> Path:
    """A backends.yaml naming every fault server as a local target (no API keys needed)."""
    lines = ["backends:"]
    for name, server in servers.items():
        lines += [f"  {name}:", f"    base_url: {server.base_url}", f"    model: {name}",
                  "    local: true",
                  "    timeouts: {connect: 0.5, first_token: 2, idle: 2, total: 10}"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
async def make_dispatcher(
    tmp_path: Path, llms: dict[str, FaultServer]
) -> AsyncIterator[DispatcherFactory]:
    """``build_dispatcher`` from files, connected to the router at ``router``; any other keyword
    is a setting (``cache__semantic=False``)."""
    built: list[Dispatcher] = []
    backends = write_local_backends(tmp_path / "backends.yaml", llms)

    async def factory(router: str, **settings: Any) -> Dispatcher:
        values: dict[str, Any] = {"cache__exact": True, "cache__semantic": True, **settings}
        disp = await build_dispatcher(load_settings(
            None, dispatcher__router=router, dispatcher__backends_file=backends,
            dispatcher__router_timeout_s=10.0, loop__decision_log="", **values,
        ))
        built.append(disp)
        return disp

    try:
        yield factory
    finally:
        for disp in built:
            await disp.aclose()


class _Witness(RouterServicer):
    """The real servicer, remembering what each Route request asked for (return_embedding,
    ab_key). ``strip``: replies without the embedding fields, like a router that predates
    them."""

    def __init__(self, handle: RouterHandle, strip: bool = False) -> None:
        super().__init__(handle)
        self.strip = strip
        self.asked: list[tuple[bool, str]] = []

    async def Route(
        self, request: pb.RouteRequest, context: grpc.aio.ServicerContext
    ) -> pb.RouteResponse:
        self.asked.append((request.return_embedding, request.ab_key))
        reply = await super().Route(request, context)
        if self.strip:
            for name in EMBEDDING_FIELDS:
                reply.ClearField(name)
        return reply


@contextlib.asynccontextmanager
async def witness_router(handle: RouterHandle, strip: bool = False) -> AsyncIterator[
        tuple[str, _Witness]]:
    """A second real gRPC server on 127.0.0.1:0 serving ``handle`` through a ``_Witness``."""
    server = grpc.aio.server()
    witness = _Witness(handle, strip)
    pb_grpc.add_RouterServicer_to_server(witness, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", witness
    finally:
        await server.stop(0)


async def _ask(disp: Dispatcher, text: str, tenant: str = "", *earlier: Message) -> list[Any]:
    req = ChatRequest((*earlier, Message("user", text)), tenant=tenant)
    events: list[ChatEvent] = [e async for e in disp.chat(req)]
    return events


def _backend_calls(llms: dict[str, FaultServer]) -> int:
    return sum(len(llm.chat_requests()) for llm in llms.values())


def _sample(disp: Dispatcher, name: str, **labels: str) -> float:
    value = disp.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_a_paraphrase_hits_the_semantic_tier_through_the_served_router(
    small_index: Path, make_dispatcher: DispatcherFactory, llms: dict[str, FaultServer],
) -> None:
    """Through a router server, the re-typed question gets the stored answer (semantic match,
    no backend call, cost 0); a different question on the same subject is a miss."""
    async with running_router(small_index) as r:
        disp = await make_dispatcher(r.addr)
        first = await _ask(disp, CREATIVE_PROMPT)
        assert first[0].cache == "miss" and not first[0].fallback
        calls = _backend_calls(llms)
        again = await _ask(disp, RETYPED)
        decision, done = again[0], again[-1]
        assert isinstance(decision, DecisionEvent) and decision.cache == "hit"
        match = re.fullmatch(r"response cache: semantic match \(similarity ([0-9.]+)\)",
                             decision.reason)
        assert match is not None and float(match.group(1)) >= 0.95, decision.reason
        assert isinstance(done, DoneEvent) and done.cache == "hit" and done.cost_usd == 0.0
        assert done.target == first[-1].target
        assert _backend_calls(llms) == calls
        other = await _ask(disp, DIFFERENT)
        assert other[0].cache == "miss" and _backend_calls(llms) == calls + 1
        assert _sample(disp, "semroute_cache_semantic_hits_total") == 1


async def test_tenants_stay_apart_through_the_served_router(
    small_index: Path, make_dispatcher: DispatcherFactory,
) -> None:
    """Another tenant's re-typed question is a miss; the same tenant's is a hit."""
    async with running_router(small_index) as r:
        disp = await make_dispatcher(r.addr)
        await _ask(disp, CREATIVE_PROMPT, "team-a")
        assert (await _ask(disp, RETYPED, "team-b"))[0].cache == "miss"
        assert (await _ask(disp, RETYPED, "team-a"))[0].cache == "hit"


async def test_the_embedding_is_asked_for_only_when_the_semantic_tier_will_look_it_up(
    small_index: Path, make_dispatcher: DispatcherFactory,
) -> None:
    """The router is asked for the embedding on an exact miss of a single question with the
    tier on; not for a conversation with earlier turns, not with the tier off; an exact hit
    does not call the router at all."""
    async with running_router(small_index) as r, witness_router(r.handle) as (addr, witness):
        disp = await make_dispatcher(addr)
        await _ask(disp, CREATIVE_PROMPT, "team-a")
        earlier = (Message("user", "Hello"), Message("assistant", "Hi! How can I help?"))
        await _ask(disp, DIFFERENT, "team-a", *earlier)
        await _ask(disp, CREATIVE_PROMPT, "team-a")  # exact hit: no router call
        assert [wanted for wanted, _ in witness.asked] == [True, False]
        off = await make_dispatcher(addr, cache__semantic=False)
        await _ask(off, DIFFERENT, "team-a")
        assert [wanted for wanted, _ in witness.asked] == [True, False, False]


async def test_a_reply_without_an_embedding_bypasses_the_semantic_tier(
    small_index: Path, make_dispatcher: DispatcherFactory, llms: dict[str, FaultServer],
) -> None:
    """A router that returns no embedding (it predates the field): the re-typed question is
    answered by a backend, the exact tier still hits, and the reason is logged once."""
    async with (
        running_router(small_index) as r,
        witness_router(r.handle, strip=True) as (addr, witness),
    ):
        disp = await make_dispatcher(addr)
        with capture_logs() as logs:
            await _ask(disp, CREATIVE_PROMPT)
            calls = _backend_calls(llms)
            retyped = await _ask(disp, RETYPED)
            assert retyped[0].cache == "miss" and _backend_calls(llms) == calls + 1
            assert (await _ask(disp, CREATIVE_PROMPT))[0].cache == "hit"
        assert all(wanted for wanted, _ in witness.asked)
        told = [e for e in logs if e["event"] == "semantic_cache_no_embedding"]
        assert len(told) == 1 and told[0]["log_level"] == "warning"
        assert _sample(disp, "semroute_cache_semantic_hits_total") == 0


class _Relabelled:
    """The real encoder under another fingerprint: how a re-exported or replaced model looks to
    an index and to the cache (same vectors here, so only the fingerprint can keep them apart)."""

    def __init__(self, inner: Any, fingerprint: str) -> None:
        self.inner = inner
        self._fingerprint = fingerprint

    @property
    def dimension(self) -> int:
        return int(self.inner.dimension)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors: np.ndarray = self.inner.encode(texts)
        return vectors


def _build_with(encoder: Any, root: Path, rows: list[tuple[str, str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root.parent / f"{root.name}.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return build_index([path], root, encoder, routes_file=ROUTES_FILE, progress=False)


async def test_embeddings_of_another_encoder_never_match(
    tmp_path: Path, small_index: Path, make_dispatcher: DispatcherFactory,
) -> None:
    """After the router is replaced by one with another encoder (another fingerprint), a
    re-typed question is not matched against questions the old encoder embedded, even though
    here the vectors are identical; questions the new encoder embedded match again."""
    other = CachedEncoder(_Relabelled(shared_encoder().inner, "sha256:relabelled-encoder"), 256)
    other_root = tmp_path / "other-idx"
    _build_with(other, other_root, ROWS_V1)
    async with (
        running_router(small_index) as old,
        running_router(other_root, encoder=other) as new,
    ):
        disp = await make_dispatcher(old.addr)
        await _ask(disp, CREATIVE_PROMPT)
        previous = disp.router
        disp.router = GuardedRouter(RouterClient(new.addr, timeout=10.0),
                                    breaker=CircuitBreaker(5, 1.0))
        await previous.aclose()  # type: ignore[attr-defined]
        assert (await _ask(disp, RETYPED))[0].cache == "miss"
        hit = await _ask(disp, CREATIVE_PROMPT + " please")
        assert hit[0].cache == "hit" and "semantic match" in hit[0].reason
