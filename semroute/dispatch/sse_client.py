"""The streaming OpenAI-compatible client of one backend.

``BackendClient.stream`` is the only place that talks HTTP. Every httpx, HTTP status and SSE
problem leaves it as one of the ``semroute.errors.BackendError`` subclasses (``raise ... from``),
so the dispatcher decides retry / failover on our own types only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from semroute.dispatch.backend_config import BackendConfig
from semroute.errors import (
    BackendError,
    BackendProtocolError,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)
from semroute.types import GenerationParams, Message

# ---- streaming client ---------------------------------------------------------------------------


@dataclass
class StreamResult:
    """Filled in by ``BackendClient.stream`` as the stream goes; complete once it ends."""

    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: bool = False  # False: token counts are our estimate
    chunks: int = 0  # content chunks received
    retry_after_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def estimate_tokens(text: str) -> int:
    """Rough token count for servers that do not report usage (about 4 characters a token)."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


class BackendClient:
    """One pooled ``httpx.AsyncClient`` per backend, streaming ``POST {base_url}/chat/completions``.

    ``transport`` is the test seam (an ``httpx.MockTransport`` or ``ASGITransport``); production
    passes None.
    """

    def __init__(
        self,
        config: BackendConfig,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        t = config.timeouts
        headers = {"Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            base_url=config.base_url,
            headers=headers,
            # read=None: first-token/idle/total are enforced per chunk below, where we know which.
            timeout=httpx.Timeout(connect=t.connect, read=None, write=t.connect, pool=t.connect),
            limits=httpx.Limits(
                max_connections=config.max_concurrency,
                max_keepalive_connections=config.max_concurrency,
            ),
            transport=transport,
            # A local backend must never be reached through an environment proxy.
            trust_env=not config.local,
        )

    @property
    def name(self) -> str:
        return self.config.name

    def request_body(self, messages: Sequence[Message], params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
        }
        if self.config.stream_usage:
            body["stream_options"] = {"include_usage": True}
        if params.max_tokens is not None:
            body["max_tokens"] = params.max_tokens
        if params.temperature is not None:
            body["temperature"] = params.temperature
        if params.top_p is not None:
            body["top_p"] = params.top_p
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    async def stream(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        result: StreamResult,
        *,
        request_id: str = "",
        first_token_by: float | None = None,
    ) -> AsyncGenerator[str, None]:
        """Yield content text chunks as the backend streams them; fill ``result`` on the way.

        ``request_id`` is ours (maybe a client's); the backend gets ``upstream_request_id`` of
        it, a UUID, since some servers (llama.cpp's) refuse any other ``X-Request-ID``.
        ``first_token_by`` (``time.monotonic``) caps the wait for the first token (the chain's
        budget). Raises BackendTimeout / BackendUnavailable / BackendRateLimited / BackendRejected /
        BackendProtocolError. Closing the generator early (``aclose`` or cancellation) closes the
        upstream HTTP request at once.
        """
        t = self.config.timeouts
        start = time.monotonic()
        total_deadline = start + t.total
        first_deadline = min(start + t.first_token, total_deadline)
        budget_binds = first_token_by is not None and first_token_by < first_deadline
        if first_token_by is not None:
            first_deadline = min(first_deadline, first_token_by)
        headers = {"X-Request-ID": upstream_request_id(request_id)} if request_id else {}
        body = self.request_body(messages, params)
        name = self.name
        text_out: list[str] = []
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    async with asyncio.timeout_at(_loop_time(first_deadline)):
                        response = await stack.enter_async_context(
                            self._client.stream(
                                "POST", "/chat/completions", json=body, headers=headers
                            )
                        )
                except TimeoutError as exc:
                    raise BackendTimeout(
                        name,
                        _BUDGET_SPENT if budget_binds else
                        f"no response headers within {t.first_token:g} s (timeouts.first_token)",
                    ) from exc
                if response.status_code != 200:
                    await self._raise_for_status(response, result)
                lines = response.aiter_lines()
                data: list[str] = []
                done = False
                while not done:
                    deadline = first_deadline if result.chunks == 0 else time.monotonic() + t.idle
                    deadline = min(deadline, total_deadline)
                    try:
                        async with asyncio.timeout_at(_loop_time(deadline)):
                            line = await anext(lines)
                    except StopAsyncIteration:
                        break
                    except TimeoutError as exc:
                        if budget_binds and result.chunks == 0:
                            raise BackendTimeout(name, _BUDGET_SPENT) from exc
                        raise BackendTimeout(name, self._timeout_message(result, start)) from exc
                    if line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                        continue
                    if line or not data:
                        continue  # comments (":"), event:/id:/retry: fields, stray blank lines
                    payload = "\n".join(data)
                    data = []
                    if payload.strip() == "[DONE]":
                        done = True
                        await self._drain(lines)
                        break
                    for text in self._parse_event(payload, result):
                        text_out.append(text)
                        yield text
                if data and not done:
                    # A last event without the blank line after it: still an event.
                    payload = "\n".join(data)
                    if payload.strip() == "[DONE]":
                        done = True
                    else:
                        for text in self._parse_event(payload, result):
                            text_out.append(text)
                            yield text
                if not done and not result.finish_reason:
                    raise BackendUnavailable(
                        name,
                        "stream ended without [DONE] or finish_reason after "
                        f"{result.chunks} chunk(s)",
                    )
        except BackendError:
            raise
        except httpx.ConnectTimeout as exc:
            raise BackendTimeout(
                name, f"connect timed out after {t.connect:g} s (timeouts.connect)"
            ) from exc
        except httpx.PoolTimeout as exc:
            raise BackendTimeout(name, f"no free connection within {t.connect:g} s") from exc
        except httpx.ConnectError as exc:
            raise BackendUnavailable(
                name, f"cannot connect to {self.config.base_url}: {exc}"
            ) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise BackendUnavailable(
                name,
                f"connection broken after {result.chunks} chunk(s): {type(exc).__name__}: {exc}",
            ) from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailable(name, f"{type(exc).__name__}: {exc}") from exc
        if not result.usage_reported:
            result.prompt_tokens = sum(estimate_tokens(m.content) for m in messages)
            result.completion_tokens = result.chunks
        if not result.finish_reason:
            result.finish_reason = "stop"

    async def _drain(self, lines: AsyncIterator[str]) -> None:
        """Read what follows ``[DONE]`` (normally just the end of the chunked body) so the
        connection goes back to the pool instead of being closed; give up after the idle
        timeout (the connection is then closed, nothing else happens)."""
        try:
            async with asyncio.timeout(self.config.timeouts.idle):
                async for _ in lines:
                    pass
        except (TimeoutError, httpx.HTTPError):
            pass

    def _timeout_message(self, result: StreamResult, start: float) -> str:
        t = self.config.timeouts
        elapsed = time.monotonic() - start
        if elapsed >= t.total - 1e-3:
            return f"attempt exceeded {t.total:g} s (timeouts.total)"
        if result.chunks == 0:
            return f"no first token within {t.first_token:g} s (timeouts.first_token)"
        return f"no data for {t.idle:g} s after {result.chunks} chunk(s) (timeouts.idle)"

    def _parse_event(self, payload: str, result: StreamResult) -> list[str]:
        try:
            event = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise BackendProtocolError(
                self.name,
                f"malformed SSE data (not JSON) after {result.chunks} chunk(s): {payload[:80]!r}",
            ) from exc
        if not isinstance(event, dict):
            raise BackendProtocolError(
                self.name, f"SSE event is not a JSON object: {payload[:80]!r}"
            )
        if "error" in event:
            err = event["error"]
            message = err.get("message", err) if isinstance(err, dict) else err
            raise BackendUnavailable(self.name, f"error event in stream: {str(message)[:200]}")
        usage = event.get("usage")
        if isinstance(usage, dict):
            result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            result.completion_tokens = int(usage.get("completion_tokens") or 0)
            result.usage_reported = True
        choices = event.get("choices")
        if choices is None:
            return []
        if not isinstance(choices, list):
            raise BackendProtocolError(self.name, f"`choices` is not a list: {payload[:80]!r}")
        texts: list[str] = []
        for choice in choices:
            if not isinstance(choice, dict):
                raise BackendProtocolError(self.name, f"choice is not an object: {payload[:80]!r}")
            if choice.get("finish_reason"):
                result.finish_reason = str(choice["finish_reason"])
            delta = choice.get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if content:
                result.chunks += 1
                texts.append(str(content))
        return texts

    async def _raise_for_status(self, response: httpx.Response, result: StreamResult) -> None:
        code = response.status_code
        try:
            async with asyncio.timeout(self.config.timeouts.connect):
                raw = await response.aread()
            detail = raw.decode("utf-8", "replace")[:200].strip()
        except (TimeoutError, httpx.HTTPError):
            detail = ""
        detail = f": {detail}" if detail else ""
        if code == 429:
            result.retry_after_s = _retry_after(response.headers.get("retry-after"))
            raise BackendRateLimited(self.name, f"HTTP 429 rate limited{detail}")
        if code >= 500:
            raise BackendUnavailable(self.name, f"HTTP {code}{detail}")
        rejected = BackendRejected(self.name, f"HTTP {code}{detail}")
        rejected.status = code  # type: ignore[attr-defined]  # the dispatcher tells 400 from 401
        raise rejected

    async def aclose(self) -> None:
        await self._client.aclose()


_BUDGET_SPENT = (
    "no first token within the chain's budget (dispatcher.first_token_budget_s or the client's "
    "deadline)"
)
# A fixed namespace: the same id of ours always maps to the same upstream UUID (log joins).
_UPSTREAM_ID_NAMESPACE = uuid.UUID("5a1e7c2e-0b7e-4f4e-9d57-3e6f2f1b8a10")


def upstream_request_id(request_id: str) -> str:
    """The ``X-Request-ID`` a backend gets for our ``request_id``: the id itself when it is a
    UUID (ours are), else a UUID derived from it. A client's own header never reaches a backend
    as sent, so it cannot decide the backend's answer."""
    try:
        return str(uuid.UUID(request_id))
    except ValueError:
        return str(uuid.uuid5(_UPSTREAM_ID_NAMESPACE, request_id))


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent or
    unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        import email.utils

        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _loop_time(monotonic_deadline: float) -> float:
    """asyncio.timeout_at wants loop time; convert from time.monotonic."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())


