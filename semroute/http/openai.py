"""OpenAI's HTTP shapes, as pure functions: request bodies in, response bodies and errors out.

Nothing here does I/O: ``parse_chat_body`` reads a decoded JSON body into a ``ChatRequest``
(checked by ``semroute.dispatch.validate``, the validator both doors share), ``error_body`` and
``error_status`` map any error to OpenAI's ``{"error": {...}}`` object and its HTTP status
(``semroute.errors.HTTP_STATUS``), and the rest shape chunks, headers and the ``usage`` and
``semroute`` objects. ``semroute.http.app`` serves them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from semroute.auth import TokenSet, parse_bearer
from semroute.dispatch.validate import (
    HTTP_FIELDS,
    ROLES,
    ChatLimits,
    echo,
    rename_field,
    validate_chat,
)
from semroute.errors import (
    ERROR_CLASSES,
    DispatchFailed,
    InsufficientQuota,
    InvalidRequest,
    ModelNotFound,
    SemrouteError,
    Unauthenticated,
    http_status_of,
)
from semroute.loop.records import check_feedback
from semroute.types import (
    ChatRequest,
    DecisionEvent,
    DoneEvent,
    GenerationParams,
    Message,
    RoutingOverrides,
)

AUTO_MODEL = "auto"
# Error messages and field names are cut here: however big the input, the error stays small.
MAX_MESSAGE_CHARS = 2048
MAX_PARAM_CHARS = 256
# OpenAI's error `type` per HTTP status; 5xx fall back to "server_error".
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


# ---- errors -------------------------------------------------------------------------------------


def _cause_class(exc: BaseException) -> type[BaseException]:
    """The class that decides status and code. A failed dispatch is judged by its last attempt
    that reached a backend, so "every target timed out" is a 504 and "every target said 429" a
    429, not a generic 503."""
    if isinstance(exc, DispatchFailed):
        kind = exc.cause_kind()
        if kind is not None:
            return ERROR_CLASSES.get(kind, type(exc))
    return type(exc)


def error_status(exc: BaseException) -> int:
    """HTTP status for an error (``semroute.errors.HTTP_STATUS``); for a failed dispatch the
    status of the last backend failure."""
    return http_status_of(_cause_class(exc))


def error_body(exc: BaseException, status: int | None = None) -> dict[str, Any]:
    """OpenAI's error object ``{"error": {"message", "type", "param", "code"}}`` for ``exc``."""
    status = error_status(exc) if status is None else status
    if isinstance(exc, InvalidRequest):
        exc = rename_field(exc, HTTP_FIELDS)
    param = exc.field if isinstance(exc, InvalidRequest) else None
    if isinstance(exc, ModelNotFound):
        code: str | None = "model_not_found"
    elif isinstance(exc, Unauthenticated):
        code = "invalid_api_key"
    elif isinstance(exc, SemrouteError):
        code = _snake(_cause_class(exc).__name__)
    else:
        code = "internal_error"
    message = str(exc) if isinstance(exc, SemrouteError) else "internal error (see server logs)"
    if len(message) > MAX_MESSAGE_CHARS:
        cut = len(message) - MAX_MESSAGE_CHARS
        message = f"{message[:MAX_MESSAGE_CHARS]}... ({cut} more characters)"
    kind = ERROR_TYPES.get(status, "server_error")
    if isinstance(exc, InsufficientQuota):
        kind = "insufficient_quota"  # OpenAI's own type for a spent quota
    return {
        "error": {
            "message": _safe_text(message),
            "type": kind,
            "param": None if param is None else _safe_text(param[:MAX_PARAM_CHARS]),
            "code": code,
        }
    }


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


# ---- request parsing ----------------------------------------------------------------------------


def parse_json_body(raw: bytes, max_depth: int = 64) -> Any:
    """The decoded JSON of a request body. Raises InvalidRequest (``body``) for bytes that are
    not UTF-8 JSON, nesting deeper than ``max_depth`` (checked before parsing, so a 100k-deep
    body cannot exhaust the stack) and integers too long to read (Python's 4300-digit cap)."""
    depth = _max_nesting(raw)
    if depth > max_depth:
        raise InvalidRequest(
            "body", f"JSON nested deeper than {max_depth} levels (limits.max_json_depth)"
        )
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest("body", f"not valid JSON: {_safe_text(str(exc))[:200]}") from None
    except (ValueError, RecursionError) as exc:  # a number over the digit limit, ...
        raise InvalidRequest("body", f"JSON that cannot be read: {_safe_text(str(exc))[:200]}") \
            from None


