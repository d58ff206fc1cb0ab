"""Build-time fine-tuning of the sentence encoder on the user's own exemplars (`encoder tune`).

A kNN router on a frozen general-purpose encoder sits on a plateau: the encoder was trained to
say which sentences mean the same, not which ones need the same route. Tuning moves the
exemplars of one route together and the routes apart, on the exemplars the index is built from.

How (the figures behind each choice are in docs/EVAL.md, "Encoder tuning"):

- **Labelled exemplars** (``loss="proxy"``, the default): each label has a learned proxy
  vector (started at the label's mean embedding) and each row is trained by cross-entropy over
  its scaled cosines to all proxies, with an additive margin on its own label's: a cosine
  classifier whose weights are dropped after training, only the encoder is exported. One text
  per row, against three per anchor for ``mnrl-hard`` (one positive and one mined hard negative
  from another label, under the starting encoder; the other anchors' texts are in-batch
  negatives and a batch never holds two anchors of one label). ``mnrl`` is the same without the
  mined negative; ``supcon`` uses label-balanced batches where every other row of the anchor's
  label is a positive. On 3,000 Banking77 rows (`tune`'s held-out kNN 0.900 before) proxy
  reached 0.924 in 1.4 min, mnrl 0.920-0.927 in 3.6-4 min, supcon 0.917 and mnrl-hard (the old
  default) 0.917 in 6.9 min; 300 held-out rows, so all but the last two are within a row or
  two: proxy wins on cost. On the full train set proxy moved the held-out figure 0.921 -> 0.932
  where mnrl-hard had lowered it (0.915). docs/EVAL.md has the table (`eval_tuned.py --compare`).
- **Outcome exemplars** (per-target scores): a soft contrastive loss. The target distribution of
  each anchor over the batch comes from how alike the rows' score vectors are (one minus the mean
  absolute difference), so rows on which the same models succeed move together, meant to make a
  query's neighbours better predictors of its per-target quality (docs/EVAL.md has what it
  measured on LLMRouter).
- **Guard rail**: a stratified held-out share of the exemplars is embedded by the starting and the
  tuned model (fp32, in torch) and routed by kNN against the rest; ``tune`` reports both and the
  CLI refuses a tuned model that is not better unless ``--keep-anyway``.
- **Speed** (Banking77 train took 43 min before these): one torch thread (see ``_Trainer``), the
  token embedding table frozen, batches and the fp32 check embedded in length order, the
  starting encoder's embeddings of the check reused for the hard negatives and the proxies,
  and the default loss embeds one text per row.
- **Determinism**: one seed drives the split, the batches, dropout and the initialisation; torch
  runs with deterministic algorithms. Same seed, input and machine: the same weights, so the same
  encoder fingerprint.

torch and sentence-transformers are imported inside functions only (``pip install
'semroute[export]'``); serving never imports this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from semroute.errors import EncoderError
from semroute.exemplars import ExemplarSet, read_exemplars
from semroute.logs import ProgressCallback
from semroute.tune.folds import stratified_folds, top_neighbours
from semroute.types import ExemplarKind

Matrix = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

LOSSES = ("proxy", "mnrl", "mnrl-hard", "supcon")
OUTCOME_LOSS = "score-soft"
# The encoder's learning rate when none is given: the proxy loss was measured best at 5e-5
# (docs/EVAL.md); the others keep the sentence-transformers default they were measured with.
LEARNING_RATES = {"proxy": 5e-5}
DEFAULT_LEARNING_RATE = 2e-5
# Passes over the rows by loss (others: 1). Proxy, Banking77 train, held-out 900 rows: 0.932 after
# one epoch, 0.940 after two (docs/EVAL.md, `eval_tuned.py --compare`).
EPOCHS = {"proxy": 2}
# A route needs a positive for its anchors and rows left for the held-out check.
MIN_ROWS_PER_ROUTE = 8
FP32_SUBDIR = "fp32"  # the fp32 reference export, inside --out
MODEL_SUBDIR = "model"  # the tuned sentence-transformers folder (usable as --base)
TUNE_KEY = "tuned"  # the manifest key holding what tune records


@dataclass(frozen=True)
class TuneOptions:
    """Knobs of one tuning run. Defaults are the ones docs/EVAL.md measured."""

    epochs: int | None = None  # None: EPOCHS by loss
    seed: int = 0
    loss: str = "proxy"  # labelled sets; outcome sets always use OUTCOME_LOSS
    batch_size: int = 64
    per_label: int = 4  # rows per label in a supcon batch (K)
    learning_rate: float | None = None  # None: LEARNING_RATES by loss
    warmup: float = 0.1  # share of steps with a linear learning-rate warm-up
    scale: float = 20.0  # inverse temperature of the similarities
    proxy_lr: float = 100.0  # the proxies' learning rate, as a multiple of learning_rate
    margin: float = 0.1  # proxy loss: cosine subtracted from the true label's (additive margin)
    threads: int = 1  # torch CPU threads (see _Trainer)
    held_out: float = 0.1  # stratified share kept for the before/after check
    max_tokens: int = 128  # training truncation (the export keeps the model's own limit)
    k: int = 10  # neighbours of the held-out check
    max_rows: int | None = None  # subsample the training rows (tests, quick trials)

    def rate(self, loss: str) -> float:
        """The encoder's learning rate for ``loss`` (the one given, else the measured default)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return LEARNING_RATES.get(loss, DEFAULT_LEARNING_RATE)

    def epoch_count(self, loss: str) -> int:
        """Passes over the training rows for ``loss`` (the number given, else the measured
        default)."""
        return self.epochs if self.epochs is not None else EPOCHS.get(loss, 1)


