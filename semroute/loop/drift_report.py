"""The ``semroute drift`` report: the decision log read back, summarised, written to a directory.

``OUT/drift.json`` (everything), ``OUT/drift.md`` (the same for people) and, unless turned off,
PNG plots (matplotlib, from the ``eval`` extra, imported only here and only when plotting):
``route_mix.png``, ``confidence.png``, ``fallback_share.png``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from semroute.errors import ConfigError
from semroute.loop.drift import (
    CONFIDENCE_BINS,
    leader_clusters,
    mix,
    route_changes,
    split_windows,
    version_stats,
    window_stats,
)
from semroute.loop.store import SqlStore

Embed = Callable[[list[str]], npt.NDArray[np.float32]]
MAX_CLUSTER_TEXTS = 2000  # fell-back queries clustered at most (the newest)


def build_report(
    store: SqlStore,
    *,
    since: float = 0.0,
    windows: int = 2,
    exemplar_mix: Mapping[str, float] | None = None,
    min_change: float = 0.02,
    embed: Embed | None = None,
    cluster_threshold: float = 0.75,
) -> dict[str, Any]:
    """The drift report of the decisions logged at or after ``since`` (see the module
    docstring). ConfigError when there is nothing to report on."""
    if windows < 1:
        raise ConfigError(f"--windows: must be at least 1, got {windows}")
    records = store.decisions(since)
    if not records:
        raise ConfigError(f"{store.where}: no logged decision since {since}; nothing to report")
    cut = split_windows(records, windows)
    stats = [window_stats(w, exemplar_mix) for w in cut]
    overall = window_stats(records, exemplar_mix)
    first = next((s for s in stats if s.requests), stats[0])
    last = next((s for s in reversed(stats) if s.requests), stats[-1])
    shadow = Counter((s.serving_version, s.candidate_version)
                     for s in store.shadow_decisions(since))
    fell_back = [r for r in records if r.fallback]
    texts = [r.query_text for r in fell_back if r.query_text][-MAX_CLUSTER_TEXTS:]
    clusters: list[dict[str, Any]] = []
    if embed is not None and texts:
        for members in leader_clusters(embed(texts), cluster_threshold)[:20]:
            clusters.append({"size": len(members), "examples": [texts[i] for i in members[:5]]})
    return {
        "since": since,
        "decisions": len(records),
        "overall": asdict(overall),
        "windows": [asdict(s) for s in stats],
        "exemplar_mix": dict(exemplar_mix) if exemplar_mix else None,
        "route_changes": [
            {"route": r, "before": round(a, 4), "after": round(b, 4), "change": round(b - a, 4)}
            for r, a, b in route_changes(first.route_mix, last.route_mix, min_change)
        ],
        "versions": [asdict(v) for v in version_stats(records, store.with_feedback(since))],
        "shadow_differences": [
            {"serving": s, "candidate": c, "logged": n} for (s, c), n in sorted(shadow.items())
        ],
        "fallback_queries": {
            "total": len(fell_back),
            "with_text": len(texts),
            "note": "" if texts or not fell_back else
            "query text is not logged (log.log_query_text off): no clusters",
            "clusters": clusters,
        },
        "confidence_bins": CONFIDENCE_BINS,
        "top1_similarity": "not in the decision log; confidence is reported instead",
    }


def write_report(report: dict[str, Any], out: Path, *, plots: bool = True) -> list[Path]:
    """Write drift.json, drift.md and (with ``plots``) the PNGs under ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "drift.json", out / "drift.md"]
    written[0].write_text(json.dumps(report, indent=2) + "\n")
    written[1].write_text(markdown(report))
    if plots:
        written += _plots(report, out)
    return written


def markdown(report: dict[str, Any]) -> str:
    o = report["overall"]
    lines = [
        "# Drift report", "",
        f"{report['decisions']} decisions; fell back: {o['fallback_share']:.1%}; "
        + (f"route mix vs exemplars (Jensen-Shannon, base 2): {o['divergence']:.3f}"
           if o["divergence"] is not None else "no exemplar mix to compare with (--index)"),
        "", "## Windows", "", "| window | requests | fell back | JS divergence |",
        "|---|---|---|---|",
    ]
    for i, w in enumerate(report["windows"]):
        div = f"{w['divergence']:.3f}" if w["divergence"] is not None else "-"
        lines.append(f"| {i + 1} | {w['requests']} | {w['fallback_share']:.1%} | {div} |")
    lines += ["", "## Routes that gained or lost traffic (first window -> last)", ""]
    lines += [f"- {c['route']}: {c['before']:.1%} -> {c['after']:.1%} ({c['change']:+.1%})"
              for c in report["route_changes"]] or ["- none moved"]
    lines += ["", "## Per index version (A/B arms, promotions)", "",
              "| version | requests | fell back | feedback | mean score | cost USD |",
              "|---|---|---|---|---|---|"]
    for v in report["versions"]:
        score = f"{v['mean_score']:.3f}" if v["mean_score"] is not None else "-"
        lines.append(f"| {v['version']} | {v['requests']} | {v['fallback_share']:.1%} | "
                     f"{v['feedback']} | {score} | {v['cost_usd']:.4f} |")
    fq = report["fallback_queries"]
    lines += ["", f"## Fell-back queries ({fq['total']}, {fq['with_text']} with text)", ""]
    if fq["note"]:
        lines.append(fq["note"])
    for c in fq["clusters"]:
        lines.append(f"- {c['size']} queries, e.g. " + "; ".join(repr(t[:80])
                                                                for t in c["examples"][:3]))
    return "\n".join(lines) + "\n"


def _plots(report: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("plots need matplotlib (pip install 'semroute[eval]'), or pass "
                          "--no-plots") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = report["windows"]
    paths = []
    routes = sorted({r for w in windows for r in w["route_mix"]}
                    | set(report["exemplar_mix"] or {}))
    series: list[tuple[str, Mapping[str, float]]] = []
    if report["exemplar_mix"]:
        series.append(("exemplars", mix(report["exemplar_mix"])))
    series += [(f"window {i + 1}", w["route_mix"]) for i, w in enumerate(windows)]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(routes) * len(series) / 2), 4))
    width = 0.8 / max(1, len(series))
    for j, (name, shares) in enumerate(series):
        ax.bar([i + j * width for i in range(len(routes))],
               [shares.get(r, 0.0) for r in routes], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(routes))], routes, rotation=45,
                  ha="right")
    ax.set_ylabel("share of decisions")
    ax.set_title("Route mix")
    ax.legend()
    paths.append(_save(plt, fig, out / "route_mix.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = report["confidence_bins"]
    centres = [(i + 0.5) / bins for i in range(bins)]
    for i, w in enumerate(windows):
        total = max(1, sum(w["confidence_hist"]))
        ax.plot(centres, [c / total for c in w["confidence_hist"]], marker="o",
                label=f"window {i + 1}")
    ax.set_xlabel("confidence")
    ax.set_ylabel("share of decisions")
    ax.set_title("Confidence distribution")
    ax.legend()
    paths.append(_save(plt, fig, out / "confidence.png"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([str(i + 1) for i in range(len(windows))], [w["fallback_share"] for w in windows])
    ax.set_xlabel("window")
    ax.set_ylabel("share fell back")
    ax.set_title("Fallbacks per window")
    paths.append(_save(plt, fig, out / "fallback_share.png"))
    return paths


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def exemplar_mix_of(per_label: Mapping[str, int]) -> dict[str, float] | None:
    """The exemplars' route mix from a manifest's per-label counts (None for outcome
    indexes, which have no labels)."""
    return mix(per_label) or None
