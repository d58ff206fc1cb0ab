"""Reproduce every published evaluation figure and write docs/EVAL.md (`make eval`).

Builds the indexes it needs from ../shared/data under out/eval/ (gitignored), runs the same
evaluation code as `semroute eval labels|outcomes`, copies the plots to docs/img/ and writes
docs/EVAL.md with the commands, figures, splits and dataset attributions.

Embeddings are cached under out/cache/ (keyed by encoder fingerprint and text), so a second run
embeds nothing; the routing itself always goes through the real index and decision code.

Decision settings for the outcome sets (k, temperature, shrinkage) are chosen by 5-fold
cross-validation on the *training* exemplars only, with the core's own `predict_quality`;
the test rows are used once, for the reported figures. For LLMRouter a second CV stage, given
those three, chooses the hierarchical local step (local_k, local_shrinkage; local_k=0 is off).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from semroute.config import DEFAULT_ENCODER_DIR, IndexSettings, load_settings  # noqa: E402
from semroute.decision import DecisionParams, predict_quality  # noqa: E402
from semroute.encoder import OnnxEncoder  # noqa: E402
from semroute.evaluate import (  # noqa: E402
    DiskCachedEncoder,
    Report,
    aiq,
    apgr,
    cost_quality_sweep,
    evaluate_labels,
    evaluate_outcomes,
    pgr_curve,
)
from semroute.exemplars import read_targets  # noqa: E402
from semroute.index import ExemplarIndex, build_index  # noqa: E402
from semroute.router import Router  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "out" / "eval"
CACHE = ROOT / "out" / "cache"
DOCS = ROOT / "docs"
IMG = DOCS / "img"
ENCODER = ROOT / DEFAULT_ENCODER_DIR  # the served default

MMLU_SEED = 0
MMLU_SPLIT = (
    f"random 50/50 split of the 14,042 questions with numpy `default_rng({MMLU_SEED})`: "
    "the first half of the permutation are the exemplars, the second half the test set"
)
MMLU_SPLIT_SHORT = f"random 50/50 split, numpy default_rng({MMLU_SEED})"
# List prices (USD per 1M input / output tokens) for the two RouteLLM MMLU models. Only their
# order matters for APGR; they set the cost axis of the plot.
MMLU_PRICES = {"mixtral-8x7b-instruct": (0.6, 0.6), "gpt-4-1106-preview": (10.0, 30.0)}

GRID = {
    "k": (10, 20, 40, 80, 160),
    "temperature": (0.02, 0.05, 0.1, 0.3, 1.0),
    "shrinkage": (1.0, 3.0, 10.0),
}
# Second stage, given the chosen k/temperature/shrinkage: the closest local_k neighbours shrunk
# toward the whole neighbourhood's estimate (decision.predict_quality_local); 0 = off.
LOCAL_GRID = {
    "local_k": (0, 10, 20, 40),
    "local_shrinkage": (10.0, 30.0, 100.0, 300.0),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def make_router(encoder: Any, index_root: Path, **decision: float) -> Router:
    overrides: dict[str, Any] = {f"decision__{k}": v for k, v in decision.items()}
    settings = load_settings(None, limits__max_query_chars=16 * 1024 * 1024, **overrides)
    # The disk-cached encoder has the OnnxEncoder interface (dimension, fingerprint, encode).
    return Router(encoder, ExemplarIndex.load(index_root), settings)


# ---- choosing decision settings on the training exemplars only ----------------------------------


def cv_predictions(
    vectors: np.ndarray, scores: np.ndarray, k: int, temperature: float, shrinkage: float,
    folds: int = 5, local_k: int = 0, local_shrinkage: float = 100.0,
) -> np.ndarray:
    """Out-of-fold predicted quality for every training row, through decision.predict_quality."""
    n = len(vectors)
    fold = np.random.default_rng(0).permutation(n) % folds
    out = np.zeros_like(scores)
    params = DecisionParams(temperature=temperature, shrinkage=shrinkage, local_k=local_k,
                            local_shrinkage=local_shrinkage)
    ones = np.ones(n, dtype=np.float32)
    for f in range(folds):
        train, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        means = np.nanmean(scores[train], axis=0).astype(np.float32)
        sims = vectors[held] @ vectors[train].T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1).astype(np.float32)
        for row, i in enumerate(held):
            ids = train[top[row]]
            out[i] = predict_quality(top_sims[row], scores[ids].astype(np.float32), ones[ids],
                                     means, params)
    return out


def cv_objective(pred: np.ndarray, scores: np.ndarray, costs: np.ndarray, objective: str) -> float:
    if objective == "apgr":
        return apgr(pgr_curve(pred[:, 1] - pred[:, 0], scores[:, 0], scores[:, 1]))
    sweep = cost_quality_sweep(pred, scores, costs)
    return aiq(sweep, (float(costs.min()), float(costs.max())))


def select_settings(
    vectors: np.ndarray, scores: np.ndarray, costs: np.ndarray, objective: str,
    local: bool = False,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The grid point with the best cross-validated objective ("aiq" or "apgr").

    With ``local``, a second stage keeps the chosen k/temperature/shrinkage and picks
    local_k/local_shrinkage on the same folds; the local step is used only if it strictly beats
    the chosen point without it.
    """
    results = []
    for k in GRID["k"]:
        for t in GRID["temperature"]:
            for m in GRID["shrinkage"]:
                pred = cv_predictions(vectors, scores, k, t, m)
                value = cv_objective(pred, scores, costs, objective)
                results.append({"k": k, "temperature": t, "shrinkage": m, objective: value})
    best = max(results, key=lambda r: r[objective])
    chosen = {"k": best["k"], "temperature": best["temperature"], "shrinkage": best["shrinkage"]}
    if local:
        base = {**best, "local_k": 0}
        stage = [base]
        for lk in LOCAL_GRID["local_k"][1:]:
            if lk >= chosen["k"]:
                continue
            for lm in LOCAL_GRID["local_shrinkage"]:
                pred = cv_predictions(vectors, scores, int(chosen["k"]), chosen["temperature"],
                                      chosen["shrinkage"], local_k=lk, local_shrinkage=lm)
                value = cv_objective(pred, scores, costs, objective)
                stage.append({**chosen, "local_k": lk, "local_shrinkage": lm, objective: value})
        results += stage[1:]
        top = max(stage, key=lambda r: r[objective])  # the first (off) wins ties
        if top["local_k"]:
            chosen = {**chosen, "local_k": top["local_k"],
                      "local_shrinkage": top["local_shrinkage"]}
    return chosen, results


