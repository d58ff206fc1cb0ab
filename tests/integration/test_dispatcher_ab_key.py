"""The dispatcher's A/B key, end to end: a real router server with a candidate in `ab` mode at
share 0.5, the dispatcher as `semroute serve dispatcher` builds it, both doors on loopback. One
tenant's requests all land on one arm (the decision log's index version says which), two
tenants can land on different arms, a client's `x-semroute-ab-key` (HTTP header or gRPC
metadata) wins, without a tenant the request id decides, and an oversize key is refused naming
the header."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from semroute._proto.semroute.v1 import dispatcher_pb2_grpc as dpb_grpc
from semroute.config import Settings, load_settings
from semroute.dispatch.dispatcher import AB_KEY_HEADER, Dispatcher
from semroute.errors import NotFound
from semroute.grpc.convert import request_to_proto
from semroute.grpc.dispatcher_service import create_dispatcher_server
from semroute.grpc.router_client import RouterClient
from semroute.http.app import start_http_door
from semroute.loop.arms import CANDIDATE, SERVING, choose_arm
from semroute.serve import build_dispatcher
from semroute.testing.faultserver import FaultServer
from semroute.types import ChatRequest, ChatSummary, Message
from tests.integration.dispatcher_fixtures import llms
from tests.integration.router_grpc_support import (
    ROWS_V1,
    ROWS_V2,
    build_small_index,
    running_router,
)
from tests.integration.test_served_semantic_cache import write_local_backends

pytestmark = pytest.mark.integration
__all__ = ["llms"]  # fixture, imported for pytest

QUERIES = [
    "Write a Java function that reverses an array",
    "What is the integral of 2x from 0 to 3?",
    "Write a limerick about a cat",
    "Hey, good evening, how's it going?",
]
NAMES = [f"team-{i}" for i in range(64)]
TO_SERVING = next(n for n in NAMES if choose_arm("ab", 0.5, n) == SERVING)
TO_CANDIDATE = next(n for n in NAMES if choose_arm("ab", 0.5, n) == CANDIDATE)
TOKENS = {TO_SERVING: "tok-serving-0123456789", TO_CANDIDATE: "tok-candidate-0123456789"}
_ROOTS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def ab_root(tmp_path_factory: pytest.TempPathFactory, encoder_dir: Path) -> Path:
    """ROOT (ROWS_V1) with a candidate root, ROOT/candidates (ROWS_V2: another version)."""
    if "root" not in _ROOTS:
        root = tmp_path_factory.mktemp("ab-key") / "idx"
        build_small_index(root, ROWS_V1)
        build_small_index(root / "candidates", ROWS_V2)
        _ROOTS["root"] = root
    return _ROOTS["root"]


class _Recorder:
    """A decision sink that keeps every finished chat's summary."""

    def __init__(self) -> None:
        self.summaries: list[ChatSummary] = []

    def record(self, summary: ChatSummary) -> None:
        self.summaries.append(summary)

    async def feedback(
        self, request_id: str, score: float, target: str | None, comment: str | None
    ) -> None:
        raise NotFound("no feedback in this test")

    def close(self) -> None:
        pass

    def versions(self, tenant: str) -> set[str]:
        return {s.index_version for s in self.summaries if s.tenant == tenant}


@contextlib.asynccontextmanager
async def ab_router(root: Path) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """A router server serving ROOT with ROOT/candidates in ab mode at share 0.5: its address
    and the index version of each arm."""
    async with running_router(root) as r, RouterClient(r.addr, timeout=60.0) as admin:
        state = await admin.set_candidate("ab", "candidates", 0.5)
        assert state.candidate is not None
        yield r.addr, {SERVING: r.handle.current().index.version,
                       CANDIDATE: state.candidate.version}


@contextlib.asynccontextmanager
async def dispatcher(
    tmp_path: Path, llms: dict[str, FaultServer], router: str, auth: bool
) -> AsyncIterator[tuple[Dispatcher, Settings, _Recorder]]:
    values: dict[str, Any] = {}
    if auth:
        tokens = tmp_path / "tokens"
        tokens.write_text("".join(f"{name} {tok}\n" for name, tok in TOKENS.items()))
        values["auth__tokens_file"] = tokens
    settings = load_settings(
        None, dispatcher__router=router, dispatcher__port=0, dispatcher__router_timeout_s=10.0,
        dispatcher__backends_file=write_local_backends(tmp_path / "backends.yaml", llms),
        loop__decision_log="", **values,
    )
    disp = await build_dispatcher(settings)
    recorder = _Recorder()
    disp.sink = recorder
    try:
        yield disp, settings, recorder
    finally:
        await disp.aclose()


def _body(text: str) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}]}


