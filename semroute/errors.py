"""The semroute error tree.

Every failure a user can hit is one of these, with a message that says what was wrong, where
(file:line, field, limit) and what to do. The gRPC layer maps each class to a status code through
``GRPC_STATUS`` (by code *name*, so the core never imports grpc) and names the class in the
call's trailers, so a client raises the very class the server raised (``ERROR_CLASSES`` and
``restore``); the HTTP door maps them through ``HTTP_STATUS``. Every error class lives here.

::

    SemrouteError
    ├── ConfigError                 bad settings, routes.yaml, backends.yaml
    ├── ExemplarError               invalid exemplar CSV rows (carries every RowProblem)
    ├── EncoderError                encoder files missing or unusable
    ├── IndexArtifactError          an index artifact cannot be used
    │   ├── IndexNotFound           no index at the path / no `current`
    │   ├── FingerprintMismatch     index built with another encoder
    │   └── CorruptIndex            checksum or format mismatch
    ├── ReloadFailed                a reload was refused; the previous index keeps serving
    ├── StackError                  a local process (dev stack, test server) failed to start
    ├── InvalidRequest              a request field is wrong (names the field and the limit)
    │   ├── UnknownTarget           a policy names a target the index does not know
    │   │   └── ModelNotFound       `model` is neither `auto` nor a target (HTTP 404)
    │   ├── PayloadTooLarge         an HTTP body over its limit (HTTP 413)
    │   ├── UnsupportedMediaType    an HTTP body that is not JSON (HTTP 415)
    │   └── RequestRejected         a backend refused the request itself (4xx: context, role)
    ├── NotFound                    a request names something unknown here (HTTP 404)
    ├── NotReady                    the service has no index loaded yet
    │   ├── ServiceUnreachable      a service we call did not answer (refused, deadline)
    │   ├── ShuttingDown            the server is draining: no new calls
    │   └── RoutingUnavailable      the router refused us (our credentials): an operator problem
    ├── Unauthenticated             missing or unknown bearer token
    ├── PermissionDenied            valid token without the needed role
    ├── TenantLimited               a tenant's own limit refused the call (HTTP 429)
    │   ├── InsufficientQuota       its USD budget (day/month) is spent
    │   └── RateLimitExceeded       its requests or tokens per minute
    ├── NoTargetAvailable           the policy leaves no target to route to
    │   └── DispatchFailed          every target failed before the commit point (`attempts`)
    └── BackendError                an LLM backend call failed
        ├── BackendUnavailable      connection refused/reset, DNS, 5xx      (retriable)
        ├── BackendRateLimited      429                                    (retriable)
        │   └── ConcurrencyLimited  our own per-backend concurrency limit  (next target)
        ├── BackendTimeout          connect / first-token / idle / total    (retriable before commit)
        ├── BackendProtocolError    malformed SSE or JSON                   (retriable before commit)
        ├── BackendRejected         4xx other than 429 (bad request, auth)  (not retriable)
        ├── CircuitOpen             the breaker is open for this backend    (skip to next target)
        └── StreamInterrupted       failure after the commit point          (never retried)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

_T = TypeVar("_T")


class SemrouteError(Exception):
    """Base of every error semroute raises on purpose."""


class ConfigError(SemrouteError):
    """A configuration file or setting is invalid."""


@dataclass(frozen=True)
class RowProblem:
    """One bad row (or header) of an input file."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class ExemplarError(SemrouteError):
    """Exemplar input failed validation; ``problems`` lists every bad row, not just the first."""

    def __init__(self, problems: list[RowProblem]) -> None:
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:50])
        more = len(self.problems) - 50
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{len(self.problems)} problem(s) in exemplar input; nothing was written:\n{shown}{tail}"
        )


class EncoderError(SemrouteError):
    """The encoder directory is missing or unusable."""


class IndexArtifactError(SemrouteError):
    """An index artifact cannot be used."""


class IndexNotFound(IndexArtifactError):
    pass


class FingerprintMismatch(IndexArtifactError):
    pass


class CorruptIndex(IndexArtifactError):
    pass


