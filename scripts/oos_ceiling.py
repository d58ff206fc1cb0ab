"""How far can out-of-scope detection go on the Banking77 proxy with the stock encoder?

    .venv/bin/python scripts/oos_ceiling.py [--no-write]

The abstention proxy of docs/EVAL.md (20 Banking77 intents held out as out-of-scope) asks for
an out-of-scope AUROC >= 0.93 and a recall >= 0.70 at 95% in-scope coverage. The served score
(``semroute.abstain``) reaches about 0.91. This script measures the candidate scores we know of
on the same split and embeddings, alone and combined, to show where the ceiling is:

- neighbour features (what the served score combines): top-1 and mean top-k similarity, vote
  share, margin, top-1 minus the neighbours' own density (k=10, T=0.05, null similarity 0.35,
  raw embedding space);
- class-conditional: Mahalanobis distance to the nearest route mean (shared covariance,
  shrunk), cosine to the nearest route centroid, the winner centroid's z-score against its own
  exemplars, a linear probe's maximum softmax probability;
- lexical novelty (a second view the encoder does not give): share of the query's words never
  seen in an exemplar, TF-IDF top-1 cosine over words (1-2 grams) and over character 3-5 grams.

Combinations are logistic regressions (``semroute.abstain.fit_abstain``), fitted two ways:
like the build (in-scope rows from 5-fold CV, out-of-scope rows from leave-routes-out folds,
no test row involved) and, as an upper bound for a linear combination, on the test rows
themselves. For each score: AUROC (in-scope vs ``oos``) and the out-of-scope recall at the
threshold that answers 95% of in-scope test rows. Writes the ``oos-ceiling`` section of
docs/EVAL.md. Pure numpy apart from the encoder; embeddings are cached in out/cache/.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import benchlib
import evaluate as ev
import numpy as np
import numpy.typing as npt

from semroute.abstain import auroc, fit_abstain, own_density
from semroute.encoder import OnnxEncoder
from semroute.quality.cache import DiskCachedEncoder
from semroute.tune.folds import route_groups, stratified_folds, top_neighbours
from semroute.tune.labelled import features_batch, vote

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Matrix = npt.NDArray[np.float32]
DOC = ev.DOCS / "EVAL.md"
K, TEMPERATURE, NULL_SIMILARITY = 10, 0.05, 0.35
COVERAGE = 0.95
WORD = re.compile(r"[a-z0-9]+")
NEIGHBOUR = ("top1", "topk", "share", "margin", "density")
CLASS = ("mahalanobis", "centroid", "centroid_z", "probe_msp")
LEXICAL = ("unseen_words", "tfidf_words", "tfidf_chars")
LABELS = {
    "top1": "top-1 similarity",
    "topk": "mean top-k similarity",
    "share": "vote share",
    "margin": "vote margin",
    "density": "top-1 minus the neighbours' own density",
    "mahalanobis": "Mahalanobis distance to the nearest route mean (negated)",
    "centroid": "cosine to the nearest route centroid",
    "centroid_z": "winner centroid cosine, z-score within its route",
    "probe_msp": "linear probe, maximum softmax probability",
    "unseen_words": "share of words never seen in an exemplar (negated)",
    "tfidf_words": "TF-IDF top-1 cosine, words 1-2 grams",
    "tfidf_chars": "TF-IDF top-1 cosine, characters 3-5 grams",
}


def read_rows(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [(r["text"], r["label"]) for r in csv.DictReader(fh)]


def embed(encoder: DiskCachedEncoder, texts: Sequence[str]) -> Matrix:
    parts = [np.asarray(encoder.encode(list(texts[i : i + 64])), dtype=np.float32)
             for i in range(0, len(texts), 64)]
    return np.ascontiguousarray(np.concatenate(parts))


# ---- lexical views ---------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _char_grams(text: str) -> list[str]:
    out: list[str] = []
    for w in _words(text):
        padded = f" {w} "
        out += [padded[i : i + n] for n in (3, 4, 5) for i in range(len(padded) - n + 1)]
    return out


def _word_grams(text: str) -> list[str]:
    ws = _words(text)
    return ws + [f"{a} {b}" for a, b in itertools.pairwise(ws)]


def tfidf_top1(base: Sequence[str], queries: Sequence[str],
               grams: Callable[[str], list[str]]) -> FloatArray:
    """Each query's best cosine to a base text, TF-IDF with sublinear tf, smoothed idf."""
    docs = [Counter(grams(t)) for t in base]
    df: Counter[str] = Counter()
    for d in docs:
        df.update(d.keys())
    vocab = {g: i for i, g in enumerate(sorted(df))}
    n = len(docs)
    idf = np.array([math.log((1 + n) / (1 + df[g])) + 1 for g in sorted(df)])

    def matrix(counts: list[Counter[str]]) -> FloatArray:
        m = np.zeros((len(counts), len(vocab)), dtype=np.float32)
        for r, c in enumerate(counts):
            for g, v in c.items():
                j = vocab.get(g)
                if j is not None:
                    m[r, j] = (1 + math.log(v)) * idf[j]
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        return np.asarray(m / np.maximum(norms, 1e-12), dtype=np.float64)

    a = matrix(docs).astype(np.float32)
    b = matrix([Counter(grams(t)) for t in queries]).astype(np.float32)
    best = np.zeros(len(queries))
    for i in range(0, len(b), 512):
        best[i : i + 512] = (b[i : i + 512] @ a.T).max(axis=1)
    return best