def _max_nesting(raw: bytes) -> int:
    """The deepest ``[``/``{`` nesting outside strings (a cheap scan, no parsing)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _safe_text(text: str) -> str:
    """``text`` with lone surrogates escaped, so it can always be encoded as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class ParsedChat:
    """A validated ``/v1/chat/completions`` body."""

    request: ChatRequest
    model: str
    stream: bool
    include_usage: bool


def parse_chat_body(
    body: Any, targets: Sequence[str], request_id: str = "", limits: ChatLimits | None = None
) -> ParsedChat:
    """Read and validate an OpenAI chat body: its JSON shape here, its meaning with the same
    ``validate_chat`` the gRPC door uses. Raises InvalidRequest naming the JSON field (``param``)
    or ModelNotFound for an unknown ``model``. Unknown extra fields are ignored, as
    OpenAI-compatible servers do; fields whose meaning we cannot honour (``n`` > 1, ``tools``)
    are refused."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model", f"required: {AUTO_MODEL!r} or one of {list(targets)}")
    if model != AUTO_MODEL and model not in targets:
        raise ModelNotFound(
            "model",
            f"the model {echo(model)} does not exist here; use {AUTO_MODEL!r} to let semroute "
            f"route, or one of {list(targets)}",
        )
    messages = _messages(body.get("messages"))
    stream = _optional(body, "stream", bool) or False
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise InvalidRequest("stream_options", "must be an object")
        include_usage = _optional(stream_options, "include_usage", bool, "stream_options.") or False
    n = _optional(body, "n", int)
    if n is not None and n != 1:
        raise InvalidRequest("n", f"only n=1 is supported, got {echo(n)}")
    for unsupported in ("tools", "functions"):
        if body.get(unsupported):
            raise InvalidRequest(unsupported, "tool calling is not supported by semroute")
    max_tokens = _optional(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _optional(body, "max_tokens", int)
    temperature = _number(body, "temperature")
    top_p = _number(body, "top_p")
    seed = _optional(body, "seed", int)
    params = GenerationParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=_stop(body.get("stop")),
        seed=seed,
    )
    overrides = _overrides(body.get("semroute"), None if model == AUTO_MODEL else model, targets)
    request = ChatRequest(messages, params, overrides, request_id)
    try:
        request = validate_chat(request, targets, limits or ChatLimits())
    except InvalidRequest as exc:
        raise rename_field(exc, HTTP_FIELDS) from None
    return ParsedChat(request, model, stream, include_usage)


def _optional(obj: dict[str, Any], key: str, kind: type, prefix: str = "") -> Any:
    value = obj.get(key)
    if value is None:
        return None
    # bool is an int in Python; JSON true is not a number.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(f"{prefix}{key}", f"must be {kind.__name__}, got {echo(value)}")
    return value


def _number(obj: dict[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidRequest(key, f"must be a number, got {echo(value)}")
    try:
        return float(value)
    except OverflowError:
        raise InvalidRequest(key, "must be a number within float range") from None


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequest("stop", "must be a non-empty string or a list of them")
    return tuple(stops)


def _messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("messages", "required: a non-empty list of {role, content}")
    out: list[Message] = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(where, "must be an object with role and content")
        role = item.get("role")
        if not isinstance(role, str):
            raise InvalidRequest(
                f"{where}.role", f"must be one of {', '.join(ROLES)}, got {echo(role)}"
            )
        out.append(Message(role, _content(item.get("content"), f"{where}.content", role)))
    return tuple(out)


def _content(value: Any, where: str, role: str) -> str:
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":
        return ""
    if isinstance(value, list):
        parts: list[str] = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequest(f"{where}[{j}]", "only parts of type 'text' are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"{where}[{j}].text", "must be a string")
            parts.append(text)
        return "\n".join(parts)
    raise InvalidRequest(where, "must be a string or a list of text parts")


def _overrides(value: Any, force_target: str | None, targets: Sequence[str]) -> RoutingOverrides:
    """The optional ``semroute`` extension object (``extra_body={"semroute": {...}}`` in the SDK):
    ``allowed_targets``, ``require_local``, ``max_cost`` (USD per 1M tokens, blended)."""
    if value is None:
        return RoutingOverrides(force_target=force_target)
    if not isinstance(value, dict):
        raise InvalidRequest("semroute", "must be an object")
    unknown = sorted(set(value) - {"allowed_targets", "require_local", "max_cost"})
    if unknown:
        raise InvalidRequest(
            f"semroute.{echo(unknown[0])[1:-1]}",
            "unknown field (allowed_targets, require_local, max_cost)",
        )
    allowed = value.get("allowed_targets") or []
    if not isinstance(allowed, list) or not all(isinstance(t, str) for t in allowed):
        raise InvalidRequest("semroute.allowed_targets", "must be a list of target names")
    require_local = _optional(value, "require_local", bool, "semroute.") or False
    max_cost = value.get("max_cost")
    if max_cost is not None and (not isinstance(max_cost, int | float) or isinstance(max_cost, bool)):
        raise InvalidRequest("semroute.max_cost", f"must be a number >= 0, got {echo(max_cost)}")
    if isinstance(max_cost, int) and max_cost.bit_length() > 1023:
        raise InvalidRequest("semroute.max_cost", "must be a number within float range")
    return RoutingOverrides(
        force_target=force_target,
        allowed_targets=tuple(allowed),
        require_local=require_local,
        max_cost=None if max_cost is None else float(max_cost),
    )


# ---- auth ---------------------------------------------------------------------------------------


def check_bearer(header: str | None, tokens: TokenSet) -> str:
    """Raise Unauthenticated unless auth is off or ``header`` is ``Bearer <known token>``;
    returns the token's tenant ("" when auth is off). The token set is the gRPC door's
    (``semroute.auth.TokenSet``): sha256 digests compared in constant time against every
    configured token, user or admin."""
    if not tokens.enabled:
        return ""
    presented = parse_bearer(header)
    if presented is None:
        raise Unauthenticated("missing bearer token: send the header Authorization: Bearer <token>")
    tenant = tokens.tenant(presented)
    if tenant is None:
        raise Unauthenticated("invalid bearer token")
    return tenant


# ---- response shapes ----------------------------------------------------------------------------


def decision_headers(decision: DecisionEvent, request_id: str) -> dict[str, str]:
    """The routing decision as response headers (ASCII only; names are ours)."""
    return {
        "x-request-id": request_id,
        "x-semroute-route": _ascii(decision.route),
        "x-semroute-target": _ascii(decision.target),
        "x-semroute-confidence": f"{decision.confidence:.4f}",
        "x-semroute-fallback": "true" if decision.fallback else "false",
        **({"x-semroute-cache": decision.cache} if decision.cache else {}),
    }


def _ascii(value: str) -> str:
    return value.encode("ascii", "replace").decode()


def semroute_field(decision: DecisionEvent, done: DoneEvent) -> dict[str, Any]:
    """The extra ``semroute`` object: the decision and what actually happened. ``target`` is the
    target that answered (after any failover); ``decided_target`` the router's first choice."""
    return {
        "route": decision.route,
        "target": done.target,
        "decided_target": decision.target,
        "confidence": round(decision.confidence, 6),
        "fallback": decision.fallback,
        "reason": decision.reason,
        "chain": list(decision.chain),
        "attempts": done.attempts,
        "cost_usd": done.cost_usd,
        "counterfactual_cost_usd": done.counterfactual_cost_usd,
        "cache": done.cache,
        "ttft_s": round(done.ttft_s, 6),
    }


def usage_field(done: DoneEvent) -> dict[str, Any]:
    """OpenAI's ``usage`` plus ``cost_usd``."""
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "cost_usd": done.cost_usd,
        "counterfactual_cost_usd": done.counterfactual_cost_usd,
    }


def sse(data: dict[str, Any] | str) -> bytes:
    """One SSE event (``data: ...`` and the blank line)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def parse_feedback_body(body: Any) -> tuple[str, float, str | None, str | None]:
    """``POST /v1/feedback``: ``request_id`` (the x-request-id of an answer), ``score`` in
    [0, 1], optional ``target`` and ``comment``. Raises InvalidRequest naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object with request_id and score")
    unknown = sorted(set(body) - {"request_id", "score", "target", "comment"})
    if unknown:
        raise InvalidRequest(unknown[0][:64], "unknown field (request_id, score, target, comment)")
    return check_feedback(
        body.get("request_id"), body.get("score"), body.get("target"), body.get("comment")
    )
