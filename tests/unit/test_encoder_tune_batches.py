"""The pure parts of encoder tuning: held-out split, batches, score similarity, kNN checks, and
the proxy loss on a toy batch."""

from __future__ import annotations

import numpy as np
import pytest

from semroute.encoder_tune import (
    fill_batches,
    held_out_split,
    knn_accuracy,
    knn_quality,
    label_groups,
    mnrl_batches,
    proxy_loss,
    score_similarity,
)


def _labels() -> list[str]:
    return [f"r{i % 7}" for i in range(200)] + ["tiny", "tiny"]


def test_held_out_split_is_stratified_and_spares_small_labels() -> None:
    """About a tenth of each label is held out, at least one row of each, none of a 2-row label."""
    labels = _labels()
    mask = held_out_split(labels, 0.1, seed=3)
    y = np.asarray(labels)
    for value in set(labels) - {"tiny"}:
        rows = mask[y == value]
        assert 1 <= rows.sum() <= 0.2 * len(rows)
    assert not mask[y == "tiny"].any()
    assert (held_out_split(labels, 0.1, seed=3) == mask).all()


def test_label_balanced_batches_cover_every_row_once_with_whole_groups() -> None:
    """Every row trains once per epoch; each group of one label stays in one batch, so every
    anchor has a positive; the same seed gives the same batches."""
    labels = _labels()
    lengths = np.asarray([(i * 37) % 90 + 1 for i in range(len(labels))], dtype=np.int64)
    batches = fill_batches(label_groups(labels, 4, np.random.default_rng(0)), 64,
                           np.random.default_rng(1), lengths)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(len(labels)))
    y = np.asarray(labels)
    for batch in batches:
        counts = {v: int((y[batch] == v).sum()) for v in set(y[batch].tolist())}
        assert all(c >= 2 for c in counts.values()), counts
    again = fill_batches(label_groups(labels, 4, np.random.default_rng(0)), 64,
                         np.random.default_rng(1), lengths)
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))


def test_length_buckets_cut_padding() -> None:
    """Sorting within a pool makes a batch's longest row much closer to its typical row."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 100, size=4096).astype(np.int64)
    singles = [np.asarray([i]) for i in range(len(lengths))]

    def padded(batches: list[np.ndarray]) -> int:
        return sum(int(lengths[b].max()) * len(b) for b in batches)

    mixed = fill_batches(singles, 64, np.random.default_rng(1))
    bucketed = fill_batches(singles, 64, np.random.default_rng(1), lengths)
    assert padded(bucketed) < 0.7 * padded(mixed)


@pytest.mark.parametrize("bucketed", [False, True])
def test_mnrl_batches_never_hold_two_anchors_of_one_label(bucketed: bool) -> None:
    """Every row is an anchor once, with a positive of its label and no other anchor of it."""
    labels = _labels()
    y = np.asarray(labels)
    lengths = np.asarray([(i * 37) % 90 + 1 for i in range(len(labels))], dtype=np.int64)
    seen = []
    for anchors, positives in mnrl_batches(labels, 5, np.random.default_rng(0),
                                           lengths if bucketed else None):
        assert len(set(y[anchors].tolist())) == len(anchors)
        assert (y[anchors] == y[positives]).all() and (anchors != positives).all()
        seen.extend(anchors.tolist())
    assert sorted(seen) == list(range(len(labels)))  # the 2-row label has a positive too


def test_score_similarity_and_knn_checks() -> None:
    """Alike score vectors are similar; the kNN checks pick the right label and best target."""
    scores = np.asarray([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    sim = score_similarity(scores)
    assert sim[0, 1] == 1.0 and sim[0, 2] == 0.0
    base = np.eye(3, dtype=np.float32)
    queries = np.asarray([[0.9, 0.1, 0], [0, 0.1, 0.9]], dtype=np.float32)
    assert knn_accuracy(base, ["a", "a", "b"], queries, ["a", "b"], k=1) == 1.0
    assert knn_accuracy(base, ["a", "a", "b"], queries, ["b", "a"], k=1) == 0.0
    truth = np.asarray([[0.8, 0.2], [0.1, 0.7]], dtype=np.float32)
    assert abs(knn_quality(base, scores, queries, truth, k=1) - 0.75) < 1e-6


def test_proxy_loss_falls_and_proxies_line_up_with_labels() -> None:
    """On a toy batch (three labels, noisy rows around three directions), gradient steps on the
    rows and on randomly started proxies lower the proxy loss, and each label's proxy ends up
    closest to that label's rows; an additive margin makes the same batch cost more."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 16, generator=gen), dim=1)
    codes = np.repeat(np.arange(3), 8)
    raw = (centres[codes] + 0.6 * torch.randn(24, 16, generator=gen)).requires_grad_(True)
    proxies = torch.nn.Parameter(torch.randn(3, 16, generator=gen))
    optimiser = torch.optim.SGD([raw, proxies], lr=0.5)

    def loss_now(margin: float = 0.0) -> torch.Tensor:
        return proxy_loss(torch.nn.functional.normalize(raw, dim=1), proxies, codes, 20.0,
                          margin)

    first = float(loss_now().detach())
    assert float(loss_now(0.2).detach()) > first
    for _ in range(30):
        optimiser.zero_grad()
        loss_now().backward()
        optimiser.step()
    assert float(loss_now().detach()) < 0.5 * first
    emb = torch.nn.functional.normalize(raw.detach(), dim=1)
    means = torch.stack([emb[torch.as_tensor(codes == c)].mean(0) for c in range(3)])
    nearest = (torch.nn.functional.normalize(proxies.detach(), dim=1) @ means.T).argmax(1)
    assert nearest.tolist() == [0, 1, 2]


def test_epochs_default_by_loss_and_an_explicit_count_wins() -> None:
    """The proxy loss takes two passes by default (docs/EVAL.md measured one and two); the other
    losses, and the outcome loss, one; ``--epochs`` overrides both."""
    from semroute.encoder_tune import OUTCOME_LOSS, TuneOptions

    assert TuneOptions().epoch_count("proxy") == 2
    assert TuneOptions().epoch_count("mnrl") == 1
    assert TuneOptions().epoch_count(OUTCOME_LOSS) == 1
    assert TuneOptions(epochs=3).epoch_count("proxy") == 3
    assert TuneOptions(epochs=1).epoch_count("proxy") == 1
