"""`semroute serve router --processes`: a whole number >= 1 or `auto`; anything else is refused
by the argument parser with a message saying what to give. And the client side: a channel
pool of at least one."""

from __future__ import annotations

import os

import pytest

from semroute.cli import build_parser
from semroute.config import load_settings
from semroute.grpc.router_client import RouterClient


def _parse(*args: str) -> int | None:
    parsed = build_parser().parse_args(["serve", "router", *args])
    value: int | None = parsed.processes
    return value


@pytest.mark.parametrize(
    ("value", "message"),
    [("0", "need at least 1 process"), ("-3", "need at least 1 process"),
     ("two", "'two' is not a process count"), ("1.5", "'1.5' is not a process count")],
)
def test_bad_process_counts_are_refused_naming_the_flag(
    value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Zero, negative and non-numbers exit with status 2 and name --processes and the fix."""
    with pytest.raises(SystemExit) as exc:
        _parse("--processes", value)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--processes" in err and message in err


def test_counts_auto_and_the_default() -> None:
    """A number is taken as is, `auto` is one per usable core, no flag leaves the setting
    (default 1) alone."""
    assert _parse("--processes", "3") == 3
    assert _parse("--processes", "auto") == len(os.sched_getaffinity(0))
    assert _parse() is None
    assert load_settings(None).router_server.processes == 1


async def test_a_client_needs_at_least_one_channel() -> None:
    """`RouterClient(channels=0)` is refused before any connection is opened."""
    with pytest.raises(ValueError, match="channels: need at least 1"):
        RouterClient("127.0.0.1:1", channels=0)
