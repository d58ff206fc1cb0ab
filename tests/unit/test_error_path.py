"""The one error path: every error class -> gRPC status + trailers -> the same class on the client,
and -> the OpenAI door's HTTP status and error body."""

from __future__ import annotations

import inspect

import grpc
import pytest

from semroute import errors
from semroute.errors import (
    ERROR_CLASSES,
    Attempt,
    BackendError,
    DispatchFailed,
    ExemplarError,
    InvalidRequest,
    RowProblem,
    SemrouteError,
)
from semroute.grpc.errors import MAX_TRAILER_CHARS, error_from_rpc, error_trailers, status_code
from semroute.http.openai import error_body, error_status


def _example(cls: type[SemrouteError]) -> SemrouteError:
    """One instance of ``cls`` built the way the code raises it."""
    if issubclass(cls, InvalidRequest):
        return cls("params.max_tokens", "must be between 1 and 10, got 11")
    if issubclass(cls, BackendError):
        return cls("local-small", "connection refused")
    if issubclass(cls, ExemplarError):
        return cls([RowProblem("a.csv", 3, "blank text")])
    if issubclass(cls, DispatchFailed):
        return cls("no target could answer", [Attempt("gpt-4o", "BackendTimeout", "slow")])
    return cls("something went wrong")


def _rpc_error(exc: SemrouteError) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        status_code(exc), grpc.aio.Metadata(), grpc.aio.Metadata(*error_trailers(exc)),
        details=str(exc),
    )


def test_every_error_class_is_registered() -> None:
    """Each SemrouteError subclass defined in semroute.errors is in ERROR_CLASSES under its name,
    so a client can rebuild it."""
    defined = {
        name: obj for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, SemrouteError)
    }
    assert defined == ERROR_CLASSES


@pytest.mark.parametrize("cls", sorted(ERROR_CLASSES.values(), key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_grpc_round_trip_gives_the_same_class(cls: type[SemrouteError]) -> None:
    """Status + trailers -> error_from_rpc -> the class the server raised, same message, and the
    attributes that travel (field, target); the status code is kept as .grpc_code."""
    sent = _example(cls)
    got = error_from_rpc("router at 127.0.0.1:1", _rpc_error(sent))
    assert type(got) is cls
    assert str(got) == str(sent)
    assert got.grpc_code == status_code(sent)  # type: ignore[attr-defined]
    if isinstance(sent, InvalidRequest):
        assert got.field == sent.field  # type: ignore[attr-defined]
    if isinstance(sent, BackendError):
        assert got.target == sent.target  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", sorted(ERROR_CLASSES.values(), key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_http_mapping_gives_a_status_and_an_openai_body(cls: type[SemrouteError]) -> None:
    """Every class maps to one HTTP status and OpenAI's error object; client mistakes are 4xx."""
    exc = _example(cls)
    status = error_status(exc)
    body = error_body(exc)["error"]
    assert set(body) == {"message", "type", "param", "code"}
    if isinstance(exc, InvalidRequest):
        assert 400 <= status < 500
        # the OpenAI door's spelling of params.max_tokens, in the param and the message
        assert body["param"] == "max_tokens"
        assert body["message"] == "max_tokens: must be between 1 and 10, got 11"
    else:
        assert body["message"] == str(exc)
        assert body["param"] is None


def test_status_without_our_trailer_names_the_peer() -> None:
    """A transport failure (no semroute-error trailer) becomes the fallback class for its
    status, and the message says which peer failed."""
    exc = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
        details="failed to connect to all addresses",
    )
    got = error_from_rpc("router at 127.0.0.1:9", exc)
    assert type(got) is errors.ServiceUnreachable
    assert "router at 127.0.0.1:9" in str(got)


def test_trailers_stay_small_and_ascii() -> None:
    """A huge or non-ASCII field name is cut and escaped in the trailer, so the reply never
    overflows the client's metadata limit."""
    exc = InvalidRequest("x" * 100_000 + "é", "bad")
    trailers = dict(error_trailers(exc))
    field = trailers["semroute-field"]
    assert field.isascii()
    assert len(field) < MAX_TRAILER_CHARS + 64
