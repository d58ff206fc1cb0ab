"""Quality commands: `eval labels`, `eval outcomes`, `calibrate`, `index lint`.

Each eval command writes OUT/report.json and PNG plots next to it, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from semroute.config import DEFAULT_INDEX_DIR

# Test prompts (e.g. LLMRouter's) can be far longer than a served query may be; the encoder
# truncates them to its token limit, so evaluation lifts the character limit.
_EVAL_MAX_CHARS = 16 * 1024 * 1024


def register(top: Any, groups: dict[str, Any]) -> None:
    p = groups["eval"].add_parser(
        "labels",
        help="accuracy, per-route P/R/F1, confusion, coverage and calibration on a labelled CSV",
        description="Route every row of a `text,label` CSV. Rows labelled `oos` (or with a label "
        "the index does not know) must be abstained on; their abstain precision, recall "
        "and AUROC are reported.",
    )
    _common(p)
    p.add_argument("--bins", type=int, default=10, help="reliability diagram bins [10]")
    p.set_defaults(handler=_eval_labels)

    p = groups["eval"].add_parser(
        "outcomes",
        help="cost-quality curve, AIQ, APGR/CPT on an outcome CSV (a score column per target)",
        description="Sweep the cost weight over the router's predicted qualities and compare "
        "with each single target, random and oracle routing.",
    )
    _common(p)
    p.add_argument("--targets", type=Path, default=None,
                   help="routes YAML or prices CSV (default: the prices in the index)")
    p.add_argument("--shrinkage", type=float, default=None, help="override decision.shrinkage")
    p.set_defaults(handler=_eval_outcomes)

    p = top.add_parser(
        "calibrate",
        help="choose confidence thresholds on a validation CSV and write them into the index",
    )
    p.add_argument("--index", type=Path, default=DEFAULT_INDEX_DIR)
    p.add_argument("--val", type=Path, required=True, help="labelled validation CSV")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--precision", type=float, help="target precision of answered queries")
    goal.add_argument("--coverage", type=float, help="target share of queries answered")
    goal.add_argument(
        "--in-scope-coverage", type=float,
        help="target share of in-scope queries answered (rows labelled `oos`, or with a label "
        "the index has no route for, are out of scope)",
    )
    p.add_argument("--per-route", action="store_true", help="one threshold per route")
    p.add_argument("--min-rows", type=int, default=10,
                   help="per route: validation rows needed to set its own threshold [10]")
    p.add_argument("--encoder", type=Path, default=None, help="encoder directory")
    p.add_argument(
        "--no-add-out-of-scope", dest="add_out_of_scope", action="store_false",
        help="do not add the rows labelled `oos` to the index as out-of-scope exemplars (by "
        "default they are, in a new index version, and the thresholds are chosen on the other "
        "rows)",
    )
    p.set_defaults(handler=_calibrate)

    p = groups["index"].add_parser(
        "lint",
        help="check exemplar files: duplicates, label conflicts, thin routes, misfits",
        description="Exit status 1 when any error is found (or any warning with --strict), so "
        "it can gate CI.",
    )
    p.add_argument("--exemplars", type=Path, nargs="+", required=True, metavar="PATH")
    p.add_argument("--encoder", type=Path, default=None, help="encoder directory")
    p.add_argument("--no-embed", action="store_true",
                   help="text checks only (no near duplicates, leave-one-out, margins)")
    p.add_argument("--min-per-route", type=int, default=5)
    p.add_argument("--near-duplicate", type=float, default=0.97,
                   help="cosine at or above which same-label texts are near duplicates")
    p.add_argument("--conflict", type=float, default=0.95,
                   help="cosine at or above which different-label texts conflict")
    p.add_argument("--k", type=int, default=10, help="neighbours in the leave-one-out vote")
    p.add_argument("--loo-min", type=float, default=0.8,
                   help="warn when a route's leave-one-out accuracy is below this")
    p.add_argument("--margin", type=float, default=0.2,
                   help="warn when neighbours out-vote an exemplar's own label by more")
    p.add_argument("--strict", action="store_true", help="warnings fail too")
    p.add_argument("--json", action="store_true", help="print findings as JSON lines")
    p.add_argument("--probes", type=Path, default=None, metavar="CSV",
                   help="probe queries (text,label) that must win clearly, e.g. "
                   "index_data/probes.csv: each whose vote margin or similarity gap is below "
                   "the bound is an error (their decisions could flip between CPUs)")
    p.add_argument("--probe-margin", type=float, default=0.3,
                   help="least vote share by which a probe's route must lead [0.3]")
    p.add_argument("--probe-gap", type=float, default=0.0,
                   help="least similarity by which a probe's best match must beat other "
                   "routes' [0.0]")
    p.set_defaults(handler=_lint)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path, default=DEFAULT_INDEX_DIR)
    p.add_argument("--test", type=Path, required=True, help="test CSV")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json and plots")
    p.add_argument("--encoder", type=Path, default=None, help="encoder directory")
    p.add_argument("--k", type=int, default=None, help="override decision.k")
    p.add_argument("--temperature", type=float, default=None,
                   help="override decision.temperature")
    p.add_argument("--limit", type=int, default=None, help="use only the first N test rows")


def _router(args: argparse.Namespace, **extra: Any) -> Any:
    from semroute.cli import settings_from_args
    from semroute.router import Router

    overrides: dict[str, Any] = {"limits__max_query_chars": _EVAL_MAX_CHARS}
    if getattr(args, "k", None) is not None:
        overrides["decision__k"] = args.k
    if getattr(args, "temperature", None) is not None:
        overrides["decision__temperature"] = args.temperature
    overrides.update(extra)
    settings = settings_from_args(args, **overrides)
    return Router.load(args.index, settings, encoder_path=args.encoder)


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(title)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def _write_report(out: Path, data: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _eval_labels(args: argparse.Namespace) -> int:
    from semroute.quality.evaluate import evaluate_labels

    router = _router(args)
    result = evaluate_labels(router, args.test, args.out, bins=args.bins, limit=args.limit)
    _print_table(f"eval labels: {args.test} against {router.index.path}", result.report.table())
    per_route = result.report.metrics.per_route
    worst = sorted((kv for kv in per_route.items() if kv[1].support),
                   key=lambda kv: kv[1].f1)[:5]
    if worst:
        print("  lowest F1: " + ", ".join(f"{k} {v.f1:.3f}" for k, v in worst))
    print(f"wrote {args.out / 'report.json'} and {len(result.plots)} plots")
    return 0


def _eval_outcomes(args: argparse.Namespace) -> int:
    from semroute.quality.evaluate import evaluate_outcomes

    router = _router(args, decision__shrinkage=args.shrinkage)
    prices = dict(router.index.route_table.targets)
    if args.targets is not None:
        from semroute.exemplars import read_targets

        prices.update(read_targets(args.targets))
    result = evaluate_outcomes(router, args.test, args.out, prices, limit=args.limit)
    _print_table(f"eval outcomes: {args.test} against {router.index.path}",
                 result.report.table())
    print(f"wrote {args.out / 'report.json'} and {len(result.plots)} plots")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from semroute.cli import settings_from_args
    from semroute.quality.calibrate import calibrate_index

    settings = settings_from_args(args, limits__max_query_chars=_EVAL_MAX_CHARS)
    cal, version_dir = calibrate_index(
        args.index, args.val, settings, precision=args.precision, coverage=args.coverage,
        in_scope_coverage=args.in_scope_coverage, per_route=args.per_route,
        min_rows=args.min_rows, encoder_path=args.encoder, add_out_of_scope=args.add_out_of_scope,
    )
    if args.precision is not None:
        goal = f"precision {args.precision}"
    elif args.coverage is not None:
        goal = f"coverage {args.coverage}"
    else:
        goal = f"in-scope coverage {args.in_scope_coverage}"
    if cal.added_out_of_scope:
        print(f"added {cal.added_out_of_scope} out-of-scope exemplars (rows labelled `oos`) in "
              f"a new version; thresholds chosen on the other rows")
    print(f"calibrated {version_dir} for {goal}")
    print(f"  {'route':<24} {'threshold':>9} {'precision':>9} {'coverage':>8} {'rows':>6}")
    for route, p in cal.points.items():
        name = "(global)" if route == "*" else route
        print(f"  {name:<24} {p.threshold:>9.4f} {p.precision:>9.4f} {p.coverage:>8.4f} "
              f"{p.rows:>6}")
    for route, why in cal.skipped.items():
        print(f"  note: {route}: {why}")
    from semroute.index import read_manifest

    if not read_manifest(version_dir).route_table.default_route:
        print("  note: this index has no default route, so thresholds cannot make it fall back; "
              "rebuild it (indexes built without --routes get one) or give a routes file that "
              "sets `default:`")
    return 0


def _lint(args: argparse.Namespace) -> int:
    from semroute.cli import settings_from_args
    from semroute.quality.lint import LintSettings, lint_files

    settings = LintSettings(
        min_per_route=args.min_per_route, near_duplicate=args.near_duplicate,
        conflict=args.conflict, k=args.k, loo_min_accuracy=args.loo_min, low_margin=args.margin,
        probe_margin=args.probe_margin, probe_gap=args.probe_gap,
    )
    if args.probes is not None and args.no_embed:
        print("semroute: error: --probes needs embeddings; drop --no-embed", file=sys.stderr)
        return 2
    report = lint_files(
        args.exemplars, settings, embed=not args.no_embed, encoder_path=args.encoder,
        app_settings=settings_from_args(args), probes=args.probes,
    )
    for f in report.findings:
        if args.json:
            print(json.dumps({"severity": f.severity, "code": f.code, "where": f.where,
                              "message": f.message}))
        else:
            print(f, file=sys.stdout)
    if not args.json:
        if report.loo_accuracy:
            worst = sorted(report.loo_accuracy.items(), key=lambda kv: kv[1])[:5]
            print("leave-one-out accuracy, lowest routes: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in worst))
        print(f"{len(report.errors)} error(s), {len(report.warnings)} warning(s) in "
              f"{sum(report.counts.values())} exemplars")
    failed = bool(report.errors) or (args.strict and bool(report.warnings))
    return 1 if failed else 0
