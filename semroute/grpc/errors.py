"""The one error path between semroute's gRPC servers and clients.

A servicer ends a failed call with ``abort(context, exc)``: the status from
``semroute.errors.GRPC_STATUS``, the error's message as the details, and trailers naming the
error class (``semroute-error``) plus the attributes a client needs to rebuild it
(``semroute-field`` for request errors, ``semroute-target`` for backend errors) and the request
id. A client turns a failed call back into an error with ``error_from_rpc``: the very class the
server raised, with the server's message; a status without our trailer (the transport failed,
the server is not ours) gets the class ``STATUS_FALLBACK`` names, its message prefixed with the
peer's address. Either way the ``AioRpcError`` is the ``__cause__`` and its code ``.grpc_code``.
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from semroute.errors import (
    STATUS_FALLBACK,
    BackendError,
    InvalidRequest,
    SemrouteError,
    grpc_status_name,
    restore,
)
from semroute.logs import REQUEST_ID_HEADER, get_request_id

ERROR_TYPE_KEY = "semroute-error"
ERROR_FIELD_KEY = "semroute-field"
ERROR_TARGET_KEY = "semroute-target"
# Trailers travel in HTTP/2 headers: keep echoed values small so the reply never overflows the
# client's metadata limit (it would then see RESOURCE_EXHAUSTED instead of our status).
MAX_TRAILER_CHARS = 256
# The status details are a header too: a message echoing a huge input is cut here.
MAX_DETAILS_CHARS = 2048


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status an error maps to."""
    code: grpc.StatusCode = getattr(grpc.StatusCode, grpc_status_name(exc))
    return code


def error_trailers(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that lets a client rebuild ``exc`` (ASCII, bounded)."""
    trailers = [(ERROR_TYPE_KEY, type(exc).__name__)]
    if isinstance(exc, InvalidRequest):
        trailers.append((ERROR_FIELD_KEY, _header_safe(exc.field)))
    if isinstance(exc, BackendError):
        trailers.append((ERROR_TARGET_KEY, _header_safe(exc.target)))
    rid = get_request_id()
    if rid:
        trailers.append((REQUEST_ID_HEADER, rid))
    return tuple(trailers)


async def abort(context: grpc.aio.ServicerContext, exc: SemrouteError) -> NoReturn:
    """End the call with ``exc``'s status, message and trailers (never returns)."""
    details = str(exc)
    if len(details) > MAX_DETAILS_CHARS:
        cut = len(details) - MAX_DETAILS_CHARS
        details = f"{details[:MAX_DETAILS_CHARS]}... ({cut} more characters)"
    await context.abort(status_code(exc), details, trailing_metadata=error_trailers(exc))
    raise AssertionError("unreachable")  # context.abort always raises


def error_from_rpc(peer: str, exc: grpc.aio.AioRpcError) -> SemrouteError:
    """The semroute error for a failed call to ``peer`` (``"router at host:port"``)."""
    code = exc.code()
    details = exc.details() or ""
    trailers = _trailers(exc)
    name = trailers.get(ERROR_TYPE_KEY)
    err: SemrouteError
    if name is not None:
        err = restore(
            name, details, field=trailers.get(ERROR_FIELD_KEY),
            target=trailers.get(ERROR_TARGET_KEY),
        )
    else:
        cls = STATUS_FALLBACK.get(code.name, SemrouteError)
        text = details or code.name.lower().replace("_", " ")
        if issubclass(cls, InvalidRequest):
            field, sep, _ = details.partition(": ")
            err = restore(cls.__name__, details, field=field if sep else "request")
        elif issubclass(cls, BackendError):
            err = restore(cls.__name__, f"{peer}: {text}", target=peer)
        else:
            err = restore(cls.__name__, f"{peer}: {code.name}: {text}")
    err.grpc_code = code  # type: ignore[attr-defined]
    return err


def _trailers(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in exc.trailing_metadata() or ():
        out.setdefault(key, value.decode("utf-8", "replace") if isinstance(value, bytes) else value)
    return out


def _header_safe(value: str) -> str:
    text = value.encode("ascii", "backslashreplace").decode("ascii")
    if len(text) > MAX_TRAILER_CHARS:
        text = text[:MAX_TRAILER_CHARS] + f"...({len(text) - MAX_TRAILER_CHARS} more)"
    return "".join(c if c.isprintable() else "?" for c in text)
