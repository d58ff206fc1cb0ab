"""The HTTP door's pure parts: OpenAI body parsing, bearer check, error status and shape."""

from __future__ import annotations

from typing import Any

import pytest

from semroute.auth import TokenSet
from semroute.config import AuthSettings
from semroute.errors import (
    Attempt,
    BackendTimeout,
    DispatchFailed,
    InvalidRequest,
    ModelNotFound,
    StreamInterrupted,
    Unauthenticated,
)
from semroute.http.openai import (
    check_bearer,
    error_body,
    error_status,
    parse_chat_body,
    sse,
)

TARGETS = ("local-small", "gpt-4o")


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_auto_routes_and_a_target_name_forces_it() -> None:
    """model "auto" leaves force_target empty; a target name becomes force_target."""
    assert parse_chat_body(_body(), TARGETS).request.overrides.force_target is None
    forced = parse_chat_body(_body(model="gpt-4o"), TARGETS)
    assert forced.request.overrides.force_target == "gpt-4o"


def test_unknown_model_is_model_not_found_listing_the_choices() -> None:
    """Any other model name raises ModelNotFound (HTTP 404) naming the valid choices."""
    with pytest.raises(ModelNotFound, match="local-small") as info:
        parse_chat_body(_body(model="gpt-9"), TARGETS)
    assert error_status(info.value) == 404
    assert error_body(info.value)["error"]["code"] == "model_not_found"


def test_openai_fields_map_to_generation_params() -> None:
    """max_completion_tokens wins over max_tokens; a single stop string becomes a tuple;
    developer is a system message; text parts are joined."""
    parsed = parse_chat_body(
        {
            "model": "auto",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "text", "text": "b"}]},
            ],
            "max_tokens": 10,
            "max_completion_tokens": 20,
            "stop": "END",
            "temperature": 0,
            "seed": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "ignored",
        },
        TARGETS,
        "rid",
    )
    req = parsed.request
    assert [(m.role, m.content) for m in req.messages] == [("system", "be brief"), ("user", "a\nb")]
    assert (req.params.max_tokens, req.params.stop, req.params.temperature, req.params.seed) == (
        20, ("END",), 0.0, 7,
    )
    assert parsed.stream and parsed.include_usage
    assert req.request_id == "rid"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        (_body(messages=[]), "messages"),
        (_body(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
        (_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
         "messages[0].content[0]"),
        (_body(temperature="hot"), "temperature"),
        (_body(top_p=1.5), "top_p"),
        (_body(max_tokens=0), "max_tokens"),
        (_body(max_tokens=True), "max_tokens"),
        (_body(stop=["a", "b", "c", "d", "e"]), "stop"),
        (_body(stream="yes"), "stream"),
        (_body(n=3), "n"),
        (_body(tools=[{"type": "function"}]), "tools"),
        (_body(semroute={"require_local": "yes"}), "semroute.require_local"),
        (_body(semroute={"max_cost": -1}), "semroute.max_cost"),
        (_body(semroute={"bogus": 1}), "semroute.bogus"),
    ],
)
def test_invalid_fields_name_the_json_field(body: Any, field: str) -> None:
    """Every invalid field raises InvalidRequest whose field is the JSON path, shown as the
    OpenAI error's param with HTTP 400."""
    with pytest.raises(InvalidRequest) as info:
        parse_chat_body(body, TARGETS)
    assert info.value.field == field
    assert error_status(info.value) == 400
    assert error_body(info.value)["error"]["param"] == field


def test_semroute_extension_sets_overrides() -> None:
    """The semroute object carries allowed_targets, require_local and max_cost."""
    parsed = parse_chat_body(
        _body(semroute={"allowed_targets": ["local-small"], "require_local": True, "max_cost": 1}),
        TARGETS,
    )
    o = parsed.request.overrides
    assert (o.allowed_targets, o.require_local, o.max_cost) == (("local-small",), True, 1.0)


def test_bearer_check_accepts_only_configured_tokens(tmp_path: Any) -> None:
    """The door uses the gRPC door's token set (settings and token files, user and admin);
    without tokens auth is off; with some, a missing, malformed or unknown token raises
    Unauthenticated."""
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# ops\nfile-token\n\n")
    tokens = TokenSet.from_settings(
        AuthSettings(tokens=["env-token"], tokens_file=tokens_file, admin_tokens=["root"])
    )
    for good in ("Bearer file-token", "bearer env-token", "Bearer root"):
        check_bearer(good, tokens)
    check_bearer(None, TokenSet.of())
    for header in (None, "", "Basic env-token", "Bearer ", "Bearer other", "Bearer # ops"):
        with pytest.raises(Unauthenticated):
            check_bearer(header, tokens)


def test_failed_dispatch_status_follows_the_last_backend_failure() -> None:
    """A dispatch whose last called target timed out is a 504 with code backend_timeout; one
    where no backend was called (all skipped) stays a 503."""
    timed_out = DispatchFailed(
        "no target could answer",
        [Attempt("a", "BackendUnavailable", "HTTP 500"), Attempt("b", "BackendTimeout", "slow")],
    )
    assert error_status(timed_out) == 504
    assert error_body(timed_out)["error"]["code"] == "backend_timeout"
    skipped = DispatchFailed("no target could answer", [Attempt("gpt-4o", "Skipped", "no key")])
    assert error_status(skipped) == 503
    assert error_body(skipped)["error"]["type"] == "server_error"
    assert error_status(BackendTimeout("a", "x")) == 504
    assert error_body(StreamInterrupted("a", "broke"))["error"]["code"] == "stream_interrupted"


def test_internal_errors_do_not_leak_their_text() -> None:
    """A non-semroute exception becomes a generic 500 message (details stay in the log)."""
    body = error_body(RuntimeError("secret path /etc/x"))
    assert body["error"]["message"] == "internal error (see server logs)"
    assert error_status(RuntimeError()) == 500


def test_sse_frames_one_event_per_data_line() -> None:
    """sse() emits `data: <compact json>` and a blank line; strings go through as is."""
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert sse("[DONE]") == b"data: [DONE]\n\n"
