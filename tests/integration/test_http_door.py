"""The OpenAI-compatible HTTP door over a real dispatcher whose backends are our fault servers.

The door runs in the test's event loop on a free loopback port (as inside `serve dispatcher`);
clients are raw httpx (to see the SSE framing byte by byte) and the official `openai` SDK.
Routing for model "auto" comes from a real pre-filter rule, so no router is needed here; the
real router is exercised by tests/e2e.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import openai
import pytest

from semroute.config import load_settings
from semroute.dispatch.backend_config import BackendConfig, Timeouts
from semroute.dispatch.dispatcher import Dispatcher
from semroute.dispatch.pii import PiiDetector
from semroute.dispatch.pool import BackendPool
from semroute.dispatch.rules import Rule, RuleEngine
from semroute.http.app import HttpDoorHandle, start_http_door
from semroute.testing.faultserver import FaultServer, FaultSpec
from semroute.types import Decision

pytestmark = pytest.mark.integration

TOKEN = "door-test-token"
CHUNKS = ("Hello", ",", " world", "!")
PII_PROMPT = "Charge my card 4111 1111 1111 1111 and mail jane.doe@example.com the receipt"


class _RouterMustNotBeCalled:
    """Every request here is routed by the catch-all rule or forced; reaching the router would
    mean the door bypassed the dispatcher's pre-filter."""

    async def route(self, text: str, **_: Any) -> Decision:
        raise AssertionError("router called although a rule or force_target should decide")


@pytest.fixture
def local_llm() -> Any:
    with FaultServer(FaultSpec(chunks=CHUNKS), model="local-small") as server:
        yield server


@pytest.fixture
def cloud_llm() -> Any:
    with FaultServer(FaultSpec(chunks=CHUNKS), model="gpt-4o-mini") as server:
        yield server


DoorFactory = Callable[..., Awaitable[HttpDoorHandle]]


@pytest.fixture
async def make_door(local_llm: FaultServer, cloud_llm: FaultServer) -> AsyncIterator[DoorFactory]:
    started: list[tuple[HttpDoorHandle, Dispatcher]] = []
    timeouts = Timeouts(connect=1.0, first_token=0.5, idle=1.0, total=10.0)

    async def factory(tokens: tuple[str, ...] = ()) -> HttpDoorHandle:
        configs = {
            "gpt-4o-mini": BackendConfig(
                "gpt-4o-mini", cloud_llm.base_url, "gpt-4o-mini", timeouts=timeouts,
                input_cost=0.15, output_cost=0.60,
            ),
            "local-small": BackendConfig(
                "local-small", local_llm.base_url, "local-small", timeouts=timeouts, local=True,
                input_cost=0.02, output_cost=0.02,
            ),
        }
        settings = load_settings(
            auth__tokens=list(tokens), dispatcher__retries=0, dispatcher__backoff_s=0.0
        )
        rules = RuleEngine(
            [Rule("everything", "general", ("gpt-4o-mini", "local-small"), min_chars=1)],
            PiiDetector(),
        )
        dispatcher = Dispatcher(
            _RouterMustNotBeCalled(), BackendPool(configs, environ={}), settings.dispatcher, rules
        )
        handle = await start_http_door(dispatcher, settings, 0, "127.0.0.1")
        started.append((handle, dispatcher))
        return handle

    yield factory
    for handle, dispatcher in started:
        await handle.stop()
        await dispatcher.aclose()


@pytest.fixture
async def door(make_door: DoorFactory) -> HttpDoorHandle:
    return await make_door()


def _body(model: str = "auto", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi there"}],
            "stream": stream, **extra}


async def _eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll without blocking the loop the door runs in."""
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


async def _sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order, checking the blank-line framing."""
    raw = (await response.aread()).decode()
    assert raw.endswith("\n\n"), f"stream does not end with a complete event: {raw[-40:]!r}"
    events = [block for block in raw.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events), events
    return [block.removeprefix("data: ") for block in events]


