"""LLM backends: configuration, the streaming OpenAI-compatible client, breaker and limits.

``backends.yaml`` names each target the router may pick and says how to reach it::

    backends:
      local-small:
        base_url: http://127.0.0.1:8081/v1   # what the OpenAI SDK calls base_url (ends in /v1)
        model: smollm2                        # the "model" field sent upstream
        local: true                           # runs on our machines: allowed for sensitive prompts
        max_concurrency: 4                    # in-flight requests to this backend
        input_cost: 0.0                       # USD per 1M prompt tokens
        output_cost: 0.0                      # USD per 1M completion tokens
        timeouts: {connect: 2, first_token: 30, idle: 30, total: 300}   # seconds
      gpt-4o-mini:
        base_url: https://api.openai.com/v1
        model: gpt-4o-mini
        api_key_env: OPENAI_API_KEY           # the variable's NAME; never the key itself
        input_cost: 0.15
        output_cost: 0.60

A target whose ``api_key_env`` variable is unset is skipped (``BackendPool.skipped`` says why);
the dispatcher moves past it like any other unavailable target.

``BackendClient.stream`` is the only place that talks HTTP. Every httpx, HTTP status and SSE
problem leaves it as one of the ``semroute.errors.BackendError`` subclasses (``raise ... from``),
so the dispatcher decides retry / failover on our own types only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
import yaml

from semroute.errors import (
    BackendError,
    BackendProtocolError,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    CircuitOpen,
    ConfigError,
)
from semroute.types import GenerationParams, Message, Target

# ---- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    """Seconds. ``first_token``: request sent -> first content token; ``idle``: between chunks;
    ``total``: the whole attempt."""

    connect: float = 2.0
    first_token: float = 30.0
    idle: float = 30.0
    total: float = 300.0


@dataclass(frozen=True)
class BackendConfig:
    """One entry of backends.yaml (see the module docstring)."""

    name: str
    base_url: str
    model: str
    api_key_env: str | None = None
    timeouts: Timeouts = Timeouts()
    max_concurrency: int = 8
    input_cost: float = 0.0
    output_cost: float = 0.0
    local: bool = False
    stream_usage: bool = True  # send stream_options.include_usage (some servers reject it)
    source: str = ""  # file the entry came from, for messages

    @property
    def target(self) -> Target:
        return Target(self.name, self.input_cost, self.output_cost, self.local)

    @property
    def cost(self) -> float:
        """Blended USD per 1M tokens, as ``Target.cost`` (used for ``max_cost``)."""
        return self.target.cost

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_cost + completion_tokens * self.output_cost) / 1e6


_BACKEND_KEYS = {
    "base_url",
    "model",
    "api_key_env",
    "timeouts",
    "max_concurrency",
    "input_cost",
    "output_cost",
    "local",
    "stream_usage",
}
_TIMEOUT_KEYS = {"connect", "first_token", "idle", "total"}


def load_backends(path: Path) -> dict[str, BackendConfig]:
    """Read backends.yaml. Raises ConfigError naming the file and the field (``backends.X.Y``)
    for every problem found, not just the first. Order of the file is kept."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read backends file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("backends"), dict):
        raise ConfigError(f"{path}: expected a top-level mapping `backends:` of target -> settings")
    problems: list[str] = []
    out: dict[str, BackendConfig] = {}
    for name, entry in raw["backends"].items():
        where = f"backends.{name}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping, got {type(entry).__name__}")
            continue
        before = len(problems)
        for key in sorted(set(entry) - _BACKEND_KEYS):
            problems.append(
                f"{where}.{key}: unknown field (allowed: {', '.join(sorted(_BACKEND_KEYS))})"
            )
        base_url = _string(entry, "base_url", where, problems, required=True)
        if base_url and not base_url.startswith(("http://", "https://")):
            problems.append(
                f"{where}.base_url: must start with http:// or https://, got {base_url!r}"
            )
        model = _string(entry, "model", where, problems, required=True)
        key_env = _string(entry, "api_key_env", where, problems, required=False)
        if key_env and not key_env.replace("_", "").isalnum():
            problems.append(
                f"{where}.api_key_env: must be an environment variable NAME (letters, digits, _), "
                "never the key itself"
            )
        timeouts = _timeouts(entry.get("timeouts", {}), f"{where}.timeouts", problems)
        max_conc = _number(entry, "max_concurrency", where, problems, 8, minimum=1, integer=True)
        in_cost = _number(entry, "input_cost", where, problems, 0.0, minimum=0.0)
        out_cost = _number(entry, "output_cost", where, problems, 0.0, minimum=0.0)
        local = _bool(entry, "local", where, problems, False)
        stream_usage = _bool(entry, "stream_usage", where, problems, True)
        if len(problems) == before:
            out[str(name)] = BackendConfig(
                name=str(name),
                base_url=base_url.rstrip("/"),
                model=model,
                api_key_env=key_env or None,
                timeouts=timeouts,
                max_concurrency=int(max_conc),
                input_cost=in_cost,
                output_cost=out_cost,
                local=local,
                stream_usage=stream_usage,
                source=str(path),
            )
    if not raw["backends"]:
        problems.append("backends: no backend defined")
    if problems:
        raise ConfigError(f"{path}: invalid backends file:\n  " + "\n  ".join(problems))
    return out