def read_scores(path: Path, targets: list[str]) -> tuple[list[str], np.ndarray]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    texts = [r["text"] for r in rows]
    scores = np.array([[float(r[t]) if r[t] != "" else np.nan for t in targets] for r in rows])
    return texts, scores


# ---- the three evaluations ----------------------------------------------------------------------


def lint_banking77(encoder: Any) -> dict[str, Any]:
    """`semroute index lint` on the Banking77 exemplars (vectors from the cache)."""
    from collections import Counter

    from semroute.exemplars import read_exemplars
    from semroute.lint import exact_duplicates, lint

    path = DATA / "banking77" / "train.csv"
    kept = read_exemplars([path]).exemplars
    texts, labels = [e.text for e in kept], [e.label for e in kept]
    report = lint(texts, labels, [e.source for e in kept], encoder.encode(texts))
    with path.open(newline="", encoding="utf-8") as fh:
        raw = list(csv.DictReader(fh))
    dups = exact_duplicates([r["text"] for r in raw], [r["label"] for r in raw],
                            [f"{path.name}:{i + 2}" for i in range(len(raw))])
    codes = Counter(f.code for f in report.findings if f.code not in {"duplicate",
                                                                      "label-conflict"})
    codes.update(f.code for f in dups)
    worst = sorted(report.loo_accuracy.items(), key=lambda kv: kv[1])[:5]
    return {"codes": dict(sorted(codes.items())), "worst_loo": worst,
            "errors": sum(f.severity == "error" for f in [*report.findings, *dups])}


def banking77(encoder: Any) -> dict[str, Any]:
    data = DATA / "banking77"
    results: dict[str, Any] = {}
    for name, projection in (("banking77-knn", "none"), ("banking77", "learned")):
        out = fresh(OUT / name)
        log(f"{name}: building index (projection={projection})")
        build_index([data / "train.csv"], out / "index", encoder,
                    settings=IndexSettings(projection=projection), progress=False)
        encoder.save()
        log(f"{name}: evaluating")
        report = evaluate_labels(make_router(encoder, out / "index"), data / "test.csv",
                                 out / "report")
        results[name] = report
        log(f"{name}: accuracy {report.data['accuracy']}")
    return results


