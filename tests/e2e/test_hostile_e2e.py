"""Issue 18 items 1 and 2 against a real llama.cpp server (llama-cpp-python), the backend the
tester hit: a client's own x-request-id must not make it answer 400, and prompts longer than
its context are the client's 400 (naming the limit), not a breaker trip for everyone."""

from __future__ import annotations

import httpx
import pytest

from semroute.testing.devstack import DevStack

pytestmark = pytest.mark.e2e


def _base(stack: DevStack) -> str:
    assert stack.dispatcher is not None and stack.dispatcher.http_port
    return f"http://127.0.0.1:{stack.dispatcher.http_port}/v1"


async def test_client_request_id_reaches_llama_cpp_as_a_uuid(stack: DevStack) -> None:
    """`x-request-id: my-trace-42` (llama.cpp refuses non-UUID ids) gets a real answer, and
    the response carries the client's id."""
    async with httpx.AsyncClient(base_url=_base(stack), timeout=120) as http:
        r = await http.post(
            "/chat/completions",
            headers={"x-request-id": "my-trace-42"},
            json={"model": "local-small", "max_tokens": 4,
                  "messages": [{"role": "user", "content": "Say hi."}]},
        )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "my-trace-42"


async def test_prompts_over_the_context_are_the_clients_400(stack: DevStack) -> None:
    """Several prompts longer than the model's context: each a 400 naming the problem; the
    backend is still served to others afterwards (its breaker did not open)."""
    long_prompt = "the quick brown fox jumps over the lazy dog " * 3000
    async with httpx.AsyncClient(base_url=_base(stack), timeout=120) as http:
        for _ in range(4):
            r = await http.post("/chat/completions", json={
                "model": "local-small", "max_tokens": 4,
                "messages": [{"role": "user", "content": long_prompt}]})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "messages"
        ok = await http.post("/chat/completions", json={
            "model": "local-small", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Say hi."}]})
    assert ok.status_code == 200, ok.text
