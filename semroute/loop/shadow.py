"""The shadow lane: the candidate index decides queries after the served answer has left.

Off the response path in three ways: ``submit`` only appends to a bounded queue and returns
(when ``max_pending`` jobs wait, the job is dropped and counted, never waited for); the
candidate runs on the lane's own thread, never on the serving workers, so a slow candidate
cannot take a worker from the served decisions; and the lane's results are handled by its own
task. Jobs are decided in batches of at most ``batch_max`` (one encoder call each; with the
serving router's cached encoder the query's embedding is usually a cache hit).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from semroute.logs import get_logger
from semroute.types import Decision, Query

if TYPE_CHECKING:
    from semroute.router import Router

log = get_logger(__name__)


@dataclass(frozen=True)
class ShadowJob:
    """One served decision to compare: the candidate that should decide ``query`` too."""

    candidate: Router
    query: Query
    served: Decision
    request_id: str


OnResult = Callable[[ShadowJob, Decision], None]


class ShadowLane:
    """See the module docstring. ``start()`` inside the event loop; ``close()`` to stop."""

    def __init__(self, on_result: OnResult, *, max_pending: int = 256, batch_max: int = 32,
                 on_error: Callable[[ShadowJob, Exception], None] | None = None) -> None:
        self._on_result = on_result
        self._on_error = on_error
        self._max_pending = max_pending
        self._batch_max = batch_max
        self._jobs: deque[ShadowJob] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="semroute-shadow"
        )
        self.dropped = 0
        self.decided = 0
        self.errors = 0

    @property
    def pending(self) -> int:
        """Jobs waiting (the batch being decided is not counted)."""
        return len(self._jobs)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def submit(self, job: ShadowJob) -> bool:
        """Queue ``job``; False (counted in ``dropped``) when ``max_pending`` jobs wait.
        Never blocks, never raises."""
        if len(self._jobs) >= self._max_pending:
            self.dropped += 1
            return False
        self._jobs.append(job)
        self._wake.set()
        return True

    async def close(self) -> None:
        """Stop deciding (queued jobs are dropped) and release the lane's thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._jobs.clear()
        # Do not wait for a candidate call still running: it finishes on its own thread.
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._jobs:
                batch: list[ShadowJob] = []
                while self._jobs and len(batch) < self._batch_max:
                    batch.append(self._jobs.popleft())
                # A candidate switch may land between submissions: one call per candidate.
                groups: dict[int, list[ShadowJob]] = {}
                for job in batch:
                    groups.setdefault(id(job.candidate), []).append(job)
                for group in groups.values():
                    await self._decide(loop, group)

    async def _decide(self, loop: asyncio.AbstractEventLoop, group: list[ShadowJob]) -> None:
        candidate = group[0].candidate
        try:
            decisions = await loop.run_in_executor(
                self.executor, candidate.route_batch, [j.query for j in group]
            )
        except Exception as exc:
            if len(group) > 1:  # one query the candidate refuses must not hide the others
                for job in group:
                    await self._decide(loop, [job])
                return
            self.errors += 1
            log.warning("shadow_decision_failed", error=str(exc)[:200],
                        error_type=type(exc).__name__)
            if self._on_error is not None:
                self._on_error(group[0], exc)
            return
        for job, decision in zip(group, decisions, strict=True):
            self.decided += 1
            try:
                self._on_result(job, decision)
            except Exception as exc:  # a bug in reporting must not stop the lane
                log.error("shadow_result_failed", error=str(exc)[:200])
