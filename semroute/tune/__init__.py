"""Build-time tuning: decision settings chosen by cross-validation on the exemplars alone.

``tune_for_build`` is what ``index build`` calls; ``labelled`` and ``outcomes`` hold the two
tuners, ``folds`` the fold logic and ``frontier`` the cost-quality maths they share with
evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from semroute.abstain import AbstainModel


@dataclass(frozen=True)
class BuildTuning:
    """What a build records: the chosen decision settings (overriding the settings' defaults
    when the index is served, unless set explicitly), the CV figures, and the abstention
    score. ``projection`` says whether the learned projection won on CV."""

    decision: dict[str, float | int | bool]
    figures: dict[str, Any]
    summary: str
    projection: bool = False
    abstain: AbstainModel | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def tune_labelled_build(
    vectors: npt.NDArray[np.float32],
    labels: Sequence[str],
    weights: npt.ArrayLike,
    *,
    null_similarity: float | None,
    projection: str,
    projection_epochs: int,
) -> BuildTuning | None:
    from semroute.tune.folds import one_blas_thread
    from semroute.tune.labelled import tune_labelled

    with one_blas_thread():
        t = tune_labelled(vectors, labels, weights, null_similarity=null_similarity,
                          projection=projection, projection_epochs=projection_epochs)
    if t is None:
        return None
    figures: dict[str, Any] = {
        "method": f"{t.folds}-fold stratified CV on the exemplars; abstention score fitted on "
                  "those folds plus leave-routes-out folds",
        "cv_accuracy": round(t.cv_accuracy, 4),
        "cv_accuracy_untuned": round(t.cv_accuracy_untuned, 4),
        "abstain_auroc_leave_routes_out": t.abstain_auroc,
        "feature_auroc_leave_routes_out": t.feature_auroc,
        "seconds": round(t.seconds, 2),
        "summary": t.summary(),
    }
    if t.projection:
        figures["projection_strength"] = t.projection_strength
        figures["projection_strength_cv_accuracy"] = {
            f"{s:g}": round(a, 4) for s, a in t.strength_cv_accuracy.items()}
    return BuildTuning({"k": t.k, "temperature": t.temperature}, figures, t.summary(),
                       t.projection, t.abstain,
                       extra={"projection_strength": t.projection_strength})


def tune_outcome_build(
    vectors: npt.NDArray[np.float32],
    scores: npt.ArrayLike,
    costs: npt.ArrayLike,
    weights: npt.ArrayLike,
) -> BuildTuning | None:
    from semroute.tune.folds import one_blas_thread
    from semroute.tune.outcomes import tune_outcomes

    with one_blas_thread():
        t = tune_outcomes(vectors, scores, costs, weights)
    if t is None:
        return None
    figures: dict[str, Any] = {
        "method": f"{t.folds}-fold CV on the exemplars, AIQ over the targets' price range",
        "cv_aiq": round(t.cv_aiq, 4),
        "cv_aiq_knn": round(t.cv_aiq_knn, 4),
        "cv_aiq_untuned": round(t.cv_aiq_untuned, 4),
        "cv_aiq_single_targets": round(t.cv_aiq_single_targets, 4),
        "seconds": round(t.seconds, 2),
        "summary": t.summary(),
    }
    decision: dict[str, float | int | bool] = {
        "k": t.k, "temperature": t.temperature, "shrinkage": t.shrinkage,
        "local_k": t.local_k, "local_shrinkage": t.local_shrinkage,
        "use_neighbours": t.use_neighbours,
    }
    if t.cv_aiq_feedback is not None:
        figures["cv_aiq_feedback"] = round(t.cv_aiq_feedback, 4)
    if t.cv_aiq_feedback_without is not None:
        figures["cv_aiq_feedback_without"] = round(t.cv_aiq_feedback_without, 4)
    if t.feedback_shrinkage is not None:
        decision["feedback_shrinkage"] = t.feedback_shrinkage
        decision["feedback_temperature"] = t.feedback_temperature
    return BuildTuning(decision, figures, t.summary())
