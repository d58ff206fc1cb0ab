"""Gathering concurrent Route calls into encoder batches, off the event loop.

The ``Coalescer`` turns many concurrent single queries into few ``run_batch`` calls without
making a lone query wait: on an idle service a query runs at once in its caller's task; only
while earlier batches are running does a batch wait (``max_wait_s``) to fill up.

A query on a quiet service can run on the event loop itself (``run_inline``), skipping the hop
to a worker thread and back, the largest fixed cost of a lone call. While a query runs inline
nothing else can arrive, so quiet is proven on the thread path: an idle query that runs there
with no other query arriving meanwhile (a probe) lets the next ``inline_after_probe`` idle
queries run inline; any query that finds the service busy ends that, so a burst of concurrent
calls is back on the batching path within a few calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from semroute.errors import NotReady
from semroute.logs import get_logger
from semroute.types import Decision, Query

if TYPE_CHECKING:
    from semroute.router import Router

log = get_logger(__name__)



@dataclass
class _Pending:
    router: Router
    query: Query
    future: asyncio.Future[Decision]


BatchRunner = Callable[["Router", list[Query]], Awaitable[list[Decision]]]
InlineRunner = Callable[["Router", list[Query]], list[Decision]]


class Coalescer:
    """Gathers concurrent single queries into batches for ``run_batch``.

    At most ``slots`` batches run at once. A batch is cut as soon as a slot is free; when other
    batches are still running (the service is busy) it first waits up to ``max_wait_s`` for
    ``max_batch`` queries to arrive. Queries whose caller has gone (cancelled, deadline passed)
    are dropped before they reach the encoder. Each caller gets its own decision; a batch that
    fails is retried query by query so one caller's error never becomes another's.
    """

    def __init__(
        self, run_batch: BatchRunner, *, max_batch: int, max_wait_s: float, slots: int,
        run_inline: InlineRunner | None = None, inline_after_probe: int = 4,
    ) -> None:
        self._run_batch = run_batch
        self._run_inline = run_inline
        self._inline_after_probe = inline_after_probe
        self._inline_budget = 0  # idle queries that may still run inline before the next probe
        self._contended = False  # a query found the service busy (since the last probe began)
        self.inline_runs = 0
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._slots = asyncio.Semaphore(slots)
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._filled = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._in_flight = 0  # batches being encoded (cut by the loop or run inline)
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._cut_batches())

    async def close(self) -> None:
        """Stop cutting batches; waits for running batches; pending callers get NotReady."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(NotReady("the router is shutting down"))

    @property
    def queued(self) -> int:
        """Queries waiting for a batch (not yet handed to the encoder)."""
        return len(self._queue)

    async def submit(self, router: Router, query: Query) -> Decision:
        """Route ``query`` with ``router`` as part of the next batch."""
        idle = not self._queue and self._in_flight == 0 and not self._slots.locked()
        if idle and self._run_inline is not None and self._inline_budget > 0:
            self._inline_budget -= 1
            self.inline_runs += 1
            return self._run_inline(router, [query])[0]  # nothing else runs meanwhile
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        if idle:
            # Idle service: there is no batch to join, so run now in this task instead of
            # waking the batch cutter (saves two event-loop hops on the latency path).
            self._contended = False
            await self._slots.acquire()  # a slot is free: this does not suspend
            await self._execute([_Pending(router, query, future)])
            if not self._contended:  # a probe: nobody came while it ran
                self._inline_budget = self._inline_after_probe
            return future.result()
        self._contended, self._inline_budget = True, 0
        self._queue.append(_Pending(router, query, future))
        self._arrived.set()
        if len(self._queue) >= self._max_batch:
            self._filled.set()
        return await future

    async def _cut_batches(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._queue:
                await self._slots.acquire()
                if self._in_flight and self._max_wait_s > 0 and len(self._queue) < self._max_batch:
                    self._filled.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._filled.wait(), self._max_wait_s)
                batch: list[_Pending] = []
                while self._queue and len(batch) < self._max_batch:
                    pending = self._queue.popleft()
                    if not pending.future.done():
                        batch.append(pending)
                if not batch:
                    self._slots.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._execute(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _execute(self, batch: list[_Pending]) -> None:
        self._in_flight += 1
        try:
            # A reload may land between calls: group by the router each call started with.
            groups: dict[int, list[_Pending]] = {}
            for pending in batch:
                groups.setdefault(id(pending.router), []).append(pending)
            for group in groups.values():
                await self._execute_group(group)
        except Exception as exc:  # a bug below must not leave callers waiting forever
            log.error("batch failed", error=str(exc), error_type=type(exc).__name__)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        finally:
            self._in_flight -= 1
            self._slots.release()

    async def _execute_group(self, group: list[_Pending]) -> None:
        router = group[0].router
        try:
            decisions = await self._run_batch(router, [p.query for p in group])
        except Exception as exc:
            if len(group) == 1:
                if not group[0].future.done():
                    group[0].future.set_exception(exc)
                return
            for pending in group:
                await self._execute_group([pending])
            return
        for pending, decision in zip(group, decisions, strict=True):
            if not pending.future.done():
                pending.future.set_result(decision)
