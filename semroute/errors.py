"""The semroute error tree.

Every failure a user can hit is one of these, with a message that says what was wrong, where
(file:line, field, limit) and what to do. The gRPC layer maps each class to a status code through
``GRPC_STATUS`` (by code *name*, so the core never imports grpc); the HTTP door maps them through
``HTTP_STATUS``.

::

    SemrouteError
    ├── ConfigError                 bad settings, routes.yaml, backends.yaml
    ├── ExemplarError               invalid exemplar CSV rows (carries every RowProblem)
    ├── EncoderError                encoder files missing or unusable
    ├── IndexArtifactError          an index artifact cannot be used
    │   ├── IndexNotFound           no index at the path / no `current`
    │   ├── FingerprintMismatch     index built with another encoder
    │   └── CorruptIndex            checksum or format mismatch
    ├── InvalidRequest              a request field is wrong (names the field and the limit)
    │   └── UnknownTarget           a policy names a target the index does not know
    ├── NotReady                    the service has no index loaded yet
    ├── Unauthenticated             missing or unknown bearer token
    ├── PermissionDenied            valid token without the needed role
    ├── NoTargetAvailable           the policy leaves no target to route to / all targets failed
    └── BackendError                an LLM backend call failed
        ├── BackendUnavailable      connection refused/reset, DNS, 5xx      (retriable)
        ├── BackendRateLimited      429                                    (retriable)
        ├── BackendTimeout          connect / first-token / idle / total    (retriable before commit)
        ├── BackendProtocolError    malformed SSE or JSON                   (retriable before commit)
        ├── BackendRejected         4xx other than 429 (bad request, auth)  (not retriable)
        ├── CircuitOpen             the breaker is open for this backend    (skip to next target)
        └── StreamInterrupted       failure after the commit point          (never retried)
"""

from __future__ import annotations

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


class NotReady(SemrouteError):
    pass


class Unauthenticated(SemrouteError):
    pass


class PermissionDenied(SemrouteError):
    pass


class NoTargetAvailable(SemrouteError):
    pass


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
    NotReady: "UNAVAILABLE",
    Unauthenticated: "UNAUTHENTICATED",
    PermissionDenied: "PERMISSION_DENIED",
    NoTargetAvailable: "UNAVAILABLE",
    BackendTimeout: "DEADLINE_EXCEEDED",
    BackendRateLimited: "RESOURCE_EXHAUSTED",
    BackendRejected: "FAILED_PRECONDITION",
    StreamInterrupted: "ABORTED",
    BackendError: "UNAVAILABLE",
    SemrouteError: "INTERNAL",
}

HTTP_STATUS: dict[type[SemrouteError], int] = {
    InvalidRequest: 400,
    Unauthenticated: 401,
    PermissionDenied: 403,
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
    return _lookup(HTTP_STATUS, exc, 500)
