"""Stock against tuned encoder (`semroute encoder tune`): Banking77, the abstention proxy and
LLMRouter, the tuning time and the tuned int8 encoder's speed. Writes the ``encoder-tune``
section of docs/EVAL.md.

    .venv/bin/python scripts/eval_tuned.py [--reuse] [--only banking77,proxy,llmrouter]
    .venv/bin/python scripts/eval_tuned.py --compare DESIGN... [--rows N]

``--compare`` tunes Banking77 train (all of it, or a seeded subset of ``--rows``) once per
design (``loss:learning_rate:epochs``, e.g. ``proxy:5e-5:1``) and records `tune`'s own held-out
figures in out/tuned/compare.json; every later run puts that table in the section, so the
default loss is chosen on figures that a script produced.

Each set is tuned on its own training exemplars only (Banking77 train; the proxy's 57 in-scope
intents; LLMRouter train), with the default `encoder tune` settings, then evaluated exactly as
scripts/evaluate.py evaluates the stock encoder (same builds, same test rows). Tuned encoders
go to out/tuned/NAME; with ``--reuse`` an existing one tuned from the same files is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from semroute.encoder_tune import (  # noqa: E402
    TuneOptions,
    file_checksums,
    tune_encoder,
    tune_model,
)
from semroute.exemplars import read_exemplars  # noqa: E402
from semroute.export import default_model_dir  # noqa: E402
from semroute.logs import stderr_progress  # noqa: E402
from semroute.quality.cache import DiskCachedEncoder  # noqa: E402

TUNED = ROOT / "out" / "tuned"
DOC = ROOT / "docs" / "EVAL.md"
SETS = ("banking77", "proxy", "llmrouter")
COMPARE = TUNED / "compare.json"


def compare(designs: list[str], rows: int | None) -> None:
    """Tune Banking77 train once per design; add each run's held-out figures to COMPARE."""
    import tempfile

    train = ev.DATA / "banking77" / "train.csv"
    exemplar_set = read_exemplars([train])
    done = json.loads(COMPARE.read_text()) if COMPARE.exists() else {}
    for design in designs:
        loss, rate, epochs = design.split(":")
        options = TuneOptions(loss=loss, learning_rate=float(rate), epochs=int(epochs),
                              max_rows=rows)
        ev.log(f"compare: {design} on {rows or 'all'} rows")
        with tempfile.TemporaryDirectory() as folder:
            result = tune_model(exemplar_set, default_model_dir(), Path(folder) / "model",
                                options, progress=stderr_progress(f"{design}: steps"))
        done[f"{design}@{rows or 'all'}"] = {
            **result.record(),
            "options": {"proxy_lr": options.proxy_lr, "margin": options.margin,
                        "batch_size": options.batch_size, "scale": options.scale},
            "machine": machine(),
        }
        COMPARE.parent.mkdir(parents=True, exist_ok=True)
        COMPARE.write_text(json.dumps(done, indent=2) + "\n")
        ev.log(f"compare: {design}: {result.before} -> {result.after} in {result.seconds:.0f}s")


