"""Semantic cache threshold: hit rate and false-hit rate per similarity threshold on labelled
question pairs, with the encoder the router serves.

    .venv/bin/python scripts/measure_semantic_cache.py [--n 1000] [--no-write]

A semantic tier would serve a stored answer to a new question whose embedding's cosine
similarity to a stored question is at least the threshold. This measures, for each threshold,
how often that would be right and how often wrong, on pairs built from Banking77's test set
(``../shared/data/banking77``, CC BY 4.0; 3,080 questions, 77 intents). How the pairs are
labelled:

* **paraphrase** (a hit is right): a question and a re-typed copy of it, made by rules that keep
  the question (case, end punctuation, a greeting or a thanks around it, contractions expanded
  or made, doubled spaces), at most two per copy and at least one that the exact tier's
  normalisation does not undo. Labelled by construction. These are the repeats a cache sees
  most, not deep paraphrases.
* **different question** (a hit is a false hit): a question and its most similar question of
  another intent (the hardest negatives there are: different intent, different answer).
  Labelled by the dataset's intents.
* **same intent, other wording**: a question and its most similar other question of the same
  intent. Banking77's intents are coarse ("card_arrival" holds "How do I locate my card?" and
  "I ordered my card over a week ago"), so these pairs are neither labelled right nor wrong; their
  hit rate is shown apart.

The default threshold is the lowest whose false-hit rate is under 1% with 95% confidence (the
Wilson upper bound of the measured rate, so the sample's luck does not choose it). Writes the
``bench:semantic_cache`` section of docs/CACHE.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import re
import sys

import numpy as np
from benchlib import BANKING, ENCODER_DIR, ROOT, machine, write_section

from semroute.encoder import OnnxEncoder

DOC = ROOT / "docs" / "CACHE.md"
THRESHOLDS = tuple(round(0.80 + 0.01 * i, 2) for i in range(20))
GREETINGS = ("Hi, ", "Hello! ", "Hey, quick question: ", "Good morning. ")
THANKS = (" Thanks.", " Thank you!", " Cheers", " Thanks in advance.")
CONTRACTIONS = (("I am", "I'm"), ("do not", "don't"), ("can not", "can't"), ("cannot", "can't"),
                ("is not", "isn't"), ("what is", "what's"), ("I have", "I've"),
                ("it is", "it's"), ("does not", "doesn't"), ("did not", "didn't"))


def _normalised(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def retype(text: str, rng: random.Random) -> str:
    """A copy of ``text`` as someone might type the same question again."""

    def case(t: str) -> str:
        return t.lower() if t != t.lower() else t.capitalize()

    def punct(t: str) -> str:
        return t.rstrip("?.!") if t[-1:] in "?.!" else t + "?"

    def greet(t: str) -> str:
        return rng.choice(GREETINGS) + t[:1].lower() + t[1:]

    def thank(t: str) -> str:
        return t + rng.choice(THANKS)

    def contract(t: str) -> str:
        for long, short in CONTRACTIONS:
            pattern = re.compile(rf"\b{re.escape(long)}\b", re.IGNORECASE)
            if pattern.search(t):
                return pattern.sub(short, t, count=1)
            pattern = re.compile(rf"\b{re.escape(short)}\b", re.IGNORECASE)
            if pattern.search(t):
                return pattern.sub(long, t, count=1)
        return t

    def spaces(t: str) -> str:
        words = t.split(" ")
        if len(words) < 3:
            return t
        i = rng.randrange(1, len(words))
        return " ".join(words[:i]) + "  " + " ".join(words[i:])

    rules = [case, punct, greet, thank, contract, spaces]
    for _ in range(20):
        copy = text
        for rule in rng.sample(rules, rng.choice((1, 2))):
            copy = rule(copy)
        if _normalised(copy) != _normalised(text):
            return copy
    return text + " Thanks."


def build_pairs(
    texts: list[str], labels: list[str], vectors: np.ndarray, n: int, rng: random.Random
) -> tuple[list[tuple[str, str]], list[tuple[int, int]], list[tuple[int, int]]]:
    """(paraphrase text pairs, different-intent index pairs, same-intent index pairs)."""
    picks = rng.sample(range(len(texts)), min(n, len(texts)))
    labels_arr = np.array(labels)
    sims = vectors[picks] @ vectors.T
    negatives, same = [], []
    for row, i in enumerate(picks):
        other = np.where(labels_arr != labels[i])[0]
        negatives.append((i, int(other[np.argmax(sims[row, other])])))
        mates = [j for j in np.where(labels_arr == labels[i])[0] if texts[j] != texts[i]]
        if mates:
            same.append((i, int(mates[int(np.argmax(sims[row, mates]))])))
    positives = [(texts[i], retype(texts[i], rng)) for i in picks]
    return positives, negatives, same


def rates(similarities: np.ndarray) -> list[float]:
    return [float(np.mean(similarities >= t)) for t in THRESHOLDS]


def wilson_upper(rate: float, n: int, z: float = 1.96) -> float:
    """Upper end of the 95% Wilson interval of a proportion measured on ``n`` trials."""
    centre = rate + z * z / (2 * n)
    spread = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return (centre + spread) / (1 + z * z / n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3080,
                        help="questions sampled, pairs per kind [all 3,080]")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help=f"print only, leave {DOC.name}")
    args = parser.parse_args(argv)
    with (BANKING / "test.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    rng = random.Random(args.seed)
    encoder = OnnxEncoder.load(ENCODER_DIR, threads=2)
    vectors = encoder.encode(texts)
    positives, negatives, same = build_pairs(texts, labels, vectors, args.n, rng)
    left = encoder.encode([a for a, _ in positives])
    right = encoder.encode([b for _, b in positives])
    pos_sim = np.sum(left * right, axis=1)
    neg_sim = np.array([float(vectors[i] @ vectors[j]) for i, j in negatives])
    same_sim = np.array([float(vectors[i] @ vectors[j]) for i, j in same])
    hit, false_hit, same_hit = rates(pos_sim), rates(neg_sim), rates(same_sim)
    upper = [wilson_upper(f, len(neg_sim)) for f in false_hit]
    default = next((t for t, u in zip(THRESHOLDS, upper, strict=True) if u < 0.01), None)
    lines = [
        "## Semantic tier: hit and false-hit rates by threshold",
        "",
        f"`.venv/bin/python scripts/measure_semantic_cache.py --n {args.n} --seed {args.seed}` "
        f"on {machine()}; encoder `{ENCODER_DIR.relative_to(ROOT)}` (the served one).",
        f"Pairs from Banking77's test set: {len(positives)} paraphrase (a question re-typed by "
        f"rules), {len(negatives)} different question (nearest question of another intent), "
        f"{len(same)} same intent, other wording (nearest other question of its intent; not "
        "labelled). See the script's docstring for how pairs are labelled.",
        "",
        "| threshold | hit rate (paraphrases) | false-hit rate (different questions) "
        "| its 95% upper bound | same intent, other wording, above threshold |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for t, h, f, u, s in zip(THRESHOLDS, hit, false_hit, upper, same_hit, strict=True):
        mark = " **default**" if t == default else ""
        lines.append(f"| {t:.2f}{mark} | {h:.1%} | {f:.2%} | {u:.2%} | {s:.1%} |")
    lines += [
        "",
        f"Similarity of paraphrase pairs: median {np.median(pos_sim):.3f}, 5th percentile "
        f"{np.percentile(pos_sim, 5):.3f}. Different-question pairs: median "
        f"{np.median(neg_sim):.3f}, 99th percentile {np.percentile(neg_sim, 99):.3f}, max "
        f"{neg_sim.max():.3f}.",
        "",
        (f"Lowest threshold whose false-hit rate is under 1% with 95% confidence: "
         f"**{default:.2f}**." if default is not None
         else "No threshold up to 0.99 keeps false hits under 1% with 95% confidence."),
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("semantic_cache", text, doc=DOC, header="# Cache\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