async def test_one_tenant_is_served_by_one_arm_and_a_client_key_wins(
    tmp_path: Path, ab_root: Path, llms: dict[str, FaultServer],
) -> None:
    """Over the HTTP door with auth: every request of a tenant is decided by the arm its name
    picks (twelve each, two tenants on different arms); with `x-semroute-ab-key` the key's arm
    decides instead."""
    async with (
        ab_router(ab_root) as (router, versions),
        dispatcher(tmp_path, llms, router, auth=True) as (disp, settings, recorder),
    ):
        door = await start_http_door(disp, settings, 0, "127.0.0.1")
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{door.port}",
                                         timeout=30.0) as http:
                for i in range(12):
                    for token in TOKENS.values():
                        resp = await http.post(
                            "/v1/chat/completions", json=_body(QUERIES[i % 4]),
                            headers={"authorization": f"Bearer {token}"},
                        )
                        assert resp.status_code == 200, resp.text
                assert recorder.versions(TO_SERVING) == {versions[SERVING]}
                assert recorder.versions(TO_CANDIDATE) == {versions[CANDIDATE]}
                assert len(recorder.summaries) == 24
                recorder.summaries.clear()
                for i in range(4):
                    resp = await http.post(
                        "/v1/chat/completions", json=_body(QUERIES[i]),
                        headers={"authorization": f"Bearer {TOKENS[TO_SERVING]}",
                                 AB_KEY_HEADER: TO_CANDIDATE},
                    )
                    assert resp.status_code == 200, resp.text
                assert recorder.versions(TO_SERVING) == {versions[CANDIDATE]}
        finally:
            await door.stop(1)


async def test_grpc_metadata_key_wins_and_without_a_tenant_the_request_id_decides(
    tmp_path: Path, ab_root: Path, llms: dict[str, FaultServer],
) -> None:
    """Over the gRPC door without auth (no tenant): `x-semroute-ab-key` metadata puts every
    request on its key's arm; without it each request id picks its own arm."""
    async with (
        ab_router(ab_root) as (router, versions),
        dispatcher(tmp_path, llms, router, auth=False) as (disp, settings, recorder),
    ):
        server, port = await create_dispatcher_server(settings, disp)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = dpb_grpc.DispatcherStub(channel)  # type: ignore[no-untyped-call]

                async def chat(text: str, *metadata: tuple[str, str]) -> None:
                    call = stub.Chat(request_to_proto(ChatRequest((Message("user", text),))),
                                     metadata=metadata, timeout=30)
                    _ = [event async for event in call]

                for i in range(8):
                    await chat(QUERIES[i % 4], (AB_KEY_HEADER, TO_CANDIDATE))
                assert {s.index_version for s in recorder.summaries} == {versions[CANDIDATE]}
                recorder.summaries.clear()
                rids = [f"req-{i}" for i in range(12)]
                for i, rid in enumerate(rids):
                    await chat(QUERIES[i % 4], ("x-request-id", rid))
                got = {s.request_id: s.index_version for s in recorder.summaries}
                assert got == {rid: versions[choose_arm("ab", 0.5, rid)] for rid in rids}
                assert set(got.values()) == set(versions.values())  # the ids scatter
        finally:
            await server.stop(0)


async def test_an_oversize_ab_key_is_refused_naming_the_header(
    tmp_path: Path, llms: dict[str, FaultServer],
) -> None:
    """257 characters: HTTP 400 in OpenAI's shape with `param` = the header; gRPC
    INVALID_ARGUMENT whose message starts with the metadata key. Nothing reaches a backend."""
    long_key = "k" * 257
    async with dispatcher(tmp_path, llms, "127.0.0.1:1", auth=False) as (disp, settings, _):
        door = await start_http_door(disp, settings, 0, "127.0.0.1")
        server, port = await create_dispatcher_server(settings, disp)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{door.port}") as http:
                resp = await http.post("/v1/chat/completions", json=_body(QUERIES[0]),
                                       headers={AB_KEY_HEADER: long_key})
            assert resp.status_code == 400
            error = resp.json()["error"]
            assert error["param"] == AB_KEY_HEADER and error["type"] == "invalid_request_error"
            assert "257 characters" in error["message"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = dpb_grpc.DispatcherStub(channel)  # type: ignore[no-untyped-call]
                call = stub.Chat(request_to_proto(ChatRequest((Message("user", "hi"),))),
                                 metadata=((AB_KEY_HEADER, long_key),), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    _ = [event async for event in call]
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (info.value.details() or "").startswith(f"{AB_KEY_HEADER}:")
            assert sum(len(llm.chat_requests()) for llm in llms.values()) == 0
        finally:
            await server.stop(0)
            await door.stop(1)
