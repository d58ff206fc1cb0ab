"""Loop commands: `learn` (a candidate index from logged feedback)."""

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


def _learn(args: argparse.Namespace) -> int:
    from semroute.cli import settings_from_args
    from semroute.errors import ConfigError
    from semroute.index import build_index, resolve_version_dir
    from semroute.loop.learn import prepare_learning, replay
    from semroute.loop.store import open_store, redact_url
    from semroute.router import Router
    from semroute.types import Query

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
        def predict(texts: list[str]) -> list[dict[str, float]]:
            return [dict(d.scores) for d in serving.route_batch([Query(t) for t in texts])]

        learnt = prepare_learning(serving_dir, pairs, Path(work), holdout=args.holdout,
                                  min_score=args.min_score, predict=predict)
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
    (args.out / f"learned-{version.name}.json").write_text(json.dumps(provenance, indent=2))
    candidate = Router.load(version, settings, encoder_path=None)
    before = replay(lambda text: serving.route(text).target, learnt.holdout)
    after = replay(lambda text: candidate.route(text).target, learnt.holdout)
    summary = {"candidate": str(version), **provenance,
               "holdout_replay": {"serving": before.as_dict(), "candidate": after.as_dict()}}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"candidate {version} from {len(learnt.train)} feedback rows "
              f"({learnt.skipped_no_text} without text, {learnt.skipped_low_score} low-score)")
        print(f"held-out replay ({len(learnt.holdout)} rows): serving {before.as_dict()}, "
              f"candidate {after.as_dict()}")
    return 0