async def test_stream_is_openai_chunks_with_decision_usage_and_done(door: HttpDoorHandle) -> None:
    """A streamed chat is role chunk, one chunk per backend delta, a final chunk with
    finish_reason + usage + semroute, then [DONE]; decision headers come with the 200."""
    async with httpx.AsyncClient(base_url=door.base_url) as client:
        response = await client.post(
            "/chat/completions", json=_body(stream=True), headers={"x-request-id": "rid-123"}
        )
        events = await _sse_events(response)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-semroute-route"] == "general"
    assert response.headers["x-semroute-target"] == "gpt-4o-mini"
    assert float(response.headers["x-semroute-confidence"]) == 1.0
    assert response.headers["x-semroute-fallback"] == "false"
    assert response.headers["x-request-id"] == "rid-123"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-rid-123"
               for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    texts = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert texts == list(CHUNKS)
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["usage"]["total_tokens"] == (
        final["usage"]["prompt_tokens"] + final["usage"]["completion_tokens"]
    )
    assert final["usage"]["completion_tokens"] > 0
    assert final["usage"]["cost_usd"] > 0
    assert final["semroute"]["route"] == "general"
    assert final["semroute"]["target"] == "gpt-4o-mini"
    assert final["semroute"]["attempts"] == 1
    assert "everything" in final["semroute"]["reason"]


async def test_include_usage_puts_usage_on_an_extra_empty_choices_chunk(
    door: HttpDoorHandle,
) -> None:
    """With stream_options.include_usage the finish chunk is followed by OpenAI's usage chunk
    (choices == []), which also carries the semroute field."""
    async with httpx.AsyncClient(base_url=door.base_url) as client:
        response = await client.post(
            "/chat/completions",
            json=_body(stream=True, stream_options={"include_usage": True}),
        )
        events = await _sse_events(response)
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in chunks[-2]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert chunks[-1]["semroute"]["target"] == "gpt-4o-mini"


async def test_openai_sdk_non_streaming_forced_target(
    door: HttpDoorHandle, cloud_llm: FaultServer, local_llm: FaultServer
) -> None:
    """The official SDK gets a chat.completion from a forced target: text, usage, the semroute
    field, and the decision says 'forced'; the other backend is never called."""
    async with openai.AsyncOpenAI(base_url=door.base_url, api_key="unused", max_retries=0) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="local-small", messages=[{"role": "user", "content": "hello"}], max_tokens=8
        )
        reply = raw.parse()
    assert reply.choices[0].message.content == "".join(CHUNKS)
    assert reply.model == "local-small"
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.model_extra is not None
    assert reply.model_extra["semroute"]["route"] == "forced"
    assert raw.headers["x-semroute-target"] == "local-small"
    assert [r.body["max_tokens"] for r in local_llm.chat_requests()] == [8]
    assert cloud_llm.chat_requests() == []


async def test_openai_sdk_streaming_collects_the_backend_text(door: HttpDoorHandle) -> None:
    """The SDK's stream iterator yields the backend's text exactly once, in order."""
    async with openai.AsyncOpenAI(base_url=door.base_url, api_key="unused", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hello"}], stream=True
        )
        text = ""
        last: Any = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            last = chunk
    assert text == "".join(CHUNKS)
    assert last.usage is not None and last.usage.total_tokens > 0
    assert last.model_extra["semroute"]["target"] == "gpt-4o-mini"


async def test_models_lists_auto_and_targets(door: HttpDoorHandle) -> None:
    """GET /v1/models lists "auto" first, then every usable target, in OpenAI's list shape."""
    async with openai.AsyncOpenAI(base_url=door.base_url, api_key="unused", max_retries=0) as sdk:
        models = await sdk.models.list()
        ids = [m.id async for m in models]
        one = await sdk.models.retrieve("local-small")
    assert ids == ["auto", "gpt-4o-mini", "local-small"]
    assert one.id == "local-small"


