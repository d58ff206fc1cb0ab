"""What the decision log keeps: one row per routed request, and feedback on it.

The query's text is kept only when the operator turned text logging on (``log.log_query_text``);
otherwise its sha256 and length, enough to count repeats and spot drift without the content.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from semroute.errors import InvalidRequest

MAX_COMMENT_CHARS = 4096
MAX_ID_CHARS = 128


@dataclass(frozen=True)
class DecisionRecord:
    """One routed request. ``target`` answered (empty when none did); ``decided_target`` was the
    first choice; ``status``: ok, failed, interrupted, invalid or cancelled."""

    request_id: str
    ts: float
    route: str
    decided_target: str
    target: str
    confidence: float
    fallback: bool
    status: str
    tenant: str = ""
    index_version: str = ""
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float = 0.0
    query_sha256: str = ""
    query_chars: int = 0
    query_text: str | None = None
    shadow_route: str | None = None
    shadow_target: str | None = None
    explored: bool = False
    # P(the answering target was served first | the router's decision), from exploration
    # (semroute.explore); 1 when nothing could have been explored
    propensity: float = 1.0


@dataclass(frozen=True)
class ShadowRecord:
    """A shadow decision that differed from the served one, written by the router (which knows
    it only after the answer has left): join it to ``decisions`` on ``request_id``."""

    request_id: str
    ts: float
    serving_version: str
    candidate_version: str
    route: str
    target: str
    confidence: float
    fallback: bool
    shadow_route: str
    shadow_target: str
    shadow_confidence: float
    shadow_fallback: bool
    query_sha256: str = ""
    query_chars: int = 0
    query_text: str | None = None


@dataclass(frozen=True)
class Feedback:
    """A client's score in [0, 1] for the answer to ``request_id`` (``target``: which answer,
    when the client knows; defaults to the one that answered)."""

    request_id: str
    score: float
    ts: float
    target: str | None = None
    comment: str | None = None


def query_fields(text: str, *, keep_text: bool) -> dict[str, object]:
    """The record fields describing the query: its hash and length, and the text if kept."""
    return {
        "query_sha256": hashlib.sha256(text.encode("utf-8", "replace")).hexdigest(),
        "query_chars": len(text),
        "query_text": text if keep_text else None,
    }


def check_feedback(
    request_id: object, score: object, target: object = None, comment: object = None
) -> tuple[str, float, str | None, str | None]:
    """The feedback fields, checked; InvalidRequest names the field and the limit."""
    if not isinstance(request_id, str) or not request_id.strip():
        raise InvalidRequest("request_id", "required: the x-request-id of the answer")
    if len(request_id) > MAX_ID_CHARS:
        raise InvalidRequest("request_id", f"longer than {MAX_ID_CHARS} characters")
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise InvalidRequest("score", f"must be a number in [0, 1], got {type(score).__name__}")
    value = float(score)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidRequest("score", f"must be in [0, 1], got {value!r}")
    if target is not None and (not isinstance(target, str) or len(target) > MAX_ID_CHARS):
        raise InvalidRequest("target", f"must be a target name of at most {MAX_ID_CHARS} chars")
    if comment is not None and not isinstance(comment, str):
        raise InvalidRequest("comment", "must be a string")
    if comment is not None and len(comment) > MAX_COMMENT_CHARS:
        raise InvalidRequest(
            "comment", f"{len(comment)} characters is over the limit of {MAX_COMMENT_CHARS}"
        )
    return request_id.strip(), value, target or None, comment or None
