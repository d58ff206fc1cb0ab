"""The two-stage encoder: the static stage's leave-one-out gate, the switch, fingerprints.

A hash encoder stands in for the full encoder and a random word table for the static model,
so these need no model; the real pair is measured by scripts/bench_two_stage.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from semroute.config import EncoderSettings, Settings
from semroute.decision import DecisionParams, decide_labelled
from semroute.errors import FingerprintMismatch
from semroute.index import ExemplarIndex, build_index, read_manifest, write_thresholds
from semroute.manifest import StaticRecord
from semroute.metrics import RouterMetrics
from semroute.router import Router, effective_decision
from semroute.static_encoder import StaticEncoder, write_static_model
from semroute.two_stage import (
    AGREEMENT_TARGET,
    MIN_ANSWERED,
    SCOPE_GRID,
    SCOPE_MISS,
    StaticStage,
    apply_map,
    estimated_confidence,
    fit_scope_cuts,
    largest_agreeing_prefix,
    open_static_stage,
    other_routes_neighbours,
    scope_cut,
    static_votes,
)
from semroute.types import Decision, Policy, Query
from tests.conftest import HashEncoder, write

ROUTES = 6
POOL = 8  # words of each route's own vocabulary
SHARED = [f"common{i}" for i in range(20)]


def words(route: int) -> list[str]:
    return [f"r{route}w{j}" for j in range(POOL)]


def exemplar_csv(seed: int = 0, per_route: int = 40, ambiguous: int = 40) -> str:
    """Clean exemplars (a route's own words plus shared noise) and ambiguous ones (words of
    two routes, either label), so the two encoders agree on most rows but not all."""
    rng = np.random.default_rng(seed)
    rows = ["text,label"]
    for r in range(ROUTES):
        for _ in range(per_route):
            own = list(rng.choice(words(r), 3, replace=False))
            rows.append(" ".join([*own, str(rng.choice(SHARED))]) + f",r{r}")
    for _ in range(ambiguous):
        a, b = rng.choice(ROUTES, 2, replace=False)
        mixed = list(rng.choice(words(int(a)), 2)) + list(rng.choice(words(int(b)), 2))
        rows.append(" ".join([*mixed, str(rng.choice(SHARED))]) + f",r{rng.choice([a, b])}")
    return "\n".join(dict.fromkeys(rows)) + "\n"


def static_model(tmp_path: Path, source: str, seed: int = 1, name: str = "static") -> StaticEncoder:
    """A word-level static model: a seeded random vector per word, route words sharing a
    route direction (so its neighbours resemble, but are not, the hash encoder's)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab_words = ["[UNK]"] + [w for r in range(ROUTES) for w in words(r)] + SHARED
    vocab = {w: i for i, w in enumerate(vocab_words)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()  # type: ignore[assignment]
    tokenizer_file = tmp_path / f"{name}-tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    rng = np.random.default_rng(seed)
    route_dirs = rng.normal(size=(ROUTES, 16))
    table = rng.normal(scale=0.8, size=(len(vocab), 16))
    for r in range(ROUTES):
        for w in words(r):
            table[vocab[w]] += route_dirs[r]
    table[vocab["[UNK]"]] = 0.0
    out = write_static_model(tmp_path / name, table.astype(np.float32), tokenizer_file,
                             source_fingerprint=source, max_tokens=64)
    return StaticEncoder.load(out)


class BlendEncoder(HashEncoder):
    """The stand-in full encoder: the static model's words plus hashed words, so the two
    stages agree on most exemplars but not on all."""

    def __init__(self, model: StaticEncoder) -> None:
        super().__init__(dimension=256)
        self.model = model

    @property
    def dimension(self) -> int:
        return 256 + self.model.dimension

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        v = np.concatenate([self.model.encode(texts), super().encode(texts)], axis=1)
        return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)).astype(np.float32)


@pytest.fixture
def built(tmp_path: Path) -> tuple[HashEncoder, StaticEncoder, Path]:
    model = static_model(tmp_path, HashEncoder().fingerprint)
    enc = BlendEncoder(model)
    csv = write(tmp_path / "ex.csv", exemplar_csv())
    build_index([csv], tmp_path / "idx", enc, progress=False, tune=False, static_model=model)
    return enc, model, tmp_path / "idx"


def two_stage(on: bool) -> Settings:
    return Settings(encoder=EncoderSettings(two_stage=on, cache_size=0))


def brute_loo(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1).astype(np.float32), ids.astype(np.int64)