async def test_unknown_model_is_404_in_openai_error_shape(door: HttpDoorHandle) -> None:
    """A model that is neither auto nor a target is a 404 with code model_not_found, param
    model; the SDK raises NotFoundError."""
    async with httpx.AsyncClient(base_url=door.base_url) as client:
        response = await client.post("/chat/completions", json=_body(model="gpt-5-ultra"))
    assert response.status_code == 404
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gpt-5-ultra" in error["message"]
    async with openai.AsyncOpenAI(base_url=door.base_url, api_key="unused", max_retries=0) as sdk:
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(
                model="gpt-5-ultra", messages=[{"role": "user", "content": "hi"}]
            )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "auto"}, "messages"),
        (_body(temperature=7), "temperature"),
        (_body(n=2), "n"),
        ({"model": "auto", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"model": "auto", "messages": [{"role": "assistant", "content": "only me"}]}, "messages"),
        (_body(semroute={"allowed_targets": ["nope"]}), "semroute.allowed_targets"),
    ],
)
async def test_bad_requests_are_400_naming_the_field(
    door: HttpDoorHandle, body: dict[str, Any], param: str
) -> None:
    """Each invalid body is a 400 invalid_request_error whose param names the offending field,
    whether the door or the dispatcher found the problem."""
    async with httpx.AsyncClient(base_url=door.base_url) as client:
        response = await client.post("/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


async def test_invalid_json_is_400(door: HttpDoorHandle) -> None:
    """A body that is not JSON is a 400 with param "body"."""
    async with httpx.AsyncClient(base_url=door.base_url) as client:
        response = await client.post(
            "/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "body"


async def test_auth_requires_a_configured_bearer_token(make_door: DoorFactory) -> None:
    """With tokens configured, no token or a wrong one is a 401 (invalid_api_key) on every API
    route, the right one works, and /healthz stays open."""
    door = await make_door(tokens=(TOKEN,))
    async with httpx.AsyncClient(base_url=door.base_url) as client:
        missing = await client.post("/chat/completions", json=_body())
        wrong = await client.get("/models", headers={"authorization": "Bearer nope"})
        right = await client.post(
            "/chat/completions", json=_body(), headers={"authorization": f"Bearer {TOKEN}"}
        )
        health = await client.get(door.base_url.removesuffix("/v1") + "/healthz")
    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert right.status_code == 200
    assert health.status_code == 200
    async with openai.AsyncOpenAI(base_url=door.base_url, api_key="nope", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError):
            await sdk.models.list()


@pytest.mark.parametrize(
    ("spec", "status", "code"),
    [
        (FaultSpec(mode="500"), 502, "backend_unavailable"),
        (FaultSpec(mode="429"), 429, "backend_rate_limited"),
        (FaultSpec(mode="slow", delay_s=3.0), 504, "backend_timeout"),
    ],
)
async def test_failure_before_first_token_is_an_http_error_not_a_stream(
    make_door: DoorFactory,
    local_llm: FaultServer,
    spec: FaultSpec,
    status: int,
    code: str,
) -> None:
    """When the (forced) target fails before its first token, a streaming request gets the
    matching HTTP status and an OpenAI error body instead of a 200 stream."""
    local_llm.set_default(spec)
    door = await make_door()
    async with httpx.AsyncClient(base_url=door.base_url) as client:
        response = await client.post("/chat/completions", json=_body("local-small", stream=True))
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-semroute-target"] == "local-small"
    error = response.json()["error"]
    assert error["code"] == code
    assert "local-small" in error["message"]


async def test_failover_before_commit_is_reported(
    door: HttpDoorHandle, cloud_llm: FaultServer
) -> None:
    """The first target of the chain fails before any token; the answer comes from the next one
    and the semroute field tells both the decided and the answering target."""
    cloud_llm.script([FaultSpec(mode="500")])
    async with openai.AsyncOpenAI(base_url=door.base_url, api_key="unused", max_retries=0) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "hello"}]
        )
        reply = raw.parse()
    assert reply.choices[0].message.content == "".join(CHUNKS)
    assert raw.headers["x-semroute-target"] == "gpt-4o-mini"
    assert reply.model == "local-small"
    extra = reply.model_extra or {}
    assert extra["semroute"]["decided_target"] == "gpt-4o-mini"
    assert extra["semroute"]["target"] == "local-small"
    assert extra["semroute"]["attempts"] == 2


