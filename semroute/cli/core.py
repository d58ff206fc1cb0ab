"""Core commands: `encoder export`, `index build`, `index pull`, `route`."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from semroute.cli import settings_from_args
from semroute.config import (
    DEFAULT_ENCODER_DIR,
    DEFAULT_INDEX_DIR,
    FP32_ENCODER_DIR,
)
from semroute.types import OUT_OF_SCOPE, Decision, Policy, Query


def register(top: Any, groups: dict[str, Any]) -> None:
    p = groups["encoder"].add_parser("export", help="export a sentence-transformers model to ONNX")
    p.add_argument(
        "--model", type=Path, default=None, help="model folder (default: all-MiniLM-L6-v2)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default: {FP32_ENCODER_DIR}, or {DEFAULT_ENCODER_DIR} with --int8)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="dynamic int8 quantisation, per-channel weights (the served default: about 3x "
        "faster per query, Banking77 accuracy unchanged)",
    )
    p.set_defaults(handler=_export)

    p = groups["index"].add_parser("build", help="build an index from exemplar files")
    p.add_argument("--exemplars", type=Path, nargs="+", required=True, metavar="PATH")
    p.add_argument("--routes", type=Path, default=None, help="routes YAML")
    p.add_argument("--targets", type=Path, default=None, help="target prices CSV (models.csv)")
    p.add_argument("--encoder", type=Path, default=None, help="exported encoder directory")
    p.add_argument("--out", required=True,
                   help="index root (DIR/current is switched), or s3://BUCKET/PREFIX to publish "
                   "the version there (semroute.index_remote)")
    p.add_argument("--factory", default=None, help="FAISS factory string for large indexes")
    p.add_argument(
        "--faiss",
        choices=["auto", "flat", "hnsw-sq", "ivf-sq", "ivfpq"],
        default=None,
        help="FAISS index type (recorded in the manifest): auto (default) is exact up to "
        "index.exact_max exemplars and --factory above; hnsw-sq, ivf-sq and ivfpq are quantised "
        "and read memory-mapped, for very large indexes (docs/BENCHMARKS.md, bench:scale)",
    )
    p.add_argument(
        "--projection",
        choices=["auto", "none", "learned"],
        default=None,
        help="labelled sets: fit a linear projection on the exemplars; auto (default): when it "
        "wins on cross-validation (see docs/EVAL.md)",
    )
    p.add_argument(
        "--default-route",
        default="default",
        metavar="NAME",
        help="without --routes: the route low-confidence queries fall back to once `semroute "
        "calibrate` has set a threshold [default]",
    )
    p.add_argument(
        "--no-tune",
        action="store_true",
        help="skip choosing the decision settings by cross-validation on the exemplars",
    )
    p.add_argument(
        "--static", type=Path, default=None, metavar="DIR",
        help="static model for the two-stage encoder (default: encoder.static_path when it "
        "exists and was distilled from this encoder; semroute.two_stage)",
    )
    p.add_argument("--no-static", action="store_true", help="store no static stage")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_build)

    p = groups["index"].add_parser(
        "pull", help="mirror the current version of an s3:// index into a local index root",
        description="Downloads the version s3://BUCKET/PREFIX/current names into DIR/versions/, "
        "checks every file against the manifest's checksums, then switches DIR/current "
        "atomically; a router serving DIR (and watching DIR/current) follows. Endpoint and "
        "credentials: boto3's environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).",
    )
    p.add_argument("url", help="s3://BUCKET/PREFIX")
    p.add_argument("--to", type=Path, required=True, help="local index root")
    p.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                   help="keep polling current every SECONDS and pull new versions (0: once)")
    p.set_defaults(handler=_pull)

    p = top.add_parser("route", help="route queries (argument, or one per line on stdin)")
    p.add_argument("text", nargs="?", default=None)
    p.add_argument("--index", type=Path, default=DEFAULT_INDEX_DIR)
    p.add_argument("--server", default=None, help="ask a router service at ADDR instead")
    p.add_argument("--token", default=None, help="bearer token for --server")
    p.add_argument("--json", action="store_true", help="print JSON (one object per line)")
    p.add_argument("--explain", action="store_true", help="include the nearest exemplars")
    p.add_argument("--history", action="append", default=[], help="earlier turn (repeatable)")
    p.add_argument("--allow", action="append", default=[], help="allowed target (repeatable)")
    p.add_argument("--require-local", action="store_true")
    p.add_argument("--max-cost", type=float, default=None, help="USD per 1M tokens")
    p.add_argument("--quality-tolerance", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=64, help="stdin queries per batch")
    p.set_defaults(handler=_route)


def _export(args: argparse.Namespace) -> int:
    from semroute.export import export_encoder

    started = time.perf_counter()
    default_out = DEFAULT_ENCODER_DIR if args.int8 else FP32_ENCODER_DIR
    out = export_encoder(args.model, args.out or default_out, int8=args.int8)
    manifest = json.loads((out / "manifest.json").read_text())
    print(
        f"exported {manifest['model_name']} -> {out} (dim {manifest['dimension']}, "
        f"max {manifest['max_tokens']} tokens, {'int8' if manifest['int8'] else 'fp32'}, "
        f"{manifest['fingerprint'][:19]}…) "
        f"in {time.perf_counter() - started:.1f}s"
    )
    return 0


def _pull(args: argparse.Namespace) -> int:
    """Pull once; with --watch, poll forever: a failed poll (store unreachable, corrupt
    version) is reported and retried, and the local root keeps the version it has."""
    from semroute.errors import SemrouteError
    from semroute.index_remote import current_version, pull

    last = ""
    while True:
        try:
            if not last or current_version(args.url) != last:
                last = pull(args.url, args.to).name
                print(f"{args.to}/current -> {last} (from {args.url})", flush=True)
        except SemrouteError as exc:
            if args.watch <= 0:
                raise
            print(f"index pull: {exc}", file=sys.stderr, flush=True)
        if args.watch <= 0:
            return 0
        time.sleep(args.watch)


def _build(args: argparse.Namespace) -> int:
    from semroute.index_remote import is_remote, publish

    if not is_remote(args.out):
        _build_into(args, Path(args.out))
        return 0
    # s3://: build in a temporary root, then upload the version and switch the bucket's current.
    with tempfile.TemporaryDirectory(prefix="semroute-index-") as tmp:
        version_dir = _build_into(args, Path(tmp))
        publish(version_dir, args.out)
    return 0


def _build_into(args: argparse.Namespace, out: Path) -> Path:
    from semroute.cli.static_cmds import static_for_build
    from semroute.encoder import OnnxEncoder
    from semroute.index import build_index, read_manifest

    settings = settings_from_args(args)
    index_settings = settings.index
    if args.factory:
        index_settings = index_settings.model_copy(update={"approx_factory": args.factory})
    if args.projection:
        index_settings = index_settings.model_copy(update={"projection": args.projection})
    if args.faiss:
        index_settings = index_settings.model_copy(update={"faiss": args.faiss})
    encoder_path = args.encoder or settings.encoder.path
    encoder = OnnxEncoder.from_settings(encoder_path, settings.encoder)
    started = time.perf_counter()
    version_dir = build_index(
        args.exemplars,
        out,
        encoder,
        routes_file=args.routes,
        targets_file=args.targets,
        settings=index_settings,
        decision=settings.decision,
        batch_size=settings.encoder.batch_size,
        progress=not args.quiet,
        encoder_path=encoder_path,
        tune=not args.no_tune,
        default_route=args.default_route,
        static_model=static_for_build(args.static, args.no_static, settings, encoder),
    )
    elapsed = time.perf_counter() - started
    manifest = read_manifest(version_dir)
    n = manifest.counts.exemplars
    n_out = manifest.counts.per_label.get(OUT_OF_SCOPE, 0)
    print(
        f"built {manifest.kind.value} index {manifest.version}: {n} exemplars"
        f"{f' ({n_out} out-of-scope examples)' if n_out else ''}, "
        f"{len(manifest.route_table.routes)} routes, {manifest.faiss.factory} "
        f"in {elapsed:.1f}s ({n / elapsed:.0f} exemplars/s); {args.out}/current -> {version_dir.name}"
    )
    summary = manifest.tuning.get("summary")
    print(summary if summary else "decision settings: not tuned (defaults apply)")
    return version_dir


def _route(args: argparse.Namespace) -> int:
    policy = Policy(
        allowed_targets=tuple(args.allow),
        require_local=args.require_local,
        max_cost=args.max_cost,
        quality_tolerance=args.quality_tolerance,
    )
    history = tuple(args.history)
    if args.text is not None:
        batches = [[Query(args.text, history, policy, args.explain)]]
    else:
        batches = _stdin_batches(args.batch_size, history, policy, args.explain)
    if args.server:
        from semroute.grpc.router_client import SyncRouterClient

        with SyncRouterClient(args.server, token=args.token) as client:
            for batch in batches:
                _print(client.route_batch(batch), args.json)
        return 0
    from semroute.router import Router

    settings = settings_from_args(args)
    router = Router.load(args.index, settings)
    for batch in batches:
        _print(router.route_batch(batch), args.json)
    return 0


def _stdin_batches(size: int, history: tuple[str, ...], policy: Policy, explain: bool) -> Any:
    batch: list[Query] = []
    for line in sys.stdin:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        batch.append(Query(text, history, policy, explain))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _print(decisions: list[Decision], as_json: bool) -> None:
    for d in decisions:
        if as_json:
            print(json.dumps(d.as_dict(), ensure_ascii=False))
        else:
            flag = " [fallback]" if d.fallback else ""
            print(f"{d.route} -> {d.target} ({d.confidence:.2f}){flag}: {d.reason}")
            for n in d.neighbors:
                print(f"    {n.similarity:.3f} [{n.label}] {n.text[:100]}")
    sys.stdout.flush()
