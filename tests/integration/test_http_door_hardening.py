"""The OpenAI door against hostile input (issue 18 items 4, 8, 9, 12; issue 17 item 3): bodies
over the limit stop at the limit (413), non-JSON types are 415, bad JSON of any kind is a 400
naming the field, echoed values are bounded, a client leaving mid-body is a disconnect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from semroute.config import load_settings
from semroute.http.app import HttpDoorHandle, start_http_door
from semroute.types import ChatEvent, ChatRequest, DecisionEvent, DeltaEvent, DoneEvent

pytestmark = pytest.mark.integration

LIMIT = 4096


class _EchoDispatcher:
    """Answers every chat with one word (what the door does with it is what is tested)."""

    def __init__(self) -> None:
        self.requests: list[ChatRequest] = []

    def target_names(self) -> list[str]:
        return ["local-small"]

    async def chat(self, req: ChatRequest, *, ab_key: str = "") -> AsyncIterator[ChatEvent]:
        self.requests.append(req)
        yield DecisionEvent("chitchat", "local-small", 1.0, "test", False, ("local-small",))
        yield DeltaEvent("hi")
        yield DoneEvent("stop", 1, 1, 0.0, "local-small", 1, 0.01)


@pytest.fixture
async def door() -> AsyncIterator[HttpDoorHandle]:
    settings = load_settings(None, limits__max_body_bytes=LIMIT)
    handle = await start_http_door(_EchoDispatcher(), settings, 0, "127.0.0.1")  # type: ignore[arg-type]
    try:
        yield handle
    finally:
        await handle.stop(1)


async def _post(door: HttpDoorHandle, content: bytes, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=door.base_url, timeout=10) as http:
        return await http.post("/chat/completions", content=content, headers=headers)


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": "hello"}], **extra}


async def _raw(door: HttpDoorHandle, head: bytes, body_chunks: list[bytes]) -> bytes:
    """Send ``head`` then the chunks (stopping as soon as a response arrives); the response."""
    reader, writer = await asyncio.open_connection(door.host, door.port)
    try:
        writer.write(head)
        await writer.drain()
        response = asyncio.ensure_future(reader.read(65536))
        for chunk in body_chunks:
            if response.done():
                break
            try:
                writer.write(chunk)
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0)
        return await asyncio.wait_for(response, 10)
    finally:
        writer.close()


async def test_content_length_over_the_limit_is_413_before_reading(door: HttpDoorHandle) -> None:
    """A declared length over limits.max_body_bytes is refused without waiting for the body."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 300000000\r\n\r\n"
    )
    reply = await _raw(door, head, [])
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"max_body_bytes" in reply


async def test_chunked_body_stops_at_the_limit_with_413(door: HttpDoorHandle) -> None:
    """A chunked body is counted as it arrives and refused once past the limit (the rest is
    never buffered)."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"400\r\n" + b" " * 1024 + b"\r\n"
    reply = await _raw(door, head, [chunk] * 2000)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded"])
async def test_non_json_content_type_is_415(door: HttpDoorHandle, ctype: str) -> None:
    r = await _post(door, json.dumps(_chat()).encode(), **{"content-type": ctype})
    assert r.status_code == 415
    assert r.json()["error"]["param"] == "content-type"


async def test_json_content_type_with_charset_is_accepted(door: HttpDoorHandle) -> None:
    r = await _post(door, json.dumps(_chat()).encode(),
                    **{"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "body"),  # deep nesting
        (b'{"model": "auto", "max_tokens": ' + b"9" * 5000 + b"}", "body"),  # huge integer
        (json.dumps(_chat(max_tokens=10**12)).encode(), "max_tokens"),
        (b'{"model":"auto","messages":[{"role":"user","content":"a\\ud800b"}]}',
         "messages[0].content"),
        (b'{"model":"auto","messages":[{"role":"user","content":"a\\u0000b"}]}',
         "messages[0].content"),
        (b'{"model":"\\ud800","messages":[{"role":"user","content":"x"}]}', "model"),
        (b'{"model":"auto","semroute":{"\\udfff":1},"messages":[{"role":"user","content":"x"}]}',
         None),
        (b"\xff\xfe not utf-8", "body"),
    ],
)
async def test_bad_json_is_a_400_naming_the_field(
    door: HttpDoorHandle, raw: bytes, param: str | None
) -> None:
    """Deep nesting, 5,000-digit integers, lone surrogates, NUL, non-UTF-8: a 4xx with OpenAI's
    error shape naming the field, never a 500."""
    with capture_logs() as logs:
        r = await _post(door, raw, **{"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    error = r.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    else:
        assert error["param"]
    assert not [e for e in logs if e.get("log_level") == "error"]


async def test_echoed_values_are_bounded(door: HttpDoorHandle) -> None:
    """A long model name gets a short 404 (the value is cut and says how much)."""
    r = await _post(door, json.dumps(_chat(model="m" * 3_000)).encode(),
                    **{"content-type": "application/json"})
    assert r.status_code == 404
    assert len(r.content) < 1024 and "more characters" in r.json()["error"]["message"]
    async with httpx.AsyncClient(base_url=door.base_url, timeout=10) as http:
        r = await http.get("/models/" + "m" * 10_000)
    assert r.status_code == 404 and len(r.content) < 4096


async def test_client_leaving_mid_body_is_a_disconnect_not_an_error(door: HttpDoorHandle) -> None:
    """Headers promise 1,000 bytes, 10 arrive, the client closes: logged as a client gone."""
    with capture_logs() as logs:
        _reader, writer = await asyncio.open_connection(door.host, door.port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"model\": "
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
        for _ in range(100):
            if any(e["event"] == "http_client_gone" for e in logs):
                break
            await asyncio.sleep(0.02)
    assert any(e["event"] == "http_client_gone" for e in logs), logs
    assert not [e for e in logs if e.get("log_level") in ("error", "critical")]


async def test_healthz_is_503_once_draining(door: HttpDoorHandle) -> None:
    """The door's health goes NOT_SERVING (503) first when the process drains; new chats are
    refused with 503."""
    async with httpx.AsyncClient(base_url=f"http://{door.host}:{door.port}", timeout=10) as http:
        assert (await http.get("/healthz")).status_code == 200
        door.begin_drain()
        assert (await http.get("/healthz")).status_code == 503
        r = await http.post("/v1/chat/completions", json=_chat())
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
