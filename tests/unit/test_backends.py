"""backends.yaml loading, key handling, and the SSE client's parsing and error mapping.

The client is driven through httpx's transport seam (``MockTransport``): these are wire-format
cases (comments, usage chunks, error events, status codes). Real sockets, timeouts and broken
connections are exercised against the fault server in tests/integration/test_dispatcher*.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from semroute.dispatch.backend_config import BackendConfig, Timeouts, load_backends
from semroute.dispatch.pool import BackendPool
from semroute.dispatch.sse_client import BackendClient, StreamResult, upstream_request_id
from semroute.errors import (
    BackendError,
    BackendProtocolError,
    BackendRateLimited,
    BackendRejected,
    BackendUnavailable,
    ConfigError,
)
from semroute.types import GenerationParams, Message

GOOD = """\
backends:
  local-small:
    base_url: http://127.0.0.1:8081/v1/
    model: smollm2
    local: true
    max_concurrency: 2
    timeouts: {connect: 1, first_token: 5, idle: 2, total: 60}
  gpt-4o-mini:
    base_url: https://api.openai.com/v1
    model: gpt-4o-mini
    api_key_env: OPENAI_API_KEY
    input_cost: 0.15
    output_cost: 0.6
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "backends.yaml"
    path.write_text(text)
    return path


def test_loads_backends_in_file_order(tmp_path: Path) -> None:
    """Every field is read, defaults fill the rest, the trailing slash of base_url goes."""
    cfgs = load_backends(_write(tmp_path, GOOD))
    assert list(cfgs) == ["local-small", "gpt-4o-mini"]
    local = cfgs["local-small"]
    assert local.base_url == "http://127.0.0.1:8081/v1"
    assert local.local and local.max_concurrency == 2
    assert local.timeouts == Timeouts(connect=1, first_token=5, idle=2, total=60)
    cloud = cfgs["gpt-4o-mini"]
    assert cloud.api_key_env == "OPENAI_API_KEY" and not cloud.local
    assert cloud.timeouts == Timeouts()
    assert cloud.cost == pytest.approx(0.375)
    assert cloud.cost_usd(1_000_000, 2_000_000) == pytest.approx(0.15 + 1.2)


