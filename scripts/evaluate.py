"""Reproduce every published evaluation figure and write docs/EVAL.md (`make eval`).

Builds the indexes it needs from ../shared/data under out/eval/ (gitignored), runs the same
evaluation code as `semroute eval labels|outcomes`, copies the plots to docs/img/ and writes
docs/EVAL.md with the commands, figures, splits and dataset attributions.

Embeddings are cached under out/cache/ (keyed by encoder fingerprint and text), so a second run
embeds nothing; the routing itself always goes through the real index and decision code.

Every index is a default build (`semroute index build` with no tuning flags): the build chooses
its own decision settings by cross-validation on its exemplars (semroute.tune), so the test rows
are used once, for the reported figures. An untuned build (`--no-tune`) of each set is scored
too, for the tuned-vs-untuned table.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from semroute.config import DEFAULT_ENCODER_DIR, load_settings  # noqa: E402
from semroute.encoder import OnnxEncoder  # noqa: E402
from semroute.exemplars import read_targets  # noqa: E402
from semroute.index import ExemplarIndex, build_index  # noqa: E402
from semroute.quality import evaluate as runners  # noqa: E402
from semroute.quality.cache import DiskCachedEncoder  # noqa: E402
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

@dataclass
class Report:
    """What the doc is written from: a report.json body (plus figures this script adds) and
    the table the CLI would print."""

    data: dict[str, Any]
    table: list[tuple[str, str]]


def evaluate_labels(router: Router, test: Path, out: Path) -> Report:
    result = runners.evaluate_labels(router, test, out)
    return Report(result.to_dict(), result.report.table())


def evaluate_outcomes(router: Router, test: Path, out: Path, prices: Any) -> Report:
    result = runners.evaluate_outcomes(router, test, out, prices)
    return Report(result.to_dict(), result.report.table())


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


def lint_banking77(encoder: Any) -> dict[str, Any]:
    """`semroute index lint` on the Banking77 exemplars (vectors from the cache)."""
    from collections import Counter

    from semroute.exemplars import read_exemplars
    from semroute.quality.lint import exact_duplicates, lint

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


def banking77(encoder: Any, tag: str = "") -> dict[str, Report]:
    """Default build (tuned) and `--no-tune` build of the Banking77 train split (under
    out/eval/banking77{tag})."""
    data = DATA / "banking77"
    results: dict[str, Report] = {}
    for name, tune in (("banking77-untuned", False), ("banking77", True)):
        out = fresh(OUT / f"{name}{tag}")
        log(f"{name}: building index (tune={tune})")
        started = time.perf_counter()
        build_index([data / "train.csv"], out / "index", encoder, progress=False, tune=tune)
        build_s = time.perf_counter() - started
        encoder.save()
        log(f"{name}: evaluating")
        report = evaluate_labels(make_router(encoder, out / "index"), data / "test.csv",
                                 out / "report")
        report.data["build_seconds"] = round(build_s, 1)
        results[name] = report
        log(f"{name}: accuracy {report.data['accuracy']} (build {build_s:.0f}s)")
    return results


def banking77_calibrated(encoder: Any, precision: float = 0.97) -> tuple[Report, Any]:
    """Abstain with a known precision: exemplars = 80% of the train split, thresholds calibrated
    on the other 20% (a `general` default route catches the rest), scored on the test split."""
    from semroute.quality.calibrate import calibrate_router

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
                progress=False)
    cal, _ = calibrate_router(make_router(encoder, out / "index"), folder / "val.csv",
                              precision=precision)
    report = evaluate_labels(make_router(encoder, out / "index"), DATA / "banking77" / "test.csv",
                             out / "report")
    log(f"banking77-calibrated: threshold {cal.global_threshold:.3f}, test coverage "
        f"{report.data['coverage']}, accuracy of answered {report.data['answered_accuracy']}")
    return report, cal


PROXY_HELD_OUT = 20
PROXY_COVERAGE = 0.95


def proxy_split() -> tuple[Path, Path, Path, list[str]]:
    """The Banking77 abstention proxy (issue 11), written under out/eval-data/proxy/.

    Hold out 20 intents (``random.Random(0).sample(sorted(labels), 20)``); exemplars are the
    train rows of the other 57 minus a seeded 10% kept for validation; validation adds 10% of
    the held-out intents' train rows labelled ``oos``; the test set is every test row with the
    held-out intents relabelled ``oos``.
    """
    import random

    folder = OUT.parent / "eval-data" / "proxy"
    folder.mkdir(parents=True, exist_ok=True)
    with (DATA / "banking77" / "train.csv").open(newline="", encoding="utf-8") as fh:
        train = list(csv.DictReader(fh))
    with (DATA / "banking77" / "test.csv").open(newline="", encoding="utf-8") as fh:
        test = list(csv.DictReader(fh))
    labels = sorted({r["label"] for r in train})
    held = sorted(random.Random(0).sample(labels, PROXY_HELD_OUT))
    held_set = set(held)
    inside = [r for r in train if r["label"] not in held_set]
    outside = [r for r in train if r["label"] in held_set]
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(inside))
    n_val = len(inside) // 10
    val = [inside[i] for i in perm[:n_val]]
    exemplars = [inside[i] for i in perm[n_val:]]
    perm_out = rng.permutation(len(outside))
    val += [{"text": outside[i]["text"], "label": "oos"} for i in perm_out[: len(outside) // 10]]
    parts = {
        "exemplars": [(r["text"], r["label"]) for r in exemplars],
        "val": [(r["text"], r["label"]) for r in val],
        "test": [(r["text"], "oos" if r["label"] in held_set else r["label"]) for r in test],
    }
    for name, rows in parts.items():
        with (folder / f"{name}.csv").open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            w.writerows(rows)
    return folder / "exemplars.csv", folder / "val.csv", folder / "test.csv", held


def abstention_proxy(encoder: Any, tag: str = "", plot: bool = True) -> dict[str, Any]:
    """Default build on the proxy exemplars, `calibrate --in-scope-coverage 0.95` on validation
    (which adds validation's `oos` rows as out-of-scope exemplars), `eval labels` on test; the
    same without the examples (`calibrate --no-add-out-of-scope`: what the score alone does);
    plus the evidence for the score (AUROC of each neighbour feature and of the combined score,
    on the proxy test set and on the build's leave-routes-out folds). Works under
    out/eval/proxy{tag}; ``plot`` writes docs/img/proxy-abstention.png."""
    from semroute.abstain import DENSITY_K, FEATURES, auroc
    from semroute.quality.calibrate import calibrate_router
    from semroute.quality.metrics import OOS_LABEL, abstention_curve
    from semroute.quality.plots import abstention_plot
    from semroute.quality.runs import route_labelled
    from semroute.tune.labelled import features_batch, vote

    exemplars, val, test, held = proxy_split()
    with test.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    oos = np.array([r["label"] == OOS_LABEL for r in rows])
    served: dict[str, Any] = {}
    for name, add in (("zero", False), ("examples", True)):
        out = fresh(OUT / f"proxy{tag}-{name}")
        log(f"proxy ({name}): default build, calibrate --in-scope-coverage 0.95"
            f"{'' if add else ' --no-add-out-of-scope'}, eval labels")
        build_index([exemplars], out / "index", encoder, progress=False)
        cal, _ = calibrate_router(make_router(encoder, out / "index"), val,
                                  in_scope_coverage=PROXY_COVERAGE, add_out_of_scope=add)
        router = make_router(encoder, out / "index")
        report = evaluate_labels(router, test, out / "report")
        run = route_labelled(router, [r["text"] for r in rows])
        # rows whose vote the out-of-scope exemplars won fall back at any threshold
        score = np.where(np.asarray(run.predicted) == OOS_LABEL, -1.0, run.confidence)
        served[name] = {"report": report.data, "calibration": cal, "router": router,
                        "score": score}
        log(f"proxy ({name}): in-scope accuracy {report.data['in_scope_accuracy']}, oos recall "
            f"{report.data.get('oos_recall')}, AUROC {report.data.get('oos_auroc')}")
    # Evidence for the score: the neighbour features of every test query on the index without
    # out-of-scope examples (what the build fits, with none to learn from).
    router = served["zero"]["router"]
    index = router.index
    d = router.decision_settings
    sims, ids = index.search(encoder.encode([r["text"] for r in rows]), d.k)
    names = sorted(set(index.labels.tolist()))
    pos = {n: i for i, n in enumerate(names)}
    y = np.array([pos[v] for v in index.labels.tolist()])
    shares = vote(sims, y[ids], index.weights[ids], len(names), d.temperature, d.null_similarity)
    density = index.density if index.density is not None else np.zeros(index.size)
    _, table = features_batch(sims, shares, density[ids].astype(np.float64))
    evidence = {f: auroc(table[f], ~oos) for f in FEATURES}
    model = index.manifest.abstain
    combined = model.score_many(table) if model is not None else shares.max(axis=1)
    evidence["combined"] = auroc(combined, ~oos)
    curves = {
        f"served, {served['examples']['calibration'].added_out_of_scope} out-of-scope "
        "examples": abstention_curve(
            served["examples"]["score"], oos),
        "served, no examples (combined score)": abstention_curve(combined, oos),
        "top-1 similarity": abstention_curve(table["top1"], oos),
        "vote share": abstention_curve(table["share"], oos),
    }
    if plot:
        IMG.mkdir(parents=True, exist_ok=True)
        abstention_plot(curves, IMG / "proxy-abstention.png",
                        title="Banking77 proxy: 57 intents in scope, 20 held out")
    at = {name: _recall_at(c, PROXY_COVERAGE) for name, c in curves.items()}
    main = served["examples"]
    return {"report": main["report"], "calibration": main["calibration"],
            "zero": {"report": served["zero"]["report"],
                     "calibration": served["zero"]["calibration"]},
            "held_out": held, "evidence": evidence, "loro": dict(index.manifest.tuning),
            "loro_examples": dict(main["router"].index.manifest.tuning),
            "recall_at": at, "density_k": DENSITY_K}


def _recall_at(curve: list[Any], coverage: float) -> float:
    """Out-of-scope recall of the highest threshold still answering ``coverage`` in scope."""
    ok = [p.oos_recall for p in curve if p.in_scope_coverage >= coverage - 1e-12]
    return max(ok) if ok else float("nan")


def outcomes(
    encoder: Any, name: str, train: Path, test: Path, prices_file: Path,
) -> dict[str, Report]:
    """Default build (tuned) and `--no-tune` build of an outcome set, scored on its test rows."""
    prices = read_targets(prices_file)
    results: dict[str, Report] = {}
    for label, tune in ((f"{name}-untuned", False), (name, True)):
        out = fresh(OUT / label)
        log(f"{label}: building outcome index (tune={tune})")
        started = time.perf_counter()
        build_index([train], out / "index", encoder, targets_file=prices_file, progress=False,
                    tune=tune)
        build_s = time.perf_counter() - started
        encoder.save()
        router = make_router(encoder, out / "index")
        report = evaluate_outcomes(router, test, out / "report", prices)
        report.data["build_seconds"] = round(build_s, 1)
        report.data["decision"] = dict(router.index.manifest.decision)
        (out / "report" / "report.json").write_text(json.dumps(report.data, indent=2) + "\n")
        results[label] = report
        log(f"{label}: max quality {report.data['router_max_quality']}, AIQ {report.data['aiq']}"
            f", APGR {report.data.get('apgr')}")
    return results


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


def yes(ok: bool) -> str:
    return "yes" if ok else "no"


def settings_text(decision: dict[str, Any]) -> str:
    if not decision:
        return "defaults (k=10, T=0.05)"
    if decision.get("use_neighbours") is False:
        return "neighbours off: best single target per cost level"
    keys = ("k", "temperature", "shrinkage", "local_k", "local_shrinkage")
    return ", ".join(f"{k}={decision[k]:g}" for k in keys if k in decision)


def targets_table(b77: dict[str, Report], proxy: dict[str, Any], lr: dict[str, Any],
                  mm: dict[str, Any]) -> list[str]:
    pr = proxy["report"]
    acc = b77["banking77"].data["accuracy"]
    rows = [
        ("proxy: in-scope accuracy at 95% in-scope coverage", ">= 0.92",
         pr["in_scope_accuracy"], pr["in_scope_accuracy"] >= 0.92),
        ("proxy: out-of-scope recall at that threshold", ">= 0.70", pr.get("oos_recall"),
         (pr.get("oos_recall") or 0) >= 0.70),
        ("proxy: out-of-scope AUROC", ">= 0.93", pr.get("oos_auroc"),
         (pr.get("oos_auroc") or 0) >= 0.93),
        ("Banking77 accuracy, default build", ">= 0.935", acc, acc >= 0.935),
        ("LLMRouter max quality, default build", ">= 0.60", lr["router_max_quality"],
         lr["router_max_quality"] >= 0.60),
        ("LLMRouter cost to match the best single (share of its cost)", "<= 0.25",
         lr["cost_ratio_at_best_single_quality"],
         (lr["cost_ratio_at_best_single_quality"] or 9) <= 0.25),
        ("RouteLLM MMLU APGR, default build", ">= 0.65", mm["apgr"], mm["apgr"] >= 0.65),
    ]
    lines = ["| target (default builds, no flags) | wanted | result | reached |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {want} | {fmt(v, 4)} | {yes(ok)} |" for name, want, v, ok in rows]
    for name, rep in (("LLMRouter", lr), ("MMLU", mm)):
        t = rep["index"]["tuning"]
        ok = t.get("cv_aiq", 0) >= t.get("cv_aiq_single_targets", 1) - 1e-9
        lines.append(f"| {name}: AIQ on the build's own CV folds >= the single-target hull's | "
                     f">= {fmt(t.get('cv_aiq_single_targets'), 4)} | {fmt(t.get('cv_aiq'), 4)} | "
                     f"{yes(ok)} |")
    return lines


def abstention_section(proxy: dict[str, Any]) -> list[str]:
    pr, ev, loro, cal = proxy["report"], proxy["evidence"], proxy["loro"], proxy["calibration"]
    names = {"top1": "top-1 similarity", "topk": "mean top-k similarity",
             "share": "vote share (the old confidence)", "margin": "vote margin",
             "density": "top-1 minus the neighbours' own density"}
    feat = loro.get("feature_auroc_leave_routes_out", {})
    lines = [
        "## Abstention",
        "",
        "### The proxy",
        "",
        "Banking77 with 20 intents held out as out-of-scope: `random.Random(0).sample(sorted(labels),"
        " 20)` = " + ", ".join(f"`{h}`" for h in proxy["held_out"]) + ". Exemplars: the train",
        "rows of the other 57 intents minus a seeded 10% (numpy `default_rng(0)`) kept for",
        "validation; validation adds 10% of the held-out intents' train rows labelled `oos`; the",
        "test set is the whole test split with the held-out intents relabelled `oos`. The split is",
        "written to `out/eval-data/proxy/` by `scripts/evaluate.py`.",
        "",
        "```sh",
        "semroute index build --exemplars out/eval-data/proxy/exemplars.csv --out out/eval/proxy/index",
        "semroute calibrate --index out/eval/proxy/index --val out/eval-data/proxy/val.csv \\",
        "    --in-scope-coverage 0.95",
        "semroute eval labels --index out/eval/proxy/index --test out/eval-data/proxy/test.csv \\",
        "    --out out/eval/proxy/report",
        "```",
        "",
        "No routes file: the build adds a `default` route. `calibrate` adds validation's",
        f"{cal.added_out_of_scope} rows labelled `oos` to the index as out-of-scope exemplars (a new",
        "version; `--no-add-out-of-scope` skips it) and writes the threshold "
        f"({cal.global_threshold:.3f})",
        "that answers 95% of the in-scope validation rows. An out-of-scope exemplar is an example",
        "of what the router must not answer: when such exemplars win a query's vote the router",
        "falls back to the default route, and every confidence is multiplied by one minus their",
        "share of the vote (`semroute/decision.py`). Treating out-of-scope queries as one more",
        "class trained on examples of them (\"oos-train\") is one of the schemes the CLINC150",
        "study (Larson et al., 2019) compares with thresholding. The second column is the run",
        "with `--no-add-out-of-scope`: what the abstention score alone does, with no example.",
        "",
        "| on the test split | with the examples (default) | no examples |",
        "|---|---|---|",
    ]
    zr = proxy["zero"]["report"]
    for label, key in (
        ("in-scope accuracy (an abstention counts as wrong)", "in_scope_accuracy"),
        ("in-scope coverage", "coverage"),
        ("accuracy of the answered in-scope queries", "answered_accuracy"),
        ("accuracy with no threshold", "accuracy_no_threshold"),
        ("out-of-scope recall (share abstained on)", "oos_recall"),
        ("out-of-scope precision (abstentions that were out of scope)", "oos_precision"),
        ("out-of-scope AUROC of the confidence", "oos_auroc"),
    ):
        lines.append(f"| {label} | {fmt(pr.get(key), 4)} | {fmt(zr.get(key), 4)} |")
    lines += [
        "",
        "The held-out intents' test rows are close to their validation rows (same intents), so",
        "the examples column is what a deployment gets when it labels a sample of the traffic it",
        "does not want answered; for traffic unlike any example, the no-example column applies.",
        "",
        "### The score",
        "",
        "A labelled decision's confidence is now an abstention score (`semroute/abstain.py`): a",
        "logistic regression over five neighbour features, fitted at build time without any",
        "out-of-scope example. In-scope rows come from the build's 5-fold CV (target: the fold",
        "routed the row right); out-of-scope rows from leave-routes-out folds (five groups of routes",
        "held out whole, their exemplars routed against the rest; target 0); both kinds weigh the",
        f"same. The density feature uses each exemplar's mean similarity to its {proxy['density_k']}",
        "nearest other exemplars, stored in the index (`density.npy`).",
        "",
        "Evidence, AUROC for telling in-scope from out-of-scope (higher is better), on the index",
        "without out-of-scope examples: on the proxy test split, and on the proxy build's own",
        "leave-routes-out folds (no test row involved).",
        "",
        "| score | proxy test | leave-routes-out |",
        "|---|---|---|",
    ]
    for key, label in names.items():
        lines.append(f"| {label} | {fmt(ev[key], 4)} | {fmt(feat.get(key), 4)} |")
    lines += [
        f"| **combined (served)** | **{fmt(ev['combined'], 4)}** | "
        f"{fmt(loro.get('abstain_auroc_leave_routes_out'), 4)} (in-sample) |",
        "",
        "Out-of-scope recall at 95% in-scope coverage, thresholds set on the test split itself "
        "(the curve below): " + ", ".join(f"{k} {v:.3f}" for k, v in proxy["recall_at"].items())
        + ".",
        "",
        "Other scores (class-conditional distances, a linear probe, lexical novelty) and their",
        "combinations, up to a logistic fit on the test rows themselves, are measured by",
        "`scripts/oos_ceiling.py` in the section \"Abstention: where the ceiling is\" below: with",
        "no out-of-scope example none reaches the out-of-scope targets on this proxy; the",
        "examples validation provides do (first table).",
        "",
        "![in-scope coverage against out-of-scope recall](img/proxy-abstention.png)",
        "",
    ]
    return lines


def tuning_section(b77: dict[str, Report], llm: dict[str, Report],
                   mmlu: dict[str, Report]) -> list[str]:
    lines = [
        "## Self-tuning builds",
        "",
        "`semroute index build` chooses its decision settings by cross-validation on the exemplars",
        "alone (embeddings computed once and reused by every fold): for labelled sets k x",
        "temperature x learned projection on/off by 5-fold stratified accuracy, then the",
        "abstention score; for outcome sets k x temperature x shrinkage, then the local step, by",
        "5-fold AIQ. An outcome build whose best kNN AIQ does not beat the single targets' hull on",
        "those folds ignores its neighbours (best single target per cost level). The settings and",
        "CV figures go into the manifest (`decision`, `tuning`) and the build prints a one-line",
        "summary; `--no-tune` skips all of it. Settings given explicitly (flags, environment,",
        "config file) still win when the index is served.",
        "",
        "| data set | build | settings | CV figure | test figure | build time |",
        "|---|---|---|---|---|---|",
    ]
    for name, reps, metric in (("Banking77", b77, "accuracy"), ("LLMRouter", llm, "aiq"),
                               ("MMLU", mmlu, "apgr")):
        for label, key in (("--no-tune", "-untuned"), ("default (tuned)", "")):
            base = {"Banking77": "banking77", "LLMRouter": "llmrouter", "MMLU": "mmlu"}[name]
            d = reps[base + key].data
            t = d["index"]["tuning"]
            if metric == "accuracy":
                cv = f"accuracy {fmt(t.get('cv_accuracy'), 4)}" if t else "-"
                test = f"accuracy {fmt(d['accuracy'], 4)}"
                sets = (f"k={d['settings']['k']}, T={d['settings']['temperature']:g}, projection "
                        f"{'learned' if d['index']['projection'] else 'none'}")
            else:
                cv = f"AIQ {fmt(t.get('cv_aiq'), 4)}" if t else "-"
                test = (f"AIQ {fmt(d['aiq'], 4)}, max quality {fmt(d['router_max_quality'])}"
                        + (f", APGR {fmt(d['apgr'])}" if d.get("apgr") is not None else ""))
                sets = settings_text(d.get("decision", {}))
            lines.append(f"| {name} | {label} | {sets} | {cv} | {test} | "
                         f"{d['build_seconds']:.0f} s |")
    lines += [
        "",
        "Build times include embedding (from the evaluation's embedding cache here; a cold",
        "10,000-exemplar Banking77 build embeds for about 30 s more with the int8 encoder).",
        "",
    ]
    return lines


def write_doc(b77: dict[str, Report], calibrated: tuple[Report, Any], proxy: dict[str, Any],
              llm: dict[str, Report], mmlu: dict[str, Report], lint_summary: dict[str, Any],
              seconds: float) -> Path:
    knn, proj = b77["banking77-untuned"].data, b77["banking77"].data
    cd, cal = calibrated[0].data, calibrated[1]
    lr, mm = llm["llmrouter"].data, mmlu["mmlu"].data
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
        "`semroute index build`, `calibrate` and `eval labels|outcomes`, and rewrites this file and",
        "`docs/img/`. Encoder: the stock all-MiniLM-L6-v2, the served int8 ONNX export",
        "(`make setup`); routing is an embedding plus a FAISS lookup, no LLM call. Every index is a",
        "default build: no tuning flags, the build chooses its own settings. Decisions are the",
        "full encoder's: the indexes carry no static stage, so the two-stage encoder (on by",
        "default for indexes `semroute index build` makes after `make setup`) does not run; what it",
        "changes (0.5% of Banking77 decisions) is in docs/BENCHMARKS.md, `bench:two_stage`. Last run: "
        f"{seconds / 60:.1f} minutes on a 2-core box (embeddings cached in `out/cache/`).",
        "",
        *targets_table(b77, proxy, lr, mm),
        "",
        *abstention_section(proxy),
        *tuning_section(b77, llm, mmlu),
        "## Banking77: labelled routes",
        "",
        "Train split (10,003 rows, 77 intents) as exemplars, test split (3,080 rows) as queries.",
        "",
        "```sh",
        "semroute index build --exemplars ../shared/data/banking77/train.csv --out out/eval/banking77/index",
        "semroute eval labels --index out/eval/banking77/index \\",
        "    --test ../shared/data/banking77/test.csv --out out/eval/banking77/report",
        "```",
        "",
        "| index | accuracy | macro-F1 | ECE |",
        "|---|---|---|---|",
        f"| `--no-tune`: kNN on raw embeddings (k={knn['settings']['k']}, "
        f"T={knn['settings']['temperature']}) | {fmt(knn['accuracy'], 4)} | "
        f"{fmt(knn['macro_f1'], 4)} | {fmt(knn['ece'])} |",
        f"| default build (k={proj['settings']['k']}, T={proj['settings']['temperature']}, "
        f"projection {'learned' if proj['index']['projection'] else 'none'}) | "
        f"{fmt(proj['accuracy'], 4)} | {fmt(proj['macro_f1'], 4)} | {fmt(proj['ece'])} |",
        "",
        "The learned projection is a 384x384 matrix fitted at build time with numpy (a cosine",
        "softmax over route prototypes, 10 epochs) and stored in the index as `projection.npy`;",
        "query vectors are projected and re-normalised before the FAISS lookup. The build turns it",
        "on when it wins on the exemplars' own CV folds. ECE is measured on the served confidence",
        "(the abstention score for tuned builds, the vote share for `--no-tune`).",
        "",
        *(f"![{Path(p).stem}]({p})" for p in b77_img),
        "",
        "### Abstaining with a known precision",
        "",
        "Exemplars: a random 80% of the train split (numpy `default_rng(0)`); the other 20% is",
        "the validation set for `semroute calibrate --precision 0.97`, which writes a global",
        "threshold into the index; queries below it go to a `general` default route.",
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
        f"Settings chosen by the build: {settings_text(lr.get('decision', {}))}.",
        "",
        "```sh",
        "semroute index build --exemplars ../shared/data/llmrouter/train.csv \\",
        "    --targets ../shared/data/llmrouter/models.csv --out out/eval/llmrouter/index",
        "semroute eval outcomes --index out/eval/llmrouter/index \\",
        "    --test ../shared/data/llmrouter/test.csv --out out/eval/llmrouter/report",
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
        f"Settings chosen by the build: {settings_text(mm.get('decision', {}))}.",
        "Routing ranks questions by predicted quality of gpt-4 minus that of mixtral.",
        "",
        "```sh",
        ".venv/bin/python scripts/evaluate.py   # writes the split to out/eval-data/mmlu/",
        "semroute index build --exemplars out/eval-data/mmlu/train.csv \\",
        "    --targets out/eval-data/mmlu/prices.csv --out out/eval/mmlu/index",
        "semroute eval outcomes --index out/eval/mmlu/index --test out/eval-data/mmlu/test.csv \\",
        "    --out out/eval/mmlu/report",
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
        f"{fmt(mm['cost_ratio_at_best_single_quality'])} of its cost.",
        "",
        *(f"![{Path(p).stem} ({MMLU_SPLIT_SHORT})]({p})" for p in mm_img),
        "",
        "## Definitions",
        "",
        "- AIQ (RouterBench): area under the non-decreasing upper convex hull of the router's",
        "  (cost, quality) points, divided by the cost range (here cheapest to dearest target).",
        "- PGR / APGR / CPT (RouteLLM): PGR = (quality - weak) / (strong - weak) as a function of",
        "  the share of queries sent to the strong model; APGR is its area over [0, 1]; CPT(x%) the",
        "  smallest share reaching PGR x%. Computed at every share k/n (n test questions).",
        "- In-scope accuracy: right answers over in-scope test rows, an abstention counting as",
        "  wrong; out-of-scope recall / precision: of the `oos` rows, the share abstained on / of",
        "  the abstentions, the share that were `oos`; AUROC: of the confidence, in-scope vs `oos`.",
        "- ECE: 10 equal-width confidence bins, sum of |accuracy - mean confidence| weighted by",
        "  bin size.",
        "",
        "## Data",
        "",
        "Datasets are read from `../shared/data/` and are not copied into this repository.",
        "",
        attributions(),
        "",
    ]
    path = DOCS / "EVAL.md"
    kept = kept_sections(path)
    if kept:
        at = lines.index("## Definitions")
        lines[at:at] = [*kept, ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def kept_sections(path: Path) -> list[str]:
    """The ``<!-- bench:NAME -->`` sections other scripts wrote into ``path``
    (scripts/eval_tuned.py, scripts/oos_ceiling.py), so rewriting the file keeps them."""
    import re

    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(r"<!-- bench:([\w-]+) -->.*?<!-- /bench:\1 -->", re.S)
    return [m.group(0) + "\n" for m in pattern.finditer(text)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    if not DATA.exists():
        print(f"error: shared datasets not found at {DATA}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    encoder = DiskCachedEncoder(OnnxEncoder.load(ENCODER, threads=2), CACHE)
    proxy = abstention_proxy(encoder)
    b77 = banking77(encoder)
    calibrated = banking77_calibrated(encoder)
    llm_data = DATA / "llmrouter"
    llm = outcomes(encoder, "llmrouter", llm_data / "train.csv", llm_data / "test.csv",
                   llm_data / "models.csv")
    mtrain, mtest, mprices = mmlu_split()
    mm = outcomes(encoder, "mmlu", mtrain, mtest, mprices)
    encoder.save()
    log("banking77: index lint")
    lint_summary = lint_banking77(encoder)
    doc = write_doc(b77, calibrated, proxy, llm, mm, lint_summary, time.perf_counter() - started)
    pr = proxy["report"]
    print(f"\n== proxy: in-scope accuracy {pr['in_scope_accuracy']}, oos recall "
          f"{pr.get('oos_recall')}, oos AUROC {pr.get('oos_auroc')}")
    for name, rep in (("banking77", b77["banking77"]), ("llmrouter", llm["llmrouter"]),
                      ("mmlu", mm["mmlu"])):
        print(f"\n== {name}")
        for key, value in rep.table:
            print(f"  {key:<28} {value}")
    log(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
