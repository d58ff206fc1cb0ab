"""SIGTERM drain of a dispatcher process (issue 18 item 6), through ``serve_dispatcher`` with a
stop event standing in for the signal: health NOT_SERVING first, both doors stop together, and
streams still running at the end of ``grace_s`` are cut with an error the client sees (gRPC
ABORTED, an SSE error event), never UNAVAILABLE after text was sent (a code clients retry)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import httpx
import pytest

from semroute.config import load_settings
from semroute.errors import SemrouteError, StreamInterrupted
from semroute.grpc.dispatcher_client import DispatcherClient
from semroute.serve import serve_dispatcher
from semroute.testing.faultserver import FaultServer, FaultSpec
from semroute.types import ChatRequest, DeltaEvent, Message
from tests.integration.test_dispatcher_serve import free_port, write_backends

pytestmark = pytest.mark.integration

GRACE_S = 0.6
SLOW = FaultSpec(chunks=tuple(f"w{i} " for i in range(400)), chunk_delay_s=0.05)


async def test_drain_cuts_long_streams_visibly_on_both_doors(tmp_path: Path) -> None:
    """Two long streams (gRPC and HTTP) in flight at stop: both end at the grace end with a
    shutting-down error after their text (nothing repeated), the process returns, and new
    chats are refused in the meantime."""
    servers = {name: FaultServer(SLOW, model=name).start() for name in ("local-small",)}
    try:
        backends = write_backends(tmp_path / "backends.yaml", servers)
        settings = load_settings(
            # No router listens there: chats use the static fallback chain (local-small).
            dispatcher__router=f"127.0.0.1:{free_port()}", dispatcher__backends_file=backends,
            dispatcher__port=0, dispatcher__metrics_port=0, dispatcher__http_port=free_port(),
            dispatcher__grace_s=GRACE_S, dispatcher__router_timeout_s=0.5,
        )
        ready: asyncio.Future[tuple[int, int, int]] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        task = asyncio.create_task(serve_dispatcher(
            settings, stop=stop, on_ready=lambda *ports: ready.set_result(ports)))
        port, _, http_port = await asyncio.wait_for(ready, 30)
        grpc_text: list[str] = []
        grpc_error: list[BaseException] = []
        first = asyncio.Event()

        async def grpc_stream() -> None:
            async with DispatcherClient(f"127.0.0.1:{port}", timeout=30) as client:
                try:
                    async for event in client.chat(ChatRequest((Message("user", "hi"),))):
                        if isinstance(event, DeltaEvent):
                            grpc_text.append(event.text)
                            first.set()
                except SemrouteError as exc:
                    grpc_error.append(exc)

        sse_lines: list[str] = []

        async def http_stream() -> None:
            async with httpx.AsyncClient(timeout=30) as http, http.stream(
                "POST", f"http://127.0.0.1:{http_port}/v1/chat/completions",
                json={"model": "auto", "stream": True,
                      "messages": [{"role": "user", "content": "hi"}]},
            ) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        sse_lines.append(line[6:])

        streams = [asyncio.create_task(grpc_stream()), asyncio.create_task(http_stream())]
        await asyncio.wait_for(first.wait(), 10)
        for _ in range(100):
            if len(sse_lines) >= 3:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.sleep(0.1)
        # Draining: a new chat is refused on both doors, nothing half-sent.
        async with DispatcherClient(f"127.0.0.1:{port}", timeout=5) as client:
            with pytest.raises(SemrouteError):
                async for _ in client.chat(ChatRequest((Message("user", "hi"),))):
                    pass
        with pytest.raises((httpx.HTTPError, AssertionError)):
            async with httpx.AsyncClient(timeout=5) as http:
                r = await http.post(f"http://127.0.0.1:{http_port}/v1/chat/completions",
                                    json={"model": "auto",
                                          "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200, "accepted a chat while draining"
        await asyncio.wait_for(asyncio.gather(*streams), GRACE_S + 10)
        await asyncio.wait_for(task, GRACE_S + 10)
    finally:
        for server in servers.values():
            server.stop()
    # gRPC: the text so far, then ABORTED saying why (not UNAVAILABLE: clients retry that).
    assert grpc_text and "".join(grpc_text) == "".join(SLOW.chunks[: len(grpc_text)])
    assert len(grpc_error) == 1 and isinstance(grpc_error[0], StreamInterrupted), grpc_error
    assert getattr(grpc_error[0], "grpc_code", None) == grpc.StatusCode.ABORTED
    assert "shutting down" in str(grpc_error[0])
    # HTTP: chunks, then an SSE error event (a complete body), no [DONE].
    last = json.loads(sse_lines[-1])
    assert "shutting down" in last["error"]["message"], sse_lines[-3:]
    assert "[DONE]" not in sse_lines
