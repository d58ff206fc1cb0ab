"""The decision log behind the real dispatcher (fault-server backends, the real in-process
router): every chat becomes a row, and feedback arrives through both doors, the gRPC Feedback
RPC and POST /v1/feedback, checked (unknown id 404 / NOT_FOUND, bad score 400 /
INVALID_ARGUMENT) and stored next to the decision."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from semroute.config import load_settings
from semroute.errors import InvalidRequest, NotFound
from semroute.http.app import start_http_door
from semroute.loop.decision_log import DecisionLog
from semroute.loop.sink import LogSink
from semroute.loop.store import open_store
from tests.integration.dispatcher_fixtures import (
    CODE_PROMPT,
    collect,
    llms,
    make_stack,
    split,
    user,
)

__all__ = ["llms", "make_stack"]  # fixtures, imported for pytest


@pytest.fixture
def sink(tmp_path: Path) -> LogSink:
    return LogSink(DecisionLog(open_store(f"sqlite:{tmp_path / 'log.db'}")), keep_text=False)


async def test_grpc_chat_is_logged_and_takes_feedback(
    make_stack: Any, sink: LogSink
) -> None:
    """A chat over gRPC leaves one row (route, the target that answered, status, cost, no text);
    Feedback on its id is stored; an unknown id is NOT_FOUND and a score of 1.5
    INVALID_ARGUMENT naming `score`."""
    stack = await make_stack(sink=sink)
    req = replace(user(CODE_PROMPT), request_id="chat-1")
    _, text, done = split(await collect(stack.client.chat(req)))
    assert text
    await stack.client.feedback("chat-1", 0.75, comment="good enough")
    with pytest.raises(NotFound) as missing:
        await stack.client.feedback("no-such-chat", 1.0)
    assert missing.value.grpc_code == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest) as bad:
        await stack.client.feedback("chat-1", 1.5)
    assert bad.value.field == "score"
    assert sink.log.flush()
    [(row, feedback)] = sink.log.store.with_feedback()
    assert (row.request_id, row.status, row.target, row.route) == (
        "chat-1", "ok", done.target, "code"
    )
    assert row.query_text is None and row.query_chars == len(CODE_PROMPT)
    assert row.cost_usd == pytest.approx(done.cost_usd)
    assert (feedback.score, feedback.comment) == (0.75, "good enough")


async def test_http_feedback_by_the_answers_request_id(
    make_stack: Any, sink: LogSink
) -> None:
    """The OpenAI door: the x-request-id of an answer takes feedback at POST /v1/feedback (200);
    an unknown id is 404 and an out-of-range score 400 with `param: score`."""
    stack = await make_stack(sink=sink)
    door = await start_http_door(stack.dispatcher, load_settings(), 0, "127.0.0.1")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{door.port}") as http:
            answer = await http.post("/v1/chat/completions", json={
                "model": "auto", "messages": [{"role": "user", "content": CODE_PROMPT}],
            }, headers={"x-request-id": "http-chat-7"})
            assert answer.status_code == 200
            rid = answer.headers["x-request-id"]
            assert rid == "http-chat-7"
            ok = await http.post("/v1/feedback", json={"request_id": rid, "score": 1})
            unknown = await http.post("/v1/feedback", json={"request_id": "nope", "score": 1})
            bad = await http.post("/v1/feedback", json={"request_id": rid, "score": -1})
    finally:
        await door.stop()
    assert ok.status_code == 200 and ok.json()["ok"] is True
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "score"
    assert sink.log.flush()
    assert [(d.request_id, f.score) for d, f in sink.log.store.with_feedback()] == [
        ("http-chat-7", 1.0)
    ]
