"""``semroute serve dispatcher`` and ``semroute chat``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(top: Any, groups: dict[str, Any]) -> None:
    p = groups["serve"].add_parser(
        "dispatcher",
        help="serve the dispatcher over gRPC (route, call the LLM, stream tokens back)",
        description="Serve semroute.v1.Dispatcher: asks the router, calls the chosen backend "
        "from backends.yaml and streams the answer, failing over before the first token. "
        "Unset flags fall back to --config, then SEMROUTE_* environment variables, then defaults.",
    )
    p.add_argument(
        "--router", default=None, help="router address host:port [127.0.0.1:50051]; several "
        "replicas: dns:///host:port or ipv4:a:port,b:port (balanced call by call, round_robin)"
    )
    p.add_argument(
        "--router-lb-policy", choices=["auto", "round_robin", "pick_first"], default=None,
        help="how router calls spread over the router's addresses [auto: round_robin when "
        "--router may name several]",
    )
    p.add_argument(
        "--backends", type=Path, default=None, help="backends file [deploy/backends.yaml]"
    )
    p.add_argument(
        "--rules",
        type=Path,
        default=None,
        help="rules/PII pre-filter file (default: PII detection only)",
    )
    p.add_argument("--host", default=None, help="address to bind [127.0.0.1]")
    p.add_argument("--port", type=int, default=None, help="gRPC port [50052]; 0 picks a free one")
    p.add_argument(
        "--metrics-port", type=int, default=None, help="Prometheus port [9465]; 0 disables"
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="OpenAI-compatible HTTP door port; 0 (default) leaves it off",
    )
    p.add_argument(
        "--router-token",
        default=None,
        help="bearer token for the router (visible in `ps`: prefer --router-token-file or the "
        "SEMROUTE_DISPATCHER__ROUTER_TOKEN environment variable)",
    )
    p.add_argument(
        "--router-token-file",
        type=Path,
        default=None,
        help="file holding the router's bearer token (first line that is not blank or # ...)",
    )
    p.add_argument("--config", default=argparse.SUPPRESS, help="YAML settings file")
    p.set_defaults(handler=_serve_dispatcher)

    c = top.add_parser(
        "chat",
        help="send one prompt to a dispatcher and stream the answer",
        description="Prints the routing decision on the first line, then the answer as it "
        "streams, then a summary line (target, tokens, cost, time to first token) on stderr.",
    )
    c.add_argument("prompt", help="the user message")
    c.add_argument("--server", default="127.0.0.1:50052", help="dispatcher address [%(default)s]")
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--temperature", type=float, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--target", default=None, help="force this target (skips the router)")
    c.add_argument(
        "--allow", action="append", default=[], metavar="TARGET", help="allowed target (repeatable)"
    )
    c.add_argument("--require-local", action="store_true", help="only local backends may answer")
    c.add_argument("--max-cost", type=float, default=None, help="USD per 1M tokens, blended")
    c.add_argument("--token", default=None, help="bearer token for the dispatcher")
    c.add_argument("--tls-ca", type=Path, default=None, help="CA file: connect over TLS")
    c.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds [%(default)s]")
    c.set_defaults(handler=_chat)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings the serve flags set (None: flag not given)."""
    return {
        "dispatcher__router": args.router,
        "dispatcher__router_lb_policy": args.router_lb_policy,
        "dispatcher__backends_file": args.backends,
        "dispatcher__rules_file": args.rules,
        "dispatcher__host": args.host,
        "dispatcher__port": args.port,
        "dispatcher__metrics_port": args.metrics_port,
        "dispatcher__http_port": args.http_port,
        "dispatcher__router_token": args.router_token,
        "dispatcher__router_token_file": args.router_token_file,
    }


def _serve_dispatcher(args: argparse.Namespace) -> int:
    import asyncio

    from semroute.cli import settings_from_args
    from semroute.logs import configure_logging

    settings = settings_from_args(args, **_overrides(args))
    configure_logging(settings.log)
    from semroute.serve import serve_dispatcher

    asyncio.run(serve_dispatcher(settings))
    return 0


def _chat(args: argparse.Namespace) -> int:
    import asyncio

    from semroute.types import ChatRequest, GenerationParams, Message, RoutingOverrides

    messages = []
    if args.system:
        messages.append(Message("system", args.system))
    messages.append(Message("user", args.prompt))
    req = ChatRequest(
        messages=tuple(messages),
        params=GenerationParams(
            max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
        ),
        overrides=RoutingOverrides(
            force_target=args.target,
            allowed_targets=tuple(args.allow),
            require_local=args.require_local,
            max_cost=args.max_cost,
        ),
    )
    return asyncio.run(_chat_async(args, req))


def decision_line(event: Any) -> str:
    """The one-line summary ``semroute chat`` prints before the answer."""
    chain = " > ".join(event.chain)
    fb = " fallback" if event.fallback else ""
    return (
        f"[route={event.route} target={event.target} confidence={event.confidence:.2f}{fb} "
        f"chain={chain}] {event.reason}"
    )


async def _chat_async(args: argparse.Namespace, req: Any) -> int:
    from semroute.errors import StreamInterrupted
    from semroute.grpc.dispatcher_client import DispatcherClient
    from semroute.types import DecisionEvent, DeltaEvent, DoneEvent

    out = sys.stdout
    streamed = False
    async with DispatcherClient(args.server, token=args.token, tls_ca=args.tls_ca) as client:
        try:
            async for event in client.chat(req, timeout=args.timeout):
                if isinstance(event, DecisionEvent):
                    print(decision_line(event), file=out, flush=True)
                elif isinstance(event, DeltaEvent):
                    out.write(event.text)
                    out.flush()
                    streamed = True
                elif isinstance(event, DoneEvent):
                    if streamed:
                        out.write("\n")
                    print(
                        f"[done target={event.target} finish={event.finish_reason} "
                        f"tokens={event.prompt_tokens}+{event.completion_tokens} "
                        f"cost=${event.cost_usd:.6f} ttft={event.ttft_s * 1000:.0f}ms "
                        f"attempts={event.attempts}]",
                        file=sys.stderr,
                        flush=True,
                    )
        except StreamInterrupted:
            if streamed:
                out.write("\n")
            raise
    return 0
