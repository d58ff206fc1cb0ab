"""`semroute serve dispatcher` as run in production: files, a real router gRPC server, metrics.

The dispatcher is built from a backends.yaml on disk and connects to a real router server over
gRPC (router-grpc's server over the default index); fault servers stand in for the LLMs.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from semroute.config import load_settings
from semroute.dispatch.sse_client import upstream_request_id
from semroute.errors import ConfigError
from semroute.grpc.dispatcher_client import DispatcherClient
from semroute.grpc.router_service import create_router_server
from semroute.logs import add_request_id
from semroute.serve import serve_dispatcher
from semroute.testing.faultserver import FaultServer
from semroute.types import ChatRequest, Message
from tests.integration.dispatcher_fixtures import CHUNKS, CREATIVE_PROMPT, llms, split

pytestmark = pytest.mark.integration
__all__ = ["llms"]

UNSET_KEY = "SEMROUTE_TEST_KEY_THAT_IS_NEVER_SET"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_backends(path: Path, servers: dict[str, FaultServer]) -> Path:
    lines = ["backends:"]
    for name, server in servers.items():
        lines += [f"  {name}:", f"    base_url: {server.base_url}", f"    model: {name}"]
        if name.startswith("local"):
            lines.append("    local: true")
        else:
            lines.append(f"    api_key_env: {UNSET_KEY}")
        lines.append("    timeouts: {connect: 0.5, first_token: 1, idle: 1, total: 5}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
async def router_addr(default_index: Path, encoder_dir: Path) -> Any:
    settings = load_settings(encoder__path=encoder_dir, router_server__watch_interval_s=0)
    server, port, handle = await create_router_server(settings, default_index, port=0)
    await server.start()
    await handle.load()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
        close = getattr(handle, "close", None) or getattr(handle, "aclose", None)
        if close is not None:
            result = close()
            if asyncio.iscoroutine(result):
                await result


async def test_serves_from_files_with_request_id_end_to_end(
    tmp_path: Path, llms: dict[str, FaultServer], router_addr: str
) -> None:
    """From backends.yaml + a router address: the chat is answered; the request id we send is in
    the dispatcher's and the router's log lines and reaches the backend; cloud targets without a
    key are skipped with a logged reason; metrics are served; stop drains and returns."""
    backends = write_backends(tmp_path / "backends.yaml", llms)
    settings = load_settings(
        dispatcher__router=router_addr, dispatcher__backends_file=backends,
        dispatcher__port=0, dispatcher__metrics_port=free_port(), dispatcher__grace_s=0.5,
    )
    ready: asyncio.Future[tuple[int, int, int]] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    # The same request-id processor the services log with, so captured lines carry it.
    with capture_logs(processors=[add_request_id]) as logs:
        task = asyncio.create_task(serve_dispatcher(
            settings, stop=stop, on_ready=lambda *ports: ready.set_result(ports)))
        port, metrics_port, http_port = await asyncio.wait_for(ready, 30)
        async with DispatcherClient(f"127.0.0.1:{port}") as client:
            req = ChatRequest((Message("user", CREATIVE_PROMPT),), request_id="e2e-rid-42")
            events = [e async for e in client.chat(req)]
        metrics = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{metrics_port}/metrics")
        metrics_text = metrics.text
        stop.set()
        await asyncio.wait_for(task, 10)
    decision, text, done = split(events)
    assert (decision.route, done.target, text) == ("creative", "local-small", "".join(CHUNKS))
    assert http_port == 0
    assert llms["local-small"].chat_requests()[0].headers["x-request-id"] == (
        upstream_request_id("e2e-rid-42")
    )
    router_lines = [e for e in logs if e.get("event") == "rpc" and e.get("method") == "Route"]
    assert router_lines and all(e.get("request_id") == "e2e-rid-42" for e in router_lines)
    decided = [e for e in logs if e.get("event") == "decided"]
    assert decided and decided[0]["request_id"] == "e2e-rid-42"
    skipped = {e["target"]: e["reason"] for e in logs if e.get("event") == "backend_skipped"}
    assert set(skipped) == {"gpt-4o-mini", "gpt-4o"}
    assert UNSET_KEY in skipped["gpt-4o"]
    assert 'semroute_dispatcher_chats_total{outcome="ok"} 1.0' in metrics_text
    assert 'semroute_dispatcher_backend_requests_total{result="ok",target="local-small"} 1.0' \
        in metrics_text


async def test_rules_naming_unknown_targets_are_refused(
    tmp_path: Path, llms: dict[str, FaultServer]
) -> None:
    """A rules file that routes to a target missing from backends.yaml stops start-up with both
    files named."""
    backends = write_backends(tmp_path / "backends.yaml", llms)
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: r, keywords: [x], route: code, targets: [gpt-9]}\n")
    settings = load_settings(dispatcher__backends_file=backends, dispatcher__rules_file=rules,
                             dispatcher__port=0, dispatcher__metrics_port=0)
    with pytest.raises(ConfigError, match=r"rules\.yaml: rules name target\(s\) not in .*gpt-9"):
        await serve_dispatcher(settings)
