"""`encoder distill`: the two-stage encoder's static model (semroute.static_encoder)."""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semroute.config import DEFAULT_ENCODER_DIR, DEFAULT_STATIC_DIR
from semroute.errors import ConfigError

if TYPE_CHECKING:
    from semroute.config import Settings
    from semroute.static_encoder import StaticEncoder
    from semroute.types import Encoder


def register(top: Any, groups: dict[str, Any]) -> None:
    p = groups["encoder"].add_parser(
        "distill", help="distil a static embedding model from an exported encoder (two-stage)"
    )
    p.add_argument("--encoder", type=Path, default=DEFAULT_ENCODER_DIR,
                   help=f"exported encoder directory (default: {DEFAULT_ENCODER_DIR})")
    p.add_argument("--out", type=Path, default=DEFAULT_STATIC_DIR,
                   help=f"output folder (default: {DEFAULT_STATIC_DIR})")
    p.add_argument("--corpus", type=Path, nargs="*", default=[], metavar="CSV",
                   help="CSV files with a `text` column whose token frequencies set the SIF "
                   "weights (none: every token weighs the same)")
    p.add_argument("--dimension", type=int, default=256, help="PCA dimensions kept (<= 384)")
    p.set_defaults(handler=_distill)


def read_corpus(paths: list[Path]) -> list[str]:
    """The `text` column of each CSV; ConfigError names a file without one."""
    texts: list[str] = []
    for path in paths:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if "text" not in (reader.fieldnames or []):
                raise ConfigError(f"{path}:1: no `text` column; give CSV files with one")
            texts.extend(row["text"] for row in reader if row["text"])
    return texts


def _distill(args: argparse.Namespace) -> int:
    from semroute.static_encoder import StaticEncoder, distill_static

    started = time.perf_counter()
    out = distill_static(args.encoder, args.out, corpus=read_corpus(args.corpus),
                         dimension=args.dimension)
    model = StaticEncoder.load(out)
    print(f"distilled {args.encoder} -> {out} (dim {model.dimension}, "
          f"{model.fingerprint[:19]}…) in {time.perf_counter() - started:.1f}s")
    return 0


def static_for_build(
    path: Path | None, disabled: bool, settings: Settings, encoder: Encoder
) -> StaticEncoder | None:
    """The static model an index build embeds its exemplars with: ``path`` (an explicit one
    that does not fit the encoder is refused at build), else the configured one when it exists
    and was distilled from ``encoder``, else none."""
    from semroute.static_encoder import MANIFEST, StaticEncoder

    if disabled:
        return None
    if path is not None:
        return StaticEncoder.load(path)
    default = settings.encoder.static_path
    if not (default / MANIFEST).exists():
        return None
    model = StaticEncoder.load(default)
    if model.source_fingerprint != encoder.fingerprint:
        print(f"note: {default} was distilled from another encoder; no static stage "
              f"(re-distill with `semroute encoder distill`)", file=sys.stderr)
        return None
    return model
