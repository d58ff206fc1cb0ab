"""``semroute serve router``: run the router gRPC service."""

from __future__ import annotations

import argparse
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
    p.add_argument("--index", type=Path, default=DEFAULT_INDEX_DIR,
                   help=f"index root (follows ROOT/current) or version dir [{DEFAULT_INDEX_DIR}]")
    p.add_argument("--host", default=None, help="address to bind [127.0.0.1]")
    p.add_argument("--port", type=int, default=None, help="gRPC port [50051]; 0 picks a free one")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus port [9464]; 0 disables")
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
    p.set_defaults(handler=_serve_router)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings the serve flags set (None: flag not given)."""
    return {
        "router_server__host": args.host,
        "router_server__port": args.port,
        "router_server__metrics_port": args.metrics_port,
        "tls__cert_file": args.tls_cert,
        "tls__key_file": args.tls_key,
        "tls__client_ca_file": args.tls_client_ca,
        "auth__tokens_file": args.tokens_file,
        "auth__admin_tokens_file": args.admin_tokens_file,
    }


def _serve_router(args: argparse.Namespace) -> int:
    import asyncio

    from semroute.cli import settings_from_args
    from semroute.logs import configure_logging
    from semroute.serve import serve_router

    settings = settings_from_args(args, **_overrides(args))
    configure_logging(settings.log)
    asyncio.run(serve_router(settings, args.index, encoder_path=args.encoder))
    return 0
