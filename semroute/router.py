"""The in-process router: encoder + index + decision.

``Router.route()`` and ``route_batch()`` are synchronous and thread-safe; services run them off
the event loop. A batch is embedded in one encoder call (queries and their history turns
together), searched in one FAISS call, then decided per query.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from semroute.config import DecisionSettings, LimitSettings, Settings
from semroute.decision import (
    DecisionParams,
    decide_labelled,
    decide_outcomes,
    explain_neighbours,
)
from semroute.encoder import CachedEncoder, OnnxEncoder
from semroute.errors import FingerprintMismatch, InvalidRequest, UnknownTarget
from semroute.index import ExemplarIndex
from semroute.static_encoder import StaticEncoder
from semroute.two_stage import StageCounts, merge_stages, open_static_stage
from semroute.types import Decision, Encoder, ExemplarKind, IndexInfo, Policy, Query, Vectors


def effective_decision(
    settings: DecisionSettings, tuned: Mapping[str, float | int | bool]
) -> DecisionSettings:
    """``settings`` with the index's tuned values for every field not set explicitly."""
    fields = DecisionSettings.model_fields
    update = {
        name: value
        for name, value in tuned.items()
        if name in fields and name not in settings.model_fields_set
    }
    return settings.model_copy(update=update) if update else settings


@dataclass(frozen=True)
class Timings:
    encode_s: float
    search_s: float
    decide_s: float

    @property
    def total_s(self) -> float:
        return self.encode_s + self.search_s + self.decide_s


