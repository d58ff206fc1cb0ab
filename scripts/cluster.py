"""`make cluster`: a local multi-replica semroute cluster in the foreground until Ctrl-C.

N router replicas behind nginx (L7 gRPC load balancing with retry on another replica), two
dispatchers whose router is nginx and whose OpenAI doors sit behind the same nginx, one Redis for
their shared state, LLM backends (fault servers by default: canned answers, no model; `--llama`
for the local llama.cpp model), and Prometheus scraping every process. Everything binds
127.0.0.1; ports not given are free ones. The generated configuration and the logs are in
`--log-dir` (default a new temporary directory). See docs/SCALE.md and
`semroute.testing.cluster`.

Ctrl-C (or SIGTERM) stops it all; if a part dies, the rest is stopped and the exit code is 1.
Nothing outlives this runner: its children die with it even when it is SIGKILLed
(PR_SET_PDEATHSIG), and it gets SIGTERM when its own parent (`make`) dies.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from semroute.config import DEFAULT_ENCODER_DIR, DEFAULT_INDEX_DIR
from semroute.errors import SemrouteError
from semroute.testing.cluster import Cluster, ClusterOptions, describe
from semroute.testing.devstack import die_with_my_parent, sigterm_as_keyboard_interrupt

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=REPO / DEFAULT_INDEX_DIR)
    parser.add_argument("--encoder", type=Path, default=REPO / DEFAULT_ENCODER_DIR)
    parser.add_argument("--routers", type=int, default=3, help="router replicas [3]")
    parser.add_argument("--dispatchers", type=int, default=2, help="dispatchers [2]")
    parser.add_argument("--llama", action="store_true",
                        help="one llama.cpp server (SmolLM2) instead of fault servers")
    parser.add_argument("--router-port", type=int, default=0, help="nginx: routers' gRPC")
    parser.add_argument("--dispatcher-port", type=int, default=0, help="nginx: dispatchers' gRPC")
    parser.add_argument("--http-port", type=int, default=0, help="nginx: OpenAI HTTP")
    parser.add_argument("--prometheus-port", type=int, default=0)
    parser.add_argument("--scrape-interval", type=float, default=2.0, help="seconds [2]")
    parser.add_argument("--log-dir", type=Path, default=None, help="[a new temporary directory]")
    args = parser.parse_args(argv)
    if not (args.index / "current").exists() and not (args.index / "manifest.json").exists():
        print(f"cluster: no index at {args.index}; run `make setup` first", file=sys.stderr)
        return 2
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="semroute-cluster-"))
    options = ClusterOptions(
        routers=args.routers, dispatchers=args.dispatchers, fake_llm=not args.llama,
        router_lb_port=args.router_port, dispatcher_lb_port=args.dispatcher_port,
        http_port=args.http_port, prometheus_port=args.prometheus_port,
        scrape_interval_s=args.scrape_interval,
        backends_template=REPO / "deploy" / "backends.yaml",
        settings_template=REPO / "deploy" / "stack.yaml",
    )
    try:
        with sigterm_as_keyboard_interrupt(), Cluster.start(
            log_dir, index=args.index, encoder=args.encoder, options=options,
            progress=lambda msg: print(f"cluster: {msg}", flush=True),
        ) as cluster:
            print("semroute cluster is up (Ctrl-C stops it)\n" + "\n".join(describe(cluster))
                  + f"\n  logs and configuration         {log_dir}\n"
                  + f"try:  curl -s {cluster.http_url}/chat/completions "
                  + "-H 'content-type: application/json' -d '{\"model\": \"auto\", "
                  + "\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'", flush=True)
            while (dead := cluster.first_dead()) is None:
                time.sleep(0.5)
            print(f"cluster: {dead}", file=sys.stderr)
            return 1
    except SemrouteError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncluster: stopped", file=sys.stderr)
        return 0


if __name__ == "__main__":
    die_with_my_parent()
    sys.exit(main())