def unseen_share(base: Sequence[str], queries: Sequence[str]) -> FloatArray:
    seen = {w for t in base for w in _words(t)}
    out = []
    for q in queries:
        ws = _words(q)
        out.append(sum(w not in seen for w in ws) / len(ws) if ws else 0.0)
    return -np.asarray(out)  # higher = more in scope, like every other score here


# ---- class-conditional views -----------------------------------------------------------------

def linear_probe(x: Matrix, y: IntArray, n_routes: int, epochs: int = 300) -> FloatArray:
    """Multinomial logistic regression by full-batch gradient descent (L2 1e-4); weights
    (d + 1, routes)."""
    z = np.c_[x, np.ones(len(x))].astype(np.float64)
    w = np.zeros((z.shape[1], n_routes))
    onehot = np.eye(n_routes)[y]
    lr = 5.0
    for _ in range(epochs):
        logits = z @ w
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        grad = z.T @ (p - onehot) / len(z) + 1e-4 * w
        w -= lr * grad
    return w


def class_features(xb: Matrix, yb: IntArray, xq: Matrix, winner: IntArray,
                   n_routes: int) -> dict[str, FloatArray]:
    routes = np.unique(yb)
    means = np.stack([xb[yb == r].mean(axis=0) for r in routes]).astype(np.float64)
    resid = xb - means[np.searchsorted(routes, yb)]
    cov = np.cov(resid, rowvar=False)
    cov = 0.9 * cov + 0.1 * np.trace(cov) / len(cov) * np.eye(len(cov))
    vals, vecs = np.linalg.eigh(cov)
    whiten = vecs / np.sqrt(vals)
    qw, mw = xq @ whiten, means @ whiten
    d2 = (qw**2).sum(1)[:, None] - 2 * qw @ mw.T + (mw**2).sum(1)[None, :]
    cent = means / np.linalg.norm(means, axis=1, keepdims=True)
    cos = xq @ cent.T
    own = (xb * cent[np.searchsorted(routes, yb)]).sum(axis=1)
    mu = np.array([own[yb == r].mean() for r in routes])
    sd = np.array([own[yb == r].std() + 1e-9 for r in routes])
    col = np.searchsorted(routes, winner)
    col = np.clip(col, 0, len(routes) - 1)
    w = linear_probe(xb, np.searchsorted(routes, yb).astype(np.int64), len(routes))
    logits = np.c_[xq, np.ones(len(xq))] @ w
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return {
        "mahalanobis": -d2.min(axis=1),
        "centroid": cos.max(axis=1),
        "centroid_z": (cos[np.arange(len(xq)), col] - mu[col]) / sd[col],
        "probe_msp": p.max(axis=1),
    }


def all_features(x: Matrix, y: IntArray, texts: Sequence[str], base: IntArray,
                 xq: Matrix, qtexts: Sequence[str], n_routes: int
                 ) -> tuple[IntArray, dict[str, FloatArray]]:
    xb, yb = x[base], y[base]
    sims, idx = top_neighbours(xq, xb, K)
    dsims, _ = top_neighbours(xb, xb, 10, exclude_self=True)
    dens = own_density(dsims, 10)
    shares = vote(sims, yb[idx], np.ones_like(sims), n_routes, TEMPERATURE, NULL_SIMILARITY)
    winner, table = features_batch(sims, shares, dens[idx])
    table.update(class_features(xb, yb, xq, winner, n_routes))
    btexts = [texts[i] for i in base]
    table["unseen_words"] = unseen_share(btexts, qtexts)
    table["tfidf_words"] = tfidf_top1(btexts, qtexts, _word_grams)
    table["tfidf_chars"] = tfidf_top1(btexts, qtexts, _char_grams)
    return winner, table