def banking77_calibrated(encoder: Any, precision: float = 0.97) -> tuple[Report, Any]:
    """Abstain with a known precision: exemplars = 80% of the train split, thresholds calibrated
    on the other 20% (a `general` default route catches the rest), scored on the test split."""
    from semroute.calibrate import calibrate_router

    folder = OUT.parent / "eval-data" / "banking77"
    folder.mkdir(parents=True, exist_ok=True)
    with (DATA / "banking77" / "train.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    perm = np.random.default_rng(0).permutation(len(rows))
    cut = int(0.8 * len(rows))
    for part, idx in (("exemplars", perm[:cut]), ("val", perm[cut:])):
        with (folder / f"{part}.csv").open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            w.writerows([rows[i]["text"], rows[i]["label"]] for i in idx)
    labels = sorted({r["label"] for r in rows})
    routes = folder / "routes.yaml"
    routes.write_text(
        "version: 1\ndefault: general\ntargets:\n  model: {input_cost: 0, output_cost: 0}\n"
        "routes:\n" + "".join(f"  {lab}: {{targets: [model]}}\n" for lab in [*labels, "general"]),
        encoding="utf-8",
    )
    out = fresh(OUT / "banking77-calibrated")
    log(f"banking77-calibrated: building index, calibrating for precision {precision}")
    build_index([folder / "exemplars.csv"], out / "index", encoder, routes_file=routes,
                settings=IndexSettings(projection="learned"), progress=False)
    cal, _ = calibrate_router(make_router(encoder, out / "index"), folder / "val.csv",
                              precision=precision)
    report = evaluate_labels(make_router(encoder, out / "index"), DATA / "banking77" / "test.csv",
                             out / "report")
    log(f"banking77-calibrated: threshold {cal.global_threshold:.3f}, test coverage "
        f"{report.data['coverage']}, accuracy of answered {report.data['answered_accuracy']}")
    return report, cal


def outcomes(
    encoder: Any, name: str, train: Path, test: Path, prices_file: Path, objective: str,
    local: bool = False,
) -> tuple[Report, dict[str, float], list[dict[str, float]]]:
    out = fresh(OUT / name)
    prices = read_targets(prices_file)
    log(f"{name}: building outcome index")
    build_index([train], out / "index", encoder, targets_file=prices_file, progress=False)
    encoder.save()
    index = ExemplarIndex.load(out / "index")
    targets = list(index.score_targets)
    texts, scores = read_scores(train, targets)
    vectors = encoder.encode(texts)
    costs = np.array([prices[t].cost for t in targets])
    log(f"{name}: choosing k/temperature/shrinkage by 5-fold CV on the exemplars ({objective})")
    chosen, grid = select_settings(vectors, scores, costs, objective, local)
    log(f"{name}: chose {chosen}; evaluating on the test rows")
    router = make_router(encoder, out / "index", **chosen)
    report = evaluate_outcomes(router, test, out / "report", prices)
    report.data["selection"] = {"objective": objective, "chosen": chosen, "grid": grid}
    report.data["train_means"] = dict(zip(targets, np.nanmean(scores, axis=0).tolist(),
                                          strict=True))
    (out / "report" / "report.json").write_text(json.dumps(report.data, indent=2) + "\n")
    return report, chosen, grid


def mmlu_split() -> tuple[Path, Path, Path]:
    """Write the stated MMLU split and a prices CSV under out/eval-data/mmlu/."""
    folder = OUT.parent / "eval-data" / "mmlu"
    folder.mkdir(parents=True, exist_ok=True)
    with (DATA / "routellm_mmlu" / "mmlu.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    perm = np.random.default_rng(MMLU_SEED).permutation(len(rows))
    half = len(rows) // 2
    models = list(MMLU_PRICES)
    for part, idx in (("train", perm[:half]), ("test", perm[half:])):
        with (folder / f"{part}.csv").open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["text", *models])
            for i in idx:
                w.writerow([rows[i]["text"], *(rows[i][m] for m in models)])
    prices = folder / "prices.csv"
    with prices.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "input_usd_per_1m_tokens", "output_usd_per_1m_tokens"])
        for m, (a, b) in MMLU_PRICES.items():
            w.writerow([m, a, b])
    return folder / "train.csv", folder / "test.csv", prices


