"""Neighbours -> scores -> decision. Pure functions over numpy arrays; no I/O, no encoder.

Labelled exemplars vote for their route with weight ``w_i * exp((s_i - s_max) / T)`` (a softmax
over similarities, relative to the best match so it never overflows). A *null* pseudo-neighbour at
similarity ``null_similarity`` joins the denominator: when every neighbour is far from the query,
the null share grows and confidence drops, which is what lets a threshold abstain on
out-of-scope queries instead of trusting a unanimous vote of distant neighbours.

Outcome exemplars predict each target's quality as the neighbours' weighted mean score shrunk
toward the target's mean over the whole exemplar set, with ``shrinkage`` pseudo-neighbours of
prior weight. Without it a few neighbours produce ties and wild estimates (ANCHORS.md: plain
cost-aware kNN never reached the best single model on the LLMRouter split).

Scores may be missing (NaN): a row learnt from feedback knows only the score of the target that
answered it. Such partly scored rows never enter the estimate above, which runs over the ``k``
nearest fully scored rows out of a wider search (``search_width``): comparing targets needs
their outcomes on the same queries, and a feedback row was observed only where the serving index
chose its target. ``feedback_step`` then corrects that estimate by the residuals of the ``k``
nearest feedback rows (observed score minus the estimate): their mean over every target shifts
all targets alike (the queries are harder or easier than the fully scored rows say), and each
target's own residuals move it against the others, shrunk with the pseudo-count
``feedback_shrinkage`` (tuned by the build; None ignores feedback rows). A feedback row never
changes the differences between the targets it did not observe. An index without any fully
scored row averages each target over the ``k`` nearest rows that observed it.

With ``local_k`` > 0 the estimate is hierarchical: the ``local_k`` closest neighbours' weighted
mean is shrunk, with ``local_shrinkage`` pseudo-neighbours, toward the estimate of the whole
neighbourhood (itself shrunk toward the global mean as above) instead of straight toward the
global mean. The closest exemplars then refine the broad neighbourhood's answer without the
noise of trusting a few of them alone (LLMRouter, 5-fold CV on the train split: AIQ 0.6310 ->
0.6324, highest quality 0.6536 -> 0.6557; see docs/EVAL.md).

With ``use_neighbours`` off (set by a build whose kNN estimate could not beat the single-target
hull on its own CV folds, ``semroute.tune.outcomes``) every query gets the targets' mean scores:
the decision degrades to the best single target for the cost weight in force.

A labelled decision's confidence is the vote share, or, when the index carries an abstention
model (``semroute.abstain``, fitted at build time), that model's P(right) from the neighbours'
distance and agreement; thresholds compare against whichever the index provides.

Exemplars labelled ``oos`` (``types.OUT_OF_SCOPE``) are examples of queries the router must not
answer. They vote like a route; when they win, the decision falls back to the default route
whatever the threshold, and in every decision the confidence is multiplied by one minus their
share of the vote (so it falls as a query nears them). On the Banking77 abstention proxy,
273 such examples from validation raise out-of-scope recall from 0.51 to 0.85 at 95% in-scope
coverage (docs/EVAL.md, "Abstention").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from semroute.abstain import AbstainModel, neighbour_features
from semroute.errors import NoTargetAvailable
from semroute.types import OUT_OF_SCOPE, Decision, Neighbor, Policy, RouteTable

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class DecisionParams:
    temperature: float = 0.05
    null_similarity: float | None = 0.35
    shrinkage: float = 1.0
    cost_weight: float = 0.0
    local_k: int = 0
    local_shrinkage: float = 100.0
    use_neighbours: bool = True
    abstain: AbstainModel | None = None
    # Outcomes: per target, only the ``k`` most similar neighbours that observed it count
    # (0 = every neighbour given). The search must then reach past k (``search_width``).
    k: int = 0
    # Outcomes with partly scored rows (learnt from feedback): pseudo-count of the fully
    # scored rows' estimate against the partly scored rows' evidence; None ignores them.
    feedback_shrinkage: float | None = None
    feedback_temperature: float = 0.05


# The widest search ``search_width`` asks for, whatever the share of observed scores.
MAX_SEARCH_WIDTH = 2048


def search_width(k: int, scores: npt.NDArray[np.float32]) -> int:
    """Neighbours to fetch so that about ``k`` fully scored rows are among them.

    A fully scored index needs ``k``. When scores are missing (feedback rows observe only the
    target that served them), the search widens by twice the inverse of the fully scored rows'
    share (of the least observed target's share when no row is fully scored), capped at
    ``MAX_SEARCH_WIDTH`` and the index size.
    """
    n = scores.shape[0]
    if scores.ndim != 2 or scores.shape[1] == 0 or n == 0:
        return k
    complete = int(np.isfinite(scores).all(axis=1).sum())
    least = complete or int(np.isfinite(scores).sum(axis=0).min())
    if least >= n:
        return k
    width = k if least == 0 else int(np.ceil(2 * k * n / least))
    return int(min(max(width, k), MAX_SEARCH_WIDTH, n))


def neighbour_weights(sims: FloatArray, weights: FloatArray, temperature: float) -> FloatArray:
    """Softmax numerators relative to the best match (max weight 1 before exemplar weights)."""
    if sims.size == 0:
        return np.zeros(0, dtype=np.float32)
    out: FloatArray = (np.exp((sims - sims.max()) / temperature) * weights).astype(np.float32)
    return out


def vote_shares(
    sims: FloatArray,
    labels: Sequence[str],
    exemplar_weights: FloatArray,
    params: DecisionParams,
) -> dict[str, float]:
    """Each route's share of the similarity-weighted vote, in [0, 1], summing to at most 1.

    The remainder is the null pseudo-neighbour's share (no route close enough).
    """
    if sims.size == 0:
        return {}
    w = neighbour_weights(sims, exemplar_weights, params.temperature)
    total = float(w.sum())
    if params.null_similarity is not None:
        total += float(np.exp((params.null_similarity - sims.max()) / params.temperature))
    shares: dict[str, float] = {}
    for label, weight in zip(labels, w, strict=True):
        shares[label] = shares.get(label, 0.0) + float(weight)
    return {label: value / total for label, value in shares.items()}


def winning_label(shares: dict[str, float], sims: FloatArray, labels: Sequence[str]) -> str:
    """Highest share; ties go to the route with the closer best match, then by name."""
    best_sim: dict[str, float] = {}
    for label, sim in zip(labels, sims, strict=True):
        best_sim[label] = max(best_sim.get(label, -1.0), float(sim))
    return min(shares, key=lambda r: (-round(shares[r], 9), -best_sim.get(r, -1.0), r))


def predict_quality(
    sims: FloatArray,
    neighbour_scores: FloatArray,
    exemplar_weights: FloatArray,
    prior_means: FloatArray,
    params: DecisionParams,
) -> FloatArray:
    """Per-target predicted quality: (sum w_i y_it + m * mean_t) / (n_t + m).

    ``neighbour_scores`` is (n, targets) with NaN for unknown scores. The sums run over the
    ``params.k`` most similar fully scored neighbours (all when ``k`` is 0), whose weights are
    normalised to count as n_t observations; ``shrinkage`` (m) adds m more at the mean. With
    ``params.local_k`` > 0 that estimate is the prior of ``predict_quality_local`` over the
    ``local_k`` closest of them. Partly scored neighbours then refine it (``feedback_step``)
    when ``params.feedback_shrinkage`` is set; they never change the differences between the
    targets they did not observe.
    When no neighbour is fully scored, each target's sums run over the ``k`` most similar
    neighbours that observed it.
    """
    n_targets = prior_means.shape[0]
    if sims.size == 0 or not params.use_neighbours:
        return prior_means.astype(np.float32).copy()
    order = np.argsort(-sims, kind="stable")
    sims, neighbour_scores = sims[order], neighbour_scores[order]
    exemplar_weights = exemplar_weights[order]
    complete: npt.NDArray[np.bool_] = np.asarray(
        np.isfinite(neighbour_scores).all(axis=1), dtype=bool
    )
    if complete.all() or not complete.any():
        return _scored_estimate(sims, neighbour_scores, exemplar_weights, prior_means, params)
    q = _scored_estimate(sims[complete], neighbour_scores[complete], exemplar_weights[complete],
                         prior_means, params)
    if params.feedback_shrinkage is not None:
        q = feedback_step(sims, neighbour_scores, exemplar_weights, complete, q, params)
    return np.asarray(q, dtype=np.float32).reshape(n_targets)


def _scored_estimate(
    sims: FloatArray, neighbour_scores: FloatArray, exemplar_weights: FloatArray,
    prior_means: FloatArray, params: DecisionParams,
) -> FloatArray:
    w = neighbour_weights(sims, exemplar_weights, params.temperature)
    q = _shrunk_mean(w, neighbour_scores, prior_means, params.shrinkage, params.k)
    limit = params.k or len(sims)
    if 0 < params.local_k < limit:
        q = predict_quality_local(sims, neighbour_scores, exemplar_weights, q, params)
    return np.asarray(q, dtype=np.float32).reshape(prior_means.shape[0])


def feedback_step(
    sims: FloatArray,
    neighbour_scores: FloatArray,
    exemplar_weights: FloatArray,
    complete: npt.NDArray[np.bool_],
    scored: FloatArray,
    params: DecisionParams,
) -> FloatArray:
    """The fully scored rows' estimate ``scored`` corrected by the residuals of the partly
    scored neighbours (rows learnt from feedback), from the ``k`` nearest of them.

    A feedback row's residual is its observed score minus ``scored`` for that target. Averaged
    per target, residuals would compare targets on different queries (each observed where the
    serving index chose it), and the queries' difficulty would dominate; so the neighbourhood's
    residual over every observed target, r_all = sum v_i r_i / (sum v_i + 1), is taken as shared
    by all targets (how much easier or harder these queries are than ``scored`` says), and each
    target's own residuals move it away from that only as far as their weight allows:
    q_t = scored_t + (sum_t w_i r_i + m_f * r_all) / (sum_t w_i + m_f), m_f =
    ``params.feedback_shrinkage``. w_i = exp((s_i - s_best) / T_f) with s_best the most similar
    neighbour of any kind and T_f = ``params.feedback_temperature``; the shared part's v_i use
    the fully scored rows' own ``params.temperature`` instead (difficulty is as smooth as their
    estimate, a target's own advantage may be more local; one temperature for both let the
    build's criterion choose it for the shared part).

    So a target no feedback row observed moves by r_all like every other unobserved target:
    their differences, hence the choice among them, stay as the fully scored rows say; a target
    the feedback rows observed rises or falls against the others by how much its residuals
    differ from the shared one. ``tune.outcomes.feedback_batch`` is the vectorised twin.
    """
    m = params.feedback_shrinkage
    if m is None:
        return scored
    order = np.argsort(-sims, kind="stable")
    sims, neighbour_scores = sims[order], neighbour_scores[order]
    exemplar_weights, complete = exemplar_weights[order], complete[order]
    part = np.flatnonzero(~complete)
    if params.k > 0:
        part = part[: params.k]
    if part.size == 0:
        return scored
    gap = sims[part].astype(np.float64) - float(sims[0])
    ex = exemplar_weights[part].astype(np.float64)
    w = np.exp(gap / params.feedback_temperature) * ex
    v = np.exp(gap / params.temperature) * ex
    q = feedback_correction(w[None, :], neighbour_scores[part][None, :, :],
                            np.asarray(scored, dtype=np.float64)[None, :], m, v[None, :])
    return np.asarray(q[0], dtype=np.float32)


def feedback_correction(
    w: npt.NDArray[np.float64], values: npt.NDArray[np.floating], scored: npt.NDArray[np.float64],
    shrinkage: float, v: npt.NDArray[np.float64],
) -> FloatArray:
    """``feedback_step``'s arithmetic for many queries: ``w`` (n, f) and ``v`` (n, f) the
    feedback neighbours' weights for their own targets and for the shared residual, ``values``
    (n, f, targets) their scores (NaN unknown), ``scored`` (n, targets)."""
    known = np.isfinite(values)
    resid = np.where(known, values - scored[:, None, :], 0.0)
    wk = w[:, :, None] * known
    num = (wk * resid).sum(axis=1)
    den = wk.sum(axis=1)
    vk = v[:, :, None] * known
    shared = (vk * resid).sum(axis=(1, 2))[:, None] / (vk.sum(axis=(1, 2))[:, None] + 1.0)
    total = den + shrinkage
    with np.errstate(invalid="ignore", divide="ignore"):
        step = np.where(total > 0, (num + shrinkage * shared) / np.maximum(total, 1e-300), shared)
    return np.asarray(scored + step, dtype=np.float32)


def predict_quality_local(
    sims: FloatArray,
    neighbour_scores: FloatArray,
    exemplar_weights: FloatArray,
    broad: FloatArray,
    params: DecisionParams,
) -> FloatArray:
    """Per target, the ``local_k`` most similar neighbours that observed it, their weighted
    mean shrunk toward ``broad``.

    (sum_local w_i y_it + m_local * broad_t) / (n_local + m_local), with the local weights
    normalised to count as n_local (at most ``local_k``) observations. ``broad`` is the whole
    neighbourhood's estimate (``predict_quality`` without this step); neighbours need not
    arrive sorted.
    """
    order = np.argsort(-sims, kind="stable")
    w = neighbour_weights(sims[order], exemplar_weights[order], params.temperature)
    q = _shrunk_mean(w, neighbour_scores[order], broad, params.local_shrinkage, params.local_k)
    return np.asarray(q, dtype=np.float32).reshape(broad.shape[0])


def _shrunk_mean(
    w: FloatArray, neighbour_scores: FloatArray, prior: FloatArray, shrinkage: float,
    limit: int = 0,
) -> FloatArray:
    """(sum w_i y_it + m * prior_t) / (n_t + m) over the first ``limit`` neighbours (in the
    order given; all when 0) that observed target t, their weights rescaled to sum to n_t."""
    known = np.isfinite(neighbour_scores)
    used = observed_first(known, limit)
    wt = np.asarray(w, dtype=np.float64)[:, None] * used
    count = used.sum(axis=0).astype(np.float64)
    scale = count / np.maximum(wt.sum(axis=0), 1e-300)
    filled = np.where(known, neighbour_scores, 0.0)
    num = (wt * filled).sum(axis=0) * scale + shrinkage * prior
    den = count + shrinkage
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(den > 0, num / np.maximum(den, 1e-12), prior)
    return np.asarray(q, dtype=np.float32)


def observed_first(known: npt.NDArray[np.bool_], limit: int, axis: int = 0) -> npt.NDArray[np.bool_]:
    """``known`` keeping, per target, only its first ``limit`` observations along ``axis``
    (the neighbours, most similar first); all of them when ``limit`` is 0."""
    if limit <= 0:
        return known
    kept: npt.NDArray[np.bool_] = known & (np.cumsum(known, axis=axis) <= limit)
    return kept


def allowed(table: RouteTable, targets: Sequence[str], policy: Policy) -> list[str]:
    """Targets that satisfy the policy (allowed list, locality, maximum cost), order kept."""
    out = []
    for name in targets:
        target = table.targets.get(name)
        if target is None:
            continue
        if policy.allowed_targets and name not in policy.allowed_targets:
            continue
        if policy.require_local and not target.local:
            continue
        if policy.max_cost is not None and target.cost > policy.max_cost:
            continue
        out.append(name)
    return out


def rank_by_quality(
    quality: dict[str, float], table: RouteTable, policy: Policy, cost_weight: float
) -> list[str]:
    """Candidates ordered best first: utility = quality - cost_weight * cost / max cost.

    With a quality tolerance, the cheapest target within the tolerance of the best utility
    comes first (ties: higher quality, then name).
    """
    names = allowed(table, list(quality), policy)
    if not names:
        return []
    max_cost = max((table.targets[n].cost for n in quality if n in table.targets), default=0.0)
    scale = max_cost if max_cost > 0 else 1.0
    utility = {n: quality[n] - cost_weight * table.targets[n].cost / scale for n in names}
    ranked = sorted(names, key=lambda n: (-utility[n], table.targets[n].cost, n))
    best = utility[ranked[0]]
    tol = policy.quality_tolerance
    if tol > 0:
        near = [n for n in ranked if utility[n] >= best - tol - 1e-12]
        first = min(near, key=lambda n: (table.targets[n].cost, -quality[n], n))
        ranked.remove(first)
        ranked.insert(0, first)
    return ranked


def decide_labelled(
    sims: FloatArray,
    ids: npt.NDArray[np.int64],
    labels: npt.NDArray[np.str_],
    exemplar_weights: FloatArray,
    table: RouteTable,
    policy: Policy,
    params: DecisionParams,
    densities: FloatArray | None = None,
) -> Decision:
    """A decision from one query's neighbours over a labelled index.

    ``densities`` (each exemplar's own density, stored in the index) is needed for the
    abstention model's score; without it, or without a model, confidence is the vote share.
    """
    valid = ids >= 0
    sims, ids = sims[valid], ids[valid]
    neighbour_labels = [str(x) for x in labels[ids]]
    shares = vote_shares(sims, neighbour_labels, exemplar_weights[ids], params)
    if not shares:
        raise NoTargetAvailable("the index returned no neighbours")
    route = winning_label(shares, sims, neighbour_labels)
    best_match = float(sims.max())
    if params.abstain is not None and densities is not None:
        feats = neighbour_features(sims, shares, route, densities[ids])
        confidence = params.abstain.score(feats)
        reason = (
            f"route {route!r} has {shares[route]:.2f} of the vote of {len(sims)} nearest "
            f"exemplars (best match {best_match:.2f}, abstention score {confidence:.2f})"
        )
    else:
        confidence = shares[route]
        reason = (
            f"route {route!r} has {confidence:.2f} of the vote of {len(sims)} nearest exemplars "
            f"(best match {best_match:.2f})"
        )
    # Out-of-scope exemplars: their share of the vote is the chance the query is one of them.
    out_share = shares.get(OUT_OF_SCOPE, 0.0)
    confidence *= 1.0 - out_share
    if route == OUT_OF_SCOPE:
        if table.default_route is None:
            raise NoTargetAvailable(
                "the nearest exemplars are out-of-scope examples and the index has no default "
                "route to fall back to"
            )
        reason = (
            f"out-of-scope examples have {out_share:.2f} of the vote of {len(sims)} nearest "
            f"exemplars (best match {best_match:.2f}); using default route "
            f"{table.default_route!r}"
        )
        route = table.default_route
        return _labelled_decision(table, policy, route, confidence, True, reason, shares)
    fallback = False
    threshold = table.threshold_for(route)
    if (
        threshold is not None
        and confidence < threshold
        and table.default_route is not None
        and table.default_route != route
    ):
        reason = (
            f"confidence {confidence:.2f} for {route!r} is below its threshold {threshold:.2f}; "
            f"using default route {table.default_route!r}"
        )
        route, fallback = table.default_route, True
    return _labelled_decision(table, policy, route, confidence, fallback, reason, shares)


def _labelled_decision(
    table: RouteTable, policy: Policy, route: str, confidence: float, fallback: bool,
    reason: str, shares: dict[str, float],
) -> Decision:
    """The decision for ``route``: its targets allowed by the policy, else the default
    route's (a fallback), else NoTargetAvailable."""
    chain = _chain_for_route(table, route, policy)
    if not chain and table.default_route and route != table.default_route:
        chain = _chain_for_route(table, table.default_route, policy)
        if chain:
            reason += f"; no target of {route!r} satisfies the policy, using default route's"
            route, fallback = table.default_route, True
    if not chain:
        raise NoTargetAvailable(
            f"no target of route {route!r} satisfies the policy "
            f"(allowed={list(policy.allowed_targets)}, require_local={policy.require_local}, "
            f"max_cost={policy.max_cost})"
        )
    return Decision(
        route=route,
        target=chain[0],
        confidence=confidence,
        fallback=fallback,
        reason=reason,
        scores=dict(sorted(shares.items(), key=lambda kv: -kv[1])),
        targets=tuple(chain),
    )


def _chain_for_route(table: RouteTable, route: str, policy: Policy) -> list[str]:
    spec = table.routes.get(route)
    targets = spec.targets if spec is not None else (route,)
    return allowed(table, targets, policy)


def decide_outcomes(
    sims: FloatArray,
    ids: npt.NDArray[np.int64],
    scores: FloatArray,
    score_targets: Sequence[str],
    exemplar_weights: FloatArray,
    prior_means: FloatArray,
    table: RouteTable,
    policy: Policy,
    params: DecisionParams,
) -> Decision:
    """A decision from one query's neighbours over an outcome index (quality per target)."""
    valid = ids >= 0
    sims, ids = sims[valid], ids[valid]
    q = predict_quality(sims, scores[ids], exemplar_weights[ids], prior_means, params)
    quality = {t: float(v) for t, v in zip(score_targets, q, strict=True)}
    ranked = rank_by_quality(quality, table, policy, params.cost_weight)
    if not ranked:
        raise NoTargetAvailable(
            f"no target satisfies the policy (allowed={list(policy.allowed_targets)}, "
            f"require_local={policy.require_local}, max_cost={policy.max_cost})"
        )
    target = ranked[0]
    best = max(quality, key=lambda t: quality[t])
    reason = f"predicted quality {quality[target]:.3f} for {target!r}"
    if target != best:
        reason += f" (best {quality[best]:.3f} {best!r}; cost/policy chose {target!r})"
    route = target
    confidence = quality[target]
    fallback = False
    threshold = table.threshold_for(route)
    if threshold is not None and confidence < threshold and table.default_route is not None:
        default_chain = _chain_for_route(table, table.default_route, policy)
        if default_chain:
            reason = (
                f"predicted quality {confidence:.2f} for {target!r} is below the threshold "
                f"{threshold:.2f}; using default route {table.default_route!r}"
            )
            route, fallback, ranked = table.default_route, True, default_chain
    return Decision(
        route=route,
        target=ranked[0],
        confidence=confidence,
        fallback=fallback,
        reason=reason,
        scores=dict(sorted(quality.items(), key=lambda kv: -kv[1])),
        targets=tuple(ranked),
    )


def explain_neighbours(
    sims: FloatArray,
    ids: npt.NDArray[np.int64],
    texts: Sequence[str],
    labels: npt.NDArray[np.str_],
    limit: int,
) -> tuple[Neighbor, ...]:
    out: list[Neighbor] = []
    for sim, idx in zip(sims, ids, strict=True):
        if idx < 0 or len(out) >= limit:
            continue
        out.append(Neighbor(int(idx), texts[idx], str(labels[idx]), float(sim)))
    return tuple(out)
