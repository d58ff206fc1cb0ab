"""The candidate beside the serving index: shadow and A/B wiring for one router server.

The pure parts (arm choice by a stable hash, agreement counting) are ``semroute.loop.arms``;
the off-path lane is ``semroute.loop.shadow``. This module holds the live state (``Arms``: mode,
share, the candidate ``Router``), its metrics, and where differing shadow decisions go: the
decision log named by ``loop.decision_log``. The router, not the dispatcher, writes them: the
shadow decision exists only after the answer has left, so it cannot ride in the Route reply;
the rows carry the request id the dispatcher forwarded (``x-request-id``), so they join the
dispatcher's rows in the same database.

Feedback and cost per arm are not visible here (they arrive at the dispatcher); they are in the
decision log per ``index_version`` (``semroute drift`` tabulates them).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from semroute.config import Settings
from semroute.logs import get_logger
from semroute.loop.arms import CANDIDATE, SERVING, Agreement, Mode, choose_arm, sampled
from semroute.loop.decision_log import DecisionLog
from semroute.loop.records import ShadowRecord, query_fields
from semroute.loop.shadow import ShadowJob, ShadowLane
from semroute.loop.store import open_store
from semroute.types import Decision, Query

if TYPE_CHECKING:
    from semroute.router import Router

log = get_logger(__name__)


class ArmMetrics:
    """Per-arm and shadow metrics (namespace ``semroute_router``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        ns, reg = "semroute_router", registry
        self.requests = Counter(
            "arm_requests", "Decisions served by arm (serving, candidate) and index version",
            ["arm", "version"], namespace=ns, registry=reg,
        )
        self.fallbacks = Counter(
            "arm_fallbacks", "Served decisions that fell back, by arm and index version",
            ["arm", "version"], namespace=ns, registry=reg,
        )
        self.shadow = Counter(
            "shadow_decisions", "Shadow decisions compared, by served route and agreement",
            ["route", "agree"], namespace=ns, registry=reg,
        )
        self.agreement = Gauge(
            "shadow_agreement", "Share of shadow decisions agreeing with the served one "
            "(same route and target), by served route, since the candidate was set",
            ["route"], namespace=ns, registry=reg,
        )
        self.shadow_dropped = Counter(
            "shadow_dropped", "Shadow comparisons skipped because the lane was full",
            namespace=ns, registry=reg,
        )
        self.shadow_logged = Counter(
            "shadow_logged", "Differing shadow decisions queued for the decision log",
            namespace=ns, registry=reg,
        )
        self.candidate = Gauge(
            "candidate_share", "The candidate's A/B share (shadow: 0) by mode and version; "
            "absent when no candidate is set", ["mode", "version"], namespace=ns, registry=reg,
        )


@dataclass(frozen=True)
class ArmState:
    """What serves: ``mode`` off (no candidate), shadow or ab, with the ab ``share``."""

    mode: Mode = "off"
    share: float = 0.0
    candidate: Router | None = None


class Arms:
    """The live arm state of one router server (see the module docstring)."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        srv = settings.router_server
        self.settings = settings
        self.metrics = ArmMetrics(registry)
        self.state = ArmState()
        self.agreement = Agreement()
        self.lane = ShadowLane(self._compared, max_pending=srv.shadow_max_pending,
                               batch_max=srv.batch_max)
        self.decision_log: DecisionLog | None = None
        self._log_share = srv.shadow_log_share
        self._shadow_share = srv.shadow_share
        self._keep_text = settings.log.log_query_text

    def start(self) -> None:
        self.lane.start()

    def set(self, state: ArmState) -> None:
        """Install ``state`` (a new candidate resets the agreement counts). Opens the decision
        log the first time shadow mode is set (blocking: call off the event loop)."""
        url = self.settings.loop.decision_log
        if state.mode == "shadow" and self.decision_log is None and self._log_share > 0 and url:
            # First, so that a log that cannot be opened (ConfigError) changes nothing.
            self.decision_log = DecisionLog(open_store(url), max_queue=self.settings.loop.queue,
                                            retention_days=self.settings.loop.retention_days)
        if self.state.candidate is not state.candidate:
            self.agreement = Agreement()
            self.metrics.agreement.clear()
        self.state = state
        self.metrics.candidate.clear()
        if state.candidate is not None and state.mode != "off":
            share = state.share if state.mode == "ab" else 0.0
            self.metrics.candidate.labels(mode=state.mode,
                                          version=state.candidate.index.version).set(share)
        log.info("arms_set", mode=state.mode, share=state.share,
                 candidate=state.candidate.index.version if state.candidate else None)

    def pick(self, serving: Router, key: str) -> tuple[str, Router]:
        """The arm and router that serve a request with A/B ``key``."""
        state = self.state
        if state.candidate is not None and choose_arm(state.mode, state.share, key) == CANDIDATE:
            return CANDIDATE, state.candidate
        return SERVING, serving

    def served(self, arm: str, decision: Decision, query: Query, request_id: str) -> None:
        """Count a served decision; in shadow mode, hand it to the lane (never blocks)."""
        self.metrics.requests.labels(arm=arm, version=decision.index_version).inc()
        if decision.fallback:
            self.metrics.fallbacks.labels(arm=arm, version=decision.index_version).inc()
        state = self.state
        if state.mode != "shadow" or state.candidate is None or arm != SERVING:
            return
        if not sampled(request_id, self._shadow_share, "shadow"):
            return
        if not self.lane.submit(ShadowJob(state.candidate, query, decision, request_id)):
            self.metrics.shadow_dropped.inc()

    def _compared(self, job: ShadowJob, shadow: Decision) -> None:
        if job.candidate is not self.state.candidate:
            return  # decided by a candidate that has since been replaced
        same = self.agreement.record(job.served, shadow)
        route = job.served.route
        self.metrics.shadow.labels(route=route, agree=str(same).lower()).inc()
        self.metrics.agreement.labels(route=route).set(self.agreement.snapshot()[route].rate)
        if same or self.decision_log is None or not sampled(job.request_id, self._log_share):
            return
        served = job.served
        row = ShadowRecord(
            request_id=job.request_id, ts=time.time(), serving_version=served.index_version,
            candidate_version=shadow.index_version, route=served.route, target=served.target,
            confidence=served.confidence, fallback=served.fallback, shadow_route=shadow.route,
            shadow_target=shadow.target, shadow_confidence=shadow.confidence,
            shadow_fallback=shadow.fallback,
            **query_fields(job.query.text, keep_text=self._keep_text),  # type: ignore[arg-type]
        )
        if self.decision_log.record_shadow(row):
            self.metrics.shadow_logged.inc()

    async def close(self) -> None:
        await self.lane.close()
        if self.decision_log is not None:
            await asyncio.to_thread(self.decision_log.close)
            self.decision_log = None
