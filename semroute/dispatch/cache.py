"""The response cache's exact tier: a request seen before (same tenant, same normalised
conversation, same answer-changing parameters) gets the stored answer replayed.

What makes the key (``request_key``): the tenant; each message's role and content (Unicode NFC,
line endings unified, surrounding whitespace stripped); the model asked for (``auto`` or the
forced target) and every override (allowed targets, require_local, max_cost); the generation
parameters (max_tokens, temperature, top_p, stop, seed). Anything else (the request id) is left
out. The key is a sha256, so no query text reaches the store's key space.

What is never stored or served (``bypass_reason``): requests in which the PII guard found
personal data; sampled requests (temperature > 0) unless ``cache.sampled``. What is never
stored: failed or interrupted streams, answers cut short by anything but ``stop``/``length``,
answers over ``cache.max_answer_chars``.

A hit replays the stored chunks as they came from the backend, so a streaming client sees the
same shape of stream; its decision and done events say ``cache="hit"``, cost 0, and the cost
that was saved (the stored answer's cost) goes to the savings counters.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import asdict, dataclass

from semroute.config import CacheSettings
from semroute.dispatch.state import StateBackend
from semroute.types import ChatRequest

HIT, MISS, BYPASS = "hit", "miss", "bypass"
# Finish reasons of a complete answer (a backend that stopped for any other reason, such as a
# content filter, is not worth repeating).
COMPLETE = frozenset({"stop", "length"})
ENTRY_VERSION = 1


def _norm(text: str) -> str:
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n")).strip()


def request_key(req: ChatRequest) -> str:
    """The exact-tier key of ``req`` (hex sha256, scoped by ``req.tenant``)."""
    p, o = req.params, req.overrides
    shape = [
        ENTRY_VERSION,
        req.tenant,
        [[m.role, _norm(m.content)] for m in req.messages],
        o.force_target or "auto",
        sorted(o.allowed_targets),
        o.require_local,
        o.max_cost,
        p.max_tokens,
        p.temperature,
        p.top_p,
        list(p.stop),
        p.seed,
    ]
    raw = json.dumps(shape, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    """What a hit replays: the stream's chunks and what the original answer was."""

    chunks: tuple[str, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    counterfactual_cost_usd: float
    route: str
    target: str

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes) -> CachedAnswer | None:
        """The entry, or None when it is not one of ours (another version, corrupt)."""
        try:
            data = json.loads(raw)
            data["chunks"] = tuple(str(c) for c in data["chunks"])
            return cls(**data)
        except (ValueError, TypeError, KeyError):
            return None


class ResponseCache:
    """The exact tier over a ``StateBackend`` (in process or Redis)."""

    def __init__(self, settings: CacheSettings, state: StateBackend) -> None:
        self.settings = settings
        self.state = state

    @property
    def enabled(self) -> bool:
        return self.settings.exact

    def bypass_reason(self, req: ChatRequest, pii: bool) -> str | None:
        """Why ``req`` must neither be served from nor stored in the cache, or None."""
        if pii:
            return "personal data"
        temperature = req.params.temperature
        if temperature is not None and temperature > 0 and not self.settings.sampled:
            return "sampled (temperature > 0)"
        return None

    async def get(self, key: str) -> tuple[str, CachedAnswer | None]:
        """(``hit``/``miss``/``bypass``, entry): bypass when the store is unavailable."""
        available, raw = await self.state.cache_get(key)
        if not available:
            return BYPASS, None
        entry = CachedAnswer.from_bytes(raw) if raw is not None else None
        return (HIT, entry) if entry is not None else (MISS, None)

    def storable(self, answer: CachedAnswer) -> bool:
        return (
            answer.finish_reason in COMPLETE
            and bool(answer.chunks)
            and sum(len(c) for c in answer.chunks) <= self.settings.max_answer_chars
        )

    async def put(self, key: str, answer: CachedAnswer) -> bool:
        """Store a finished answer when it may be stored (see the module docstring)."""
        if not self.storable(answer):
            return False
        await self.state.cache_put(key, answer.to_bytes(), self.settings.ttl_s)
        return True
