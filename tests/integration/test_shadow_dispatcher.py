"""Shadow decisions join the dispatcher's rows: a real dispatcher (fault-server backends)
calls a real router over gRPC that shadows a candidate; both write the same SQLite decision
log, and the router's differing decision carries the chat's request id."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from semroute.grpc.router_client import RouterClient
from semroute.loop.decision_log import DecisionLog
from semroute.loop.sink import LogSink
from semroute.loop.store import open_store
from tests.integration.dispatcher_fixtures import (
    CODE_PROMPT,
    CREATIVE_PROMPT,
    collect,
    llms,
    make_stack,
    split,
    user,
)
from tests.integration.router_grpc_support import (
    ROWS_V1,
    build_small_index,
    router_settings,
    running_router,
)

__all__ = ["llms", "make_stack"]  # fixtures, imported for pytest

pytestmark = pytest.mark.integration

SWAPPED = [(text, {"code": "math", "math": "code"}.get(label, label)) for text, label in ROWS_V1]


async def test_shadow_rows_join_the_dispatchers_rows_by_request_id(
    make_stack: Any, tmp_path: Path
) -> None:
    """A code chat: the router serves "code" and its candidate (code and math labels swapped)
    says "math"; the router logs that under the chat's request id, next to the dispatcher's
    row for the same id. A creative chat, on which both agree, leaves no shadow row."""
    root = tmp_path / "idx"
    build_small_index(root, ROWS_V1)
    candidate = build_small_index(root / "candidates", SWAPPED)
    url = f"sqlite:{tmp_path / 'log.db'}"
    sink = LogSink(DecisionLog(open_store(url)))
    settings = router_settings(loop__decision_log=url, router_server__shadow_log_share=1.0)
    async with running_router(root, settings=settings) as r, RouterClient(r.addr) as client:
        await r.handle.set_candidate("shadow", candidate, 0.0)
        stack = await make_stack(sink=sink, router=client)
        for rid, prompt in (("chat-code", CODE_PROMPT), ("chat-creative", CREATIVE_PROMPT)):
            decision, text, _ = split(await collect(stack.client.chat(
                replace(user(prompt), request_id=rid))))
            assert text
        assert decision.route == "creative"
        for _ in range(200):
            if r.handle.arms.agreement.overall.compared == 2:
                break
            await asyncio.sleep(0.05)
        assert r.handle.arms.agreement.overall.compared == 2
        router_log = r.handle.arms.decision_log
        assert router_log is not None
        assert await asyncio.to_thread(router_log.flush)
        assert await asyncio.to_thread(sink.log.flush)
        store = open_store(url)
        try:
            rows = {d.request_id: d for d in store.decisions()}
            shadow = {s.request_id: s for s in store.shadow_decisions()}
        finally:
            store.close()
    assert set(rows) == {"chat-code", "chat-creative"}
    assert set(shadow) == {"chat-code"}
    row, diff = rows["chat-code"], shadow["chat-code"]
    assert (row.route, diff.route, diff.shadow_route) == ("code", "code", "math")
    assert row.index_version == diff.serving_version
    assert diff.candidate_version == candidate.name
