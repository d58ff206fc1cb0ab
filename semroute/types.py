"""Records and interfaces shared across semroute. All records are frozen dataclasses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]

# Labelled exemplars with this label are out-of-scope examples, not a route: when they win a
# query's vote the router falls back to the default route (``semroute.decision``). The same
# label marks out-of-scope rows in validation and test files (``calibrate``, ``eval labels``).
OUT_OF_SCOPE = "oos"


class ExemplarKind(StrEnum):
    """Labelled exemplars carry a route label; outcome exemplars carry a score per target."""

    LABELLED = "labelled"
    OUTCOMES = "outcomes"


@dataclass(frozen=True)
class Exemplar:
    """One exemplar query. ``label`` for labelled sets; ``scores`` (target -> 0..1, None = unknown)
    for outcome sets. ``source`` is ``file:line`` so every problem can be traced back."""

    text: str
    label: str = ""
    weight: float = 1.0
    scores: Mapping[str, float | None] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class Target:
    """A model that can answer. Prices are USD per 1M tokens."""

    name: str
    input_cost: float = 0.0
    output_cost: float = 0.0
    local: bool = False

    @property
    def cost(self) -> float:
        """Blended price (mean of input and output, USD per 1M tokens) used for cost policy."""
        return (self.input_cost + self.output_cost) / 2.0


@dataclass(frozen=True)
class Route:
    """A route: ordered targets (primary first, then fallbacks) and an optional threshold."""

    name: str
    targets: tuple[str, ...]
    threshold: float | None = None
    description: str = ""


@dataclass(frozen=True)
class RouteTable:
    """Routes, targets, the default route for low confidence, and the global threshold."""

    routes: Mapping[str, Route]
    targets: Mapping[str, Target]
    default_route: str | None = None
    threshold: float | None = None

    def threshold_for(self, route: str) -> float | None:
        r = self.routes.get(route)
        if r is not None and r.threshold is not None:
            return r.threshold
        return self.threshold


@dataclass(frozen=True)
class Policy:
    """Per-request constraints on the target.

    ``max_cost`` is USD per 1M tokens (blended, see ``Target.cost``). ``quality_tolerance``: among
    targets whose score is within this of the best, the cheapest wins.
    """

    allowed_targets: tuple[str, ...] = ()
    require_local: bool = False
    max_cost: float | None = None
    quality_tolerance: float = 0.0


@dataclass(frozen=True)
class Query:
    """One routing request: the text, earlier turns (oldest first), policy, explain flag."""

    text: str
    history: tuple[str, ...] = ()
    policy: Policy = Policy()
    explain: bool = False


@dataclass(frozen=True)
class Neighbor:
    """A matched exemplar: its row id, text, label (route, or "" for outcome sets), similarity."""

    id: int
    text: str
    label: str
    similarity: float


@dataclass(frozen=True)
class Decision:
    """What the router decided and why.

    ``targets`` is the ordered fallback chain after policy (``targets[0] == target``).
    ``scores`` holds the vote share per route (labelled) or predicted quality per target
    (outcomes). ``neighbors`` is filled only when explain was requested.
    """

    route: str
    target: str
    confidence: float
    fallback: bool
    reason: str
    scores: Mapping[str, float]
    targets: tuple[str, ...]
    neighbors: tuple[Neighbor, ...] = ()
    index_version: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "route": self.route,
            "target": self.target,
            "confidence": round(self.confidence, 6),
            "fallback": self.fallback,
            "reason": self.reason,
            "targets": list(self.targets),
            "scores": {k: round(v, 6) for k, v in self.scores.items()},
            "neighbors": [
                {"id": n.id, "text": n.text, "label": n.label, "similarity": round(n.similarity, 6)}
                for n in self.neighbors
            ],
            "index_version": self.index_version,
        }


@dataclass(frozen=True)
class IndexInfo:
    """What an operator needs to know about the loaded index."""

    version: str
    path: str
    kind: ExemplarKind
    exemplars: int
    dimension: int
    routes: tuple[str, ...]
    targets: tuple[str, ...]
    encoder_fingerprint: str
    faiss_factory: str
    built_at: str


class Encoder(Protocol):
    """Turns texts into L2-normalised float32 vectors of shape (n, dimension)."""

    @property
    def dimension(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    def encode(self, texts: Sequence[str]) -> Vectors: ...


# ---- dispatcher records -------------------------------------------------------------------------


class RouterLike(Protocol):
    """What the dispatcher needs from a router: ``semroute.grpc.router_client.RouterClient``
    fits, and so does ``semroute.dispatch.dispatcher.InProcessRouter`` around a ``Router``."""

    async def route(
        self,
        text: str,
        *,
        history: Sequence[str] = ...,
        policy: Policy = ...,
        explain: bool = False,
    ) -> Decision: ...


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class RoutingOverrides:
    """Per-request routing overrides. ``force_target`` skips the router entirely."""

    force_target: str | None = None
    allowed_targets: tuple[str, ...] = ()
    require_local: bool = False
    max_cost: float | None = None


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    params: GenerationParams = GenerationParams()
    overrides: RoutingOverrides = RoutingOverrides()
    request_id: str = ""
    # Who pays: the name of the bearer token the door authenticated (never from the body);
    # "" when auth is off. Scopes the response cache, budgets and rate limits.
    tenant: str = ""


@dataclass(frozen=True)
class DecisionEvent:
    """First event of every chat: where the request is going and why."""

    route: str
    target: str
    confidence: float
    reason: str
    fallback: bool
    chain: tuple[str, ...]  # targets to try, in order
    cache: str = ""  # "hit", "miss", "bypass"; "" when the response cache is off


@dataclass(frozen=True)
class DeltaEvent:
    text: str


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    target: str  # the target that actually answered
    attempts: int
    ttft_s: float
    cache: str = ""  # as DecisionEvent.cache
    # What the same tokens would have cost on the route's most expensive target (0: unknown).
    counterfactual_cost_usd: float = 0.0


ChatEvent = DecisionEvent | DeltaEvent | DoneEvent


# ---- the loop -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatSummary:
    """One finished chat, as the dispatcher hands it to a ``DecisionSink``. ``status``: ok,
    failed, interrupted, invalid or cancelled; ``target`` answered ("" when none did)."""

    request_id: str
    query: str
    route: str
    decided_target: str
    target: str
    confidence: float
    fallback: bool
    status: str
    tenant: str = ""
    index_version: str = ""
    cost_usd: float = 0.0
    latency_s: float = 0.0
    ttft_s: float = 0.0
    explored: bool = False  # served by exploration (semroute.explore), not the decided target
    propensity: float = 1.0  # P(decided_target first | the router's decision) under exploration


class DecisionSink(Protocol):
    """Where the dispatcher reports finished chats and feedback (``semroute.loop`` provides the
    decision log's). ``record`` must never block or raise; ``feedback`` raises NotFound for an
    unknown request id and InvalidRequest for a bad field."""

    def record(self, summary: ChatSummary) -> None: ...

    async def feedback(
        self, request_id: str, score: float, target: str | None, comment: str | None
    ) -> None: ...

    def close(self) -> None: ...
