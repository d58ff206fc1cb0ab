"""Structured logs: request ids bound per call, and no query text unless opted in."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from semroute.config import LogSettings
from semroute.logs import (
    bind_request_id,
    clean_request_id,
    configure_logging,
    get_logger,
    get_request_id,
    reset_request_id,
    text_fields,
)


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    structlog.reset_defaults()
    root.setLevel(level)
    root.handlers[:] = handlers


def test_json_lines_carry_the_bound_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    """While a request id is bound every line has it; after reset it is gone again."""
    configure_logging(LogSettings(level="INFO"))
    log = get_logger("test")
    token = bind_request_id("req-42")
    try:
        assert get_request_id() == "req-42"
        log.info("routed", route="code")
    finally:
        reset_request_id(token)
    log.info("idle")
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert lines[0]["event"] == "routed" and lines[0]["request_id"] == "req-42"
    assert lines[0]["module"] == "test" and lines[0]["level"] == "info" and "timestamp" in lines[0]
    assert lines[1]["event"] == "idle" and "request_id" not in lines[1]
    assert get_request_id() is None


def test_level_filters_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """At WARNING, info lines are dropped and warnings kept."""
    configure_logging(LogSettings(level="WARNING"))
    log = get_logger("test")
    log.info("quiet")
    log.warning("loud")
    events = [json.loads(x)["event"] for x in capsys.readouterr().err.splitlines()]
    assert events == ["loud"]


def test_query_text_is_hashed_unless_opted_in() -> None:
    """By default only a hash prefix and the length are logged; the text only on request."""
    hidden = text_fields("my card number is 4111")
    assert set(hidden) == {"query_sha256", "query_len"} and hidden["query_len"] == 22
    assert "4111" not in json.dumps(hidden)
    shown = text_fields("my card number is 4111", log_text=True)
    assert shown["query"] == "my card number is 4111"
    assert shown["query_sha256"] == hidden["query_sha256"]


@pytest.mark.parametrize("bad", ["", "x" * 129, "line\nbreak", "naïve"])
def test_unusable_client_request_ids_are_replaced(bad: str) -> None:
    """Empty, over-long, multi-line or non-ASCII ids are replaced by a fresh 32-hex id."""
    fresh = clean_request_id(bad)
    assert fresh != bad and len(fresh) == 32 and int(fresh, 16) >= 0


def test_usable_client_request_id_is_kept() -> None:
    """A printable ASCII id of sane length is used as given."""
    assert clean_request_id("abc-123_XYZ") == "abc-123_XYZ"