def recall_at_coverage(score: FloatArray, in_scope: npt.NDArray[np.bool_]) -> float:
    threshold = float(np.quantile(score[in_scope], 1 - COVERAGE))
    return float((score[~in_scope] < threshold).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    ex_path, _, test_path, held = ev.proxy_split()
    ex, test = read_rows(ex_path), read_rows(test_path)
    encoder = DiskCachedEncoder(OnnxEncoder.load(ev.ENCODER, threads=2), ev.CACHE)
    texts, qtexts = [t for t, _ in ex], [t for t, _ in test]
    x, xq = embed(encoder, texts), embed(encoder, qtexts)
    encoder.save()
    names = sorted({label for _, label in ex})
    pos = {n: i for i, n in enumerate(names)}
    y = np.asarray([pos[label] for _, label in ex], dtype=np.int64)
    in_scope = np.asarray([label != "oos" for _, label in test])
    every = np.arange(len(x))
    ev.log(f"oos ceiling: {len(x)} exemplars, {len(xq)} test rows; features on test")
    _, test_table = all_features(x, y, texts, every, xq, qtexts, len(names))

    ev.log("oos ceiling: build-style folds (5-fold CV in scope, leave-routes-out out of scope)")
    inside, right, outside = [], [], []
    fold = stratified_folds(y, 5, 0)
    for f in range(5):
        base, held_rows = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        winner, table = all_features(x, y, texts, base, x[held_rows],
                                     [texts[i] for i in held_rows], len(names))
        inside.append(table)
        right.append(winner == y[held_rows])
    group = route_groups(y, 5, 0)
    for g in sorted(set(group.tolist())):
        base, held_rows = np.flatnonzero(group != g), np.flatnonzero(group == g)
        outside.append(all_features(x, y, texts, base, x[held_rows],
                                    [texts[i] for i in held_rows], len(names))[1])
    keys = list(test_table)
    fold_table = {k: np.concatenate([*(t[k] for t in inside), *(t[k] for t in outside)])
                  for k in keys}
    ok = np.concatenate(right)
    n_in, n_out = len(ok), len(fold_table["top1"]) - len(ok)
    target = np.r_[ok.astype(np.float64), np.zeros(n_out)]
    weight = np.r_[np.full(n_in, 0.5 / n_in), np.full(n_out, 0.5 / n_out)]

    rows = []
    for key in keys:
        s = test_table[key]
        rows.append((LABELS[key], auroc(s, in_scope), recall_at_coverage(s, in_scope)))
    combos = {
        "neighbour features (the served score's inputs)": NEIGHBOUR,
        "neighbour + class-conditional": NEIGHBOUR + CLASS,
        "neighbour + lexical": NEIGHBOUR + LEXICAL,
        "all twelve": NEIGHBOUR + CLASS + LEXICAL,
    }
    combo_rows = []
    for name, feats in combos.items():
        built = fit_abstain(fold_table, target, weight, features=feats).score_many(test_table)
        oracle = fit_abstain(test_table, in_scope.astype(np.float64),
                             features=feats).score_many(test_table)
        combo_rows.append((name, auroc(built, in_scope), recall_at_coverage(built, in_scope),
                           auroc(oracle, in_scope), recall_at_coverage(oracle, in_scope)))
    seconds = time.perf_counter() - started

    lines = [
        "## Abstention: where the ceiling is",
        "",
        f"`.venv/bin/python scripts/oos_ceiling.py` ({benchlib.machine()}; "
        f"{seconds / 60:.1f} min). The proxy split above: {len(x)} exemplars of "
        f"{len(names)} intents, {len(xq)} test rows of which {int((~in_scope).sum())} are "
        f"out of scope ({len(held)} held-out intents). Stock encoder (served int8), raw "
        f"embedding space, k={K}, T={TEMPERATURE}, null similarity {NULL_SIMILARITY}. Recall: "
        f"out-of-scope rows below the threshold that answers {COVERAGE:.0%} of the in-scope "
        "test rows (set on test, so every row is comparable).",
        "",
        "| score alone | AUROC | OOS recall at 95% in-scope |",
        "|---|---|---|",
        *(f"| {name} | {a:.4f} | {r:.3f} |" for name, a, r in rows),
        "",
        "| combination (logistic) | AUROC, fitted like the build | recall | AUROC, fitted on "
        "the test rows (upper bound) | recall |",
        "|---|---|---|---|---|",
        *(f"| {name} | {a:.4f} | {r:.3f} | {oa:.4f} | {orr:.3f} |"
          for name, a, r, oa, orr in combo_rows),
        "",
        "Even fitted on the test rows themselves, no linear combination of these twelve scores "
        "reaches the targets (AUROC 0.93, recall 0.70): the held-out intents are banking "
        "questions next to kept ones (`pending_top_up` beside `top_up_failed`, "
        "`card_payment_not_recognised` beside `card_payment_wrong_exchange_rate`), and neither "
        "the frozen embedding nor the words tell them apart. The encoder tuned on the in-scope "
        "exemplars (section `encoder-tune` below) did not move the AUROC either. All of this "
        "is without any out-of-scope example: given validation's rows labelled `oos` as "
        "out-of-scope exemplars (`calibrate`'s default), the served router meets both targets "
        "(section \"Abstention\" above).",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        benchlib.write_section("oos-ceiling", body, doc=DOC, header="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