def test_loo_threshold_agrees_on_answered_exemplars(
    built: tuple[HashEncoder, StaticEncoder, Path],
) -> None:
    """Recomputed from scratch (brute-force neighbours without the exemplar itself, the full
    decision as the router makes it), the exemplars the stored gate answers agree with the
    full decision on >= 99.5% of them, and the gate answers some but not all."""
    enc, model, root = built
    index = ExemplarIndex.load(root)
    record = index.manifest.static
    assert record is not None and np.isfinite(record.threshold)
    decision = effective_decision(Settings().decision, index.manifest.decision)
    params = DecisionParams(temperature=decision.temperature,
                            null_similarity=decision.null_similarity)
    full_sims, full_ids = brute_loo(enc.encode(index.texts), record.k)
    reference = [
        decide_labelled(full_sims[i], full_ids[i], index.labels, index.weights,
                        index.route_table, Policy(), params).route
        for i in range(index.size)
    ]
    names = sorted(set(index.labels.tolist()))
    codes = np.asarray([names.index(x) for x in index.labels.tolist()], dtype=np.int64)
    s_sims, s_ids = brute_loo(model.encode(index.texts), record.k)
    winner, share = static_votes(s_sims, s_ids, codes, index.weights, record.temperature,
                                 record.null_similarity)
    answered = (share >= record.threshold) & (s_sims[:, 0] >= record.min_similarity)
    agree = np.asarray([names[w] == ref for w, ref in zip(winner, reference, strict=True)])
    assert MIN_ANSWERED <= answered.sum() < index.size
    assert agree[answered].mean() >= AGREEMENT_TARGET
    assert not agree.all()  # the data has disagreements: the gate had something to avoid
    # The thresholds sit on exemplars' own values (share, closest match), often tied here:
    # float rounding between FAISS and the brute force moves a few rows across them, and the
    # guarantee above holds either way.
    assert abs(record.figures["answered"] - answered.sum()) <= 0.05 * index.size


def test_prefix_choice_is_the_widest_that_keeps_the_target() -> None:
    """On random shares and agreements, the chosen threshold keeps >= 99.5% agreement and no
    lower threshold (at a share boundary) does."""
    rng = np.random.default_rng(3)
    share = np.round(rng.random(2000), 3).astype(np.float32)
    agree = rng.random(2000) < 0.9 + 0.1 * share  # higher share, more agreement
    threshold, answered, agreed = largest_agreeing_prefix(share, agree)
    picked = share >= threshold
    assert picked.sum() == answered and agree[picked].sum() == agreed
    assert agreed >= AGREEMENT_TARGET * answered
    for lower in np.unique(share[share < threshold]):
        wider = share >= lower
        assert agree[wider].sum() < AGREEMENT_TARGET * wider.sum()


def test_switch_off_by_setting_runs_only_the_full_encoder(
    built: tuple[HashEncoder, StaticEncoder, Path],
) -> None:
    """two_stage off: no static decisions, every decision counted as
    the full encoder's. On: some decisions say "static stage" and are counted as such, and a
    query with history or with no known word goes to the full encoder."""
    enc, model, root = built
    index = ExemplarIndex.load(root)
    # Fresh texts from the same routes (an exemplar itself would always be its own neighbour).
    queries = [Query(line.rsplit(",", 1)[0]) for line in exemplar_csv(seed=5).splitlines()[1:]]
    off = Router(enc, index, two_stage(False), static_model=model)
    # On by default (Settings() would read SEMROUTE_ENCODER__TWO_STAGE from the environment).
    assert not off.two_stage and EncoderSettings().two_stage is True
    decisions = off.route_batch(queries)
    assert not any(d.reason.startswith("static stage") for d in decisions)
    assert (off.stage_counts.static, off.stage_counts.full) == (0, len(queries))

    on = Router(enc, index, two_stage(True), static_model=model)
    assert on.two_stage
    mixed = on.route_batch(queries)
    static = [d for d in mixed if d.reason.startswith("static stage")]
    assert 0 < len(static) < len(mixed) and on.stage_counts.static == len(static)
    assert all(d.reason.startswith("full encoder") for d in mixed if d not in static)
    assert all(d.index_version == index.version and not d.fallback for d in static)
    unsure = on.route_batch([Query("zzz unknown words"), Query(index.texts[0], ("earlier",))])
    assert all(d.reason.startswith("full encoder") for d in unsure)

    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    counts = on.stage_counts
    metrics.watch_stages(lambda: (counts.static, counts.full))
    value = registry.get_sample_value("semroute_router_stage_decisions_total", {"stage": "static"})
    assert value == len(static)
    assert on.with_index(index).stage_counts is counts


