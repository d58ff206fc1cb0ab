"""The decision log as the dispatcher's sink: chats become rows (text only when kept), feedback
is validated (score in [0, 1], a known request id), and recording never raises."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from semroute.errors import InvalidRequest, NotFound
from semroute.loop.decision_log import DecisionLog
from semroute.loop.sink import LogSink
from semroute.loop.store import open_store
from semroute.types import ChatSummary


def _summary(rid: str, query: str = "what is 2 + 2?") -> ChatSummary:
    return ChatSummary(rid, query, "math", "local-small", "local-small", 0.8, False, "ok",
                       cost_usd=1e-6, latency_s=0.2, ttft_s=0.05)


@pytest.fixture
def sink(tmp_path: Path) -> LogSink:
    return LogSink(DecisionLog(open_store(f"sqlite:{tmp_path / 'log.db'}")), keep_text=False)


async def test_a_chat_becomes_a_row_without_its_text(sink: LogSink) -> None:
    """The row keeps the hash and length of the query, not the query, unless text is kept."""
    sink.record(_summary("a"))
    sink.keep_text = True
    sink.record(_summary("b", "keep me"))
    assert sink.log.flush()
    rows = {r.request_id: r for r in sink.log.store.decisions()}
    assert rows["a"].query_text is None and rows["a"].query_chars == len("what is 2 + 2?")
    assert rows["b"].query_text == "keep me"
    assert rows["a"].latency_ms == pytest.approx(200.0) and rows["a"].ttft_ms == pytest.approx(50.0)
    sink.close()


@pytest.mark.parametrize(
    ("score", "field"), [(1.5, "score"), (-0.1, "score"), (math.nan, "score"), ("1", "score")]
)
async def test_feedback_fields_are_checked(sink: LogSink, score: object, field: str) -> None:
    """A score outside [0, 1] (or not a number) is refused naming the field."""
    sink.record(_summary("a"))
    with pytest.raises(InvalidRequest) as info:
        await sink.feedback("a", score, None, None)  # type: ignore[arg-type]
    assert info.value.field == field
    sink.close()


async def test_feedback_on_unknown_and_known_ids(sink: LogSink) -> None:
    """An unknown id is NotFound; a known one is stored with its target and comment."""
    with pytest.raises(NotFound):
        await sink.feedback("nobody", 1.0, None, None)
    sink.record(_summary("a"))
    await sink.feedback("a", 0.5, "local-small", "fine")
    assert sink.log.flush()
    [(decision, fb)] = sink.log.store.with_feedback()
    assert (decision.request_id, fb.score, fb.target, fb.comment) == ("a", 0.5, "local-small",
                                                                       "fine")
    sink.close()


def test_recording_never_raises(sink: LogSink) -> None:
    """A summary the log cannot take is logged and dropped, not raised into the request."""
    sink.record(_summary("a", query=None))  # type: ignore[arg-type]
    sink.close()