class InvalidRequest(SemrouteError):
    """A request field is invalid. ``field`` names it (proto field name)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class UnknownTarget(InvalidRequest):
    pass


class ModelNotFound(UnknownTarget):
    """``model`` is neither ``auto`` nor a configured target (HTTP 404, as OpenAI does)."""


class PayloadTooLarge(InvalidRequest):
    """An HTTP request body larger than the door accepts (HTTP 413)."""


class UnsupportedMediaType(InvalidRequest):
    """An HTTP request body whose Content-Type is not JSON (HTTP 415)."""


class RequestRejected(InvalidRequest):
    """A backend refused the request itself (HTTP 400/413/422 from it: context length, a role
    or parameter it does not take). The client's doing: not retried elsewhere, not held
    against the backend's breaker."""


class NotReady(SemrouteError):
    pass


class NotFound(SemrouteError):
    """A request names something that does not exist here (feedback on an unknown request id)."""


class ShuttingDown(NotReady):
    """The server is draining after SIGTERM and takes no new calls (retry on another replica)."""


class RoutingUnavailable(NotReady):
    """The router answered but refused the dispatcher (its token or role): a server-side
    problem, reported to users without internal details (the log names the setting)."""


class ServiceUnreachable(NotReady):
    """A service we call (the router, from the dispatcher) did not answer: connection refused,
    deadline exceeded, or UNAVAILABLE without a semroute error of its own."""


class ReloadFailed(SemrouteError):
    """The server could not load the requested index; the previous one keeps serving."""


class StackError(SemrouteError):
    """A process of a local stack (llama.cpp, router, dispatcher) failed to start or died."""


class Unauthenticated(SemrouteError):
    pass


class PermissionDenied(SemrouteError):
    pass


class NoTargetAvailable(SemrouteError):
    pass


class TenantLimited(SemrouteError):
    """A tenant's own budget or rate limit refused the call; nothing was sent to a backend.
    ``retry_after_s``: seconds until the limit resets (None: unknown)."""

    retry_after_s: float | None = None

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class InsufficientQuota(TenantLimited):
    """The tenant's USD budget for the day or month is spent (OpenAI's insufficient_quota)."""


class RateLimitExceeded(TenantLimited):
    """The tenant sent more requests or tokens per minute than its limit."""


@dataclass(frozen=True)
class Attempt:
    """One try (or skip) of one target. ``kind`` is the error class name (``Skipped`` when the
    target was not called at all: no backend, key variable unset)."""

    target: str
    kind: str
    message: str
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"{self.target}: {self.kind}: {self.message}"


class DispatchFailed(NoTargetAvailable):
    """No target in the chain could answer before the commit point. ``attempts`` in order."""

    def __init__(self, message: str, attempts: Sequence[Attempt] = ()) -> None:
        self.attempts = tuple(attempts)
        if self.attempts:
            lines = "\n".join(f"  {i}. {a}" for i, a in enumerate(self.attempts, 1))
            message = f"{message}:\n{lines}"
        super().__init__(message)

    def cause_kind(self) -> str | None:
        """The class name of the last failure that reached a backend (None if every target was
        skipped or its breaker was open): what the HTTP door reports as the status."""
        called = [a.kind for a in self.attempts if a.kind not in ("Skipped", "CircuitOpen")]
        return called[-1] if called else None


class BackendError(SemrouteError):
    """An LLM backend call failed. ``retriable`` says whether another attempt may succeed."""

    retriable = True

    def __init__(self, target: str, message: str) -> None:
        self.target = target
        super().__init__(f"backend {target!r}: {message}")


class BackendUnavailable(BackendError):
    pass


class BackendRateLimited(BackendError):
    pass


class ConcurrencyLimited(BackendRateLimited):
    """Our own per-backend concurrency limit was reached (says nothing about the backend)."""


class BackendTimeout(BackendError):
    pass


class BackendProtocolError(BackendError):
    pass


class BackendRejected(BackendError):
    retriable = False


class CircuitOpen(BackendError):
    pass


class StreamInterrupted(BackendError):
    retriable = False


