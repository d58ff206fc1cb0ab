"""PNG plots for the evaluation reports (matplotlib, headless Agg backend).

Each function takes plain records from ``semroute.quality.metrics`` and writes one PNG, returning its
path. matplotlib is imported lazily so the rest of semroute never pays for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from semroute.quality.metrics import (
    AbstentionPoint,
    CostQuality,
    CoveragePoint,
    PgrCurve,
    ReliabilityBin,
    upper_hull,
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def confusion_heatmap(
    confusion: npt.NDArray[np.int64], labels: Sequence[str], path: Path, title: str = ""
) -> Path:
    """Row-normalised confusion matrix (true label down, predicted across)."""
    plt = _pyplot()
    cm = confusion.astype(np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(labels)
    size = min(4 + 0.12 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true label")
    ticks = np.arange(n)
    fontsize = 8 if n <= 20 else max(3, int(160 / n))
    ax.set_xticks(ticks, labels=list(labels), rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels=list(labels), fontsize=fontsize)
    ax.set_xlabel("predicted route")
    ax.set_ylabel("true route")
    ax.set_title(title or "confusion matrix")
    return _save(fig, path)


def coverage_plot(points: Sequence[CoveragePoint], path: Path, title: str = "") -> Path:
    """Accuracy of the answered queries against the share answered, as the threshold rises."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([p.coverage for p in points], [p.accuracy for p in points], marker=".", ms=3)
    ax.set_xlabel("coverage (share of queries above the threshold)")
    ax.set_ylabel("accuracy on covered queries")
    ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or "accuracy vs coverage")
    return _save(fig, path)


def reliability_diagram(
    bins: Sequence[ReliabilityBin], ece: float, path: Path, title: str = ""
) -> Path:
    """Accuracy per confidence bin against the diagonal of perfect calibration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    centres = [(b.lower + b.upper) / 2 for b in bins if b.count]
    accs = [b.accuracy for b in bins if b.count]
    confs = [b.confidence for b in bins if b.count]
    width = bins[0].upper - bins[0].lower if bins else 0.1
    ax.bar(centres, accs, width=width * 0.9, alpha=0.7, label="accuracy")
    ax.plot(confs, accs, "o", color="C1", ms=4, label="bin: mean confidence vs accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"reliability (ECE {ece:.3f})")
    return _save(fig, path)


def cost_quality_plot(
    router: Sequence[CostQuality],
    singles: Sequence[CostQuality],
    references: Sequence[CostQuality],
    path: Path,
    title: str = "",
) -> Path:
    """The router's sweep and its hull, each single target, and reference points (oracle,
    random)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot([p.cost for p in router], [p.quality for p in router], ".", alpha=0.5, label="router")
    hull = upper_hull(router)
    ax.plot([h[0] for h in hull], [h[1] for h in hull], "-", color="C0", label="router hull")
    for p in singles:
        ax.plot(p.cost, p.quality, "s", color="C2", ms=5)
        ax.annotate(p.label, (p.cost, p.quality), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    for i, p in enumerate(references):
        ax.plot(p.cost, p.quality, "*", ms=11, color=f"C{3 + i}", label=p.label)
    ax.set_xlabel("mean price of the chosen target (USD per 1M tokens)")
    ax.set_ylabel("mean quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "cost vs quality")
    return _save(fig, path)


def pgr_plot(curve: PgrCurve, oracle_curve: PgrCurve | None, path: Path, title: str = "") -> Path:
    """PGR against the share of calls to the strong target, with random and oracle."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(curve.strong_share, curve.pgr, label="router")
    if oracle_curve is not None:
        ax.plot(oracle_curve.strong_share, oracle_curve.pgr, ":", label="oracle")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="random")
    ax.set_xlabel("share of queries sent to the strong target")
    ax.set_ylabel("performance gap recovered")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "PGR")
    return _save(fig, path)


def abstention_plot(
    curves: dict[str, Sequence[AbstentionPoint]], path: Path, marker: float | None = 0.95,
    title: str = "",
) -> Path:
    """Out-of-scope recall against in-scope coverage, one line per score (name -> curve)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, curve in curves.items():
        ax.plot([p.in_scope_coverage for p in curve], [p.oos_recall for p in curve], label=name)
    if marker is not None:
        ax.axvline(marker, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("in-scope coverage (share of in-scope queries answered)")
    ax.set_ylabel("out-of-scope recall (share abstained on)")
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Abstention: in-scope coverage vs out-of-scope recall")
    return _save(fig, path)
