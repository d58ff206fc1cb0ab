"""Small pieces of the issue-17/18 hardening, without a model or a network: the breaker's
Retry-After hold, the static fallback chain, upstream request ids, Retry-After parsing, the JSON
depth check, the one max_cost rule and the reload-path rule."""

from __future__ import annotations

import email.utils
import math
import time
import uuid
from pathlib import Path

import pytest

from semroute.dispatch.breaker import BreakerState, CircuitBreaker
from semroute.dispatch.router_guard import fallback_chain
from semroute.dispatch.sse_client import _retry_after, upstream_request_id
from semroute.dispatch.validate import HTTP_FIELDS, check_max_cost, rename_field
from semroute.errors import InvalidRequest
from semroute.grpc.router_service import reload_path
from semroute.grpc.tls import call_metadata
from semroute.http.openai import parse_json_body


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_hold_for_opens_the_breaker_for_the_asked_time_then_one_probe() -> None:
    """A Retry-After hold opens the breaker for exactly that long (not the cooldown), never
    shortens a longer opening, and ends in half-open (one probe)."""
    clock = Clock()
    breaker = CircuitBreaker(5, cooldown_s=2.0, clock=clock)
    breaker.hold_for(7.0)
    assert breaker.state is BreakerState.OPEN and breaker.retry_in() == pytest.approx(7.0)
    breaker.hold_for(1.0)  # shorter: ignored
    assert breaker.retry_in() == pytest.approx(7.0)
    clock.now += 6.9
    assert not breaker.try_acquire()
    clock.now += 0.2
    assert breaker.try_acquire() and not breaker.try_acquire()
    breaker.record_failure()  # a failed probe re-opens for the normal cooldown
    assert breaker.retry_in() == pytest.approx(2.0)


def test_fallback_chain_is_local_first_unless_configured() -> None:
    names = ["gpt-4o", "local-small", "gpt-4o-mini", "local-large"]
    assert fallback_chain([], names, ["local-small", "local-large"]) == (
        "local-small", "local-large", "gpt-4o", "gpt-4o-mini"
    )
    assert fallback_chain(["gpt-4o", "gpt-4o"], names, ["local-small"]) == ("gpt-4o",)


def test_upstream_request_id_is_always_a_uuid() -> None:
    """Our own ids (uuid4 hex) pass as canonical UUIDs; a client's id becomes a stable UUID."""
    ours = uuid.uuid4()
    assert upstream_request_id(ours.hex) == str(ours)
    derived = upstream_request_id("my-trace-42")
    assert uuid.UUID(derived) and derived == upstream_request_id("my-trace-42")
    assert derived != upstream_request_id("my-trace-43")


def test_retry_after_reads_seconds_and_dates() -> None:
    assert _retry_after("7") == 7.0
    assert _retry_after("-3") == 0.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    assert _retry_after("inf") is None and _retry_after("nan") is None
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < (_retry_after(date) or 0) <= 31


def test_json_depth_is_checked_before_parsing() -> None:
    assert parse_json_body(b"[" * 10 + b"]" * 10, max_depth=10) == [[[[[[[[[[]]]]]]]]]]
    with pytest.raises(InvalidRequest) as info:
        parse_json_body(b"[" * 11 + b"]" * 11, max_depth=10)
    assert info.value.field == "body" and "max_json_depth" in str(info.value)
    # Brackets inside strings do not count.
    assert parse_json_body(b'{"a": "[[[[[[[[[[[[[[["}', max_depth=2) == {"a": "[" * 15}


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -0.5])
def test_one_max_cost_rule(value: float) -> None:
    with pytest.raises(InvalidRequest, match="finite number >= 0"):
        check_max_cost(value, "policy.max_cost")
    check_max_cost(0.0, "policy.max_cost")


def test_overrides_field_is_named_semroute_on_the_http_door() -> None:
    renamed = rename_field(InvalidRequest("overrides", "nothing left"), HTTP_FIELDS)
    assert renamed.field == "semroute"
    kept = rename_field(InvalidRequest("overrides.max_cost", "x"), HTTP_FIELDS)
    assert kept.field == "semroute.max_cost"


def test_reload_paths_stay_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    (root / "versions" / "v1").mkdir(parents=True)
    assert reload_path("versions/v1", root) == (root / "versions" / "v1").resolve()
    assert reload_path(str(root), root) == root.resolve()
    for bad in ("/etc", "../elsewhere", "versions/../../x", "a" * 256, "x\x00y"):
        with pytest.raises(InvalidRequest) as info:
            reload_path(bad, root)
        assert info.value.field == "path"


def test_unusable_request_ids_are_not_sent_as_metadata() -> None:
    """grpc refuses non-ASCII metadata (as INTERNAL, client side): such an id is left out."""
    assert call_metadata(None, "é-trace") == []
    assert call_metadata(None, "x" * 1000) == []
    assert call_metadata("t", "ok-1") == [("authorization", "Bearer t"), ("x-request-id", "ok-1")]