def test_static_model_fingerprint_mismatch_is_refused(
    tmp_path: Path, built: tuple[HashEncoder, StaticEncoder, Path]
) -> None:
    """Serving with a static model other than the index's, or one distilled from another
    encoder, is refused and says what to do; so is building with the latter."""
    enc, _, root = built
    index = ExemplarIndex.load(root)
    other = static_model(tmp_path, enc.fingerprint, seed=9, name="other")
    with pytest.raises(FingerprintMismatch, match="rebuild the index with this static model"):
        Router(enc, index, two_stage(True), static_model=other)
    assert not Router(enc, index, two_stage(False), static_model=other).two_stage
    foreign = static_model(tmp_path, "sha256:another-encoder", name="foreign")
    with pytest.raises(FingerprintMismatch, match="re-distill"):
        build_index([write(tmp_path / "ex2.csv", exemplar_csv(seed=2))], tmp_path / "idx2",
                    enc, progress=False, tune=False, static_model=foreign)


def test_manifest_binds_both_fingerprints(built: tuple[HashEncoder, StaticEncoder, Path]) -> None:
    """The manifest records the full encoder's and the static model's fingerprints, the latter's
    source is the former, and the static file is checksummed like the others."""
    enc, model, root = built
    manifest = read_manifest(ExemplarIndex.load(root).path)
    assert manifest.encoder.fingerprint == enc.fingerprint
    assert manifest.static is not None
    assert manifest.static.fingerprint == model.fingerprint
    assert manifest.static.source_fingerprint == enc.fingerprint
    assert manifest.static.file in manifest.checksums
    again = StaticRecord.from_json(manifest.static.to_json())
    assert again == manifest.static
    never = StaticRecord.from_json({**manifest.static.to_json(), "threshold": None})
    assert never.threshold == float("inf")


def test_full_encoder_fallback_still_applies_with_two_stage_on(tmp_path: Path) -> None:
    """With a routes file whose threshold sends unsure queries to a default route, two-stage
    on still falls back (always by the full encoder), the static stage never falls back or
    abstains by itself, and it falls back on no query the full encoder alone answers."""
    model = static_model(tmp_path, HashEncoder().fingerprint)
    enc = BlendEncoder(model)
    routes = write(tmp_path / "routes.yaml", "\n".join([
        "version: 1", "default: general", "threshold: 0.9",
        "targets:", "  small: {input_cost: 0.1, output_cost: 0.1, local: true}",
        "routes:", *[f"  r{r}: {{targets: [small]}}" for r in range(ROUTES)],
        "  general: {targets: [small]}",
    ]) + "\n")
    csv = write(tmp_path / "ex.csv", exemplar_csv())
    build_index([csv], tmp_path / "idx", enc, routes_file=routes, progress=False, tune=False,
                static_model=model)
    index = ExemplarIndex.load(tmp_path / "idx")
    queries = [Query(line.rsplit(",", 1)[0]) for line in exemplar_csv(seed=7).splitlines()[1:]]
    off = Router(enc, index, two_stage(False)).route_batch(queries)
    on = Router(enc, index, two_stage(True), static_model=model).route_batch(queries)
    assert any(d.fallback for d in off)
    static = [d for d in on if d.reason.startswith("static stage")]
    assert static and not any(d.fallback or d.route == "general" for d in static)
    assert any(d.fallback for d in on)
    assert {i for i, d in enumerate(on) if d.fallback} <= {i for i, d in enumerate(off) if d.fallback}


