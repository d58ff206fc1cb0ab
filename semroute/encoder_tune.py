"""Build-time fine-tuning of the sentence encoder on the user's own exemplars (`encoder tune`).

A kNN router on a frozen general-purpose encoder sits on a plateau: the encoder was trained to
say which sentences mean the same, not which ones need the same route. Tuning moves the
exemplars of one route together and the routes apart, on the exemplars the index is built from.

How (the figures behind each choice are in docs/EVAL.md, "Encoder tuning"):

- **Labelled exemplars** (``loss="mnrl"``, the default): each anchor gets one positive (another
  row of its label) and one mined hard negative (its nearest exemplar of another label under the
  starting encoder); the other anchors' positives and negatives are in-batch negatives, and a
  batch never holds two anchors of one label, so no negative is a false one. ``loss="supcon"``
  is the alternative: label-balanced batches where every other row of the anchor's label is a
  positive; it embeds one text per anchor to mnrl's three. mnrl is the default on a small
  comparison on Banking77 rows (not yet a script in the repository; see docs/EVAL.md for the
  figures that are).
- **Outcome exemplars** (per-target scores): a soft contrastive loss. The target distribution of
  each anchor over the batch comes from how alike the rows' score vectors are (one minus the mean
  absolute difference), so rows on which the same models succeed move together, meant to make a
  query's neighbours better predictors of its per-target quality (docs/EVAL.md has what it
  measured on LLMRouter).
- **Guard rail**: a stratified held-out share of the exemplars is embedded by the starting and the
  tuned model (fp32, in torch) and routed by kNN against the rest; ``tune`` reports both and the
  CLI refuses a tuned model that is not better unless ``--keep-anyway``.
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
from collections.abc import Callable, Sequence
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

LOSSES = ("mnrl", "supcon")
OUTCOME_LOSS = "score-soft"
# A route needs a positive for its anchors and rows left for the held-out check.
MIN_ROWS_PER_ROUTE = 8
FP32_SUBDIR = "fp32"  # the fp32 reference export, inside --out
MODEL_SUBDIR = "model"  # the tuned sentence-transformers folder (usable as --base)
TUNE_KEY = "tuned"  # the manifest key holding what tune records


@dataclass(frozen=True)
class TuneOptions:
    """Knobs of one tuning run. Defaults are the ones docs/EVAL.md measured."""

    epochs: int = 1
    seed: int = 0
    loss: str = "mnrl"  # labelled sets; outcome sets always use OUTCOME_LOSS
    batch_size: int = 64
    per_label: int = 4  # rows per label in a supcon batch (K)
    learning_rate: float = 2e-5
    warmup: float = 0.1  # share of steps with a linear learning-rate warm-up
    scale: float = 20.0  # inverse temperature of the similarities
    held_out: float = 0.1  # stratified share kept for the before/after check
    max_tokens: int = 128  # training truncation (the export keeps the model's own limit)
    k: int = 10  # neighbours of the held-out check
    max_rows: int | None = None  # subsample the training rows (tests, quick trials)


@dataclass
class TuneResult:
    """What a run measured; ``record()`` is what goes into the encoder manifest."""

    kind: str
    loss: str
    epochs: int
    seed: int
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
    """The torch side: a sentence-transformers model, its tokenizer and an optimiser."""

    def __init__(self, base: Path, options: TuneOptions, total_steps: int) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self.torch = torch
        self.options = options
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(str(base), device=self.device, local_files_only=True)
        self.model.max_seq_length = min(options.max_tokens, self.model.max_seq_length or 512)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=options.learning_rate, weight_decay=0.01)
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
        self.model.eval()
        with self.torch.no_grad():
            parts = [
                self.embed_grad(texts[i : i + batch_size]).cpu().numpy()
                for i in range(0, len(texts), batch_size)
            ]
        self.model.train()
        return np.asarray(np.concatenate(parts), dtype=np.float32)

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
    if options.epochs < 1:
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
        if outcome:
            singles = [np.asarray([i]) for i in range(len(train_ids))]
            return fill_batches(singles, options.batch_size, rng, lengths)
        if options.loss == "supcon":
            groups = label_groups(train_strata, options.per_label, rng)
            return fill_batches(groups, options.batch_size, rng, lengths)
        return list(mnrl_batches(train_strata, options.batch_size, rng, lengths))

    epochs = [plan_epoch() for _ in range(options.epochs)]
    total = sum(len(e) for e in epochs)
    trainer = _Trainer(base, options, total)

    def measure() -> float:
        emb = trainer.embed(texts)
        fit, ask = emb[~held], emb[held]
        if outcome:
            return knn_quality(fit, scores[~held], ask, scores[held], options.k)
        return knn_accuracy(fit, [strata[i] for i in train_ids], ask,
                            [strata[i] for i in np.flatnonzero(held)], options.k)

    before = measure()
    hard: IntArray | None = None
    if not outcome and options.loss == "mnrl":
        emb = trainer.embed(train_texts)
        hard = _hard_negatives(emb, train_strata)
    trainer.model.train()
    done = 0
    for batches in epochs:
        for batch in batches:
            if outcome:
                emb = trainer.embed_grad([train_texts[i] for i in batch])
                sims = score_similarity(scores[train_ids[batch]])
                loss = trainer.soft_loss(emb, sims)
            elif options.loss == "supcon":
                emb = trainer.embed_grad([train_texts[i] for i in batch])
                loss = trainer.supcon_loss(emb, [train_strata[i] for i in batch])
            else:
                anchors, positives = batch
                assert hard is not None
                a = trainer.embed_grad([train_texts[i] for i in anchors])
                c = trainer.embed_grad([train_texts[i] for i in
                                        np.concatenate([positives, hard[anchors]])])
                loss = trainer.mnrl_loss(a, c)
            value = trainer.step(loss)
            if not math.isfinite(value):
                raise EncoderError(f"tuning diverged (loss {value}); try a smaller learning rate")
            done += 1
            if progress is not None:
                progress(done, total)
    after = measure()
    trainer.save(save_to)
    return TuneResult(
        kind=exemplar_set.kind.value,
        loss=OUTCOME_LOSS if outcome else options.loss,
        epochs=options.epochs,
        seed=options.seed,
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
