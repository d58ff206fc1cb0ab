"""``semroute serve router``: run the router gRPC service; ``semroute candidate``: set its
candidate index (shadow or A/B) at run time."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from semroute.config import DEFAULT_INDEX_DIR


def register(top: Any, groups: dict[str, Any]) -> None:
    p = groups["serve"].add_parser(
        "router",
        help="serve the router over gRPC (health, reflection, Prometheus metrics)",
        description="Serve semroute.v1.Router. Health is NOT_SERVING until the index is loaded; "
        "SIGTERM drains in-flight calls. Precedence: flags, then SEMROUTE_* environment "
        "variables, then --config, then defaults.",
    )
    p.add_argument("--index", default=str(DEFAULT_INDEX_DIR),
                   help="index root (follows ROOT/current) or version dir, or s3://BUCKET/PREFIX "
                   f"(pulled into --index-cache first) [{DEFAULT_INDEX_DIR}]")
    p.add_argument("--index-cache", type=Path, default=None,
                   help="local root for an s3:// --index [~/.cache/semroute/index/BUCKET/PREFIX]")
    p.add_argument("--host", default=None, help="address to bind [127.0.0.1]")
    p.add_argument("--port", type=int, default=None, help="gRPC port [50051]; 0 picks a free one")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus port [9464]; 0 disables")
    p.add_argument("--processes", type=processes_arg, default=None, metavar="N|auto",
                   help="router processes sharing the port (SO_REUSEPORT), each with its own "
                   "encoder; the index is memory-mapped once; auto: one per core [1]. A client "
                   "channel sticks to one process: open several channels")
    p.add_argument("--config", default=argparse.SUPPRESS, help="YAML settings file")
    p.add_argument("--encoder", type=Path, default=None, help="encoder directory")
    p.add_argument("--tls-cert", type=Path, default=None, help="server certificate (PEM)")
    p.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, default=None,
                   help="CA (PEM) that client certificates must chain to: turns on mutual TLS")
    p.add_argument("--tokens-file", type=Path, default=None,
                   help="bearer tokens allowed to route, one per line")
    p.add_argument("--admin-tokens-file", type=Path, default=None,
                   help="bearer tokens allowed to call ReloadIndex as well, one per line")
    p.add_argument("--candidate", type=Path, default=None,
                   help="candidate index (root or version dir) served beside --index")
    p.add_argument("--mode", choices=("shadow", "ab"), default=None,
                   help="shadow: the candidate also decides every query, off the response path; "
                   "ab: it serves --share of the A/B keys [shadow]")
    p.add_argument("--share", type=float, default=None,
                   help="ab: share of keys (tenant, user, or request id) served by the candidate "
                   "[0.1]")
    p.set_defaults(handler=_serve_router)

    c = top.add_parser(
        "candidate",
        help="set, change or remove a running router's candidate index (admin RPC)",
        description="Calls SetCandidate on a running router. The candidate path must lie inside "
        "the router's index root. Prints the new state and the agreement of the candidate it "
        "replaced (shadow), as JSON.",
    )
    c.add_argument("--server", default="127.0.0.1:50051", help="router address")
    c.add_argument("--mode", choices=("off", "shadow", "ab"), required=True)
    c.add_argument("--path", default=None,
                   help="candidate index inside the router's root (default: keep the loaded one)")
    c.add_argument("--share", type=float, default=0.1, help="ab: share of keys [0.1]")
    c.add_argument("--token", default=None, help="admin bearer token")
    c.add_argument("--tls-ca", type=Path, default=None, help="CA (PEM) to verify the router")
    c.set_defaults(handler=_set_candidate)


def processes_arg(value: str) -> int:
    """``--processes``: a whole number >= 1, or ``auto`` (the cores this process may use)."""
    if value.strip().lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a process count: give a whole number >= 1, or auto (one per core)"
        ) from None
    if count < 1:
        raise argparse.ArgumentTypeError(
            f"{count}: need at least 1 process (1 = a single process; auto = one per core)"
        )
    return count


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings the serve flags set (None: flag not given)."""
    return {
        "router_server__host": args.host,
        "router_server__port": args.port,
        "router_server__metrics_port": args.metrics_port,
        "router_server__processes": args.processes,
        "tls__cert_file": args.tls_cert,
        "tls__key_file": args.tls_key,
        "tls__client_ca_file": args.tls_client_ca,
        "auth__tokens_file": args.tokens_file,
        "auth__admin_tokens_file": args.admin_tokens_file,
        "router_server__candidate": args.candidate,
        "router_server__candidate_mode": args.mode,
        "router_server__candidate_share": args.share,
    }


def _serve_router(args: argparse.Namespace) -> int:
    import asyncio

    from semroute.cli import settings_from_args
    from semroute.logs import configure_logging
    from semroute.serve import serve_router

    settings = settings_from_args(args, **_overrides(args))
    if settings.router_server.candidate is None and (args.mode or args.share is not None):
        from semroute.errors import ConfigError

        raise ConfigError("--mode/--share: need a candidate (--candidate DIR or "
                          "router_server.candidate)")
    configure_logging(settings.log)
    from semroute.index_remote import local_index

    index = local_index(args.index, args.index_cache)
    asyncio.run(serve_router(settings, index, encoder_path=args.encoder))
    return 0


def _set_candidate(args: argparse.Namespace) -> int:
    import json

    from semroute.grpc.router_client import SyncRouterClient
    from semroute.loop.arms import check_share

    check_share(args.share, "--share")
    with SyncRouterClient(args.server, token=args.token, tls_ca=args.tls_ca) as client:
        state = client.set_candidate(args.mode, args.path, args.share)
    print(json.dumps({
        "mode": state.mode, "share": state.share,
        "candidate": state.candidate.version if state.candidate else None,
        "replaced_agreement": {r: {"compared": c, "agreed": a}
                               for r, (c, a) in state.agreement.items()},
    }))
    return 0
