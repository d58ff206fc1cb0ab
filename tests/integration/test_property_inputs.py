"""Property-based bad input (issue 17 item 3), with hypothesis: arbitrary JSON and strings at the
HTTP door's parser and app, arbitrary protobuf field values at both gRPC servicers. Whatever
arrives, the answer is a success or a client error naming a field: never a 5xx, INTERNAL or
UNKNOWN, never a hang (every call has a deadline).

The servers run on a private event loop in a background thread (module-scoped), so each
hypothesis example is a plain blocking call. Runs are kept small (``max_examples``) so the
suite stays fast.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semroute._proto.semroute.v1 import dispatcher_pb2 as dpb
from semroute._proto.semroute.v1 import dispatcher_pb2_grpc as dpb_grpc
from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc
from semroute.config import load_settings
from semroute.dispatch.backend_config import BackendConfig
from semroute.dispatch.dispatcher import Dispatcher
from semroute.dispatch.pool import BackendPool
from semroute.dispatch.validate import ChatLimits
from semroute.errors import InvalidRequest
from semroute.grpc.dispatcher_service import create_dispatcher_server
from semroute.http.app import HttpDoor
from semroute.http.openai import error_body, parse_chat_body, parse_json_body
from semroute.types import Decision
from tests.integration.router_grpc_support import router_settings, running_router, small_index

pytestmark = pytest.mark.integration
__all__ = ["small_index"]  # fixtures, imported for pytest

TARGETS = ["local-small", "cloud"]
EXAMPLES = settings(
    max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                               max_size=5),
    max_leaves=20,
)
# Chat bodies that look like chats, with any value in any field (more interesting than noise).
chat_fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["auto", "local-small", "nope"]) | json_values,
        "messages": st.lists(
            st.fixed_dictionaries({}, optional={
                "role": st.sampled_from(["user", "system", "assistant", "tool"]) | json_values,
                "content": st.text() | json_values,
            }) | json_values,
            max_size=4,
        ) | json_values,
        "stream": json_values, "max_tokens": json_values, "temperature": json_values,
        "top_p": json_values, "stop": json_values, "seed": json_values, "n": json_values,
        "semroute": st.fixed_dictionaries({}, optional={
            "allowed_targets": json_values, "require_local": json_values,
            "max_cost": json_values,
        }) | json_values,
        "stream_options": json_values, "tools": json_values,
    },
)
surrogate_text = st.text(st.characters(codec=None, categories=None), max_size=20)


def _check_error(exc: InvalidRequest) -> None:
    body = error_body(exc)
    json.dumps(body, ensure_ascii=False).encode("utf-8")  # always encodable
    assert body["error"]["param"], body
    assert len(body["error"]["message"]) < 4096


@EXAMPLES
@given(body=json_values | chat_fields)
def test_parser_takes_any_json_value(body: Any) -> None:
    """Any decoded JSON value: a ParsedChat or InvalidRequest naming a field, nothing else."""
    try:
        parse_chat_body(body, TARGETS, "rid", ChatLimits())
    except InvalidRequest as exc:
        _check_error(exc)


@EXAMPLES
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8",
                                                                                   "surrogatepass")))
def test_parser_takes_any_bytes(raw: bytes) -> None:
    """Any body bytes (lone surrogates encoded raw included): parsed or a 400 naming a field."""
    try:
        parse_chat_body(parse_json_body(raw), TARGETS, "rid", ChatLimits())
    except InvalidRequest as exc:
        _check_error(exc)


@EXAMPLES
@given(content=surrogate_text, role=surrogate_text)
def test_parser_takes_any_string_in_messages(content: str, role: str) -> None:
    """Strings with lone surrogates and control characters in every message field."""
    body = {"model": "auto", "messages": [{"role": role, "content": content}]}
    try:
        parse_chat_body(body, TARGETS, "rid", ChatLimits())
    except InvalidRequest as exc:
        _check_error(exc)


# ---- servers on a background loop -------------------------------------------------------------


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            # An unclosed loop warns when garbage collected, in whichever test runs then.
            self.loop.close()


@dataclass
class _Servers:
    router_addr: str
    dispatcher_addr: str
    http: httpx.Client


class _FixedRouter:
    async def route(self, text: str, **kw: Any) -> Decision:
        return Decision("chitchat", "local-small", 0.9, False, "fixed", {}, ("local-small", "cloud"))


def _sse(request: httpx.Request) -> httpx.Response:
    body = (
        b'data: {"choices":[{"delta":{"content":"ok"},"finish_reason":null}]}\n\n'
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )
    return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})


@pytest.fixture(scope="module")
def servers(small_index: Path) -> Iterator[_Servers]:
    loop = _Loop()
    configs = {
        "local-small": BackendConfig("local-small", "http://mock/v1", "m", local=True,
                                     context_tokens=4096),
        "cloud": BackendConfig("cloud", "http://mock/v1", "m", input_cost=1, output_cost=2),
    }
    transports = {n: httpx.MockTransport(_sse) for n in configs}
    settings_ = load_settings(None, dispatcher__port=0)

    async def start() -> Any:
        stack = running_router(small_index, settings=router_settings())
        r = await stack.__aenter__()
        pool = BackendPool(configs, transports=transports)
        disp = Dispatcher(_FixedRouter(), pool, settings_.dispatcher,
                          limits=ChatLimits(max_tokens=8192))
        server, port = await create_dispatcher_server(settings_, disp)
        await server.start()
        return stack, r, disp, server, port

    stack, r, disp, server, port = loop.run(start())
    door = HttpDoor(disp, settings_)
    transport = httpx.ASGITransport(app=door.app)  # type: ignore[arg-type]

    class _SyncASGI(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            async def call() -> httpx.Response:
                response = await transport.handle_async_request(request)
                content = await response.aread()
                return httpx.Response(response.status_code, headers=response.headers,
                                      content=content)
            result: httpx.Response = loop.run(call())
            return result

    http = httpx.Client(transport=_SyncASGI(), base_url="http://door")
    try:
        yield _Servers(r.addr, f"127.0.0.1:{port}", http)
    finally:
        http.close()

        async def stop() -> None:
            await server.stop(0)
            await disp.aclose()
            await stack.__aexit__(None, None, None)

        loop.run(stop())
        loop.close()


def _assert_client_error(exc: grpc.RpcError, *, policy_may_exclude_all: bool = False) -> None:
    code = exc.code()
    if policy_may_exclude_all and code == grpc.StatusCode.UNAVAILABLE:
        # The router's documented answer to a policy no target satisfies (NoTargetAvailable,
        # see test_router_grpc): the request is fine, the policy leaves nothing.
        assert "satisfies the policy" in (exc.details() or ""), exc.details()
        return
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, exc.details())
    trailers = dict(exc.trailing_metadata() or ())
    assert trailers.get("semroute-field"), trailers


texts = st.text(max_size=300)
floats = st.floats(allow_nan=True, allow_infinity=True)


@EXAMPLES
@given(
    query=texts, history=st.lists(texts, max_size=20),
    allowed=st.lists(st.sampled_from(["local-small", "gpt-4o", "cloud"]) | texts, max_size=3),
    require_local=st.booleans(), max_cost=st.none() | floats, tolerance=floats,
    explain=st.booleans(),
)
def test_router_servicer_takes_any_field_values(
    servers: _Servers, query: str, history: list[str], allowed: list[str], require_local: bool,
    max_cost: float | None, tolerance: float, explain: bool,
) -> None:
    """Route with arbitrary field values: a decision or INVALID_ARGUMENT naming the field."""
    policy = pb.Policy(allowed_targets=allowed, require_local=require_local,
                       quality_tolerance=tolerance)
    if max_cost is not None:
        policy.max_cost = max_cost
    req = pb.RouteRequest(query=query, history=history, policy=policy, explain=explain)
    with grpc.insecure_channel(servers.router_addr) as ch:
        try:
            pb_grpc.RouterStub(ch).Route(req, timeout=30)
        except grpc.RpcError as exc:
            _assert_client_error(exc, policy_may_exclude_all=True)


@EXAMPLES
@given(
    # Each field: unset, a valid value or anything, so valid requests (which reach the router
    # and the backend) are common too.
    messages=st.lists(st.tuples(st.sampled_from(["user", "system", "assistant"]) | texts,
                                st.sampled_from(["hello", "write a poem"]) | texts),
                      min_size=1, max_size=4),
    max_tokens=st.none() | st.integers(1, 9000) | st.integers(-(2**31), 2**31 - 1),
    temperature=st.none() | st.floats(0, 2) | floats,
    top_p=st.none() | st.floats(0.01, 1) | floats,
    stop=st.lists(texts, max_size=6), seed=st.none() | st.integers(-(2**63), 2**63 - 1),
    force=st.sampled_from(["", "local-small", "cloud"]) | texts,
    allowed=st.lists(st.sampled_from(["local-small", "cloud"]) | texts, max_size=3),
    require_local=st.booleans(), max_cost=st.none() | floats, request_id=texts,
)
def test_dispatcher_servicer_takes_any_field_values(
    servers: _Servers, messages: list[tuple[str, str]], max_tokens: int | None,
    temperature: float | None, top_p: float | None, stop: list[str], seed: int | None,
    force: str, allowed: list[str], require_local: bool, max_cost: float | None,
    request_id: str,
) -> None:
    """Chat with arbitrary field values: a stream or INVALID_ARGUMENT naming the field."""
    params = dpb.GenerationParams(stop=stop)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("seed", seed)):
        if value is not None:
            if isinstance(value, float) and not math.isnan(value) and abs(value) > 3.4e38:
                value = math.copysign(math.inf, value)  # float32 fields
            setattr(params, name, value)
    overrides = dpb.RoutingOverrides(force_target=force, allowed_targets=allowed,
                                     require_local=require_local)
    if max_cost is not None:
        overrides.max_cost = max_cost
    req = dpb.ChatRequest(
        messages=[dpb.ChatMessage(role=r, content=c) for r, c in messages],
        params=params, overrides=overrides, request_id=request_id,
    )
    with grpc.insecure_channel(servers.dispatcher_addr) as ch:
        try:
            replies = list(dpb_grpc.DispatcherStub(ch).Chat(req, timeout=30))
        except grpc.RpcError as exc:
            _assert_client_error(exc)
        else:
            assert replies[-1].HasField("done"), replies[-1]


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck),
          database=None)
@given(body=chat_fields | json_values, stream=st.booleans())
def test_http_door_answers_any_json_without_a_5xx(
    servers: _Servers, body: Any, stream: bool
) -> None:
    """The whole door (app, parser, dispatcher): any JSON body is a 200 or a 4xx in OpenAI's
    error shape naming a field."""
    if stream and isinstance(body, dict):
        body = {**body, "stream": True}
    raw = json.dumps(body).encode()
    r = servers.http.post("/v1/chat/completions", content=raw,
                          headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert r.json()["error"]["param"], r.text[:300]