class Router:
    """Routes queries against one loaded index. Swap indexes with ``with_index``."""

    def __init__(
        self,
        encoder: Encoder,
        index: ExemplarIndex,
        settings: Settings | None = None,
        *,
        static_model: StaticEncoder | None = None,
        stage_counts: StageCounts | None = None,
    ) -> None:
        """``static_model``: the two-stage encoder's static model (default: the one the index
        records); used only with ``settings.encoder.two_stage``. ``stage_counts`` is shared
        with the routers ``with_index`` makes, so the counts survive index swaps."""
        settings = settings or Settings()
        if encoder.fingerprint != index.encoder_fingerprint:
            raise FingerprintMismatch(
                f"{index.path}: index was built with encoder {index.encoder_fingerprint[:19]}… "
                f"but the loaded encoder is {encoder.fingerprint[:19]}…; rebuild the index "
                f"with this encoder or load the one it was built with"
            )
        self.encoder = encoder
        self.index = index
        self.settings = settings
        self._decision: DecisionSettings = effective_decision(
            settings.decision, index.manifest.decision
        )
        self._limits: LimitSettings = settings.limits
        self.stage_counts = stage_counts if stage_counts is not None else StageCounts()
        self._params = DecisionParams(
            temperature=self._decision.temperature,
            null_similarity=self._decision.null_similarity,
            shrinkage=self._decision.shrinkage,
            cost_weight=self._decision.cost_weight,
            local_k=self._decision.local_k,
            local_shrinkage=self._decision.local_shrinkage,
            use_neighbours=bool(index.manifest.decision.get("use_neighbours", True)),
            abstain=index.manifest.abstain,
            k=self._decision.k,
            feedback_shrinkage=self._decision.feedback_shrinkage,
            feedback_temperature=self._decision.feedback_temperature,
        )
        # The static stage estimates this decision's confidence where a threshold applies.
        self._static_stage = (
            open_static_stage(encoder.fingerprint, index, settings, static_model,
                              params=self._params, density=index.density)
            if settings.encoder.two_stage and index.kind is ExemplarKind.LABELLED else None
        )

    @property
    def decision_settings(self) -> DecisionSettings:
        """The decision settings in force: the index's tuned values, except those the caller
        set explicitly (flags, environment, config file)."""
        return self._decision

    @classmethod
    def load(
        cls,
        index_path: Path,
        settings: Settings | None = None,
        encoder_path: Path | None = None,
        *,
        mmap: bool = False,
    ) -> Router:
        """Load the encoder and index (``index_path`` = ROOT or a version directory).

        The encoder is ``encoder_path``, else the one recorded in the index manifest if it still
        exists, else ``settings.encoder.path``. A fingerprint mismatch is refused. ``mmap``:
        the index vectors are mapped from the file (``ExemplarIndex.load``).
        """
        settings = settings or Settings()
        index = ExemplarIndex.load(index_path, mmap=mmap)
        if encoder_path is None:
            recorded = index.manifest.encoder.path
            encoder_path = Path(recorded) if recorded and Path(recorded).exists() else None
        encoder_path = encoder_path or settings.encoder.path
        inner = OnnxEncoder.from_settings(encoder_path, settings.encoder)
        encoder = CachedEncoder(inner, settings.encoder.cache_size)
        return cls(encoder, index, settings)

    def with_index(self, index: ExemplarIndex) -> Router:
        """The same encoder over another index (refused when the fingerprints differ)."""
        return Router(self.encoder, index, self.settings, stage_counts=self.stage_counts,
                      static_model=self._static_stage.model if self._static_stage else None)

    @property
    def info(self) -> IndexInfo:
        return self.index.info

    def validate(self, query: Query) -> None:
        """Raise InvalidRequest naming the (proto) field and the limit for a bad query."""
        limit = self._limits.max_query_chars
        if not query.text.strip():
            raise InvalidRequest("query", "must not be empty or blank")
        if len(query.text) > limit:
            raise InvalidRequest(
                "query", f"{len(query.text)} characters is over the limit of {limit}"
            )
        if len(query.history) > self._limits.max_history_turns:
            raise InvalidRequest(
                "history",
                f"{len(query.history)} turns is over the limit of {self._limits.max_history_turns}",
            )
        for i, turn in enumerate(query.history):
            if len(turn) > limit:
                raise InvalidRequest(
                    f"history[{i}]", f"{len(turn)} characters is over the limit of {limit}"
                )
        policy = query.policy
        known = self.index.route_table.targets
        for i, name in enumerate(policy.allowed_targets):
            if name not in known:
                raise UnknownTarget(
                    f"policy.allowed_targets[{i}]",
                    f"unknown target {name!r}; known targets: {sorted(known)}",
                )
        if policy.max_cost is not None and not policy.max_cost >= 0:
            raise InvalidRequest("policy.max_cost", f"must be >= 0, got {policy.max_cost}")
        if not 0 <= policy.quality_tolerance <= 1:
            raise InvalidRequest(
                "policy.quality_tolerance", f"must be in 0..1, got {policy.quality_tolerance}"
            )

    def route(
        self,
        text: str,
        *,
        history: Sequence[str] = (),
        policy: Policy = Policy(),
        explain: bool = False,
    ) -> Decision:
        """Route one query. Raises InvalidRequest for bad input, NoTargetAvailable when the
        policy excludes every target."""
        return self.route_batch([Query(text, tuple(history), policy, explain)])[0]

    def route_batch(self, queries: Sequence[Query]) -> list[Decision]:
        """Route many queries with one encoder call; results are in input order."""
        return self.route_batch_timed(queries)[0]

    def route_batch_timed(
        self, queries: Sequence[Query], *, two_stage: bool = True
    ) -> tuple[list[Decision], Timings]:
        """``route_batch`` with the time of each part. With the two-stage encoder on (and
        ``two_stage``), the static stage's time counts as encoding."""
        for q in queries:
            self.validate(q)
        if not queries:
            return [], Timings(0.0, 0.0, 0.0)
        if two_stage and self._static_stage is not None:
            return self._route_two_stage(queries)
        if two_stage:
            self.stage_counts.add(0, len(queries))
        t0 = time.perf_counter()
        vectors = self.embed(queries)
        t1 = time.perf_counter()
        if self.index.kind is ExemplarKind.OUTCOMES:
            # Rows learnt from feedback miss most scores: the search widens until each target
            # has k neighbours that observed it (plain top-k on a fully scored index).
            sims, ids = self.index.search_observed(vectors, self._decision.k)
        else:
            sims, ids = self.index.search(vectors, self._decision.k)
        t2 = time.perf_counter()
        decisions = [self._decide(q, sims[i], ids[i]) for i, q in enumerate(queries)]
        t3 = time.perf_counter()
        return decisions, Timings(t1 - t0, t2 - t1, t3 - t2)

    def _route_two_stage(self, queries: Sequence[Query]) -> tuple[list[Decision], Timings]:
        assert self._static_stage is not None
        t0 = time.perf_counter()
        static = self._static_stage.decide(queries, self.index.version)
        static_s = time.perf_counter() - t0
        rest = [q for q, d in zip(queries, static, strict=True) if d is None]
        full, timings = self.route_batch_timed(rest, two_stage=False)
        self.stage_counts.add(len(queries) - len(rest), len(rest))
        decisions = merge_stages(static, full, self.index.version)
        return decisions, Timings(timings.encode_s + static_s, timings.search_s, timings.decide_s)

    @property
    def two_stage(self) -> bool:
        """True when the static stage is on for this index (settings and index allow it)."""
        return self._static_stage is not None

    def embed(self, queries: Sequence[Query]) -> Vectors:
        """Query vectors; earlier turns are blended in with geometrically decaying weights."""
        turns = self._decision.history_turns
        texts: list[str] = []
        for q in queries:
            texts.append(q.text)
            texts.extend(q.history[-turns:] if turns else ())
        unique = list(dict.fromkeys(texts))
        position = {t: i for i, t in enumerate(unique)}
        embedded = self.encoder.encode(unique)
        out = np.empty((len(queries), embedded.shape[1]), dtype=np.float32)
        first, decay = self._decision.history_weight, self._decision.history_decay
        for i, q in enumerate(queries):
            vec = embedded[position[q.text]].copy()
            recent = list(reversed(q.history[-turns:])) if turns else []
            # A follow-up like "make it shorter" says little by itself: the turn before it
            # weighs as much as the query (measured on the default routes), older ones less.
            for j, turn in enumerate(recent):
                vec += first * (decay**j) * embedded[position[turn]]
            norm = float(np.linalg.norm(vec))
            out[i] = vec / norm if norm > 0 else vec
        return out

    def _decide(self, query: Query, sims: np.ndarray, ids: np.ndarray) -> Decision:
        index = self.index
        if index.kind is ExemplarKind.LABELLED:
            decision = decide_labelled(
                sims,
                ids,
                index.labels,
                index.weights,
                index.route_table,
                query.policy,
                self._params,
                index.density,
            )
        else:
            decision = decide_outcomes(
                sims,
                ids,
                index.scores,
                index.score_targets,
                index.weights,
                index.target_means,
                index.route_table,
                query.policy,
                self._params,
            )
        neighbours = (
            explain_neighbours(sims, ids, index.texts, index.labels, self._decision.max_explain)
            if query.explain
            else ()
        )
        return replace(decision, neighbors=neighbours, index_version=index.version)
