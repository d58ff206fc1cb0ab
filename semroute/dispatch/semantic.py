"""The response cache's semantic tier: a single-turn question whose embedding is close enough
to one answered before (same tenant, same route, same system prompt and parameters) gets that
answer.

The embedding is the router's own embedding of the question, not a second one: a router that
can hand it over implements ``QueryEmbedder`` (``InProcessRouter`` does, reading the router's
embedding cache). The index here holds, per scope, the embeddings of answered questions and
the exact-tier keys of their answers; the answers themselves stay in the state backend (in
process or Redis), so a vector whose answer expired or was evicted is dropped when found.
With Redis the vectors are this replica's own (each replica learns from the misses it
served); the answers are shared.

Eligible: one user message (system messages allowed, no assistant turns), routed by the router
(not a rule or a forced target: then no embedding was made), not bypassed (personal data,
sampling). The threshold is ``cache.semantic_threshold`` or the route's own in
``cache.semantic_route_thresholds``; docs/CACHE.md measures the false hits per threshold.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Protocol, runtime_checkable

import numpy as np

from semroute.config import CacheSettings
from semroute.types import ChatRequest

MAX_PER_SCOPE = 1024


@runtime_checkable
class QueryEmbedder(Protocol):
    async def query_embedding(self, text: str) -> np.ndarray | None:
        """The L2-normalised embedding the router made of ``text`` (None: not available)."""
        ...


def eligible(req: ChatRequest) -> bool:
    roles = [m.role for m in req.messages]
    return roles.count("user") == 1 and all(r in ("system", "user") for r in roles)


def scope_of(req: ChatRequest, route: str) -> str:
    """What two questions must share to share an answer: tenant, route, system messages,
    overrides and generation parameters."""
    p, o = req.params, req.overrides
    shape = [
        req.tenant, route,
        [m.content.strip() for m in req.messages if m.role == "system"],
        o.force_target or "auto", sorted(o.allowed_targets), o.require_local, o.max_cost,
        p.max_tokens, p.temperature, p.top_p, list(p.stop), p.seed,
    ]
    raw = json.dumps(shape, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


class SemanticIndex:
    """Embeddings of answered questions by scope, bounded: at most ``MAX_PER_SCOPE`` per scope
    (oldest dropped) and ``max_entries`` in all (least recently used scope dropped)."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self._scopes: OrderedDict[str, tuple[np.ndarray, list[str]]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def threshold(self, route: str) -> float:
        return self.settings.semantic_route_thresholds.get(route, self.settings.semantic_threshold)

    def search(self, scope: str, vector: np.ndarray, route: str) -> tuple[str, float] | None:
        """(exact-tier key, similarity) of the closest stored question at or above the route's
        threshold, or None."""
        found = self._scopes.get(scope)
        if found is None or not found[1]:
            return None
        self._scopes.move_to_end(scope)
        matrix, keys = found
        sims = matrix @ vector.astype(np.float32)
        best = int(np.argmax(sims))
        similarity = float(sims[best])
        return (keys[best], similarity) if similarity >= self.threshold(route) else None

    def add(self, scope: str, vector: np.ndarray, key: str) -> None:
        row = vector.astype(np.float32).reshape(1, -1)
        matrix, keys = self._scopes.pop(scope, (np.empty((0, row.shape[1]), np.float32), []))
        if key in keys:
            self._scopes[scope] = (matrix, keys)
            return
        matrix, keys = np.vstack([matrix, row]), [*keys, key]
        self._count += 1
        if len(keys) > MAX_PER_SCOPE:
            matrix, keys = matrix[1:], keys[1:]
            self._count -= 1
        self._scopes[scope] = (matrix, keys)
        while self._count > self.settings.max_entries and len(self._scopes) > 1:
            _, (_, dropped) = self._scopes.popitem(last=False)
            self._count -= len(dropped)

    def drop(self, scope: str, key: str) -> None:
        """Forget a vector whose answer is gone from the store."""
        found = self._scopes.get(scope)
        if found is None or key not in found[1]:
            return
        matrix, keys = found
        i = keys.index(key)
        self._count -= 1
        if len(keys) == 1:
            del self._scopes[scope]
        else:
            self._scopes[scope] = (np.delete(matrix, i, axis=0), keys[:i] + keys[i + 1 :])