# ---- docs/EVAL.md -------------------------------------------------------------------------------


def copy_plots(name: str, report_dir: Path, plots: list[str]) -> list[str]:
    IMG.mkdir(parents=True, exist_ok=True)
    out = []
    for p in plots:
        dest = IMG / f"{name}-{p}"
        shutil.copyfile(report_dir / p, dest)
        out.append(f"img/{dest.name}")
    return out


def attributions() -> str:
    text = (DATA / "README.md").read_text(encoding="utf-8")
    start = text.index("| folder")
    end = text.index("\n\n", start)
    return text[start:end]


def fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def local_settings(chosen: dict[str, float]) -> str:
    if not chosen.get("local_k"):
        return ", local_k=0 (off)"
    return f", local_k={chosen['local_k']}, local_shrinkage={chosen['local_shrinkage']}"


def local_env(chosen: dict[str, float]) -> str:
    if not chosen.get("local_k"):
        return ""
    return (f"SEMROUTE_DECISION__LOCAL_K={chosen['local_k']} "
            f"SEMROUTE_DECISION__LOCAL_SHRINKAGE={chosen['local_shrinkage']} \\\n    ")


def local_note(report: dict[str, Any]) -> list[str]:
    """How the second CV stage (local_k, local_shrinkage) was chosen, with its CV AIQ."""
    grid = report.get("selection", {}).get("grid", [])
    stage = [r for r in grid if "local_k" in r]
    if not stage:
        return []
    off = max((r["aiq"] for r in grid if "local_k" not in r), default=float("nan"))
    best = max(stage, key=lambda r: r["aiq"])
    ks = ", ".join(str(k) for k in LOCAL_GRID["local_k"])
    ms = ", ".join(f"{m:g}" for m in LOCAL_GRID["local_shrinkage"])
    return [
        "",
        "A second CV stage on the same folds, with those three fixed, tries the hierarchical",
        f"local step: local_k in ({ks}) x local_shrinkage in ({ms}).",
        "With local_k = n the n closest neighbours' weighted mean is shrunk, with local_shrinkage",
        "pseudo-neighbours, toward the estimate from all k neighbours (itself shrunk toward the",
        "global mean) rather than straight toward the global mean",
        "(`decision.predict_quality_local`); it is used only if it strictly beats local_k = 0.",
        f"CV AIQ: {off:.4f} without it, {best['aiq']:.4f} with local_k={best['local_k']}, "
        f"local_shrinkage={best['local_shrinkage']:g}.",
    ]


def missed_note(proj: dict[str, Any], lr: dict[str, Any], mm: dict[str, Any]) -> list[str]:
    """An honest line for each missed target (settings are never tuned on test rows)."""
    notes = []
    if lr["router_max_quality"] < 0.6:
        train = lr["train_means"]
        lower = sum(t["quality"] < train[t["target"]] for t in lr["targets"])
        notes.append(
            f"- LLMRouter maximum quality misses 0.60 by {0.6 - lr['router_max_quality']:.3f}. "
            "The settings are the cross-validated choice on the train split, which is easier "
            f"than the test split ({lower} of {len(lr['targets'])} models score lower on test "
            "than on train); we do not tune on the test rows."
        )
    if proj["accuracy"] < 0.93:
        notes.append(f"- Banking77 accuracy misses 0.93 by {0.93 - proj['accuracy']:.4f}.")
    if mm.get("apgr", 1.0) < 0.6:
        notes.append(f"- MMLU APGR misses 0.60 by {0.6 - mm['apgr']:.3f}.")
    return (["Missed:", "", *notes, ""]) if notes else []


