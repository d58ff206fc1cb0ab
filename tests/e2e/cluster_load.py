"""Client load for the cluster test: N clients, each alternating a Route call (gRPC, through
nginx to the router replicas) and a streamed chat (OpenAI HTTP, through nginx to the dispatchers),
recording every outcome. The Route clients are plain stubs of the public contract on a channel
with the retry policy a client of routers behind nginx should use
(``ROUTER_RETRY_SERVICE_CONFIG``: nginx cannot replay a gRPC call a dying replica had
received). The clients run on their own event loop in a background thread, so the test's main
thread stays free to start and kill processes (PR_SET_PDEATHSIG is tied to the thread that forks
a child: see semroute.testing.devstack)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import grpc
import httpx

from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc
from semroute.testing.cluster_config import ROUTER_RETRY_SERVICE_CONFIG

PROMPTS = (
    "Write a Python function that reverses a string.",
    "What is the integral of x squared?",
    "Write a short poem about autumn leaves.",
    "Summarize this: the meeting moved to Tuesday and the budget was approved.",
    "Hi! How are you today?",
    "My doctor said my blood test results were abnormal, what should I do?",
    "Fix this SQL: SELECT * FROM users WHERE id = ",
    "If a train travels 60 km in 45 minutes, what is its speed in km/h?",
)


@dataclass
class RouteOutcome:
    started: float
    ended: float
    version: str = ""
    route: str = ""
    targets: tuple[str, ...] = ()
    error: str = ""


@dataclass
class ChatOutcome:
    started: float
    ended: float
    status: int = 0
    text: str = ""
    done: bool = False  # saw [DONE]
    upstream: str = ""  # nginx's x-semroute-upstream: the dispatcher door(s) tried
    route: str = ""
    chain: tuple[str, ...] = ()
    error: str = ""
    resent: int = 0  # times the client resent it after nginx closed the connection unanswered


@dataclass
class Load:
    """``start()`` the clients, ``stop()`` them (each finishes the call it is in)."""

    router_address: str
    http_url: str
    clients: int = 16
    routes: list[RouteOutcome] = field(default_factory=list)
    chats: list[ChatOutcome] = field(default_factory=list)
    in_flight: dict[int, ChatOutcome] = field(default_factory=dict)  # client -> its last chat
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 120.0) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "load clients did not finish their calls"

    def wait_for_stream(self, upstream: str, timeout: float = 30.0) -> bool:
        """Wait until some chat is streaming from ``upstream`` (its first token is in, its end
        is not); False if none was within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(c.upstream == upstream and c.text and not c.ended
                   for c in list(self.in_flight.values())):
                return True
            time.sleep(0.01)
        return False

    async def _main(self) -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=60.0) as http:
            await asyncio.gather(*(self._client(i, http) for i in range(self.clients)))

    async def _client(self, i: int, http: httpx.AsyncClient) -> None:
        calls = 0
        options = [("grpc.enable_retries", 1),
                   ("grpc.service_config", json.dumps(ROUTER_RETRY_SERVICE_CONFIG))]
        async with grpc.aio.insecure_channel(self.router_address, options=options) as channel:
            router = pb_grpc.RouterStub(channel)  # type: ignore[no-untyped-call]
            while not self._stop.is_set():
                prompt = PROMPTS[(i + calls) % len(PROMPTS)]
                self.routes.append(await _route(router, prompt))
                # A unique prompt: the response cache (shared in Redis) must not answer it.
                chat = self.in_flight[i] = ChatOutcome(started=time.monotonic(), ended=0.0)
                await _chat(http, self.http_url, f"{prompt} [{i}.{calls}]", chat)
                self.chats.append(chat)
                calls += 1


async def _route(router: pb_grpc.RouterStub, prompt: str) -> RouteOutcome:
    out = RouteOutcome(started=time.monotonic(), ended=0.0)
    try:
        reply = await router.Route(pb.RouteRequest(query=prompt), timeout=30.0)
    except grpc.aio.AioRpcError as exc:
        out.error = f"{exc.code().name}: {exc.details()}"
    else:
        out.version, out.route, out.targets = (
            reply.index_version, reply.route, tuple(reply.targets)
        )
    out.ended = time.monotonic()
    return out


async def _chat(http: httpx.AsyncClient, base: str, prompt: str, out: ChatOutcome) -> None:
    """One streamed chat. Like the OpenAI SDK, a request that got no response at all because
    the pooled keep-alive connection was closed under it (``RemoteProtocolError`` before any
    status) is sent once more on a new connection; ``out.resent`` counts it, so the test can
    tell a client-side keep-alive race from a server that failed the call."""
    body = {"model": "auto", "stream": True, "max_tokens": 32,
            "messages": [{"role": "user", "content": prompt}]}
    for attempt in range(2):
        try:
            async with http.stream("POST", f"{base}/chat/completions", json=body) as response:
                out.status = response.status_code
                out.upstream = response.headers.get("x-semroute-upstream", "")
                if response.status_code != 200:
                    out.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                else:
                    await _read_stream(response, out)
        except httpx.RemoteProtocolError as exc:
            if out.status == 0 and attempt == 0:
                out.resent += 1
                continue
            out.error = f"{type(exc).__name__}: {exc}"
        except httpx.HTTPError as exc:
            out.error = f"{type(exc).__name__}: {exc}"
        break
    out.ended = time.monotonic()


async def _read_stream(response: httpx.Response, out: ChatOutcome) -> None:
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            out.done = True
            continue
        event = json.loads(data)
        if "error" in event:
            out.error = f"error event: {event['error']}"
            continue
        for choice in event.get("choices", []):
            out.text += (choice.get("delta") or {}).get("content") or ""
        if "semroute" in event:
            out.route = event["semroute"]["route"]
            out.chain = tuple(event["semroute"]["chain"])