# Most specific class first wins: lookups walk the MRO of the raised error.
GRPC_STATUS: dict[type[SemrouteError], str] = {
    InvalidRequest: "INVALID_ARGUMENT",
    ExemplarError: "INVALID_ARGUMENT",
    ConfigError: "FAILED_PRECONDITION",
    IndexArtifactError: "FAILED_PRECONDITION",
    EncoderError: "FAILED_PRECONDITION",
    ReloadFailed: "FAILED_PRECONDITION",
    NotFound: "NOT_FOUND",
    NotReady: "UNAVAILABLE",
    Unauthenticated: "UNAUTHENTICATED",
    PermissionDenied: "PERMISSION_DENIED",
    NoTargetAvailable: "UNAVAILABLE",
    TenantLimited: "RESOURCE_EXHAUSTED",
    BackendTimeout: "DEADLINE_EXCEEDED",
    BackendRateLimited: "RESOURCE_EXHAUSTED",
    BackendRejected: "FAILED_PRECONDITION",
    StreamInterrupted: "ABORTED",
    BackendError: "UNAVAILABLE",
    SemrouteError: "INTERNAL",
}

HTTP_STATUS: dict[type[SemrouteError], int] = {
    ModelNotFound: 404,
    NotFound: 404,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidRequest: 400,
    Unauthenticated: 401,
    PermissionDenied: 403,
    TenantLimited: 429,
    BackendRateLimited: 429,
    BackendTimeout: 504,
    NotReady: 503,
    NoTargetAvailable: 503,
    BackendError: 502,
    SemrouteError: 500,
}


def _lookup(table: dict[type[SemrouteError], _T], exc: BaseException, default: _T) -> _T:
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return default


def grpc_status_name(exc: BaseException) -> str:
    """The gRPC status code name (e.g. ``"INVALID_ARGUMENT"``) for an error."""
    return _lookup(GRPC_STATUS, exc, "INTERNAL")


def http_status(exc: BaseException) -> int:
    """The HTTP status code for an error (OpenAI-compatible door)."""
    return http_status_of(type(exc))


def http_status_of(cls: type[BaseException]) -> int:
    """The HTTP status code for an error class."""
    for base in cls.__mro__:
        if base in HTTP_STATUS:
            return HTTP_STATUS[base]
    return 500


ERROR_CLASSES: dict[str, type[SemrouteError]] = {
    cls.__name__: cls
    for cls in (
        SemrouteError, ConfigError, ExemplarError, EncoderError, IndexArtifactError,
        IndexNotFound, FingerprintMismatch, CorruptIndex, ReloadFailed, StackError,
        InvalidRequest, UnknownTarget, ModelNotFound, NotFound, NotReady, ServiceUnreachable,
        PayloadTooLarge, UnsupportedMediaType, RequestRejected, ShuttingDown, RoutingUnavailable,
        Unauthenticated, PermissionDenied, NoTargetAvailable, DispatchFailed, BackendError,
        BackendUnavailable, BackendRateLimited, ConcurrencyLimited, BackendTimeout,
        BackendProtocolError, BackendRejected, CircuitOpen, StreamInterrupted,
        TenantLimited, InsufficientQuota, RateLimitExceeded,
    )
}
"""Every error class by name: what a client reads from the ``semroute-error`` trailer."""

# When a status arrives without our trailer (the transport failed, or a foreign server), the
# class that best says what happened.
STATUS_FALLBACK: dict[str, type[SemrouteError]] = {
    "INVALID_ARGUMENT": InvalidRequest,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "UNAVAILABLE": ServiceUnreachable,
    "DEADLINE_EXCEEDED": ServiceUnreachable,
    "RESOURCE_EXHAUSTED": BackendRateLimited,
    "ABORTED": StreamInterrupted,
}


def restore(
    name: str, message: str, *, field: str | None = None, target: str | None = None
) -> SemrouteError:
    """The error a peer raised, rebuilt from its class name and message (``str(exc)`` as the
    peer formatted it) plus the attributes that travel with it. An unknown name gives a
    plain SemrouteError with the same message."""
    cls = ERROR_CLASSES.get(name, SemrouteError)
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    if issubclass(cls, InvalidRequest):
        err.field = field or "request"  # type: ignore[attr-defined]
    if issubclass(cls, BackendError):
        err.target = target or "?"  # type: ignore[attr-defined]
    if issubclass(cls, ExemplarError):
        err.problems = []  # type: ignore[attr-defined]
    if issubclass(cls, DispatchFailed):
        err.attempts = ()  # type: ignore[attr-defined]
    return err