def write_doc(b77: dict[str, Report], calibrated: tuple[Report, Any],
              llm: tuple[Report, dict[str, float]],
              mmlu: tuple[Report, dict[str, float]], lint_summary: dict[str, Any],
              seconds: float) -> Path:
    knn, proj = b77["banking77-knn"].data, b77["banking77"].data
    cd, cal = calibrated[0].data, calibrated[1]
    lr, lr_set = llm[0].data, llm[1]
    mm, mm_set = mmlu[0].data, mmlu[1]
    b77_img = copy_plots("banking77", OUT / "banking77" / "report", proj["plots"])
    lr_img = copy_plots("llmrouter", OUT / "llmrouter" / "report", lr["plots"])
    mm_img = copy_plots("mmlu", OUT / "mmlu" / "report", mm["plots"])
    best = lr["best_single"]
    ratio = lr["cost_ratio_at_best_single_quality"]
    point = lr["cost_ratio_at_best_single_quality_single_point"]
    lines = [
        "# Routing quality",
        "",
        "Every figure here is produced by `make eval` (`.venv/bin/python scripts/evaluate.py`),",
        "which builds the indexes under `out/eval/` from `../shared/data`, runs the same code as",
        "`semroute eval labels|outcomes`, and rewrites this file and `docs/img/`. Encoder: the",
        "stock all-MiniLM-L6-v2, the served int8 ONNX export (`make setup`); routing is an",
        "embedding plus a FAISS lookup, no LLM call. Last run: "
        f"{seconds / 60:.1f} minutes on a 2-core box.",
        "Embeddings are cached in `out/cache/` per encoder fingerprint, so reruns skip them; a",
        "cold run embeds about 33,000 texts, most of them long prompts (about 3 minutes in all",
        "with the int8 encoder, 25 with fp32). Speed figures live in BENCHMARKS.md.",
        "",
        "| target | result | reached |",
        "|---|---|---|",
        f"| Banking77 accuracy >= 0.93 | {fmt(proj['accuracy'], 4)} | "
        f"{'yes' if proj['accuracy'] >= 0.93 else 'no'} |",
        f"| LLMRouter: best single's quality at <= 50% of its cost | "
        f"{fmt(ratio)} of its cost | {'yes' if ratio is not None and ratio <= 0.5 else 'no'} |",
        f"| LLMRouter: maximum quality >= 0.60 | {fmt(lr['router_max_quality'])} | "
        f"{'yes' if lr['router_max_quality'] >= 0.6 else 'no'} |",
        f"| RouteLLM MMLU APGR >= 0.60 ({MMLU_SPLIT_SHORT}) | {fmt(mm['apgr'])} | "
        f"{'yes' if mm['apgr'] >= 0.6 else 'no'} |",
        "",
        *missed_note(proj, lr, mm),
        "## Banking77: labelled routes",
        "",
        "Train split (10,003 rows, 77 intents) as exemplars, test split (3,080 rows) as queries.",
        "",
        "```sh",
        "SEMROUTE_INDEX__PROJECTION=learned semroute index build \\",
        "    --exemplars ../shared/data/banking77/train.csv --out out/eval/banking77/index",
        "semroute eval labels --index out/eval/banking77/index \\",
        "    --test ../shared/data/banking77/test.csv --out out/eval/banking77/report",
        "```",
        "",
        "| index | accuracy | macro-F1 | ECE |",
        "|---|---|---|---|",
        f"| kNN on raw embeddings (k={knn['settings']['k']}, T={knn['settings']['temperature']}) "
        f"| {fmt(knn['accuracy'], 4)} | {fmt(knn['macro_f1'], 4)} | {fmt(knn['ece'])} |",
        f"| kNN after the learned projection (`index.projection: learned`) | "
        f"{fmt(proj['accuracy'], 4)} | {fmt(proj['macro_f1'], 4)} | {fmt(proj['ece'])} |",
        "",
        "The learned projection is a 384x384 matrix fitted at build time with numpy (a cosine",
        "softmax over route prototypes, 10 epochs; the count was chosen on a holdout of the train",
        "split) and stored in the index as `projection.npy`; query vectors are projected and",
        "re-normalised before the FAISS lookup. No test row is used to fit or tune it.",
        "",
        *(f"![{Path(p).stem}]({p})" for p in b77_img),
        "",
        "### Abstaining with a known precision",
        "",
        "Exemplars: a random 80% of the train split (numpy `default_rng(0)`); the other 20% is",
        "the validation set for `semroute calibrate --precision 0.97`, which writes a global",
        "threshold into the index; queries below it go to a `general` default route.",
        "",
        "```sh",
        "SEMROUTE_INDEX__PROJECTION=learned semroute index build \\",
        "    --exemplars out/eval-data/banking77/exemplars.csv \\",
        "    --routes out/eval-data/banking77/routes.yaml --out out/eval/banking77-calibrated/index",
        "semroute calibrate --index out/eval/banking77-calibrated/index \\",
        "    --val out/eval-data/banking77/val.csv --precision 0.97",
        "semroute eval labels --index out/eval/banking77-calibrated/index \\",
        "    --test ../shared/data/banking77/test.csv --out out/eval/banking77-calibrated/report",
        "```",
        "",
        "| | threshold | precision of answered queries | coverage |",
        "|---|---|---|---|",
        f"| validation (20% of train) | {cal.global_threshold:.3f} | "
        f"{cal.points['*'].precision:.4f} | {cal.points['*'].coverage:.4f} |",
        f"| test split | {cal.global_threshold:.3f} | {fmt(cd['answered_accuracy'], 4)} | "
        f"{fmt(cd['coverage'], 4)} |",
        "",
        f"Accuracy of the same index with no threshold: {fmt(cd['accuracy_no_threshold'], 4)} "
        "(80% of the exemplars).",
        "",
        "`semroute index lint --exemplars ../shared/data/banking77/train.csv` on the same",
        f"exemplars: findings by kind {lint_summary['codes']}, of which "
        f"{lint_summary['errors']} are errors (texts at cosine >= 0.95 under different intents),",
        "so the lint exits 1 on this data set; lowest leave-one-out accuracy: "
        + ", ".join(f"{k} {v:.2f}" for k, v in lint_summary["worst_loo"]) + ".",
        "",
        "## LLMRouter: outcome exemplars, cost against quality",
        "",
        "Train split (5,608 prompts, a quality score per model for 9 models) as exemplars; test",
        "split (500 prompts) as queries; prices from `models.csv` (blended USD per 1M tokens).",
        f"Decision settings chosen by 5-fold cross-validation of AIQ on the train split: "
        f"k={lr_set['k']}, temperature={lr_set['temperature']}, shrinkage={lr_set['shrinkage']}"
        f"{local_settings(lr_set)}.",
        *local_note(lr),
        "",
        "```sh",
        "semroute index build --exemplars ../shared/data/llmrouter/train.csv \\",
        "    --targets ../shared/data/llmrouter/models.csv --out out/eval/llmrouter/index",
        f"{local_env(lr_set)}semroute eval outcomes --index out/eval/llmrouter/index \\",
        "    --test ../shared/data/llmrouter/test.csv --targets ../shared/data/llmrouter/models.csv \\",
        f"    --k {lr_set['k']} --temperature {lr_set['temperature']} "
        f"--shrinkage {lr_set['shrinkage']} --out out/eval/llmrouter/report",
        "```",
        "",
        "| | quality | cost (USD / 1M tokens) |",
        "|---|---|---|",
        f"| best single model ({best['target']}) | {fmt(best['quality'])} | {best['cost']:.2f} |",
        f"| oracle | {fmt(lr['oracle']['quality'])} | {lr['oracle']['cost']:.2f} |",
        f"| random | {fmt(lr['random']['quality'])} | {lr['random']['cost']:.2f} |",
        f"| router, highest-quality point | {fmt(lr['router_max_quality'])} | "
        f"{lr['router_max_quality_cost']:.2f} |",
        "",
        f"- Cost to match the best single model's quality: **{fmt(ratio)}** of its cost on the",
        "  router's non-decreasing convex hull (RouterBench's convention: a point between two",
        "  sweep points is reached by mixing them per query); the cheapest single sweep point",
        f"  at or above that quality costs {fmt(point)} of it.",
        f"- AIQ over the price range: router **{fmt(lr['aiq'])}**, single models "
        f"{fmt(lr['aiq_single_targets'])}, oracle {fmt(lr['aiq_oracle'])}.",
        "",
        *(f"![{Path(p).stem}]({p})" for p in lr_img),
        "",
        "## RouteLLM MMLU: two models, APGR",
        "",
        f"Split: **{MMLU_SPLIT}** ({mm['index']['exemplars']:,} exemplars after dropping exact",
        f"duplicates, {mm['n_test']:,} test questions). Weak model mixtral-8x7b-instruct, strong",
        "model gpt-4-1106-preview, correctness 0/1 per question. Prices, for the cost axis only: "
        + ", ".join(f"{m} ${a:g}/${b:g}" for m, (a, b) in MMLU_PRICES.items())
        + " per 1M input/output tokens.",
        f"Decision settings chosen by 5-fold cross-validation of APGR on the exemplar half: "
        f"k={mm_set['k']}, temperature={mm_set['temperature']}, shrinkage={mm_set['shrinkage']}.",
        "Routing ranks questions by predicted quality of gpt-4 minus that of mixtral.",
        "",
        "```sh",
        ".venv/bin/python scripts/evaluate.py   # writes the split to out/eval-data/mmlu/",
        "semroute index build --exemplars out/eval-data/mmlu/train.csv \\",
        "    --targets out/eval-data/mmlu/prices.csv --out out/eval/mmlu/index",
        "semroute eval outcomes --index out/eval/mmlu/index --test out/eval-data/mmlu/test.csv \\",
        f"    --k {mm_set['k']} --temperature {mm_set['temperature']} "
        f"--shrinkage {mm_set['shrinkage']} --out out/eval/mmlu/report",
        "```",
        "",
        f"| {MMLU_SPLIT_SHORT} | APGR | CPT(50%) | CPT(80%) |",
        "|---|---|---|---|",
        f"| router | {fmt(mm['apgr'])} | {fmt(mm['cpt50'])} | {fmt(mm['cpt80'])} |",
        f"| oracle | {fmt(mm['apgr_oracle'])} | {fmt(mm['cpt50_oracle'])} | |",
        "| random | 0.500 | 0.500 | 0.800 |",
        "",
        f"Highest quality on the curve: {fmt(mm['router_max_quality'])} (gpt-4 alone "
        f"{fmt(mm['best_single']['quality'])}); gpt-4's quality is matched at "
        f"{fmt(mm['cost_ratio_at_best_single_quality'])} of its cost. Plots below: "
        f"{MMLU_SPLIT_SHORT}.",
        "",
        *(f"![{Path(p).stem} ({MMLU_SPLIT_SHORT})]({p})" for p in mm_img),
        "",
        "## Definitions",
        "",
        "- AIQ (RouterBench): area under the non-decreasing upper convex hull of the router's",
        "  (cost, quality) points, divided by the cost range (here cheapest to dearest target).",
        "- PGR / APGR / CPT (RouteLLM): PGR = (quality - weak) / (strong - weak) as a function of",
        "  the share of queries sent to the strong model; APGR is its area over [0, 1]; CPT(x%) the",
        "  smallest share reaching PGR x%. Computed at every share k/n (n test questions), the",
        "  continuous form of RouteLLM's area over its threshold sweep.",
        "- ECE: 10 equal-width confidence bins, sum of |accuracy - mean confidence| weighted by",
        "  bin size; confidence is the router's vote share of the winning route.",
        "",
        "## Data",
        "",
        "Datasets are read from `../shared/data/` and are not copied into this repository.",
        "",
        attributions(),
        "",
    ]
    path = DOCS / "EVAL.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    if not DATA.exists():
        print(f"error: shared datasets not found at {DATA}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    encoder = DiskCachedEncoder(OnnxEncoder.load(ENCODER, threads=2), CACHE)
    b77 = banking77(encoder)
    calibrated = banking77_calibrated(encoder)
    llm_data = DATA / "llmrouter"
    llm = outcomes(encoder, "llmrouter", llm_data / "train.csv", llm_data / "test.csv",
                   llm_data / "models.csv", "aiq", local=True)
    mtrain, mtest, mprices = mmlu_split()
    mm = outcomes(encoder, "mmlu", mtrain, mtest, mprices, "apgr")
    encoder.save()
    log("banking77: index lint")
    lint_summary = lint_banking77(encoder)
    doc = write_doc(b77, calibrated, llm[:2], mm[:2], lint_summary, time.perf_counter() - started)
    for name, rep in (("banking77", b77["banking77"]), ("llmrouter", llm[0]), ("mmlu", mm[0])):
        print(f"\n== {name}")
        for key, value in rep.table:
            print(f"  {key:<28} {value}")
    log(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
