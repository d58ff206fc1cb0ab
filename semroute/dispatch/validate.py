"""One validation of a chat request, used by both doors (gRPC ``Chat`` and the OpenAI door).

``validate_chat`` checks what a request means (roles, a user turn, numbers in range, stop
sequences, known targets, valid Unicode, sizes within ``ChatLimits``) and returns it normalised
(OpenAI's ``developer`` role is its newer name for ``system``). Errors are ``InvalidRequest``
naming the field as the gRPC contract spells it (``params.max_tokens``); a door whose clients
spell fields otherwise renames them with ``rename_field`` (the OpenAI door: ``max_tokens``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from semroute.config import LimitSettings
from semroute.errors import InvalidRequest, UnknownTarget
from semroute.logs import clean_request_id
from semroute.types import ChatRequest, Message

# ``tool`` messages need tool calling, which semroute does not carry through.
ROLES = ("system", "developer", "user", "assistant")
_ROLE_NAMES = {"developer": "system"}
# Values echoed in an error message are cut here, so a huge input never makes a huge reply.
ECHO_CHARS = 64

# gRPC field -> the OpenAI door's name for it (prefix match; the rest of the path is kept).
HTTP_FIELDS: Mapping[str, str] = {
    "params.max_tokens": "max_tokens",
    "params.temperature": "temperature",
    "params.top_p": "top_p",
    "params.stop": "stop",
    "params.seed": "seed",
    "overrides.force_target": "model",
    "overrides.allowed_targets": "semroute.allowed_targets",
    "overrides.require_local": "semroute.require_local",
    "overrides.max_cost": "semroute.max_cost",
    "overrides": "semroute",
}


@dataclass(frozen=True)
class ChatLimits:
    """Size limits of a chat request (``limits.*`` settings)."""

    max_messages: int = 256
    max_message_chars: int = 200_000
    max_stop: int = 4
    max_stop_chars: int = 256
    max_tokens: int = 131_072

    @classmethod
    def from_settings(cls, limits: LimitSettings) -> ChatLimits:
        return cls(
            max_messages=limits.max_messages,
            max_message_chars=limits.max_message_chars,
            max_stop=limits.max_stop,
            max_stop_chars=limits.max_stop_chars,
            max_tokens=limits.max_tokens,
        )


def echo(value: object) -> str:
    """``repr`` of a client's value for an error message, cut to ``ECHO_CHARS`` (says how much
    was cut), so errors stay small whatever was sent."""
    text = repr(value)
    if len(text) <= ECHO_CHARS:
        return text
    return f"{text[:ECHO_CHARS]}... ({len(text) - ECHO_CHARS} more characters)"


def check_text(value: str, field: str, *, limit: int | None = None) -> None:
    """Refuse text that cannot travel on: a lone UTF-16 surrogate (JSON ``"\\ud800"``), a NUL
    character, or more than ``limit`` characters."""
    if limit is not None and len(value) > limit:
        raise InvalidRequest(field, f"{len(value)} characters is over the limit of {limit}")
    if "\x00" in value:
        raise InvalidRequest(field, f"contains a NUL character at offset {value.index(chr(0))}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            field, f"invalid Unicode: a lone surrogate at offset {exc.start} (send valid UTF-8)"
        ) from None


def validate_chat(req: ChatRequest, targets: Sequence[str], limits: ChatLimits) -> ChatRequest:
    """``req`` checked and normalised; raises InvalidRequest / UnknownTarget naming the field."""
    messages = _messages(req, limits)
    _params(req, limits)
    _overrides(req, targets)
    # A client's id only labels logs: an unusable one (too long, not printable ASCII) is
    # replaced, never a reason to fail the chat.
    request_id = clean_request_id(req.request_id) if req.request_id else ""
    return replace(req, messages=messages, request_id=request_id)


def _messages(req: ChatRequest, limits: ChatLimits) -> tuple[Message, ...]:
    if not req.messages:
        raise InvalidRequest("messages", "at least one message is required")
    if len(req.messages) > limits.max_messages:
        raise InvalidRequest(
            "messages",
            f"{len(req.messages)} messages is over the limit of {limits.max_messages} "
            "(limits.max_messages)",
        )
    out: list[Message] = []
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role",
                f"unknown role {echo(m.role)}; one of {', '.join(ROLES)} (tool messages are not "
                "supported)",
            )
        check_text(m.content, f"messages[{i}].content", limit=limits.max_message_chars)
        role = _ROLE_NAMES.get(m.role, m.role)
        out.append(m if role == m.role else Message(role, m.content))
    users = [i for i, m in enumerate(out) if m.role == "user"]
    if not users:
        raise InvalidRequest("messages", "needs at least one message with role user")
    if not out[users[-1]].content.strip():
        raise InvalidRequest(
            f"messages[{users[-1]}].content", "the last user message must not be blank"
        )
    return tuple(out)


def _params(req: ChatRequest, limits: ChatLimits) -> None:
    p = req.params
    if p.max_tokens is not None and not 1 <= p.max_tokens <= limits.max_tokens:
        raise InvalidRequest(
            "params.max_tokens",
            f"must be between 1 and {limits.max_tokens} (limits.max_tokens), got "
            f"{echo(p.max_tokens)}",
        )
    if p.temperature is not None and not (
        math.isfinite(p.temperature) and 0.0 <= p.temperature <= 2.0
    ):
        raise InvalidRequest("params.temperature", f"must be in [0, 2], got {echo(p.temperature)}")
    if p.top_p is not None and not (math.isfinite(p.top_p) and 0.0 < p.top_p <= 1.0):
        raise InvalidRequest("params.top_p", f"must be in (0, 1], got {echo(p.top_p)}")
    if p.seed is not None and not -(2**63) <= p.seed < 2**63:
        raise InvalidRequest("params.seed", "must fit in a signed 64-bit integer")
    if len(p.stop) > limits.max_stop:
        raise InvalidRequest(
            "params.stop",
            f"at most {limits.max_stop} stop sequences (limits.max_stop), got {len(p.stop)}",
        )
    for j, stop in enumerate(p.stop):
        if not stop:
            raise InvalidRequest("params.stop", "stop sequences must be non-empty")
        check_text(stop, f"params.stop[{j}]", limit=limits.max_stop_chars)


def _overrides(req: ChatRequest, targets: Sequence[str]) -> None:
    o = req.overrides
    known = ", ".join(targets)
    if o.force_target and o.force_target not in targets:
        raise UnknownTarget(
            "overrides.force_target",
            f"unknown target {echo(o.force_target)}; configured: {known}",
        )
    unknown = [t for t in o.allowed_targets if t not in targets]
    if unknown:
        shown = ", ".join(echo(t) for t in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise UnknownTarget(
            "overrides.allowed_targets",
            f"unknown target(s) {shown}{more}; configured: {known}",
        )
    if o.force_target and o.allowed_targets and o.force_target not in o.allowed_targets:
        raise InvalidRequest(
            "overrides.force_target",
            f"{echo(o.force_target)} is not in overrides.allowed_targets",
        )
    if o.max_cost is not None:
        check_max_cost(o.max_cost, "overrides.max_cost")


def check_max_cost(value: float, field: str) -> None:
    """The one rule for a cost cap, on both services (router ``policy.max_cost``, dispatcher
    ``overrides.max_cost``): a finite number >= 0 (USD per 1M tokens; leave it unset for no
    cap: ``inf`` is refused, not read as "no cap")."""
    if not (math.isfinite(value) and value >= 0):
        raise InvalidRequest(
            field, f"must be a finite number >= 0 (leave it unset for no cap), got {echo(value)}"
        )


def rename_field(exc: InvalidRequest, names: Mapping[str, str]) -> InvalidRequest:
    """``exc`` with its field spelled as a door's clients spell it (``names``: prefix map)."""
    for prefix, new in names.items():
        if exc.field == prefix or exc.field.startswith((prefix + ".", prefix + "[")):
            field = new + exc.field[len(prefix):]
            message = str(exc).removeprefix(f"{exc.field}: ")
            renamed = type(exc)(field, message)
            renamed.__cause__ = exc.__cause__
            return renamed
    return exc