def compare_table() -> list[str]:
    if not COMPARE.exists():
        return []
    done = json.loads(COMPARE.read_text())
    lines = [
        "",
        "Choosing the loss (`scripts/eval_tuned.py --compare`; Banking77 train, `tune`'s held-out",
        "kNN accuracy on its stratified 10%, seed 0, batch 64; one run each, so differences under",
        "about a point are noise; proxy: proxies at 100x the encoder's rate, margin 0.1):",
        "",
        "| loss | learning rate | epochs | rows trained | held-out before | after | time "
        "| load average at start |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for record in sorted(done.values(), key=lambda r: (r["rows_trained"], -r["after"])):
        load = re.search(r"load average ([0-9.]+)", record.get("machine", ""))
        lines.append(
            f"| {record['loss']} | {record['learning_rate']:g} | {record['epochs']} | "
            f"{record['rows_trained']:,} | {record['before']:.4f} | {record['after']:.4f} | "
            f"{record['seconds'] / 60:.1f} min | {load.group(1) if load else 'not recorded'} |"
        )
    lines += ["", "Tuning runs on one torch thread, so a load average above 1 on these 2 "
              "cores slows it: compare times at similar loads."]
    return lines


def tuned_encoder(name: str, files: list[Path], reuse: bool) -> tuple[Path, dict[str, Any]]:
    out = TUNED / name
    manifest = out / "manifest.json"
    if reuse and manifest.exists():
        record = json.loads(manifest.read_text()).get("tuned", {})
        if record.get("exemplars") == file_checksums(files):
            ev.log(f"{name}: reusing {out}")
            return out, record
    ev.log(f"{name}: tuning on {', '.join(str(f) for f in files)}")
    # the load the tuning time was measured under (2 cores shared with other work)
    (TUNED / f"{name}.load").parent.mkdir(parents=True, exist_ok=True)
    (TUNED / f"{name}.load").write_text(f"{os.getloadavg()[0]:.1f}\n")
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
    parser.add_argument("--compare", nargs="+", metavar="LOSS:LR:EPOCHS", default=None,
                        help="only tune Banking77 train per design into out/tuned/compare.json")
    parser.add_argument("--rows", type=int, default=None, help="--compare on a seeded subset")
    args = parser.parse_args()
    only = [s for s in args.only.split(",") if s]
    if not ev.DATA.exists():
        print(f"error: shared datasets not found at {ev.DATA}", file=sys.stderr)
        return 2
    if args.compare:
        compare(args.compare, args.rows)
        return 0
    started = time.perf_counter()
    load = machine()
    stock = encoders(ev.ENCODER)
    rows: list[tuple[str, str, str, str]] = []
    tuning: list[str] = []
    figures: dict[str, Any] = {}

    def note_tuning(name: str, record: dict[str, Any], key: str) -> None:
        load_file = TUNED / f"{key}.load"
        load_at = load_file.read_text().strip() if load_file.exists() else "not recorded"
        tuning.append(
            f"| {name} | {record['rows_trained']:,} | {record['loss']} | "
            f"{record.get('learning_rate', 2e-5):g} | {record['epochs']} | "
            f"{record['seconds'] / 60:.1f} min | {load_at} | {record['before']:.4f} | "
            f"{record['after']:.4f} |"
        )

    def run_set(name: str) -> None:
        if name == "banking77":
            path, record = tuned_encoder("banking77", [ev.DATA / "banking77" / "train.csv"],
                                         args.reuse)
            note_tuning("Banking77 train", record, "banking77")
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
            note_tuning("proxy (57 in-scope intents)", record, "proxy")
            stock_run = ev.abstention_proxy(stock, plot=False)
            tuned_run = ev.abstention_proxy(encoders(path), tag="-tuned", plot=False)
            # the target is the score alone (no out-of-scope examples); calibrate's
            # default, with validation's out-of-scope rows as examples, is shown after it
            for mode, what, target in (
                ("zero", "no out-of-scope examples", ">= 0.95"),
                ("examples", "validation's out-of-scope rows as examples", ""),
            ):
                before = stock_run["zero"]["report"] if mode == "zero" else stock_run["report"]
                after = tuned_run["zero"]["report"] if mode == "zero" else tuned_run["report"]
                for label, key, goal in (
                    ("out-of-scope AUROC", "oos_auroc", target),
                    ("out-of-scope recall at 95% in-scope coverage", "oos_recall", ""),
                    ("in-scope accuracy at that threshold", "in_scope_accuracy", ""),
                ):
                    rows.append((f"proxy, {what}: {label}", ev.fmt(before.get(key)),
                                 ev.fmt(after.get(key)), goal))
                figures[f"proxy-{mode}"] = after
        if name == "llmrouter":
            data = ev.DATA / "llmrouter"
            path, record = tuned_encoder("llmrouter", [data / "train.csv"], args.reuse)
            note_tuning("LLMRouter train (outcomes)", record, "llmrouter")
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
            "| exemplars | rows | loss | learning rate | epochs | time | load at start | "
            "held-out before | after |",
            "|---|---|---|---|---|---|---|---|---|",
            *tuning,
            *compare_table(),
        ]
        write_section("encoder-tune", "\n".join(body), doc=DOC)

    for name in only:
        run_set(name)
        write()  # after each set, so a long run leaves what it measured
    print(json.dumps(figures, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
