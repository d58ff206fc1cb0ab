"""Clients of the router service.

``RouterClient`` is async (grpc.aio) and is what services such as the dispatcher use.
``SyncRouterClient`` is the blocking client for scripts, the CLI and threaded code: it calls
grpc's synchronous stub directly, with no event loop in between (it used to run
``RouterClient`` on a private loop, which cost about 0.25 ms a call; ``scripts/profile_route.py
--floor`` measures each client kind). Both build their requests and read their replies with the
same functions below. Inside a running event loop use ``RouterClient``: a blocking call would
stall the loop.

Failures come back as the ``semroute.errors`` class the server raised (``semroute.grpc.errors``),
so callers handle local and remote routing the same way; a server that cannot be reached gives
``ServiceUnreachable``. The original ``grpc.aio.AioRpcError`` is the ``__cause__`` and its status
code is kept as ``.grpc_code`` on the raised error.

``RouterClient.route`` also serves the dispatcher's ``RouteCall`` (``semroute.dispatch.semantic``)
when one is bound around the call: it sends its A/B key (unless ``ab_key`` is given), asks for
the query embedding when the call wants it, and puts the reply's embedding on the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc
from semroute.dispatch.semantic import RouteCall, current_route_call
from semroute.errors import ReloadFailed
from semroute.grpc import convert
from semroute.grpc.balancing import balancing_options, resolve_policy
from semroute.grpc.errors import error_from_rpc
from semroute.grpc.tls import call_metadata, channel_credentials, open_channel
from semroute.logs import get_request_id
from semroute.types import Decision, IndexInfo, Policy, Query

_NO_POLICY = Policy()


@dataclass(frozen=True)
class CandidateState:
    """A router's candidate after ``set_candidate``: mode, A/B share, the candidate index
    (None when off), and the agreement counts of the candidate it replaced, per served route
    (route -> (compared, agreed))."""

    mode: str
    share: float
    candidate: IndexInfo | None
    agreement: dict[str, tuple[int, int]]
# A router that went away and came back is used again within a second or so (grpc's default
# reconnect backoff grows to two minutes, keeping the dispatcher on its fallback that long).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Each channel its own connection: grpc otherwise shares one among channels with equal
    # arguments, and a connection is served by one process of a multi-process router.
    ("grpc.use_local_subchannel_pool", 1),
]


def route_request(
    text: str, history: Sequence[str], policy: Policy, explain: bool, ab_key: str
) -> tuple[pb.RouteRequest, RouteCall | None]:
    """The RouteRequest for one query, and the dispatcher's ``RouteCall`` bound around it, if
    any (its A/B key unless ``ab_key`` is given; the embedding asked for when it wants one)."""
    request = convert.query_to_proto(Query(text, tuple(history), policy, explain))
    call = current_route_call()
    if call is not None:
        request.ab_key = ab_key or call.ab_key
        request.return_embedding = call.want_embedding
    elif ab_key:
        request.ab_key = ab_key
    return request, call


def route_reply(reply: pb.RouteResponse, call: RouteCall | None) -> Decision:
    """The decision in ``reply``; its embedding goes on ``call`` when the call asked for it."""
    if call is not None and call.want_embedding:
        call.embedding = convert.embedding_from_proto(reply)
    return convert.decision_from_proto(reply)


def reload_reply(addr: str, reply: pb.ReloadIndexResponse) -> IndexInfo:
    if not reply.ok:
        raise ReloadFailed(f"router at {addr} kept index {reply.previous_version!r}: "
                           f"{reply.error}")
    return convert.info_from_proto(reply.index)


def candidate_reply(reply: pb.SetCandidateResponse) -> CandidateState:
    return CandidateState(
        reply.mode, reply.share,
        convert.info_from_proto(reply.candidate) if reply.HasField("candidate") else None,
        {a.route: (a.compared, a.agreed) for a in reply.agreement},
    )


def channel_options(addr: str, lb_policy: str) -> list[tuple[str, int | str]]:
    return [*CHANNEL_OPTIONS, *balancing_options(addr, lb_policy)]


class _ClientChannels:
    """What both router clients share: their arguments (see ``RouterClient``), ``channels``
    channels opened by the subclass's ``_open``, and one Router stub per channel, handed out in
    turn call by call."""

    def __init__(
        self,
        addr: str,
        *,
        token: str | None = None,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        timeout: float = 5.0,
        channels: int = 1,
        lb_policy: str = "auto",
    ) -> None:
        if channels < 1:
            raise ValueError(f"channels: need at least 1, got {channels}")
        self.addr = addr
        self.timeout = timeout
        self._token = token
        self.lb_policy = resolve_policy(addr, lb_policy) or "pick_first"
        options = channel_options(addr, lb_policy)
        self._channels = [self._open(addr, tls_ca, tls_cert, tls_key, options)
                          for _ in range(channels)]
        self._stubs = [pb_grpc.RouterStub(ch)  # type: ignore[no-untyped-call]
                       for ch in self._channels]
        self._turn = 0

    @staticmethod
    def _open(addr: str, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None,
              options: Sequence[tuple[str, Any]]) -> Any:
        raise NotImplementedError

    @property
    def stub(self) -> pb_grpc.RouterStub:
        """The stub of the next channel in turn."""
        self._turn = (self._turn + 1) % len(self._stubs)
        return self._stubs[self._turn]


class RouterClient(_ClientChannels):
    """Async client of ``semroute.v1.Router``. Use as ``async with RouterClient(addr) as c``.

    ``token``: bearer token sent on every call. ``tls_ca``: CA file to verify the server (TLS on
    when given); ``tls_cert``/``tls_key``: client certificate for mutual TLS. ``timeout``: per-call
    deadline in seconds. The current request id (``semroute.logs``), if any, is forwarded as
    ``x-request-id``.

    ``channels``: connections to open, used in turn call by call. A gRPC channel is one HTTP/2
    connection, and a router started with ``--processes N`` serves each connection from one of
    its processes (SO_REUSEPORT spreads connections, not calls), so a busy client needs several
    (a few per process) to use them all; a load balancer in front does the same job.

    ``lb_policy``: how calls spread over the addresses ``addr`` resolves to
    (``semroute.grpc.balancing``): ``auto`` is ``round_robin`` for a target that may name several
    router replicas (``dns:///host:port``, ``ipv4:a:p,b:p``) and gRPC's default otherwise.
    """

    @staticmethod
    def _open(addr: str, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None,
              options: Sequence[tuple[str, Any]]) -> Any:
        return open_channel(addr, tls_ca, tls_cert, tls_key, options=options)

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self._channels))

    def _metadata(self) -> list[tuple[str, str]]:
        return call_metadata(self._token, get_request_id())

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(
                request, timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(f"router at {self.addr}", exc) from exc

    async def route(
        self,
        text: str,
        *,
        history: Sequence[str] = (),
        policy: Policy = _NO_POLICY,
        explain: bool = False,
        timeout: float | None = None,
        ab_key: str = "",
    ) -> Decision:
        """Route one query (``ab_key``: the A/B key, see router.proto; empty: the bound
        ``RouteCall``'s, if any)."""
        request, call = route_request(text, history, policy, explain, ab_key)
        return route_reply(await self._call(self.stub.Route, request, timeout), call)

    async def route_batch(
        self, queries: Sequence[Query], *, timeout: float | None = None
    ) -> list[Decision]:
        """Route several queries in one call; decisions in query order."""
        request = pb.RouteBatchRequest(requests=[convert.query_to_proto(q) for q in queries])
        reply = await self._call(self.stub.RouteBatch, request, timeout)
        return [convert.decision_from_proto(r) for r in reply.responses]

    async def index_info(self, *, timeout: float | None = None) -> IndexInfo:
        """The index now serving."""
        reply = await self._call(self.stub.GetIndexInfo, pb.GetIndexInfoRequest(), timeout)
        return convert.info_from_proto(reply.index)

    async def reload(self, path: str | None = None, *, timeout: float | None = 60.0) -> IndexInfo:
        """Ask the server to reload (its root's ``current``, or ``path``). Needs an admin token.

        Returns the index serving afterwards; raises ReloadFailed with the server's reason when
        the new index was refused (the old one keeps serving).
        """
        reply = await self._call(
            self.stub.ReloadIndex, pb.ReloadIndexRequest(path=path or ""), timeout
        )
        return reload_reply(self.addr, reply)

    async def set_candidate(
        self, mode: str, path: str | None = None, share: float = 0.0, *,
        timeout: float | None = 60.0,
    ) -> CandidateState:
        """Set the server's candidate (``mode`` off, shadow or ab; ``path`` None keeps the one
        loaded). Needs an admin token. Raises the server's error (InvalidRequest for a bad
        mode, share or path; IndexNotFound, CorruptIndex, FingerprintMismatch, ConfigError)."""
        request = pb.SetCandidateRequest(mode=mode, path=path or "", share=share)
        return candidate_reply(await self._call(self.stub.SetCandidate, request, timeout))


class SyncRouterClient(_ClientChannels):
    """Blocking client of ``semroute.v1.Router``, on grpc's synchronous channel: the same
    arguments, methods and errors as ``RouterClient``, no event loop in between. Safe to share
    between threads (grpc channels are thread-safe). Use as ``with SyncRouterClient(addr) as c``.
    """

    @staticmethod
    def _open(addr: str, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None,
              options: Sequence[tuple[str, Any]]) -> Any:
        if tls_ca is not None or tls_cert is not None:
            return grpc.secure_channel(addr, channel_credentials(tls_ca, tls_cert, tls_key),
                                       options=options)
        return grpc.insecure_channel(addr, options=options)

    def __enter__(self) -> SyncRouterClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(
                request, timeout=self.timeout if timeout is None else timeout,
                metadata=call_metadata(self._token, get_request_id()),
            )
        except grpc.RpcError as exc:  # a grpc.Call too: code(), details(), trailing_metadata()
            raise error_from_rpc(f"router at {self.addr}", exc) from exc

    def route(
        self,
        text: str,
        *,
        history: Sequence[str] = (),
        policy: Policy = _NO_POLICY,
        explain: bool = False,
        timeout: float | None = None,
        ab_key: str = "",
    ) -> Decision:
        """Route one query (as ``RouterClient.route``)."""
        request, call = route_request(text, history, policy, explain, ab_key)
        return route_reply(self._call(self.stub.Route, request, timeout), call)

    def route_batch(
        self, queries: Sequence[Query], *, timeout: float | None = None
    ) -> list[Decision]:
        request = pb.RouteBatchRequest(requests=[convert.query_to_proto(q) for q in queries])
        reply = self._call(self.stub.RouteBatch, request, timeout)
        return [convert.decision_from_proto(r) for r in reply.responses]

    def index_info(self, *, timeout: float | None = None) -> IndexInfo:
        reply = self._call(self.stub.GetIndexInfo, pb.GetIndexInfoRequest(), timeout)
        return convert.info_from_proto(reply.index)

    def reload(self, path: str | None = None, *, timeout: float | None = 60.0) -> IndexInfo:
        reply = self._call(self.stub.ReloadIndex, pb.ReloadIndexRequest(path=path or ""), timeout)
        return reload_reply(self.addr, reply)

    def set_candidate(
        self, mode: str, path: str | None = None, share: float = 0.0, *,
        timeout: float | None = 60.0,
    ) -> CandidateState:
        request = pb.SetCandidateRequest(mode=mode, path=path or "", share=share)
        return candidate_reply(self._call(self.stub.SetCandidate, request, timeout))
