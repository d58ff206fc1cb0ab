"""`make serve`: the local semroute stack in the foreground until Ctrl-C.

Two llama.cpp servers (local-small on 8081, local-large on 8082), the router (gRPC 50051,
metrics 9464) and the dispatcher (gRPC 50052, metrics 9465, OpenAI-compatible HTTP on 8000), all
on 127.0.0.1. Ctrl-C (or SIGTERM) stops them all within 10 s, the dispatcher first. If one of
them dies, the others are stopped and the exit code is 1. See deploy/README.md.

Nothing outlives this runner: its children die with it even when it is SIGKILLed (Linux
``PR_SET_PDEATHSIG``, see ``semroute.testing.devstack``), and the runner itself gets SIGTERM
when its own parent dies (``make`` killed by a supervisor), so the next ``make serve`` finds
its ports free. To keep a stack running after its terminal closes, run it under a supervisor
(systemd, tmux), not ``nohup``.

``--fake-llm`` serves local-small and local-large with fault servers (canned answers, no model):
a stack that starts in seconds, for trying the plumbing and for tests. Port 0 = a free port.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from semroute.config import DEFAULT_ENCODER_DIR, DEFAULT_INDEX_DIR
from semroute.errors import SemrouteError
from semroute.testing.devstack import (
    DevStack,
    StackPorts,
    die_with_my_parent,
    sigterm_as_keyboard_interrupt,
)

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=REPO / DEFAULT_INDEX_DIR)
    parser.add_argument("--encoder", type=Path, default=REPO / DEFAULT_ENCODER_DIR)
    parser.add_argument("--backends", type=Path, default=REPO / "deploy" / "backends.yaml",
                        help="backends template; local base_urls are rewritten to the run's ports")
    parser.add_argument("--router-port", type=int, default=50051)
    parser.add_argument("--router-metrics-port", type=int, default=9464)
    parser.add_argument("--dispatcher-port", type=int, default=50052)
    parser.add_argument("--dispatcher-metrics-port", type=int, default=9465)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--small-port", type=int, default=8081, help="llama.cpp for local-small")
    parser.add_argument("--large-port", type=int, default=8082, help="llama.cpp for local-large")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per llama.cpp server")
    parser.add_argument("--allow-cloud", action="store_true",
                        help="pass OPENAI_API_KEY to the dispatcher (cloud targets may answer)")
    parser.add_argument("--log-dir", type=Path, default=None, help="[a new temporary directory]")
    parser.add_argument("--fake-llm", action="store_true",
                        help="fault servers instead of llama.cpp for the local targets (no model)")
    args = parser.parse_args(argv)
    if not (args.index / "current").exists():
        print(f"serve: no index at {args.index}; run `make setup` first", file=sys.stderr)
        return 2
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="semroute-serve-"))
    ports = StackPorts(
        router=args.router_port,
        router_metrics=args.router_metrics_port,
        dispatcher=args.dispatcher_port,
        dispatcher_metrics=args.dispatcher_metrics_port,
        http=args.http_port,
        llama={"local-small": args.small_port, "local-large": args.large_port},
    )
    try:
        with sigterm_as_keyboard_interrupt(), DevStack.start(
            log_dir,
            index=args.index,
            encoder=args.encoder,
            backends_template=args.backends,
            dispatcher_args=("--config", str(REPO / "deploy" / "stack.yaml")),
            ports=ports,
            allow_cloud=args.allow_cloud,
            n_threads=args.threads,
            fake_llm=args.fake_llm,
            progress=lambda msg: print(f"serve: {msg}", flush=True),
        ) as stack:
            _banner(stack, log_dir)
            while True:
                dead = [p for p in stack.processes() if not p.alive()]
                if dead:
                    print(dead[0].fail("stopped unexpectedly"), file=sys.stderr)
                    return 1
                time.sleep(0.5)
    except SemrouteError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nserve: stopped", file=sys.stderr)
        return 0


def _banner(stack: DevStack, log_dir: Path) -> None:
    assert stack.router is not None and stack.dispatcher is not None
    d = stack.dispatcher
    lines = [f"  {alias:<12} http://127.0.0.1:{s.port}/v1" for alias, s in stack.llamas.items()]
    http = f"http://127.0.0.1:{d.http_port}/v1"
    print(
        "semroute stack is up (Ctrl-C stops it)\n"
        + "\n".join(lines)
        + f"\n  router       {stack.router.address} (metrics :{stack.router.metrics_port})"
        + f"\n  dispatcher   {d.address} (metrics :{d.metrics_port})"
        + f"\n  OpenAI HTTP  {http}"
        + f"\n  logs         {log_dir}\n"
        + f"try:  .venv/bin/semroute chat --server {d.address} \"Write a haiku about rain\"\n"
        + f"      curl -s {http}/chat/completions -H 'content-type: application/json' "
        + "-d '{\"model\": \"auto\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'",
        flush=True,
    )


if __name__ == "__main__":
    die_with_my_parent()
    sys.exit(main())
