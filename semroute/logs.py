"""Structured logs (structlog) and the request id that ties a call's log lines together.

``configure_logging(settings.log)`` once per process (the CLI does it); library code just calls
``get_logger(__name__)`` and logs keyword events: ``log.info("routed", route=..., ms=...)``.
Every line carries ``request_id`` while one is bound (the gRPC request-id interceptor binds it
for the whole call, from ``x-request-id`` metadata or a fresh one).

Query text is personal data: log ``text_fields(text, settings)`` (a hash and the length) and the
text itself only when the operator set ``log.log_query_text``.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import sys
import time
import uuid
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

from semroute.config import LogSettings

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "semroute_request_id", default=None
)

REQUEST_ID_HEADER = "x-request-id"
# Client-supplied ids are echoed into logs: keep them short and printable.
MAX_REQUEST_ID_LEN = 128


def new_request_id() -> str:
    """A fresh random request id (32 hex characters)."""
    return uuid.uuid4().hex


def clean_request_id(value: str | None) -> str:
    """A client-supplied id if it is usable (printable ASCII, not too long), else a fresh one."""
    if value and len(value) <= MAX_REQUEST_ID_LEN and value.isascii() and value.isprintable():
        return value
    return new_request_id()


def bind_request_id(request_id: str) -> contextvars.Token[str | None]:
    """Bind ``request_id`` for the current context; pass the token to ``reset_request_id``."""
    return _request_id.set(request_id)


def reset_request_id(token: contextvars.Token[str | None]) -> None:
    _request_id.reset(token)


def get_request_id() -> str | None:
    """The request id bound in this context, or None outside a request."""
    return _request_id.get()


def add_request_id(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: adds the bound request id (tests pass it to ``capture_logs``)."""
    rid = _request_id.get()
    if rid is not None:
        event.setdefault("request_id", rid)
    return event


def text_fields(text: str, *, log_text: bool = False) -> dict[str, Any]:
    """Log fields describing a query: sha256 prefix and length, plus the text if ``log_text``."""
    fields: dict[str, Any] = {
        "query_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
        "query_len": len(text),
    }
    if log_text:
        fields["query"] = text
    return fields


def configure_logging(settings: LogSettings | None = None) -> None:
    """Set up structlog (JSON lines on stderr by default) and route stdlib logging through it.

    Safe to call more than once (the last call wins).
    """
    settings = settings or LogSettings.model_validate({})
    level = logging.getLevelNamesMapping().get(settings.level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if settings.json_logs
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_request_id,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Third-party stdlib loggers (grpc, asyncio) at WARNING and above, as plain lines on stderr.
    root = logging.getLogger()
    root.setLevel(max(level, logging.WARNING))
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))


def get_logger(name: str) -> Any:
    """A structlog logger tagged with ``module=name``. Lazy: safe to create at import time,
    it picks up whatever ``configure_logging`` set when it first logs."""
    return structlog.get_logger(module=name)


ProgressCallback = Callable[[int, int], None]
LOG_EVERY_S = 30.0  # progress lines when stderr is not a terminal


def stderr_progress(label: str, *, stream: TextIO | None = None) -> ProgressCallback:
    """A progress callback for long work (``callback(done, total)``): a live line with the rate
    and the time left on a terminal; elsewhere (a log file, CI) one line every ``LOG_EVERY_S``
    seconds and one at the end. For commands that opted in (``--progress``); library code takes
    the callback, it never prints."""
    out = stream or sys.stderr
    live = out.isatty()
    # The rate is measured from the first report, so set-up before the work (loading a model)
    # does not skew the time left.
    first: list[tuple[float, int]] = []
    last = [0.0]

    def report(done: int, total: int) -> None:
        finished = done >= total
        now = time.perf_counter()
        if not first:
            first.append((now, 0 if done <= 1 else done))
            last[0] = now
        if not (live or finished or now - last[0] >= LOG_EVERY_S):
            return
        last[0] = now
        started, done0 = first[0]
        elapsed = max(now - started, 1e-9)
        rate = (done - done0) / elapsed if done > done0 else done / elapsed
        left = (total - done) / rate if rate > 0 else 0.0
        eta = "" if finished else f", {left:.0f} s left"
        end = "\n" if finished or not live else "\r"
        shown = f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"
        print(f"{label} {done}/{total} ({shown}/s{eta})", end=end, file=out, flush=True)

    return report
