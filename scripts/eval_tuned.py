"""Stock against tuned encoder (`semroute encoder tune`): Banking77, the abstention proxy and
LLMRouter, the tuning time and the tuned int8 encoder's speed. Writes the ``encoder-tune``
section of docs/EVAL.md.

    .venv/bin/python scripts/eval_tuned.py [--reuse] [--only banking77,proxy,llmrouter]

Each set is tuned on its own training exemplars only (Banking77 train; the proxy's 57 in-scope
intents; LLMRouter train), with the default `encoder tune` settings, then evaluated exactly as
scripts/evaluate.py evaluates the stock encoder (same builds, same test rows). Tuned encoders
go to out/tuned/NAME; with ``--reuse`` an existing one tuned from the same files is kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import evaluate as ev  # noqa: E402
from benchlib import machine, read_texts, write_section  # noqa: E402

from semroute.encoder import OnnxEncoder  # noqa: E402
from semroute.encoder_tune import TuneOptions, file_checksums, tune_encoder  # noqa: E402
from semroute.logs import stderr_progress  # noqa: E402
from semroute.quality.cache import DiskCachedEncoder  # noqa: E402

TUNED = ROOT / "out" / "tuned"
DOC = ROOT / "docs" / "EVAL.md"
SETS = ("banking77", "proxy", "llmrouter")


def tuned_encoder(name: str, files: list[Path], reuse: bool) -> tuple[Path, dict[str, Any]]:
    out = TUNED / name
    manifest = out / "manifest.json"
    if reuse and manifest.exists():
        record = json.loads(manifest.read_text()).get("tuned", {})
        if record.get("exemplars") == file_checksums(files):
            ev.log(f"{name}: reusing {out}")
            return out, record
    ev.log(f"{name}: tuning on {', '.join(str(f) for f in files)}")
    result = tune_encoder(files, out, options=TuneOptions(), keep_anyway=True,
                          progress=stderr_progress(f"{name}: steps"),
                          warn=lambda text: ev.log(f"{name}: warning: {text}"))
    ev.log(f"{name}: tuned in {result.seconds:.0f}s, held-out {result.before} -> {result.after}")
    return out, json.loads(manifest.read_text())["tuned"]


def encoders(path: Path) -> Any:
    return DiskCachedEncoder(OnnxEncoder.load(path, threads=2), ev.CACHE)


def query_speed(path: Path, texts: list[str], repeats: int = 3) -> float:
    """Median ms of one short query on an idle int8 encoder (two threads, as served)."""
    encoder = OnnxEncoder.load(path, threads=2)
    for text in texts[:20]:
        encoder.encode([text])
    times = []
    for _ in range(repeats):
        for text in texts:
            started = time.perf_counter()
            encoder.encode([text])
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="keep tuned encoders of the same data")
    parser.add_argument("--only", default=",".join(SETS))
    args = parser.parse_args()
    only = [s for s in args.only.split(",") if s]
    if not ev.DATA.exists():
        print(f"error: shared datasets not found at {ev.DATA}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    load = machine()
    stock = encoders(ev.ENCODER)
    rows: list[tuple[str, str, str, str]] = []
    tuning: list[str] = []
    figures: dict[str, Any] = {}

    def note_tuning(name: str, record: dict[str, Any]) -> None:
        tuning.append(
            f"| {name} | {record['rows_trained']:,} | {record['loss']} | {record['epochs']} | "
            f"{record['seconds'] / 60:.1f} min | {record['before']:.4f} | {record['after']:.4f} |"
        )

    def run_set(name: str) -> None:
        if name == "banking77":
            path, record = tuned_encoder("banking77", [ev.DATA / "banking77" / "train.csv"],
                                         args.reuse)
            note_tuning("Banking77 train", record)
            tuned = encoders(path)
            before, after = ev.banking77(stock), ev.banking77(tuned, tag="-tuned")
            for label, key in (("plain kNN (`--no-tune`)", "banking77-untuned"),
                               ("default build", "banking77")):
                rows.append((f"Banking77 accuracy, {label}",
                             ev.fmt(before[key].data["accuracy"]),
                             ev.fmt(after[key].data["accuracy"]),
                             ">= 0.945" if "plain" in label else ""))
            figures["banking77"] = {k: v.data["accuracy"] for k, v in after.items()}
            texts = [t for t in read_texts(ev.DATA / "banking77" / "test.csv") if len(t) < 60][:200]
            stock_ms, tuned_ms = query_speed(ev.ENCODER, texts), query_speed(path, texts)
            rows.append(("one short query, int8, ms (median of 600)", f"{stock_ms:.2f}",
                         f"{tuned_ms:.2f}", "same as stock"))
        if name == "proxy":
            exemplars, _, _, _ = ev.proxy_split()
            path, record = tuned_encoder("proxy", [exemplars], args.reuse)
            note_tuning("proxy (57 in-scope intents)", record)
            before = ev.abstention_proxy(stock, plot=False)["report"]
            after = ev.abstention_proxy(encoders(path), tag="-tuned", plot=False)["report"]
            for label, key, target in (
                ("proxy: out-of-scope AUROC", "oos_auroc", ">= 0.95"),
                ("proxy: out-of-scope recall at 95% in-scope coverage", "oos_recall", ""),
                ("proxy: in-scope accuracy at that threshold", "in_scope_accuracy", ""),
            ):
                rows.append((label, ev.fmt(before.get(key)), ev.fmt(after.get(key)), target))
            figures["proxy"] = after
        if name == "llmrouter":
            data = ev.DATA / "llmrouter"
            path, record = tuned_encoder("llmrouter", [data / "train.csv"], args.reuse)
            note_tuning("LLMRouter train (outcomes)", record)
            before = ev.outcomes(stock, "llmrouter", data / "train.csv", data / "test.csv",
                                 data / "models.csv")
            after = ev.outcomes(encoders(path), "llmrouter-tuned", data / "train.csv",
                                data / "test.csv", data / "models.csv")
            for key, label in (("router_max_quality", "max quality"), ("aiq", "AIQ")):
                rows.append((f"LLMRouter {label}, default build",
                             ev.fmt(before["llmrouter"].data[key], 4),
                             ev.fmt(after["llmrouter-tuned"].data[key], 4),
                             ">= 0.61" if key == "router_max_quality" else ""))
            figures["llmrouter"] = after["llmrouter-tuned"].data

    def write() -> None:
        body = [
            "## Encoder tuning (`semroute encoder tune`)",
            "",
            "Written by `.venv/bin/python scripts/eval_tuned.py` "
            f"({time.perf_counter() - started:.0f} s; {load}). Each set is tuned on its own",
            "training exemplars with the default settings, then built and scored exactly as the stock",
            "encoder above (same builds, same test rows; the served int8 export of each).",
            "",
            "| measure | stock | tuned | target |",
            "|---|---|---|---|",
            *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
            "",
            "Tuning runs (CPU, torch; the held-out columns are `tune`'s own guard rail: kNN on a",
            "stratified 10% of the exemplars, fp32, before and after):",
            "",
            "| exemplars | rows | loss | epochs | time | held-out before | after |",
            "|---|---|---|---|---|---|---|",
            *tuning,
        ]
        write_section("encoder-tune", "\n".join(body), doc=DOC)

    for name in only:
        run_set(name)
        write()  # after each set, so a long run leaves what it measured
    print(json.dumps(figures, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