def _string(
    entry: Mapping[str, Any], key: str, where: str, problems: list[str], *, required: bool
) -> str:
    value = entry.get(key)
    if value is None:
        if required:
            problems.append(f"{where}.{key}: required")
        return ""
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}.{key}: must be a non-empty string")
        return ""
    return value.strip()


def _number(
    entry: Mapping[str, Any],
    key: str,
    where: str,
    problems: list[str],
    default: float,
    *,
    minimum: float,
    integer: bool = False,
    positive: bool = False,
) -> float:
    value = entry.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and integer and not isinstance(value, int):
        ok = False
    if not ok or not math.isfinite(float(value)):
        kind = "an integer" if integer else "a number"
        problems.append(f"{where}.{key}: must be {kind}, got {value!r}")
        return default
    if float(value) < minimum or (positive and float(value) <= 0):
        limit = f"> {minimum}" if positive else f">= {minimum}"
        problems.append(f"{where}.{key}: must be {limit}, got {value!r}")
        return default
    return float(value)


def _bool(
    entry: Mapping[str, Any], key: str, where: str, problems: list[str], default: bool
) -> bool:
    value = entry.get(key, default)
    if not isinstance(value, bool):
        problems.append(f"{where}.{key}: must be true or false, got {value!r}")
        return default
    return value


def _timeouts(raw: Any, where: str, problems: list[str]) -> Timeouts:
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping with {', '.join(sorted(_TIMEOUT_KEYS))}")
        return Timeouts()
    for key in sorted(set(raw) - _TIMEOUT_KEYS):
        problems.append(
            f"{where}.{key}: unknown timeout (allowed: {', '.join(sorted(_TIMEOUT_KEYS))})"
        )
    d = Timeouts()
    values = {
        k: _number(raw, k, where, problems, getattr(d, k), minimum=0.0, positive=True)
        for k in _TIMEOUT_KEYS
    }
    return Timeouts(**values)