def test_reports_every_problem_with_file_and_field(tmp_path: Path) -> None:
    """All mistakes are listed at once, each as backends.<name>.<field>, under the file name."""
    path = _write(
        tmp_path,
        """\
backends:
  a:
    model: m
    timeouts: {connect: -1, first: 3}
    max_concurrency: 1.5
  b:
    base_url: ftp://x
    model: m
    api_key_env: sk-live-123
    local: "yes"
    temperature: 0.2
""",
    )
    with pytest.raises(ConfigError) as info:
        load_backends(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: invalid backends file")
    for expected in (
        "backends.a.base_url: required",
        ":4: backends.a.timeouts.first: unknown field (allowed: connect, first_token",
        "backends.a.timeouts.connect: must be > 0.0",
        "backends.a.max_concurrency: must be an integer",
        "backends.b.base_url: must start with http:// or https://",
        "backends.b.api_key_env: must be an environment variable NAME",
        ":10: backends.b.local: must be true or false",
        "backends.b.temperature: unknown field",
    ):
        assert expected in msg


@pytest.mark.parametrize(
    ("text", "needle"),
    [("backends: [\n", "invalid YAML"), ("targets: {}\n", "top-level mapping `backends:`"),
     ("backends: {}\n", "no backend defined")],
)
def test_refuses_malformed_files(tmp_path: Path, text: str, needle: str) -> None:
    """Unparsable or empty files are refused with the file named."""
    with pytest.raises(ConfigError, match=needle):
        load_backends(_write(tmp_path, text))


async def test_cloud_target_without_key_is_skipped_with_the_variable_named(tmp_path: Path) -> None:
    """An unset api_key_env removes the target and says which variable is missing."""
    cfgs = load_backends(_write(tmp_path, GOOD))
    pool = BackendPool(cfgs, environ={})
    try:
        assert pool.get("gpt-4o-mini") is None and pool.get("local-small") is not None
        reason = pool.skipped["gpt-4o-mini"]
        assert "OPENAI_API_KEY" in reason and "is not set" in reason
        assert pool.names() == ["local-small", "gpt-4o-mini"]
        assert pool.local_names() == ["local-small"]
    finally:
        await pool.aclose()


def _sse(*events: object, done: bool = True) -> bytes:
    parts = [f"data: {json.dumps(e)}\n\n" for e in events]
    if done:
        parts.append("data: [DONE]\n\n")
    return "".join(parts).encode()


def _chunk(text: str | None = None, finish: str | None = None) -> dict[str, object]:
    delta = {"content": text} if text is not None else {}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


Handler = Callable[[httpx.Request], httpx.Response]


async def _run(handler: Handler, *, key: str | None = None, stream_usage: bool = True,
               params: GenerationParams | None = None) -> tuple[list[str], StreamResult]:
    cfg = BackendConfig("t", "http://backend.test/v1", "m", stream_usage=stream_usage,
                        input_cost=1.0, output_cost=1.0)
    client = BackendClient(cfg, key, transport=httpx.MockTransport(handler))
    result = StreamResult()
    texts: list[str] = []
    try:
        async for text in client.stream(
            [Message("system", "be brief"), Message("user", "say hello to the world")],
            params or GenerationParams(), result, request_id="rid-1",
        ):
            texts.append(text)
    finally:
        await client.aclose()
    return texts, result


async def test_streams_text_and_takes_usage_from_the_stream() -> None:
    """Content deltas come out in order; a usage chunk sets the token counts; the request
    carries model, messages, stream options, parameters, key and request id."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = b": keep-alive\n\nevent: message\n" + _sse(
            {"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]},
            _chunk("Hel"), _chunk("lo"), _chunk(finish="length"),
            {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}},
        )
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    params = GenerationParams(max_tokens=5, temperature=0.0, top_p=0.9, stop=("\n",), seed=7)
    texts, result = await _run(handler, key="secret-key", params=params)
    assert texts == ["Hel", "lo"]
    assert (result.prompt_tokens, result.completion_tokens) == (11, 2)
    assert result.usage_reported and result.finish_reason == "length"
    req = seen[0]
    assert req.url.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer secret-key"
    # Not the id as sent (llama.cpp refuses non-UUID ids): a UUID derived from it.
    assert req.headers["x-request-id"] == upstream_request_id("rid-1")
    assert uuid.UUID(req.headers["x-request-id"])
    body = json.loads(req.content)
    assert body["model"] == "m" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"][1] == {"role": "user", "content": "say hello to the world"}
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["stop"], body["seed"]) \
        == (5, 0.0, 0.9, ["\n"], 7)


async def test_counts_tokens_when_the_server_sends_no_usage() -> None:
    """Without a usage chunk completion tokens are the content chunks and prompt tokens an
    estimate; stream_options is not sent when stream_usage is off."""
    bodies: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, content=_sse(_chunk("a"), _chunk("b"), _chunk("c"),
                                                _chunk(finish="stop")))

    texts, result = await _run(handler, stream_usage=False)
    assert texts == ["a", "b", "c"]
    assert not result.usage_reported
    assert result.completion_tokens == 3
    assert result.prompt_tokens == 2 + 6  # ceil(8/4) + ceil(22/4)
    assert "stream_options" not in bodies[0]


@pytest.mark.parametrize(
    ("status", "error", "retriable"),
    [(429, BackendRateLimited, True), (503, BackendUnavailable, True),
     (500, BackendUnavailable, True), (400, BackendRejected, False),
     (401, BackendRejected, False)],
)
async def test_http_status_maps_to_our_errors(status: int, error: type[BackendError],
                                              retriable: bool) -> None:
    """Status codes become the matching BackendError with the server's detail in the message."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"message": "nope"}},
                              headers={"retry-after": "2"})

    with pytest.raises(error) as info:
        await _run(handler)
    assert type(info.value) is error
    assert info.value.retriable is retriable
    assert f"HTTP {status}" in str(info.value) and "nope" in str(info.value)


async def test_key_never_appears_in_errors() -> None:
    """An auth failure says what happened without echoing the key we sent."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "invalid api key"}})

    with pytest.raises(BackendRejected) as info:
        await _run(handler, key="sk-very-secret-value")
    assert "sk-very-secret-value" not in str(info.value)


@pytest.mark.parametrize(
    ("body", "error", "needle"),
    [
        (b"data: {not json\n\n", BackendProtocolError, "malformed SSE data"),
        (b"data: [1, 2]\n\n", BackendProtocolError, "not a JSON object"),
        (_sse({"error": {"message": "model overloaded"}}), BackendUnavailable, "model overloaded"),
        (_sse(_chunk("partial"), done=False), BackendUnavailable, r"without \[DONE\]"),
        (b'data: {"choices": "x"}\n\n', BackendProtocolError, "`choices` is not a list"),
    ],
)
async def test_bad_streams_map_to_our_errors(body: bytes, error: type[BackendError],
                                             needle: str) -> None:
    """Malformed, error-carrying or truncated streams raise a specific BackendError."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body)

    with pytest.raises(error, match=needle):
        await _run(handler)


async def test_last_event_without_trailing_blank_line_still_counts() -> None:
    """A final `data:` line not followed by a blank line is still parsed."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'data: {"choices": [{"delta": {"content": "x"}, '
                                           b'"finish_reason": "stop"}]}')

    texts, result = await _run(handler)
    assert texts == ["x"] and result.finish_reason == "stop"


async def test_connection_errors_are_chained() -> None:
    """A transport failure becomes BackendUnavailable with the httpx error as __cause__."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("boom", request=request)

    with pytest.raises(BackendUnavailable, match="cannot connect") as info:
        await _run(handler)
    assert isinstance(info.value.__cause__, httpx.ConnectError)
