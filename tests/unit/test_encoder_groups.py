"""Batches are split into groups of similar token length (padding costs as much as tokens)."""

from __future__ import annotations

from semroute.encoder import _similar_length_groups


def test_groups_cover_every_row_once_and_bound_padding() -> None:
    """Every row lands in exactly one group; within a group the longest is at most 1.25x + 2."""
    lengths = [5, 40, 6, 7, 41, 90, 5, 12, 13, 88]
    groups = _similar_length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert max(lengths[i] for i in g) <= 1.25 * min(lengths[i] for i in g) + 2
    assert [sorted(lengths[i] for i in g) for g in groups] == [
        [5, 5, 6, 7],
        [12, 13],
        [40, 41],
        [88, 90],
    ]


def test_group_size_is_capped() -> None:
    """Equal lengths still split at max_size so one run's memory stays bounded."""
    groups = _similar_length_groups([10] * 130, max_size=64)
    assert [len(g) for g in groups] == [64, 64, 2]