async def test_failure_after_first_token_ends_stream_with_error_event(
    door: HttpDoorHandle, cloud_llm: FaultServer, local_llm: FaultServer
) -> None:
    """A backend that drops the connection after two chunks: the client has those two chunks
    once, then one error event (stream_interrupted) and no [DONE]; nothing is retried, and the
    SDK raises APIError."""
    cloud_llm.set_default(FaultSpec(mode="drop", after=2, chunks=CHUNKS))
    async with httpx.AsyncClient(base_url=door.base_url) as client:
        response = await client.post("/chat/completions", json=_body(stream=True))
        events = await _sse_events(response)
    assert response.status_code == 200
    assert "[DONE]" not in events
    chunks = [json.loads(e) for e in events]
    texts = [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]
    assert texts == ["", *CHUNKS[:2]]
    assert chunks[-1]["error"]["code"] == "stream_interrupted"
    assert local_llm.chat_requests() == []
    async with openai.AsyncOpenAI(base_url=door.base_url, api_key="unused", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        seen = ""
        with pytest.raises(openai.APIError, match="stream broke"):
            async for chunk in stream:
                seen += chunk.choices[0].delta.content or ""
    assert seen == "".join(CHUNKS[:2])


async def test_pii_stays_local_through_the_door(
    door: HttpDoorHandle, cloud_llm: FaultServer, local_llm: FaultServer
) -> None:
    """A prompt with a card number and an email routed "auto" goes only to the local backend
    (the rule's chain starts with the cloud one); forcing the cloud target is refused with 400."""
    messages: Any = [{"role": "user", "content": PII_PROMPT}]
    async with openai.AsyncOpenAI(base_url=door.base_url, api_key="unused", max_retries=0) as sdk:
        reply = await sdk.chat.completions.create(model="auto", messages=messages)
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert (reply.model_extra or {})["semroute"]["target"] == "local-small"
    assert "local" in (reply.model_extra or {})["semroute"]["reason"]
    assert cloud_llm.chat_requests() == []
    assert [PII_PROMPT in r.text for r in local_llm.chat_requests()] == [True]
    assert refused.value.param == "model"  # the field as the OpenAI client spells it


async def test_client_hangup_closes_the_upstream_request(
    door: HttpDoorHandle, cloud_llm: FaultServer
) -> None:
    """A client that leaves after the first token makes the door close the backend request
    (the fault server sees the disconnect before it has sent everything)."""
    cloud_llm.set_default(FaultSpec(chunks=tuple(f"t{i} " for i in range(50)), chunk_delay_s=0.1))
    async with (
        httpx.AsyncClient(base_url=door.base_url) as client,
        client.stream("POST", "/chat/completions", json=_body(stream=True)) as resp,
    ):
        async for line in resp.aiter_lines():
            if '"t0 "' in line:
                break
    assert await _eventually(
        lambda: any(r.disconnected_at is not None for r in cloud_llm.chat_requests())
    )
    assert not cloud_llm.chat_requests()[0].completed


async def test_client_giving_up_on_a_non_streaming_call_closes_the_upstream_request(
    door: HttpDoorHandle, cloud_llm: FaultServer
) -> None:
    """A non-streaming client that times out while the answer is still being generated: the
    door notices the disconnect and closes the backend request instead of finishing it."""
    cloud_llm.set_default(FaultSpec(chunks=tuple(f"t{i} " for i in range(50)), chunk_delay_s=0.1))
    async with httpx.AsyncClient(base_url=door.base_url, timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/chat/completions", json=_body())
    assert await _eventually(
        lambda: any(r.disconnected_at is not None for r in cloud_llm.chat_requests()),
        timeout=2.0,
    )
    assert not cloud_llm.chat_requests()[0].completed