def test_the_one_query_vote_matches_the_vectorised_one() -> None:
    """``static_vote_one`` (the single-query path) gives the vectorised vote's winner and
    share on random rows, with missing neighbours and exact ties (first label seen wins)."""
    from semroute.two_stage import static_vote_one, static_votes

    rng = np.random.default_rng(3)
    codes = rng.integers(0, 5, size=200)
    weights = rng.uniform(0.5, 2.0, size=200).astype(np.float32)
    sims = np.sort(rng.uniform(0.2, 0.9, size=(300, 10)).astype(np.float32), axis=1)[:, ::-1]
    ids = rng.integers(0, 200, size=(300, 10))
    ids[::7, -3:] = -1
    sims[::11, 1] = sims[::11, 0]  # ties in similarity
    for null in (None, 0.35):
        winner, share = static_votes(sims, ids, codes, weights, 0.05, null)
        for j in range(len(sims)):
            w1, s1 = static_vote_one(sims[j], ids[j], codes, weights, 0.05, null)
            assert w1 == int(winner[j])
            assert s1 == pytest.approx(float(share[j]), rel=1e-5)
    tie_codes = np.array([1, 0])
    w, s = static_vote_one(np.array([0.8, 0.8], np.float32), np.array([0, 1]), tie_codes,
                           np.ones(2, np.float32), 0.05, None)
    assert (w, s) == (1, pytest.approx(0.5))
    assert static_votes(np.array([[0.8, 0.8]], np.float32), np.array([[0, 1]]), tie_codes,
                        np.ones(2, np.float32), 0.05, None)[0][0] == 1


def routes_with_default(tmp_path: Path) -> Path:
    return write(tmp_path / "routes.yaml", "\n".join([
        "version: 1", "default: general",
        "targets:", "  small: {input_cost: 0.1, output_cost: 0.1, local: true}",
        "routes:", *[f"  r{r}: {{targets: [small]}}" for r in range(ROUTES)],
        "  general: {targets: [small]}",
    ]) + "\n")


def test_static_winner_below_the_live_threshold_goes_to_the_full_encoder(tmp_path: Path) -> None:
    """With the cut equal to the threshold, the static stage decides a query its gate passes
    exactly when its estimate of the full decision's confidence is at or above the threshold
    in force (read from the route table), and passes it on otherwise; without a threshold the
    estimate is not consulted. The decision's reason and confidence say so."""
    model = static_model(tmp_path, HashEncoder().fingerprint)
    enc = BlendEncoder(model)
    build_index([write(tmp_path / "ex.csv", exemplar_csv())], tmp_path / "idx", enc,
                routes_file=routes_with_default(tmp_path), progress=False, tune=False,
                static_model=model)
    index = ExemplarIndex.load(tmp_path / "idx")
    queries = [Query(line.rsplit(",", 1)[0]) for line in exemplar_csv(seed=5).splitlines()[1:]]
    router = Router(enc, index, two_stage(True), static_model=model)
    plain = open_static_stage(enc.fingerprint, index, two_stage(True), model,
                              params=router._params, density=index.density)
    assert plain is not None
    free = plain.decide(queries)  # no threshold: the gate alone
    passed = [i for i, d in enumerate(free) if d is not None]
    assert passed and all("estimated confidence" not in d.reason for d in free if d)

    rec = plain.record
    vectors = apply_map(model.encode([q.text for q in queries], normalize=False), plain._map)
    sims, ids = plain._index.search(vectors, rec.k)
    estimate = {i: estimated_confidence(sims[i], ids[i], index.labels, index.weights,
                                        router._params, index.density, free[i].route)
                for i, d in enumerate(free) if d is not None}
    grid = tuple(i / (SCOPE_GRID - 1) for i in range(SCOPE_GRID))  # cut = threshold
    # The grid threshold splitting the estimates most evenly (most sit near 1 here).
    values = np.asarray(list(estimate.values()))
    threshold = max(grid[1:-1], key=lambda t: min((values >= t).sum(), (values < t).sum()))
    table = replace(index.route_table, threshold=threshold)
    held = StaticStage(model, replace(rec, scope_cuts=grid), plain._index, plain._map,
                       index.texts, index.labels, index.weights, table, 5, router._params,
                       index.density)
    decided = held.decide(queries)
    assert scope_cut(grid, threshold) == threshold
    above = {i for i, e in estimate.items() if e >= threshold}
    assert 0 < len(above) < len(estimate)
    assert {i for i, d in enumerate(decided) if d is not None} == above
    for i in above:
        d = decided[i]
        assert d is not None and d.route == free[i].route
        assert d.confidence == pytest.approx(estimate[i]) and d.confidence >= threshold
        assert f"threshold {threshold:.2f}" in d.reason


