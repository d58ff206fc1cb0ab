"""A small, real OpenAI-compatible HTTP server that misbehaves on request.

Used by loopback tests and benchmarks as an LLM backend whose failures we choose: it speaks
HTTP/1.1 over a real socket (127.0.0.1, free port), streams ``/v1/chat/completions`` as SSE with
chunked transfer encoding, and records every request it receives so a test can assert what
reached it (and whether the client hung up).

Modes (``FaultSpec.mode``):

``normal``        stream ``chunks`` (``chunk_delay_s`` apart), usage if asked, ``[DONE]``
``refuse``        nothing listens on the port: connections are refused by the kernel
``500``/``429``   an HTTP error status (429 carries ``Retry-After: retry_after``); ``status``
                  overrides the code
``400``           the request refused as llama.cpp refuses a prompt over its context (the
                  client's fault, not the backend's)
``slow``          headers at once, first chunk after ``delay_s``, then normal
``drop``          ``after`` chunks, then the TCP connection is closed mid-body
``malformed``     ``after`` chunks, then an SSE ``data:`` line that is not JSON
``hang``          ``after`` chunks (0: not even headers), then silence until the client leaves

``script([...])`` queues specs for the next requests; afterwards ``default`` applies. With
``strict_request_id=True`` the server answers 400 to an ``X-Request-ID`` that is not a UUID, as
llama-cpp-python's server does. It runs its own event loop in a daemon thread, so sync and async
tests use it alike; always ``stop()`` it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MODES = ("normal", "refuse", "500", "429", "400", "slow", "drop", "malformed", "hang")
CONTEXT_ERROR = (
    "This model's maximum context length is 2048 tokens. However, you requested 5000 tokens "
    "(4990 in the messages, 10 in the completion). Please reduce the length of the messages "
    "or completion."
)


@dataclass(frozen=True)
class FaultSpec:
    mode: str = "normal"
    chunks: tuple[str, ...] = ("Hello", ",", " world", "!")
    chunk_delay_s: float = 0.0
    delay_s: float = 0.0  # slow: before the first chunk
    after: int = 0  # drop / malformed / hang: chunks sent before the fault
    status: int | None = None  # 500 / 429 modes: the code to send
    send_usage: bool = True  # honour stream_options.include_usage
    finish_reason: str = "stop"
    retry_after: str = "0"  # 429: the Retry-After header's value

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; one of {', '.join(MODES)}")


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    mode: str
    received_at: float  # time.monotonic()
    peer: str = ""  # client host:port (same port on two requests = a reused connection)
    chunks_sent: int = 0
    completed: bool = False
    disconnected_at: float | None = None  # client closed the connection before we finished

    @property
    def text(self) -> str:
        """All message contents sent to us, joined (what a PII test checks)."""
        msgs = self.body.get("messages") or []
        return "\n".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))


@dataclass
class _State:
    default: FaultSpec
    queue: deque[FaultSpec] = field(default_factory=deque)
    requests: list[RecordedRequest] = field(default_factory=list)


class FaultServer:
    """See the module docstring. ``base_url`` ends in ``/v1`` like an OpenAI endpoint."""

    def __init__(
        self,
        default: FaultSpec | None = None,
        *,
        model: str = "fault-model",
        port: int = 0,
        strict_request_id: bool = False,
    ) -> None:
        self.model = model
        self.strict_request_id = strict_request_id
        self._want_port = port
        self._state = _State(default or FaultSpec())
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._placeholder: socket.socket | None = None
        self._conns: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.port = 0

    # ---- lifecycle (call from any thread) ----

    def start(self) -> FaultServer:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        failure: list[BaseException] = []

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._listen(self._want_port))
            except OSError as exc:
                failure.append(exc)
                return
            finally:
                ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"faultserver-{id(self):x}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault server did not start")
        if failure:
            self._loop.close()
            self._loop = None
            raise RuntimeError(
                f"fault server cannot listen on port {self._want_port}: {failure[0]}"
            )
        if self._state.default.mode == "refuse":
            self._call(self._refuse())
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ---- behaviour ----

    def set_default(self, spec: FaultSpec) -> None:
        """Behaviour for every request not covered by ``script``. Switching to or from
        ``refuse`` closes or reopens the listening socket on the same port."""
        old = self._state.default
        with self._lock:
            self._state.default = spec
        if spec.mode == "refuse" and old.mode != "refuse":
            self._call(self._refuse())
        elif spec.mode != "refuse" and old.mode == "refuse":
            self._call(self._listen(self.port))

    def script(self, specs: Sequence[FaultSpec]) -> None:
        """Queue behaviours for the next requests, in order (``refuse`` is not scriptable)."""
        if any(s.mode == "refuse" for s in specs):
            raise ValueError("refuse cannot be scripted per request; use set_default")
        with self._lock:
            self._state.queue.extend(specs)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._state.requests)

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def clear(self) -> None:
        with self._lock:
            self._state.requests.clear()
            self._state.queue.clear()

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        """Poll until ``predicate(self)`` is true (e.g. a disconnect was seen); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.005)
        return bool(predicate(self))

    # ---- internals (event-loop thread) ----

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self, port: int) -> None:
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _refuse(self) -> None:
        # A socket bound to the port but not listening: connects get RST (ECONNREFUSED) and no
        # other process can take the port meanwhile.
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self._placeholder = sock

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        # Abort the connections rather than cancel the handlers: each handler then ends on its
        # own (cancelled stream handlers make asyncio log spurious tracebacks).
        for writer in list(self._conns.values()):
            writer.transport.abort()
        if self._conns:
            _, pending = await asyncio.wait(list(self._conns), timeout=2)
            for task in pending:
                task.cancel()
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    def _next_spec(self) -> FaultSpec:
        with self._lock:
            return self._state.queue.popleft() if self._state.queue else self._state.default

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns[task] = writer
        try:
            pending = b""
            while True:
                request = await self._read_request(reader, pending)
                if request is None:
                    return
                method, path, headers, body = request
                keep, pending = await self._respond(reader, writer, method, path, headers, body)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._conns.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(
        self, reader: asyncio.StreamReader, pending: bytes
    ) -> tuple[str, str, dict[str, str], bytes] | None:
        try:
            head = pending + await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        return method, path, headers, body

    async def _respond(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        path: str,
        headers: dict[str, str],
        raw: bytes,
    ) -> tuple[bool, bytes]:
        if method == "GET" and path.endswith("/models"):
            data = json.dumps({"object": "list", "data": [{"id": self.model, "object": "model"}]})
            await self._send_plain(writer, 200, data)
            return True, b""
        if method != "POST" or not path.endswith("/chat/completions"):
            await self._send_plain(writer, 404, json.dumps({"error": {"message": "not found"}}))
            return True, b""
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            await self._send_plain(writer, 400, json.dumps({"error": {"message": "bad JSON"}}))
            return True, b""
        rid = headers.get("x-request-id")
        if self.strict_request_id and rid is not None and not _is_uuid(rid):
            # llama-cpp-python's server (starlette-context's request-id plugin) does this.
            await self._send_plain(writer, 400, json.dumps({"error": {
                "message": f"Invalid X-Request-ID: {rid[:64]}", "type": "invalid_request"}}))
            return True, b""
        spec = self._next_spec()
        peer = writer.get_extra_info("peername") or ("", 0)
        rec = RecordedRequest(
            method, path, headers, body, spec.mode, time.monotonic(), f"{peer[0]}:{peer[1]}"
        )
        with self._lock:
            self._state.requests.append(rec)
        # Watch the socket while we answer, so a client hang-up is seen at once.
        watch = asyncio.ensure_future(reader.read(1))
        watch.add_done_callback(lambda f: _mark_disconnect(f, rec))
        try:
            keep = await self._answer(writer, spec, body, rec, watch)
        finally:
            if not watch.done():
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
        if rec.disconnected_at is not None or not keep:
            return False, b""
        leftover = watch.result() if watch.done() and not watch.cancelled() else b""
        return True, leftover

    async def _answer(
        self,
        writer: asyncio.StreamWriter,
        spec: FaultSpec,
        body: dict[str, Any],
        rec: RecordedRequest,
        watch: asyncio.Future[bytes],
    ) -> bool:
        if spec.mode in ("500", "429", "400"):
            code = spec.status or int(spec.mode)
            extra = {"Retry-After": spec.retry_after} if code == 429 else {}
            text = CONTEXT_ERROR if spec.mode == "400" else f"injected {code}"
            msg = json.dumps({"error": {"message": text, "type": "fault"}})
            await self._send_plain(writer, code, msg, extra)
            rec.completed = True
            return True
        if spec.mode == "hang" and spec.after == 0:
            await _until_gone(watch)
            return False
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        if spec.mode == "slow" and spec.delay_s > 0:
            await _sleep_or_gone(spec.delay_s, watch)
        created = int(time.time())
        for i, text in enumerate(spec.chunks):
            if rec.disconnected_at is not None:
                return False
            if spec.mode in ("drop", "malformed", "hang") and i == spec.after:
                return await self._fault(writer, spec, watch)
            if i and spec.chunk_delay_s > 0:
                await _sleep_or_gone(spec.chunk_delay_s, watch)
            event = {
                "id": "chatcmpl-fault",
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            }
            await _send_event(writer, json.dumps(event))
            rec.chunks_sent += 1
        if spec.mode in ("drop", "malformed", "hang"):
            return await self._fault(writer, spec, watch)
        final = {
            "id": "chatcmpl-fault",
            "object": "chat.completion.chunk",
            "created": created,
            "model": self.model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": spec.finish_reason}],
        }
        await _send_event(writer, json.dumps(final))
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if spec.send_usage and wants_usage:
            prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
            usage = {
                "id": "chatcmpl-fault",
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": rec.chunks_sent,
                    "total_tokens": prompt + rec.chunks_sent,
                },
            }
            await _send_event(writer, json.dumps(usage))
        await _send_event(writer, "[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        rec.completed = True
        return True

    async def _fault(
        self, writer: asyncio.StreamWriter, spec: FaultSpec, watch: asyncio.Future[bytes]
    ) -> bool:
        if spec.mode == "malformed":
            await _send_event(writer, '{"choices": [{"delta": {"content": "oops"')
            await _send_event(writer, "[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return False
        if spec.mode == "hang":
            await _until_gone(watch)
            return False
        # drop: abort the connection with the chunked body unfinished.
        writer.transport.abort()
        return False

    async def _send_plain(
        self,
        writer: asyncio.StreamWriter,
        code: int,
        body: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        payload = body.encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests"}.get(
            code, "Error"
        )
        head = [f"HTTP/1.1 {code} {reason}", "Content-Type: application/json"]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        head.append(f"Content-Length: {len(payload)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        await writer.drain()


def _is_uuid(value: str) -> bool:
    import uuid

    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _mark_disconnect(fut: asyncio.Future[bytes], rec: RecordedRequest) -> None:
    if fut.cancelled() or rec.disconnected_at is not None or rec.completed:
        return
    if fut.exception() is not None or fut.result() == b"":
        rec.disconnected_at = time.monotonic()


async def _send_event(writer: asyncio.StreamWriter, data: str) -> None:
    payload = f"data: {data}\n\n".encode()
    writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
    await writer.drain()


async def _until_gone(watch: asyncio.Future[bytes]) -> None:
    with contextlib.suppress(Exception):
        await asyncio.shield(watch)


async def _sleep_or_gone(seconds: float, watch: asyncio.Future[bytes]) -> None:
    with contextlib.suppress(TimeoutError, Exception):
        await asyncio.wait_for(asyncio.shield(watch), seconds)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m semroute.testing.faultserver [--port N] [--mode M] ...``: serve until
    SIGTERM/SIGINT in its own process (benchmarks use this so the backend does not share a GIL
    with what is measured). Prints ``fault server listening on PORT`` once ready."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description="fault-injecting OpenAI-compatible server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mode", choices=MODES, default="normal")
    parser.add_argument("--chunks", type=int, default=4, help="content chunks per answer")
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--delay", type=float, default=0.0, help="slow: before the first chunk")
    parser.add_argument("--model", default="fault-model")
    args = parser.parse_args(argv)
    spec = FaultSpec(
        args.mode,
        chunks=tuple(f"tok{i} " for i in range(args.chunks)),
        chunk_delay_s=args.chunk_delay,
        delay_s=args.delay,
    )
    server = FaultServer(spec, model=args.model, port=args.port)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"fault server listening on {server.port}", flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