@dataclass
class TuneResult:
    """What a run measured; ``record()`` is what goes into the encoder manifest."""

    kind: str
    loss: str
    epochs: int
    seed: int
    learning_rate: float
    rows_trained: int
    rows_held_out: int
    metric: str
    before: float
    after: float
    seconds: float
    steps: int
    device: str
    warnings: list[str] = field(default_factory=list)

    @property
    def improved(self) -> bool:
        return self.after > self.before

    def record(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- pure helpers


def file_checksums(paths: Sequence[Path]) -> dict[str, str]:
    """sha256 of each exemplar file, keyed by the path as given."""
    out = {}
    for path in paths:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        out[str(path)] = "sha256:" + digest
    return out


def held_out_split(labels: Sequence[str], share: float, seed: int) -> npt.NDArray[np.bool_]:
    """A mask of held-out rows: about ``share`` of each label, at least one row of every label
    with three or more rows, never a label's last two rows."""
    y = np.asarray(labels)
    folds = stratified_folds(y, max(2, round(1 / share)), seed=seed)
    mask: npt.NDArray[np.bool_] = np.asarray(folds == 0)
    for value in set(y.tolist()):
        rows = np.flatnonzero(y == value)
        if len(rows) < 3:
            mask[rows] = False
        elif not mask[rows].any():
            mask[rows[0]] = True
    return mask


def knn_accuracy(train: Matrix, labels: Sequence[str], queries: Matrix,
                 truth: Sequence[str], k: int) -> float:
    """Similarity-weighted k-nearest-neighbour vote: the share of queries whose winner is right."""
    y = np.asarray(labels)
    sims, ids = top_neighbours(queries, train, k)
    right = 0
    for row, want in enumerate(truth):
        votes: dict[str, float] = {}
        for s, i in zip(sims[row], ids[row], strict=True):
            votes[y[i]] = votes.get(y[i], 0.0) + float(np.exp(s / 0.05))
        right += max(votes, key=lambda v: votes[v]) == want
    return right / max(1, len(truth))


def knn_quality(train: Matrix, scores: Matrix, queries: Matrix, truth: Matrix, k: int) -> float:
    """Outcome sets: each query picks the target with the best similarity-weighted mean score
    of its k neighbours; the mean true score of the picked targets (the best reachable
    quality of a router with no cost constraint)."""
    sims, ids = top_neighbours(queries, train, k)
    weights = np.exp((sims - sims[:, :1]) / 0.05)
    predicted = np.einsum("nk,nkt->nt", weights, scores[ids]) / weights.sum(1, keepdims=True)
    picked = predicted.argmax(1)
    return float(truth[np.arange(len(truth)), picked].mean())


BUCKET_WINDOW = 32  # batches pooled before sorting by length


def fill_batches(units: Sequence[IntArray], batch_size: int, rng: np.random.Generator,
                 lengths: npt.NDArray[np.int64] | None = None) -> list[IntArray]:
    """Batches of about ``batch_size`` rows made of whole units (a label's group of rows, or one
    row), in a seeded random order.

    With ``lengths`` (tokens per row), units of similar length train together: the shuffled
    units are pooled ``BUCKET_WINDOW`` batches at a time and sorted by their longest row before
    they are cut into batches, and the batches are shuffled again. A batch is padded to its
    longest row, so one 90-token row among 13-token ones (Banking77's longest and median) costs
    several times the compute.
    """
    order = [units[i] for i in rng.permutation(len(units))]
    if lengths is not None:
        pooled: list[IntArray] = []
        pool: list[IntArray] = []
        rows = 0
        for unit in [*order, None]:
            if unit is not None:
                pool.append(unit)
                rows += len(unit)
            if unit is None or rows >= BUCKET_WINDOW * batch_size:
                pooled.extend(sorted(pool, key=lambda u: int(lengths[u].max())))
                pool, rows = [], 0
        order = pooled
    batches: list[IntArray] = []
    current: list[IntArray] = []
    size = 0
    for unit in order:
        current.append(unit)
        size += len(unit)
        if size >= batch_size:
            batches.append(np.concatenate(current))
            current, size = [], 0
    if current:
        batches.append(np.concatenate(current))
    return [batches[i] for i in rng.permutation(len(batches))]


def label_groups(labels: Sequence[str], per_label: int, rng: np.random.Generator) -> list[IntArray]:
    """Each label's rows, shuffled and cut into groups of ``per_label`` (the supcon units)."""
    y = np.asarray(labels)
    groups: list[IntArray] = []
    for value in sorted(set(y.tolist())):
        rows = np.flatnonzero(y == value)
        rows = rows[rng.permutation(len(rows))]
        groups.extend(rows[i : i + per_label] for i in range(0, len(rows), per_label))
    return groups


def mnrl_batches(labels: Sequence[str], batch_size: int, rng: np.random.Generator,
                 lengths: npt.NDArray[np.int64] | None = None,
                 ) -> list[tuple[IntArray, IntArray]]:
    """One epoch of (anchors, positives): every row is an anchor once, with a random other row of
    its label; a batch never holds two anchors of one label (no false in-batch negatives).
    With ``lengths``, anchors of similar length share a batch (pools of ``BUCKET_WINDOW``
    batches sorted by length, as in ``fill_batches``), and the batches are shuffled."""
    y = np.asarray(labels)
    by_label = {v: np.flatnonzero(y == v) for v in set(y.tolist())}
    pending = [int(i) for i in rng.permutation(len(y)) if len(by_label[y[i]]) > 1]
    if lengths is not None:
        window = BUCKET_WINDOW * batch_size
        pending = [i for start in range(0, len(pending), window)
                   for i in sorted(pending[start : start + window], key=lambda r: lengths[r])]
    batches: list[tuple[IntArray, IntArray]] = []
    while pending:
        seen: set[str] = set()
        anchors: list[int] = []
        rest: list[int] = []
        for i in pending:
            if y[i] in seen or len(anchors) >= batch_size:
                rest.append(i)
            else:
                seen.add(str(y[i]))
                anchors.append(int(i))
        positives = []
        for a in anchors:
            rows = by_label[y[a]]
            choice = int(rows[rng.integers(len(rows) - 1)])
            positives.append(choice if choice != a else int(rows[-1]))
        batches.append((np.asarray(anchors), np.asarray(positives)))
        pending = rest
    if lengths is None:
        return batches
    return [batches[i] for i in rng.permutation(len(batches))]


def score_similarity(scores: Matrix) -> Matrix:
    """How alike two rows' score vectors are: 1 - mean absolute difference (scores in [0, 1])."""
    diff = np.abs(scores[:, None, :] - scores[None, :, :]).mean(-1)
    return np.asarray(1.0 - diff, dtype=np.float32)


# ---------------------------------------------------------------------------- training


class _Trainer:
    """The torch side: a sentence-transformers model, its tokenizer and an optimiser.

    The token embedding table (half of MiniLM's weights) stays frozen: a short tuning run sees
    a few thousand of its 30k rows, and its dense gradient and AdamW update were a tenth of
    each step. Batches are small (64 rows of ~15 tokens), so a second CPU thread gains little
    when the cores are free and, OpenMP threads spin-waiting on each other, loses several
    times over when another process holds a core (83 texts/s forward+backward on one thread
    against 10-36 on two, on this 2-core machine at load 4-5); ``threads`` is 1 by default
    and fixed, as the weights may depend on it."""

    def __init__(self, base: Path, options: TuneOptions) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self.torch = torch
        self.options = options
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(str(base), device=self.device, local_files_only=True)
        self.model.max_seq_length = min(options.max_tokens, self.model.max_seq_length or 512)
        for name, param in self.model.named_parameters():
            if name.endswith("word_embeddings.weight"):
                param.requires_grad_(False)
        self.proxies: Any = None

    def start(self, total_steps: int, rate: float, proxies: Matrix | None = None) -> None:
        """The optimiser and schedule; ``proxies`` (labels x dim) adds learned label vectors
        (the proxy loss) at ``proxy_lr`` times the encoder's learning rate ``rate``."""
        torch, options = self.torch, self.options
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": params}]
        if proxies is not None:
            self.proxies = torch.nn.Parameter(torch.tensor(proxies, device=self.device))
            groups.append({"params": [self.proxies], "weight_decay": 0.0,
                           "lr": rate * options.proxy_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=rate, weight_decay=0.01)
        warm = max(1, int(total_steps * options.warmup))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (total_steps - step) / max(1, total_steps - warm))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def embed_grad(self, texts: Sequence[str]) -> Any:
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize
        features = prepare(list(texts))
        features = {k: v.to(self.device) for k, v in features.items() if hasattr(v, "to")}
        out = self.model(features)["sentence_embedding"]
        return self.torch.nn.functional.normalize(out, p=2.0, dim=1)

    def embed(self, texts: Sequence[str], batch_size: int = 128) -> Matrix:
        """fp32 embeddings of ``texts``, in order; batched by length (a batch pads to its
        longest text, and Banking77's longest is seven times its median)."""
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
        out: Matrix | None = None
        self.model.eval()
        with self.torch.inference_mode():
            for start in range(0, len(order), batch_size):
                ids = order[start : start + batch_size]
                part = self.embed_grad([texts[i] for i in ids]).cpu().numpy()
                if out is None:
                    out = np.zeros((len(texts), part.shape[1]), dtype=np.float32)
                out[ids] = part
        self.model.train()
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def step(self, loss: Any) -> float:
        self.optimizer.zero_grad()
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    def supcon_loss(self, emb: Any, labels: Sequence[str]) -> Any:
        torch = self.torch
        sims = emb @ emb.T * self.options.scale
        n = len(labels)
        eye = torch.eye(n, dtype=torch.bool, device=emb.device)
        codes = {v: i for i, v in enumerate(sorted(set(labels)))}
        y = torch.tensor([codes[v] for v in labels], device=emb.device)
        positive = (y[:, None] == y[None, :]) & ~eye
        logits = sims.masked_fill(eye, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        has = positive.any(1)
        per_anchor = -(log_prob.masked_fill(~positive, 0.0).sum(1)) / positive.sum(1).clamp(min=1)
        return per_anchor[has].mean()

    def proxy_loss(self, emb: Any, codes: IntArray) -> Any:
        return proxy_loss(emb, self.proxies, codes, self.options.scale, self.options.margin)

    def mnrl_loss(self, anchors: Any, candidates: Any) -> Any:
        torch = self.torch
        logits = anchors @ candidates.T * self.options.scale
        target = torch.arange(len(anchors), device=anchors.device)
        return torch.nn.functional.cross_entropy(logits, target)

    def soft_loss(self, emb: Any, target_sims: Matrix) -> Any:
        torch = self.torch
        n = emb.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=emb.device)
        logits = (emb @ emb.T * self.options.scale).masked_fill(eye, float("-inf"))
        target = torch.tensor(target_sims, device=emb.device) * self.options.scale
        target = torch.softmax(target.masked_fill(eye, float("-inf")), dim=1)
        log_q = torch.log_softmax(logits, dim=1).masked_fill(eye, 0.0)
        return -(target * log_q).sum(1).mean()

    def save(self, folder: Path) -> None:
        self.model.save(str(folder))


def proxy_loss(emb: Any, proxies: Any, codes: IntArray, scale: float,
               margin: float = 0.0) -> Any:
    """The proxy loss on torch tensors: cross-entropy of each row of ``emb`` (unit length) over
    its scaled cosine to every label's proxy, a cosine classifier whose weights are thrown away
    after training; ``margin`` is taken off the true label's cosine (an additive margin)."""
    import torch

    cos = emb @ torch.nn.functional.normalize(proxies, p=2.0, dim=1).T
    target = torch.as_tensor(codes, device=emb.device)
    if margin:
        cos = cos - margin * torch.nn.functional.one_hot(target, cos.shape[1])
    return torch.nn.functional.cross_entropy(cos * scale, target)


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _route_warnings(labels: Sequence[str]) -> list[str]:
    counts: dict[str, int] = {}
    for v in labels:
        counts[v] = counts.get(v, 0) + 1
    few = sorted(v for v, c in counts.items() if c < MIN_ROWS_PER_ROUTE)
    if not few:
        return []
    listing = ", ".join(f"{v} ({counts[v]})" for v in few[:10]) + (" ..." if len(few) > 10 else "")
    return [
        f"{len(few)} route(s) have fewer than {MIN_ROWS_PER_ROUTE} exemplars to tune on: "
        f"{listing}; tuning learns little for them and may pull their queries elsewhere"
    ]


def tune_model(
    exemplar_set: ExemplarSet,
    base: Path,
    save_to: Path,
    options: TuneOptions,
    progress: ProgressCallback | None = None,
    warn: Callable[[str], None] | None = None,
) -> TuneResult:
    """Fine-tune ``base`` on ``exemplar_set`` and save the sentence-transformers model to
    ``save_to``. Measures the held-out figure before and after; does not export."""
    if options.loss not in LOSSES:
        raise EncoderError(f"--loss: {options.loss!r} is not one of {', '.join(LOSSES)}")
    if options.epochs is not None and options.epochs < 1:
        raise EncoderError(f"--epochs must be at least 1, got {options.epochs}")
    started = time.perf_counter()
    _seed_everything(options.seed)
    rng = np.random.default_rng(options.seed)
    rows = exemplar_set.exemplars
    if options.max_rows is not None and len(rows) > options.max_rows:
        keep = np.sort(rng.choice(len(rows), options.max_rows, replace=False))
        rows = [rows[i] for i in keep]
    texts = [e.text for e in rows]
    outcome = exemplar_set.kind is ExemplarKind.OUTCOMES
    if outcome:
        scores = _score_matrix(rows, exemplar_set.targets)
        strata = [str(int(np.argmax(s))) for s in scores]
        warnings: list[str] = []
    else:
        strata = [e.label or "" for e in rows]
        warnings = _route_warnings(strata)
    for warning in warnings:
        if warn is not None:
            warn(warning)
    held = held_out_split(strata, options.held_out, options.seed)
    train_ids = np.flatnonzero(~held)
    if len(set(strata[i] for i in train_ids)) < 2 and not outcome:
        raise EncoderError("tuning needs at least two routes with exemplars")
    train_texts = [texts[i] for i in train_ids]
    train_strata = [strata[i] for i in train_ids]

    lengths = _token_lengths(base, train_texts, options.max_tokens)

    def plan_epoch() -> list[Any]:
        if outcome or options.loss == "proxy":
            singles = [np.asarray([i]) for i in range(len(train_ids))]
            return fill_batches(singles, options.batch_size, rng, lengths)
        if options.loss == "supcon":
            groups = label_groups(train_strata, options.per_label, rng)
            return fill_batches(groups, options.batch_size, rng, lengths)
        return list(mnrl_batches(train_strata, options.batch_size, rng, lengths))

    loss_name = OUTCOME_LOSS if outcome else options.loss
    epochs = [plan_epoch() for _ in range(options.epoch_count(loss_name))]
    total = sum(len(e) for e in epochs)
    with _torch_threads(options.threads):
        trainer = _Trainer(base, options)

        def measure() -> tuple[float, Matrix]:
            emb = trainer.embed(texts)
            fit, ask = emb[~held], emb[held]
            if outcome:
                return knn_quality(fit, scores[~held], ask, scores[held], options.k), emb
            return knn_accuracy(fit, train_strata, ask,
                                [strata[i] for i in np.flatnonzero(held)], options.k), emb

        before, start_emb = measure()
        # the starting encoder's training-row embeddings: hard negatives and proxies come
        # from them (no second pass over the rows)
        train_emb = start_emb[train_ids]
        hard = None
        if not outcome and options.loss == "mnrl-hard":
            hard = _hard_negatives(train_emb, train_strata)
        codes, names = _label_codes(train_strata)
        proxies = None
        if not outcome and options.loss == "proxy":
            proxies = _centroids(train_emb, codes, len(names))
        trainer.start(total, options.rate(loss_name), proxies)
        _train(trainer, epochs, outcome, options.loss, train_texts, train_strata, codes,
               scores[train_ids] if outcome else None, hard, progress, total)
        after, _ = measure()
        trainer.save(save_to)
    return TuneResult(
        kind=exemplar_set.kind.value,
        loss=loss_name,
        epochs=len(epochs),
        seed=options.seed,
        learning_rate=options.rate(loss_name),
        rows_trained=len(train_ids),
        rows_held_out=int(held.sum()),
        metric="held-out best-target quality (kNN)" if outcome else "held-out kNN accuracy",
        before=round(before, 4),
        after=round(after, 4),
        seconds=round(time.perf_counter() - started, 1),
        steps=total,
        device=trainer.device,
        warnings=warnings,
    )


def _train(trainer: _Trainer, epochs: Sequence[Sequence[Any]], outcome: bool, loss_name: str,
           train_texts: Sequence[str], train_strata: Sequence[str], codes: IntArray,
           scores: Matrix | None, hard: IntArray | None, progress: ProgressCallback | None,
           total: int) -> None:
    trainer.model.train()
    done = 0
    for batches in epochs:
        for batch in batches:
            if outcome:
                assert scores is not None
                emb = trainer.embed_grad([train_texts[i] for i in batch])
                loss = trainer.soft_loss(emb, score_similarity(scores[batch]))
            elif loss_name == "proxy":
                emb = trainer.embed_grad([train_texts[i] for i in batch])
                loss = trainer.proxy_loss(emb, codes[batch])
            elif loss_name == "supcon":
                emb = trainer.embed_grad([train_texts[i] for i in batch])
                loss = trainer.supcon_loss(emb, [train_strata[i] for i in batch])
            else:
                anchors, positives = batch
                a = trainer.embed_grad([train_texts[i] for i in anchors])
                others = positives if hard is None else np.concatenate([positives, hard[anchors]])
                c = trainer.embed_grad([train_texts[i] for i in others])
                loss = trainer.mnrl_loss(a, c)
            value = trainer.step(loss)
            if not math.isfinite(value):
                raise EncoderError(f"tuning diverged (loss {value}); try a smaller learning rate")
            done += 1
            if progress is not None:
                progress(done, total)


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU thread count for the block (process-wide), restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _label_codes(labels: Sequence[str]) -> tuple[IntArray, list[str]]:
    """Each row's label as an index into the sorted label names."""
    names = sorted(set(labels))
    index = {v: i for i, v in enumerate(names)}
    return np.asarray([index[v] for v in labels], dtype=np.int64), names


def _centroids(emb: Matrix, codes: IntArray, count: int) -> Matrix:
    """Unit-length mean embedding of each label: the proxies' starting point, so the first
    steps pull rows towards where their label already is rather than towards noise."""
    sums = np.zeros((count, emb.shape[1]), dtype=np.float32)
    np.add.at(sums, codes, emb)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.asarray(sums / np.maximum(norms, 1e-12), dtype=np.float32)


def _token_lengths(base: Path, texts: Sequence[str], limit: int) -> npt.NDArray[np.int64]:
    """Tokens per text (capped at ``limit``) with the base model's fast tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return np.asarray([min(limit, len(e.ids)) for e in tokenizer.encode_batch(list(texts))],
                      dtype=np.int64)


def _score_matrix(rows: Sequence[Any], targets: Sequence[str]) -> Matrix:
    """Rows x targets; an unknown score (learned from feedback on one target) takes the
    target's mean, so it neither attracts nor repels."""
    raw = np.asarray(
        [[np.nan if e.scores.get(t) is None else e.scores[t] for t in targets] for e in rows],
        dtype=np.float32,
    )
    means = np.nan_to_num(np.nanmean(np.where(np.isnan(raw), np.nan, raw), axis=0), nan=0.5)
    return np.asarray(np.where(np.isnan(raw), means[None, :], raw), dtype=np.float32)


def _hard_negatives(emb: Matrix, labels: Sequence[str]) -> IntArray:
    """For each row, its most similar row of another label."""
    y = np.asarray(labels)
    _, ids = top_neighbours(emb, emb, min(len(y) - 1, 64), exclude_self=True)
    out = np.zeros(len(y), dtype=np.int64)
    for row in range(len(y)):
        other = ids[row][y[ids[row]] != y[row]]
        out[row] = int(other[0]) if len(other) else int(ids[row][-1])
    return out


# ---------------------------------------------------------------------------- the command


def tune_encoder(
    exemplar_files: Sequence[Path],
    out: Path,
    *,
    base: Path | None = None,
    options: TuneOptions | None = None,
    keep_anyway: bool = False,
    progress: ProgressCallback | None = None,
    warn: Callable[[str], None] | None = None,
) -> TuneResult:
    """Tune, then export to ``out`` as `encoder export --int8` does, with the fp32 reference in
    ``out/fp32`` and the tuned sentence-transformers folder in ``out/model`` (a ``--base`` for
    further tuning). ``warn`` hears about routes with too few exemplars before training starts.
    A run that is not better on the held-out rows raises EncoderError (naming
    both figures) and writes nothing, unless ``keep_anyway``."""
    from semroute.export import default_model_dir, export_encoder

    options = options or TuneOptions()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    base_dir = _model_folder(base) if base is not None else default_model_dir()
    exemplar_set = read_exemplars(exemplar_files)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tune-", dir=out.parent))
    try:
        model_dir = work / MODEL_SUBDIR
        result = tune_model(exemplar_set, base_dir, model_dir, options, progress, warn)
        if not result.improved and not keep_anyway:
            raise EncoderError(
                f"the tuned encoder is not better on the held-out exemplars ({result.metric}: "
                f"{result.before:.4f} before, {result.after:.4f} after); nothing written to "
                f"{out}. Try more exemplars or epochs, or pass --keep-anyway"
            )
        staged = work / "export"
        export_encoder(model_dir, staged, int8=True)
        export_encoder(model_dir, staged / FP32_SUBDIR, int8=False)
        shutil.move(str(model_dir), staged / MODEL_SUBDIR)
        record = {
            "base": str(base_dir),
            "exemplars": file_checksums(exemplar_files),
            **result.record(),
            "options": asdict(options),
        }
        for folder in (staged, staged / FP32_SUBDIR):
            manifest_path = folder / "manifest.json"
            manifest = json.loads(manifest_path.read_text())
            manifest["source"] = f"tuned from {base_dir}"
            manifest["model_name"] = f"{_model_name(base_dir)}-tuned"
            manifest[TUNE_KEY] = record
            manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            staged.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staged.rename(out)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _model_name(folder: Path) -> str:
    return folder.parent.name if folder.name in ("model", MODEL_SUBDIR) else folder.name


def _model_folder(base: Path) -> Path:
    """``--base``: a sentence-transformers folder, or an earlier tune's output (its model/)."""
    if (base / MODEL_SUBDIR / "modules.json").exists():
        return base / MODEL_SUBDIR
    if (base / "modules.json").exists() or (base / "config.json").exists():
        return base
    raise EncoderError(
        f"--base {base}: not a sentence-transformers model folder nor a `semroute encoder tune` "
        "output (no modules.json); an ONNX export cannot be tuned further"
    )
