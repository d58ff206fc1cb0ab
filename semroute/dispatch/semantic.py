"""The response cache's semantic tier: a single-turn question whose embedding is close enough
to one answered before (same tenant, same route, same system prompt and parameters) gets that
answer.

The embedding is the router's own embedding of the question, not a second one. A router in
another process returns it in its Route reply when asked (``RouteResponse.query_embedding``):
the dispatcher asks through a ``RouteCall`` bound around the router call (a context variable,
so it passes through wrappers such as ``GuardedRouter``, like the request id), and the router
client fills ``RouteCall.embedding``. A router that can hand it over another way implements
``QueryEmbedder`` (``InProcessRouter`` does, reading the router's embedding cache). Each is a
``QueryVector`` tagged with its encoder's fingerprint, and vectors of different fingerprints
are never compared: a router restarted or rolled out with another encoder (or A/B arms with
different encoders) cannot produce a false hit. The index here holds, per encoder and scope,
the embeddings of answered questions and the exact-tier keys of their answers; the answers
themselves stay in the state backend (in process or Redis), so a vector whose answer expired
or was evicted is dropped when found. With Redis the vectors are this replica's own (each
replica learns from the misses it served); the answers are shared.

Eligible: one user message (system messages allowed, no assistant turns), routed by the router
(not a rule or a forced target: then no embedding was made), not bypassed (personal data,
sampling). The threshold is ``cache.semantic_threshold`` or the route's own in
``cache.semantic_route_thresholds``; docs/CACHE.md measures the false hits per threshold.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from semroute.config import CacheSettings
from semroute.types import ChatRequest

MAX_PER_SCOPE = 1024


class QueryVector(np.ndarray[Any, np.dtype[np.float32]]):
    """A query embedding that says which encoder made it (``fingerprint``; "" unknown)."""

    fingerprint: str = ""

    def __array_finalize__(self, obj: Any) -> None:
        self.fingerprint = str(getattr(obj, "fingerprint", ""))


def query_vector(values: Any, fingerprint: str) -> QueryVector:
    """``values`` as a flat float32 ``QueryVector`` made by the encoder ``fingerprint``."""
    out = np.array(values, dtype=np.float32).reshape(-1).view(QueryVector)
    out.fingerprint = fingerprint
    return out


def fingerprint_of(vector: np.ndarray) -> str:
    """The encoder fingerprint a vector carries ("" for a plain array)."""
    return str(getattr(vector, "fingerprint", ""))


@dataclass
class RouteCall:
    """What the dispatcher and its router exchange around one routing call beyond the
    ``RouterLike`` signature. In: the A/B key (router.proto ``ab_key``) and whether the query
    embedding is wanted; out: the embedding, when the router returned one."""

    ab_key: str = ""
    want_embedding: bool = False
    embedding: QueryVector | None = None


_ROUTE_CALL: ContextVar[RouteCall | None] = ContextVar("semroute_route_call", default=None)


def current_route_call() -> RouteCall | None:
    """The ``RouteCall`` bound around the routing call running now (None outside one)."""
    return _ROUTE_CALL.get()


@contextmanager
def route_call(call: RouteCall) -> Iterator[RouteCall]:
    """Bind ``call`` for the duration of one routing call (never across a yield to a client)."""
    token = _ROUTE_CALL.set(call)
    try:
        yield call
    finally:
        _ROUTE_CALL.reset(token)


@runtime_checkable
class QueryEmbedder(Protocol):
    async def query_embedding(self, text: str) -> np.ndarray | None:
        """The L2-normalised embedding the router made of ``text`` (None: not available); a
        ``QueryVector`` when the encoder's fingerprint is known."""
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
    """Embeddings of answered questions by encoder fingerprint and scope (a vector is only
    compared with vectors of its own fingerprint), bounded: at most ``MAX_PER_SCOPE`` per scope
    (oldest dropped) and ``max_entries`` in all (least recently used scope dropped)."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        # (encoder fingerprint, scope) -> (vectors, their exact-tier keys)
        self._scopes: OrderedDict[tuple[str, str], tuple[np.ndarray, list[str]]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def threshold(self, route: str) -> float:
        return self.settings.semantic_route_thresholds.get(route, self.settings.semantic_threshold)

    def search(self, scope: str, vector: np.ndarray, route: str) -> tuple[str, float] | None:
        """(exact-tier key, similarity) of the closest stored question at or above the route's
        threshold, or None."""
        where = (fingerprint_of(vector), scope)
        found = self._scopes.get(where)
        if found is None or not found[1] or found[0].shape[1] != vector.size:
            return None
        self._scopes.move_to_end(where)
        matrix, keys = found
        sims = matrix @ np.asarray(vector, dtype=np.float32).reshape(-1)
        best = int(np.argmax(sims))
        similarity = float(sims[best])
        return (keys[best], similarity) if similarity >= self.threshold(route) else None

    def add(self, scope: str, vector: np.ndarray, key: str) -> None:
        where = (fingerprint_of(vector), scope)
        row = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        empty: tuple[np.ndarray, list[str]] = (np.empty((0, row.shape[1]), np.float32), [])
        matrix, keys = self._scopes.pop(where, empty)
        if matrix.shape[1] != row.shape[1]:  # unknown encoder ("") changed: start again
            self._count -= len(keys)
            matrix, keys = empty
        if key in keys:
            self._scopes[where] = (matrix, keys)
            return
        matrix, keys = np.vstack([matrix, row]), [*keys, key]
        self._count += 1
        if len(keys) > MAX_PER_SCOPE:
            matrix, keys = matrix[1:], keys[1:]
            self._count -= 1
        self._scopes[where] = (matrix, keys)
        while self._count > self.settings.max_entries and len(self._scopes) > 1:
            _, (_, dropped) = self._scopes.popitem(last=False)
            self._count -= len(dropped)

    def drop(self, scope: str, key: str) -> None:
        """Forget a vector whose answer is gone from the store (under every encoder)."""
        for where in [w for w in self._scopes if w[1] == scope]:
            matrix, keys = self._scopes[where]
            if key not in keys:
                continue
            i = keys.index(key)
            self._count -= 1
            if len(keys) == 1:
                del self._scopes[where]
            else:
                self._scopes[where] = (np.delete(matrix, i, axis=0), keys[:i] + keys[i + 1 :])