def test_thresholds_written_after_the_build_are_read_live(tmp_path: Path) -> None:
    """Thresholds calibrated after the build keep the stage on and are applied as loaded:
    static decisions under a calibrated threshold clear its fitted cut; a threshold no
    confidence reaches sends every query to the full encoder (which falls back), a per-route
    one only that route's; removing them restores the static decisions."""
    model = static_model(tmp_path, HashEncoder().fingerprint)
    enc = BlendEncoder(model)
    build_index([write(tmp_path / "ex.csv", exemplar_csv())], tmp_path / "idx", enc,
                routes_file=routes_with_default(tmp_path), progress=False, tune=False,
                static_model=model)
    queries = [Query(line.rsplit(",", 1)[0]) for line in exemplar_csv(seed=5).splitlines()[1:]]

    def run() -> list[Decision]:
        router = Router(enc, ExemplarIndex.load(tmp_path / "idx"), two_stage(True),
                        static_model=model)
        assert router.two_stage
        return router.route_batch(queries)

    before = run()
    static_routes = {d.route for d in before if d.reason.startswith("static stage")}
    assert "r0" in static_routes and len(static_routes) > 1
    record = ExemplarIndex.load(tmp_path / "idx").manifest.static
    assert record is not None
    write_thresholds(tmp_path / "idx", 0.9, {})
    cut = scope_cut(record.scope_cuts, 0.9)
    calibrated = [d for d in run() if d.reason.startswith("static stage")]
    assert calibrated and all(d.confidence >= cut >= 0.9 and f"{cut:.2f}, the cut" in d.reason
               for d in calibrated)
    write_thresholds(tmp_path / "idx", 1.01, {})
    unreachable = run()
    assert not any(d.reason.startswith("static stage") for d in unreachable)
    assert all(d.fallback and d.route == "general" for d in unreachable)
    write_thresholds(tmp_path / "idx", None, {"r0": 1.01})
    one_held = run()
    static = [d for d in one_held if d.reason.startswith("static stage")]
    assert static and all(d.route != "r0" for d in static)
    assert all(d.fallback for d, q in zip(one_held, before, strict=True) if q.route == "r0")
    write_thresholds(tmp_path / "idx", None, {})
    assert [d.reason for d in run()] == [d.reason for d in before]


def test_scope_cuts_keep_the_miss_share_and_are_the_lowest_that_do() -> None:
    """On random (confidence, estimate) pairs, each grid threshold's cut is never below the
    threshold, lets at most SCOPE_MISS of the held-back rows through, and the next lower
    estimate among them would let more through; rows the gate does not pass (NaN) never
    count. The lookup takes the grid point at or above a live threshold."""
    rng = np.random.default_rng(4)
    conf = rng.random(5000).astype(np.float32)
    estimate = np.clip(conf + rng.normal(0, 0.15, 5000), 0, 1).astype(np.float32)
    estimate[rng.random(5000) < 0.3] = np.nan
    cuts = fit_scope_cuts(conf, estimate)
    assert len(cuts) == SCOPE_GRID
    for i, cut in enumerate(cuts):
        t = i / (SCOPE_GRID - 1)
        below = conf < t
        seen = estimate[below & np.isfinite(estimate)]
        allowed = int(SCOPE_MISS * below.sum())
        if not np.isfinite(cut):
            assert (seen > 1.0).sum() <= allowed < len(seen)
            continue
        assert cut >= t and (seen >= cut).sum() <= allowed
        lower = seen[seen < cut]
        if cut > t and lower.size:
            assert (seen >= lower.max()).sum() > allowed
    assert scope_cut(cuts, 0.421) == max(0.421, cuts[43])
    assert scope_cut(cuts, 0.42) == max(0.42, cuts[42])
    assert scope_cut((), 0.5) == float("inf") and scope_cut(cuts, 1.5) == float("inf")
    assert scope_cut(cuts, 0.0) == 0.0


