"""The decision log as the dispatcher's ``DecisionSink``: finished chats become log rows,
feedback is checked and queued behind them (off the event loop)."""

from __future__ import annotations

import asyncio
import time

from semroute.logs import get_logger
from semroute.loop.decision_log import DecisionLog
from semroute.loop.records import DecisionRecord, Feedback, check_feedback, query_fields
from semroute.types import ChatSummary

log = get_logger(__name__)


class LogSink:
    """``record`` turns a ``ChatSummary`` into a row (the query's text only when ``keep_text``)
    and never blocks; ``feedback`` validates the fields and queues the feedback."""

    def __init__(self, decision_log: DecisionLog, *, keep_text: bool = False) -> None:
        self.log = decision_log
        self.keep_text = keep_text

    def record(self, summary: ChatSummary) -> None:
        try:
            row = DecisionRecord(
                request_id=summary.request_id, ts=time.time(), route=summary.route,
                decided_target=summary.decided_target, target=summary.target,
                confidence=summary.confidence, fallback=summary.fallback, status=summary.status,
                tenant=summary.tenant, index_version=summary.index_version,
                cost_usd=summary.cost_usd, latency_ms=summary.latency_s * 1000,
                ttft_ms=summary.ttft_s * 1000, explored=summary.explored,
                propensity=summary.propensity,
                **query_fields(summary.query, keep_text=self.keep_text),  # type: ignore[arg-type]
            )
            self.log.record(row)
        except Exception as exc:  # the log must never fail a request
            log.warning("decision_log_record_failed", error=str(exc)[:200])

    async def feedback(
        self, request_id: str, score: float, target: str | None, comment: str | None
    ) -> None:
        rid, value, tgt, text = check_feedback(request_id, score, target, comment)
        item = Feedback(rid, value, ts=time.time(), target=tgt, comment=text)
        await asyncio.to_thread(self.log.feedback, item)

    def close(self) -> None:
        self.log.close()
