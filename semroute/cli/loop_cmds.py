"""Loop commands: `learn` (a candidate index from logged feedback), `index promote` /
`index rollback` / `index history` (which version serves, with who, when and why), `drift`."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from semroute.config import DEFAULT_INDEX_DIR


def register(top: Any, groups: dict[str, Any]) -> None:
    p = top.add_parser(
        "learn",
        help="build a candidate index from the decision log's feedback (then shadow or promote it)",
    )
    p.add_argument("--log", required=True,
                   help="decision log: sqlite:PATH, a file path, or postgresql://...")
    p.add_argument("--index", type=Path, default=DEFAULT_INDEX_DIR,
                   help="the serving index (ROOT or a version directory)")
    p.add_argument("--out", type=Path, required=True,
                   help="root for the candidate (DIR/current is switched to it)")
    p.add_argument("--since", type=float, default=0.0,
                   help="only decisions at or after this unix time")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of feedback kept out to compare candidate and serving (0..0.9)")
    p.add_argument("--min-score", type=float, default=0.5,
                   help="labelled indexes: learn queries whose answer scored at least this")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=_learn)

    pr = groups["index"].add_parser(
        "promote", help="make an index version serve (atomic `current` switch, recorded)",
        description="Checks VERSION in full (same encoder as the version serving), switches "
        "DIR/current to it and appends who/when/why to DIR/promotions.jsonl. A serving router's "
        "watch reloads it. VERSION is a name under DIR/versions or a version directory elsewhere "
        "(copied in first), e.g. a candidate from `semroute learn --out`.",
    )
    pr.add_argument("root", type=Path, metavar="DIR", help="index root")
    pr.add_argument("version", metavar="VERSION", help="version name or version directory")
    pr.add_argument("--reason", required=True, help="why (recorded)")
    pr.add_argument("--by", default=None, help="who (recorded) [user@host]")
    pr.add_argument("--if-better", action="store_true",
                    help="promote only when the held-out replay `semroute learn` recorded for "
                    "VERSION (OUT/learned-VERSION.json) scores it above the version it was "
                    "learnt from, and that version is the one DIR serves; otherwise exit 1 "
                    "and leave DIR as it is")
    pr.set_defaults(handler=_promote)
    rb = groups["index"].add_parser(
        "rollback", help="switch back to the previously promoted index version (recorded)",
    )
    rb.add_argument("root", type=Path, metavar="DIR", help="index root")
    rb.add_argument("--reason", required=True, help="why (recorded)")
    rb.add_argument("--by", default=None, help="who (recorded) [user@host]")
    rb.set_defaults(handler=_rollback)
    hi = groups["index"].add_parser("history", help="promotions and rollbacks of an index root")
    hi.add_argument("root", type=Path, metavar="DIR", help="index root")
    hi.set_defaults(handler=_history)

    d = top.add_parser(
        "drift", help="report how traffic drifts from the index (decision log -> JSON, MD, PNG)",
        description="Fallback share, route mix against the exemplars' mix (Jensen-Shannon), "
        "routes that gained or lost traffic between the first and last time window, confidence "
        "per window, per index version requests/fallbacks/feedback/cost, and clusters of "
        "fell-back queries (when query text is logged; needs --index for the encoder).",
    )
    d.add_argument("--log", required=True,
                   help="decision log: sqlite:PATH, a file path, or postgresql://...")
    d.add_argument("--index", type=Path, default=None,
                   help="the serving index: its exemplar mix, and its encoder for clusters")
    d.add_argument("--out", type=Path, required=True, help="report directory")
    d.add_argument("--since", type=float, default=0.0, help="only decisions at or after (unix s)")
    d.add_argument("--windows", type=int, default=2, help="equal time windows to compare [2]")
    d.add_argument("--min-change", type=float, default=0.02,
                   help="share change for a route to count as gaining/losing [0.02]")
    d.add_argument("--cluster-threshold", type=float, default=0.75,
                   help="cosine for two fell-back queries to share a cluster [0.75]")
    d.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNGs")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(handler=_drift)


def _learn(args: argparse.Namespace) -> int:
    from semroute.cli import settings_from_args
    from semroute.errors import ConfigError
    from semroute.index import build_index, resolve_version_dir
    from semroute.loop.learn import ReplayVerdict, prepare_learning, replay, replay_record
    from semroute.loop.store import open_store, redact_url
    from semroute.router import Router

    if not 0.0 <= args.holdout <= 0.9:
        raise ConfigError(f"--holdout: must be in [0, 0.9], got {args.holdout}")
    settings = settings_from_args(args)
    serving_dir = resolve_version_dir(args.index)
    store = open_store(args.log)
    try:
        pairs = store.with_feedback(args.since)
    finally:
        store.close()
    if not pairs:
        raise ConfigError(f"{args.log}: no logged decision has feedback yet; nothing to learn")
    serving = Router.load(serving_dir, settings)
    with tempfile.TemporaryDirectory(prefix="semroute-learn-") as work:
        learnt = prepare_learning(serving_dir, pairs, Path(work), holdout=args.holdout,
                                  min_score=args.min_score)
        if not learnt.train:
            raise ConfigError(
                f"{args.log}: no feedback row can be learnt from ({learnt.skipped_no_text} "
                "without logged text: turn log.log_query_text on; "
                f"{learnt.skipped_low_score} below --min-score)"
            )
        version = build_index(
            [learnt.exemplars_csv], args.out, serving.encoder, routes_file=learnt.routes_yaml,
            settings=settings.index, progress=False,
        )
    provenance = {"serving_version": serving_dir.name, "log": redact_url(args.log),
                  **learnt.provenance()}
    candidate = Router.load(version, settings, encoder_path=None)
    verdict = ReplayVerdict(replay(lambda text: serving.route(text).target, learnt.holdout),
                            replay(lambda text: candidate.route(text).target, learnt.holdout))
    summary = {"candidate": str(version), **provenance, "holdout_replay": verdict.as_dict()}
    # `index promote --if-better` reads the replay back from here
    replay_record(version).write_text(json.dumps(
        {**provenance, "holdout_replay": verdict.as_dict()}, indent=2))
    before, after = verdict.serving, verdict.candidate
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"candidate {version} from {len(learnt.train)} feedback rows "
              f"({learnt.skipped_no_text} without text, {learnt.skipped_low_score} low-score)")
        print(f"held-out replay ({len(learnt.holdout)} rows): serving {before.as_dict()}, "
              f"candidate {after.as_dict()}; "
              f"{'prefers' if verdict.prefers_candidate else 'does not prefer'} the candidate")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from semroute.loop.learn import read_verdict
    from semroute.loop.promote import promote, serving_version, version_dir

    reason = args.reason
    if args.if_better:
        verdict = read_verdict(version_dir(args.root, args.version))
        serving = serving_version(args.root)
        if verdict.against and verdict.against != serving:
            print(f"not promoted: the held-out replay compared the candidate with "
                  f"{verdict.against}, but {args.root} serves {serving or 'nothing'}; run "
                  "`semroute learn` against the version serving, or promote without --if-better")
            return 1
        figures = (f"held-out replay: serving {verdict.serving.weighted_score}, candidate "
                   f"{verdict.candidate.weighted_score} ({verdict.candidate.matched} of "
                   f"{verdict.candidate.rows} rows matched)")
        if not verdict.prefers_candidate:
            print(f"not promoted: {figures}; {args.root} left as it was")
            return 1
        reason = f"{reason} [{figures}]"
    entry = promote(args.root, args.version, reason=reason, by=args.by)
    print(f"promoted {entry.version} (was {entry.previous or 'none'}) in {args.root}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from semroute.loop.promote import rollback

    entry = rollback(args.root, reason=args.reason, by=args.by)
    print(f"rolled back to {entry.version} (was {entry.previous}) in {args.root}")
    return 0


def _history(args: argparse.Namespace) -> int:
    from semroute.loop.promote import history, serving_version

    for e in history(args.root):
        print(f"{e.at}  {e.action:8}  {e.version}  (was {e.previous or 'none'})  by {e.by}: "
              f"{e.reason}")
    print(f"serving: {serving_version(args.root) or 'none'}")
    return 0


def _drift(args: argparse.Namespace) -> int:
    from semroute.cli import settings_from_args
    from semroute.loop.drift_report import build_report, exemplar_mix_of, write_report
    from semroute.loop.store import open_store

    exemplar_mix = None
    embed = None
    if args.index is not None:
        from semroute.router import Router

        router = Router.load(args.index, settings_from_args(args))
        exemplar_mix = exemplar_mix_of(router.index.manifest.counts.per_label)
        embed = router.encoder.encode
    store = open_store(args.log)
    try:
        report = build_report(store, since=args.since, windows=args.windows,
                              exemplar_mix=exemplar_mix, min_change=args.min_change,
                              embed=embed, cluster_threshold=args.cluster_threshold)
    finally:
        store.close()
    written = write_report(report, args.out, plots=args.plots)
    if args.json:
        print(json.dumps(report))
    else:
        overall = report["overall"]
        print(f"{report['decisions']} decisions, {overall['fallback_share']:.1%} fell back; "
              f"report in {args.out}: {', '.join(p.name for p in written)}")
    return 0
