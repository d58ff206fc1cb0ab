"""Shared bits of the benchmark scripts: the docs/BENCHMARKS.md section writer, the Banking77
index they measure against, and a machine description. Each script owns one section, delimited
by ``<!-- bench:NAME -->`` markers, so running one script never clobbers another's figures."""

from __future__ import annotations

import csv
import os
import platform
import time
from pathlib import Path

from semroute.config import DEFAULT_ENCODER_DIR
from semroute.config import FP32_ENCODER_DIR as FP32_ENCODER_PATH

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
ENCODER_DIR = ROOT / DEFAULT_ENCODER_DIR  # the served default (int8)
FP32_ENCODER_DIR = ROOT / FP32_ENCODER_PATH  # the reference export
BANKING = ROOT.parent / "shared" / "data" / "banking77"
HEADER = (
    "# Benchmarks\n\n"
    "Every figure here is written by a script in `scripts/` (the command is beside each section);\n"
    "rerun it to refresh its own section. Medians and ratios come from one run on the machine\n"
    "named in the section; the machine is shared, so compare figures within a section.\n"
)


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {load:.2f} at start, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def write_section(name: str, body: str, doc: Path = DOC, header: str = HEADER) -> None:
    """Replace (or append) the ``bench:NAME`` section of ``doc`` (docs/BENCHMARKS.md)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = doc.read_text() if doc.exists() else header
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    print(f"wrote the bench:{name} section of {doc.relative_to(ROOT)}")


def read_texts(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [row["text"] for row in csv.DictReader(fh)]


def ensure_banking_index(root: Path) -> Path:
    """The Banking77 train set (10,003 rows) as an index under ``root``, rebuilt only when the
    source file or the encoder changed (a stamp file records both)."""
    from semroute.encoder import OnnxEncoder
    from semroute.index import build_index

    train = BANKING / "train.csv"
    encoder = OnnxEncoder.load(ENCODER_DIR, threads=2)
    stat = train.stat()
    source = f"{train.resolve()} {stat.st_size} {int(stat.st_mtime)} {encoder.fingerprint}"
    stamp = root / "index.source"
    if stamp.exists() and stamp.read_text() == source and (root / "current").exists():
        return root
    build_index([train], root, encoder, progress=False, encoder_path=ENCODER_DIR)
    stamp.write_text(source)
    return root
