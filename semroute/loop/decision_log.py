"""The decision log: rows written in batches by one writer thread, never on a request's path.

``record(row)`` only puts the row on a bounded queue and returns at once: when the queue is full
(the database is slow or down) the row is dropped and counted (``dropped``), the request is never
blocked. The writer takes up to ``batch`` rows at a time and inserts them in one transaction; a
failed insert is retried with backoff a few times, then its rows are counted as lost. Feedback
goes through the same queue, so feedback on a request whose row is still queued lands after it.
Rows older than ``retention_days`` are purged by the writer about once an hour.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from semroute.errors import NotFound
from semroute.logs import get_logger
from semroute.loop.records import DecisionRecord, Feedback, ShadowRecord
from semroute.loop.store import SqlStore

log = get_logger(__name__)

_STOP = object()
_T = TypeVar("_T")
_RETRIES = 3
_PURGE_EVERY_S = 3600.0


@dataclass
class LogCounters:
    """What happened to the rows handed to the log (read by metrics)."""

    written: int = 0
    dropped: int = 0  # queue full: never queued
    lost: int = 0  # queued, but the database refused them after every retry
    feedback: int = 0
    purged: int = 0
    errors: list[str] = field(default_factory=list)


class DecisionLog:
    """See the module docstring. ``close()`` writes what is queued, then stops the writer."""

    def __init__(
        self,
        store: SqlStore,
        *,
        max_queue: int = 10_000,
        batch: int = 256,
        retention_days: float = 30.0,
        clock: Callable[[], float] = time.time,
        retry_s: float = 0.2,
    ) -> None:
        self.store = store
        self.counters = LogCounters()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._batch = batch
        self._retention_s = retention_days * 86400.0
        self._clock = clock
        self._retry_s = retry_s
        self._pending: set[str] = set()  # request ids queued, not yet written
        self._lock = threading.Lock()
        self._last_purge = 0.0
        self._thread = threading.Thread(target=self._run, name="semroute-decision-log",
                                        daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def record(self, row: DecisionRecord) -> bool:
        """Queue ``row``; False (and counted) when the queue is full. Never blocks."""
        with self._lock:
            try:
                self._queue.put_nowait(row)
            except queue.Full:
                self.counters.dropped += 1
                return False
            self._pending.add(row.request_id)
        return True

    def record_shadow(self, row: ShadowRecord) -> bool:
        """Queue a differing shadow decision; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            with self._lock:
                self.counters.dropped += 1
            return False
        return True

    def feedback(self, item: Feedback) -> None:
        """Queue feedback on a logged request. Raises NotFound when the request id is neither
        queued nor in the store (blocking: call it off the event loop)."""
        with self._lock:
            queued = item.request_id in self._pending
        if not queued and not self.store.has_decision(item.request_id):
            raise NotFound(
                f"request_id {item.request_id[:64]!r}: no logged decision with this id (ids come "
                "from the x-request-id of an answer; rows older than the retention are gone)"
            )
        try:
            self._queue.put(item, timeout=1.0)
        except queue.Full:
            with self._lock:
                self.counters.dropped += 1
            raise NotFound("the decision log is overloaded; feedback not recorded") from None

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written (True) or ``timeout`` passes."""
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to ``timeout``), stop the writer, close the store."""
        if self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                log.warning("decision_log_close_timeout", queued=self.queued)
            self._thread.join(timeout)
        self.store.close()

    # ---- the writer thread ----

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            items = [first]
            while len(items) < self._batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in items)
            self._write([i for i in items if i is not _STOP])
            if stop:
                return
            self._maybe_purge()

    def _write(self, items: list[object]) -> None:
        decisions = [i for i in items if isinstance(i, DecisionRecord)]
        feedback = [i for i in items if isinstance(i, Feedback)]
        shadows = [i for i in items if isinstance(i, ShadowRecord)]
        flushes = [i for i in items if isinstance(i, threading.Event)]
        if decisions and self._insert(self.store.insert_decisions, decisions):
            self.counters.written += len(decisions)
        if shadows and self._insert(self.store.insert_shadow, shadows):
            self.counters.written += len(shadows)
        if feedback and self._insert(self.store.insert_feedback, feedback):
            self.counters.feedback += len(feedback)
        with self._lock:
            self._pending.difference_update(r.request_id for r in decisions)
        for event in flushes:
            event.set()

    def _insert(self, insert: Callable[[list[_T]], None], rows: list[_T]) -> bool:
        for attempt in range(_RETRIES):
            try:
                insert(rows)
                return True
            except Exception as exc:  # any driver error: the log must outlive its database
                message = f"{type(exc).__name__}: {exc}"
                log.warning("decision_log_write_failed", rows=len(rows), attempt=attempt + 1,
                            store=self.store.where, error=message[:300])
                if attempt + 1 < _RETRIES:
                    time.sleep(self._retry_s * 2**attempt)
                else:
                    self.counters.errors.append(message[:300])
                    del self.counters.errors[:-10]
        self.counters.lost += len(rows)
        return False

    def _maybe_purge(self) -> None:
        now = self._clock()
        if self._retention_s <= 0 or now - self._last_purge < _PURGE_EVERY_S:
            return
        self._last_purge = now
        try:
            self.counters.purged += self.store.purge(now - self._retention_s)
        except Exception as exc:
            log.warning("decision_log_purge_failed", store=self.store.where, error=str(exc)[:300])