# ---- circuit breaker ----------------------------------------------------------------------------


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after ``failures`` consecutive failures; after ``cooldown_s`` lets exactly one probe
    through (half-open). A successful probe closes it, a failed one re-opens it for another
    cooldown. ``clock`` is injectable so tests need not sleep."""

    def __init__(self, failures: int, cooldown_s: float, clock: Any = time.monotonic) -> None:
        if failures < 1:
            raise ValueError("failures must be >= 1")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._probing or self._clock() - self._opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def retry_in(self) -> float:
        """Seconds until the next probe is allowed (0 when closed or half-open)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self.cooldown_s - (float(self._clock()) - self._opened_at))

    def try_acquire(self) -> bool:
        """May a request go through now? In half-open state only one caller gets True until it
        reports back with ``record_success``/``record_failure``/``release``."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        self._consecutive += 1
        if self._probing or self._consecutive >= self.failures:
            self._opened_at = float(self._clock())
        self._probing = False

    def release(self) -> None:
        """The call ended without saying anything about the backend's health (cancelled,
        rejected input): free the half-open probe slot without changing the state."""
        self._probing = False


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
    ) -> AsyncGenerator[str, None]:
        """Yield content text chunks as the backend streams them; fill ``result`` on the way.

        Raises BackendTimeout / BackendUnavailable / BackendRateLimited / BackendRejected /
        BackendProtocolError. Closing the generator early (``aclose`` or cancellation) closes the
        upstream HTTP request at once.
        """
        t = self.config.timeouts
        start = time.monotonic()
        total_deadline = start + t.total
        first_deadline = min(start + t.first_token, total_deadline)
        headers = {"X-Request-ID": request_id} if request_id else {}
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
        raise BackendRejected(self.name, f"HTTP {code}{detail}")

    async def aclose(self) -> None:
        await self._client.aclose()


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _loop_time(monotonic_deadline: float) -> float:
    """asyncio.timeout_at wants loop time; convert from time.monotonic."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())


# ---- pool ---------------------------------------------------------------------------------------


class ConcurrencyLimited(BackendRateLimited):
    """Our own ``max_concurrency`` is reached (the backend itself may be healthy)."""


class Backend:
    """A backend with its client, breaker and concurrency limit."""

    def __init__(
        self, config: BackendConfig, client: BackendClient, breaker: CircuitBreaker
    ) -> None:
        self.config = config
        self.client = client
        self.breaker = breaker
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self.in_flight = 0

    @property
    def name(self) -> str:
        return self.config.name

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of ``max_concurrency`` slots; waits at most ``timeouts.connect`` for one and
        then raises BackendRateLimited (the limit is ours, the effect is the same as a 429)."""
        try:
            async with asyncio.timeout(self.config.timeouts.connect):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise ConcurrencyLimited(
                self.name,
                f"max_concurrency {self.config.max_concurrency} reached; no slot within "
                f"{self.config.timeouts.connect:g} s",
            ) from exc
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()

    def check_breaker(self) -> None:
        if not self.breaker.try_acquire():
            raise CircuitOpen(
                self.name,
                f"circuit open after {self.breaker.failures} consecutive failures; "
                f"next probe in {self.breaker.retry_in():.1f} s",
            )


class BackendPool:
    """All configured backends, in file order. ``skipped`` maps each target that cannot be used
    (cloud key variable unset) to the reason."""

    def __init__(
        self,
        configs: Mapping[str, BackendConfig],
        *,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 10.0,
        environ: Mapping[str, str] | None = None,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        # The one place outside config.py that reads the environment: API keys by variable name.
        env = os.environ if environ is None else environ
        self.configs = dict(configs)
        self.backends: dict[str, Backend] = {}
        self.skipped: dict[str, str] = {}
        for name, cfg in self.configs.items():
            key = None
            if cfg.api_key_env:
                key = env.get(cfg.api_key_env) or None
                if key is None:
                    self.skipped[name] = (
                        f"target {name!r} skipped: environment variable {cfg.api_key_env} "
                        f"(backends.{name}.api_key_env in {cfg.source or 'backends file'}) "
                        "is not set"
                    )
                    continue
            transport = (transports or {}).get(name)
            self.backends[name] = Backend(
                cfg,
                BackendClient(cfg, key, transport),
                CircuitBreaker(breaker_failures, breaker_cooldown_s, clock),
            )

    def get(self, name: str) -> Backend | None:
        return self.backends.get(name)

    def names(self) -> list[str]:
        """Every configured target, usable or skipped, in file order."""
        return list(self.configs)

    def local_names(self) -> list[str]:
        return [n for n, c in self.configs.items() if c.local]

    async def aclose(self) -> None:
        await asyncio.gather(*(b.client.aclose() for b in self.backends.values()))