def test_other_routes_neighbours_skip_the_own_route() -> None:
    """The leave-routes-out search returns, for each row, the k most similar exemplars of
    other labels in order (brute force agrees), and -1 where fewer exist."""
    rng = np.random.default_rng(2)
    v = rng.normal(size=(60, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    codes = rng.integers(0, 4, size=60).astype(np.int64)
    rows = np.arange(60, dtype=np.int64)
    sims, ids = other_routes_neighbours(v, codes, rows, 5, block=7)
    full = v @ v.T
    for r in rows:
        others = np.flatnonzero(codes != codes[r])
        best = others[np.argsort(-full[r, others], kind="stable")[:5]]
        assert np.allclose(sims[r], full[r, best], atol=1e-6)
        assert (codes[ids[r]] != codes[r]).all()
    two = np.array([0, 0, 1], dtype=np.int64)
    _, i2 = other_routes_neighbours(v[:3], two, np.arange(3, dtype=np.int64), 2)
    assert (i2[:2, 1] == -1).all() and (i2[:2, 0] == 2).all() and set(i2[2]) == {0, 1}


def test_build_stores_a_cut_for_every_grid_threshold(
    built: tuple[HashEncoder, StaticEncoder, Path],
) -> None:
    """An index built with the static stage records a cut per grid threshold, never below the
    threshold, and survives the manifest's JSON round trip (inf as null)."""
    _, _, root = built
    record = read_manifest(ExemplarIndex.load(root).path).static
    assert record is not None and len(record.scope_cuts) == SCOPE_GRID
    assert all(c >= i / (SCOPE_GRID - 1) for i, c in enumerate(record.scope_cuts))
    assert record.figures["scope_rows"] > 0
    odd = replace(record, scope_cuts=(float("inf"),) * SCOPE_GRID)
    assert StaticRecord.from_json(odd.to_json()) == odd


def test_the_estimate_is_the_full_decisions_confidence_formula() -> None:
    """``estimated_confidence`` over some neighbours equals the confidence ``decide_labelled``
    gives over the same neighbours when its winner is the route asked: with an abstention
    model and densities, with out-of-scope exemplars among the neighbours, and without a
    model (the vote share)."""
    from semroute.abstain import FEATURES, AbstainModel
    from semroute.types import OUT_OF_SCOPE, Route, RouteTable, Target

    rng = np.random.default_rng(6)
    names = ["a", "b", "c", OUT_OF_SCOPE]
    labels = np.asarray(rng.choice(names, size=80, p=[0.4, 0.3, 0.2, 0.1]), dtype=np.str_)
    weights = rng.uniform(0.5, 2.0, size=80).astype(np.float32)
    density = rng.uniform(0.3, 0.9, size=80).astype(np.float32)
    model = AbstainModel(FEATURES, tuple(rng.uniform(0.2, 0.8, 5)), tuple(rng.uniform(0.1, 0.3, 5)),
                         tuple(rng.normal(0, 1, 5)), 0.4)
    table = RouteTable({n: Route(n, (n,)) for n in ["a", "b", "c", "other"]},
                       {n: Target(n) for n in ["a", "b", "c", "other"]}, default_route="other")
    checked = 0
    for abstain in (model, None):
        params = DecisionParams(temperature=0.05, null_similarity=0.4, abstain=abstain)
        for _ in range(200):
            ids = rng.choice(80, size=10, replace=False).astype(np.int64)
            sims = np.sort(rng.uniform(0.3, 0.95, size=10)).astype(np.float32)[::-1].copy()
            d = decide_labelled(sims, ids, labels, weights, table, Policy(), params, density)
            if d.fallback:
                continue
            got = estimated_confidence(sims, ids, labels, weights, params, density, d.route)
            assert got == pytest.approx(d.confidence, rel=1e-4, abs=1e-6)
            checked += 1
    assert checked > 100


def test_calibrate_keeps_the_static_stage_when_it_adds_out_of_scope_rows(tmp_path: Path) -> None:
    """`calibrate` grows a new version with the validation's `oos` rows: that version keeps the
    static stage (same static model, refitted on the grown rows), so the two-stage encoder
    stays on after the usual build + calibrate; a static model that is gone is not faked."""
    import shutil

    from semroute.quality.calibrate import add_out_of_scope_exemplars

    model = static_model(tmp_path, HashEncoder().fingerprint)
    enc = BlendEncoder(model)
    build_index([write(tmp_path / "ex.csv", exemplar_csv())], tmp_path / "idx", enc,
                routes_file=routes_with_default(tmp_path), progress=False, tune=False,
                static_model=model)
    router = Router(enc, ExemplarIndex.load(tmp_path / "idx"), two_stage(True),
                    static_model=model)
    assert router.two_stage
    oos = [f"{SHARED[i % len(SHARED)]} unrelated question number {i}" for i in range(12)]
    grown = add_out_of_scope_exemplars(router, oos, "val.csv")
    assert grown is not None
    new_router, added = grown
    assert added == len(oos)
    record = new_router.index.manifest.static
    assert record is not None and record.fingerprint == model.fingerprint
    assert new_router.index.size == router.index.size + added
    reopened = Router(enc, ExemplarIndex.load(tmp_path / "idx"), two_stage(True))
    assert reopened.two_stage  # loads the recorded static model by itself

    shutil.rmtree(model.path)  # the model is gone: the next version has no static stage
    grown = add_out_of_scope_exemplars(reopened, [f"{t} again" for t in oos], "val.csv")
    assert grown is not None and grown[0].index.manifest.static is None
