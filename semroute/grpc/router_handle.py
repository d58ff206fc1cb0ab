"""The live state of one router server: the current index, reloads, the watch, health.

Each call takes a reference to the current ``Router`` when it starts, so a reload swaps the
reference atomically and in-flight calls finish on the old index. A reload loads and checks the
new index in full before the swap; a failure keeps the old index serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from grpc_health.v1 import health

from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute.config import Settings
from semroute.errors import ConfigError, NotReady, ReloadFailed, SemrouteError
from semroute.grpc.router_arms import Arms, ArmState
from semroute.grpc.router_drift import DriftMetrics
from semroute.grpc.server import set_serving
from semroute.logs import get_logger
from semroute.loop.arms import Mode, check_share
from semroute.metrics import RouterMetrics
from semroute.types import Decision, Encoder, IndexInfo, Query

if TYPE_CHECKING:
    from semroute.router import Router, Timings

from semroute.grpc.coalescer import Coalescer

log = get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Router"].full_name



class Peers(Protocol):
    """The other router processes serving the same port (``semroute.grpc.router_workers``):
    an admin call that reached this one is sent on to them."""

    def reload(self, path: Path | None) -> None: ...

    def set_candidate(self, mode: str, path: Path | None, share: float) -> None: ...


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    changed: bool
    error: str
    info: IndexInfo | None
    previous_version: str


class RouterHandle:
    """The serving state of one router server: current Router, reloads, watch, health."""

    def __init__(
        self,
        settings: Settings,
        index_path: Path,
        *,
        encoder: Encoder | None,
        encoder_path: Path | None = None,
        metrics: RouterMetrics,
        health_servicer: health.aio.HealthServicer,
        executor: concurrent.futures.ThreadPoolExecutor,
    ) -> None:
        self.settings = settings
        self.index_path = index_path
        self.metrics = metrics
        self.health = health_servicer
        self._encoder = encoder
        self._encoder_path = encoder_path
        self._executor = executor
        self._router: Router | None = None
        self._lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        self._failed_current: Path | None = None
        # Multi-process (semroute.grpc.router_workers): the supervisor decides health, since
        # SERVING means every process serves one version, so a new version is reported to it
        # (``on_version``) instead of setting health here; ``peers`` get this one's admin calls.
        self.on_version: Callable[[str], None] | None = None
        self.peers: Peers | None = None
        self.mmap_index = settings.router_server.processes > 1
        srv = settings.router_server
        self.coalescer = Coalescer(
            self.run_batch, max_batch=srv.batch_max, max_wait_s=srv.batch_wait_ms / 1000.0,
            slots=srv.workers, run_inline=self.route_inline if srv.inline_when_idle else None,
        )
        # RouteBatch slices run in a lane one worker short of all of them, so single Route
        # calls always find a worker (a big batch cannot starve them).
        self._batch_lane = asyncio.Semaphore(max(1, srv.workers - 1))
        self.arms = Arms(settings, metrics.registry)
        self.drift = (
            DriftMetrics(metrics.registry, srv.drift_window, self._exemplar_counts)
            if srv.drift_window else None
        )

    @property
    def router(self) -> Router | None:
        """The Router serving now (None until loaded)."""
        return self._router

    def current(self) -> Router:
        """The Router serving now; raises NotReady (UNAVAILABLE) before the first load."""
        router = self._router
        if router is None:
            raise NotReady(
                "no index loaded yet: the router is still starting (health is NOT_SERVING); "
                "retry after health reports SERVING"
            )
        return router

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run_batch(self, router: Router, queries: list[Query]) -> list[Decision]:
        """Route ``queries`` as one encoder batch on the worker threads; records metrics."""
        decisions, timings = await self._in_thread(router.route_batch_timed, queries)
        asyncio.get_running_loop().call_soon(self._observe, decisions, timings)
        return list(decisions)

    def route_inline(self, router: Router, queries: list[Query]) -> list[Decision]:
        """``run_batch`` on the calling thread (the event loop's, when the service is idle: see
        ``Coalescer``); records metrics."""
        decisions, timings = router.route_batch_timed(queries)
        asyncio.get_running_loop().call_soon(self._observe, decisions, timings)
        return decisions

    def _observe(self, decisions: list[Decision], timings: Timings) -> None:
        # Scheduled, not run inline: the replies leave before the metrics are counted.
        m = self.metrics
        m.batch_size.observe(len(decisions))
        m.encode_seconds.observe(timings.encode_s)
        m.search_seconds.observe(timings.search_s)
        m.decide_seconds.observe(timings.decide_s)
        for decision in decisions:
            m.decisions.labels(route=decision.route, target=decision.target).inc()
            if decision.fallback:
                m.fallbacks.labels(route=decision.route).inc()
            if self.drift is not None:
                self.drift.observe(decision)

    def _exemplar_counts(self) -> dict[str, int]:
        router = self._router
        return dict(router.index.manifest.counts.per_label) if router is not None else {}

    async def route_many(self, router: Router, queries: list[Query]) -> list[Decision]:
        """Route a RouteBatch: in slices of at most ``limits.batch_slice_tokens`` estimated
        tokens (and ``router_server.batch_max`` queries), one slice at a time per call through
        the batch lane, so single calls interleave with a big batch instead of queueing behind
        it."""
        srv = self.settings.router_server
        out: list[Decision] = []
        for part in batch_slices(queries, self.settings.limits.batch_slice_tokens, srv.batch_max):
            async with self._batch_lane:
                out.extend(await self.run_batch(router, part))
        return out

    def _build_router(self, path: Path) -> Router:
        from semroute.index import ExemplarIndex
        from semroute.router import Router

        if self._encoder is None:
            router = Router.load(path, self.settings, encoder_path=self._encoder_path,
                                 mmap=self.mmap_index)
            self._encoder = router.encoder
            return router
        index = ExemplarIndex.load(path, expect_fingerprint=self._encoder.fingerprint,
                                   mmap=self.mmap_index)
        counts = self._router.stage_counts if self._router is not None else None
        return Router(self._encoder, index, self.settings, stage_counts=counts)

    def _with_index(self, router: Router, path: Path) -> Router:
        from semroute.index import ExemplarIndex

        index = ExemplarIndex.load(path, expect_fingerprint=router.encoder.fingerprint,
                                   mmap=self.mmap_index)
        return router.with_index(index)

    async def load(self) -> IndexInfo:
        """Load the encoder and the index, then report SERVING. Raises SemrouteError on failure
        (health stays NOT_SERVING). Starts the ``DIR/current`` watch if configured."""
        async with self._lock:
            router = await self._in_thread(self._build_router, self.index_path)
            self._swap(router)
        hits = getattr(self._encoder, "hits", None)
        if hits is not None:
            self.metrics.watch_cache(
                lambda: int(getattr(self._encoder, "hits", 0)),
                lambda: int(getattr(self._encoder, "misses", 0)),
            )
        counts = router.stage_counts  # shared by every router built from this one
        self.metrics.watch_stages(lambda: (counts.static, counts.full))
        if self.on_version is None:
            await set_serving(self.health, [SERVICE_NAME], True)
        self.metrics.ready.set(1)
        info: IndexInfo = router.info
        log.info("index loaded", version=info.version, exemplars=info.exemplars, path=info.path)
        self.start_watch()
        return info

    def _swap(self, router: Router) -> None:
        self._router = router
        info = router.info
        self.metrics.set_index(info.version, info.exemplars)
        if self.on_version is not None:
            self.on_version(info.version)

    async def reload(self, path: Path | None = None) -> ReloadResult:
        """Load ``path`` (default: the served root, following ``current``), check it, swap it in.

        Never raises for a bad index: the result says why and the old index keeps serving.
        """
        target = path or self.index_path
        async with self._lock:
            old = self._router
            previous = old.info.version if old is not None else ""
            try:
                try:
                    if old is None:
                        new = await self._in_thread(self._build_router, target)
                    else:
                        new = await self._in_thread(self._with_index, old, target)
                except SemrouteError:
                    raise
                except Exception as exc:
                    # A version whose checksums match but whose content is broken (a manifest
                    # that is a list, a bad exemplars line, garbage FAISS data) fails in ways the
                    # loader did not foresee: still a refused reload, never an escape.
                    raise ReloadFailed(
                        f"{target}: cannot load this index ({type(exc).__name__}: "
                        f"{str(exc)[:300]})"
                    ) from exc
            except SemrouteError as exc:
                self.metrics.reloads.labels(result="error").inc()
                self.metrics.reload_failed.set(1)
                log.error("reload failed; previous index keeps serving", path=str(target),
                          error=str(exc), error_type=type(exc).__name__, serving=previous)
                return ReloadResult(False, False, f"{type(exc).__name__}: {exc}",
                                    old.info if old is not None else None, previous)
            self.metrics.reload_failed.set(0)
            changed = old is None or new.info.version != previous or new.info.path != old.info.path
            if changed:
                self._swap(new)
                await self._drop_promoted_candidate(new.info.version)
            self.metrics.reloads.labels(result="ok" if changed else "unchanged").inc()
        if old is None:
            if self.on_version is None:
                await set_serving(self.health, [SERVICE_NAME], True)
            self.metrics.ready.set(1)
        log.info("index reloaded" if changed else "index unchanged", version=new.info.version,
                 previous=previous, path=new.info.path)
        return ReloadResult(True, changed, "", new.info, previous)

    async def set_candidate(self, mode: Mode, path: Path | None, share: float) -> ArmState:
        """Load ``path`` (None: keep the candidate loaded) next to the serving index and use it
        as ``mode`` with A/B ``share``; mode off removes it. The candidate is checked in full
        (and must use the serving encoder) before it takes traffic; on any error the arms stay
        as they were and the error is raised (IndexNotFound, CorruptIndex, FingerprintMismatch,
        ReloadFailed; ConfigError when there is no candidate to keep)."""
        check_share(share)
        async with self._lock:
            serving = self.current()
            candidate = self.arms.state.candidate
            if mode == "off":
                candidate = None
            elif path is not None:
                try:
                    candidate = await self._in_thread(self._with_index, serving, path)
                except SemrouteError:
                    raise
                except Exception as exc:
                    raise ReloadFailed(f"{path}: cannot load this candidate index "
                                       f"({type(exc).__name__}: {str(exc)[:300]})") from exc
            elif candidate is None:
                raise ConfigError(
                    f"path: no candidate is loaded, so mode {mode!r} needs the candidate's path"
                )
            state = ArmState(mode, share if mode == "ab" else 0.0, candidate)
            await self._in_thread(self.arms.set, state)
        return state

    async def _drop_promoted_candidate(self, version: str) -> None:
        candidate = self.arms.state.candidate
        if candidate is not None and candidate.index.version == version:
            # The candidate was promoted: comparing the index with itself says nothing.
            log.info("candidate promoted; removed", version=version)
            await self._in_thread(self.arms.set, ArmState())

    def start_watch(self) -> None:
        """Poll ``DIR/current`` every ``router_server.watch_interval_s`` (0: no watch)."""
        interval = self.settings.router_server.watch_interval_s
        if interval > 0 and self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(interval))

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self._watch_once()
            except Exception as exc:
                # Whatever happens, the watch goes on: a later good build must still be seen.
                self.metrics.reloads.labels(result="error").inc()
                self.metrics.reload_failed.set(1)
                log.error("index watch failed; still watching", error=str(exc)[:300],
                          error_type=type(exc).__name__)

    async def _watch_once(self) -> None:
        link = self.index_path / "current"
        router = self._router
        if router is None or not link.exists():
            return
        target = link.resolve()
        if target == router.index.path.resolve() or target == self._failed_current:
            return
        log.info("index current changed", current=str(target))
        # Retry a failed version only when `current` moves again.
        self._failed_current = target
        result = await self.reload()
        if result.ok:
            self._failed_current = None

    async def close(self) -> None:
        """Stop the watch and the coalescer and release the worker threads."""
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        await self.coalescer.close()
        await self.arms.close()
        self.metrics.ready.set(0)
        await asyncio.to_thread(self._executor.shutdown, True)


# Tokens the encoder reads at most per text (MiniLM's window), and the estimate's divisor.
_MAX_TEXT_TOKENS = 256
_CHARS_PER_TOKEN = 4


def _query_tokens(query: Query) -> int:
    texts = (query.text, *query.history)
    return sum(min(_MAX_TEXT_TOKENS, len(t) // _CHARS_PER_TOKEN + 2) for t in texts)


def batch_slices(queries: list[Query], max_tokens: int, max_queries: int) -> list[list[Query]]:
    """``queries`` cut, in order, into slices of at most ``max_tokens`` estimated encoder tokens
    and ``max_queries`` queries (a query bigger than the budget alone is a slice of one)."""
    out: list[list[Query]] = []
    part: list[Query] = []
    used = 0
    for query in queries:
        cost = _query_tokens(query)
        if part and (used + cost > max_tokens or len(part) >= max_queries):
            out.append(part)
            part, used = [], 0
        part.append(query)
        used += cost
    if part:
        out.append(part)
    return out
