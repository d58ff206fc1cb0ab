"""The evaluation embedding cache: a second process embeds nothing and gets the same vectors,
including for texts whose SHA-1 ends in a NUL byte (numpy bytes dtypes strip those)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from semroute.quality.cache import DiskCachedEncoder
from tests.conftest import HashEncoder


class CountingEncoder(HashEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += len(texts)
        return super().encode(texts)


def _text_with_nul_digest() -> str:
    i = 0
    while hashlib.sha1(f"text {i}".encode()).digest()[-1] != 0:
        i += 1
    return f"text {i}"


def test_cache_round_trips_every_text_without_re_embedding(tmp_path: Path) -> None:
    """Vectors saved by one instance are served by the next with no encoder call, in order."""
    texts = ["alpha beta", _text_with_nul_digest(), "gamma", "alpha beta"]
    first = DiskCachedEncoder(CountingEncoder(), tmp_path)
    want = first.encode(texts)
    assert first.inner.calls == 3  # the repeated text is embedded once
    first.save()
    inner = CountingEncoder()
    second = DiskCachedEncoder(inner, tmp_path)
    got = second.encode(list(reversed(texts)))
    assert inner.calls == 0
    assert np.array_equal(got, want[::-1])


def test_new_texts_are_appended_and_saved_alongside_old_ones(tmp_path: Path) -> None:
    """A later run adds its misses; a third run finds both the old and the new texts."""
    a = DiskCachedEncoder(CountingEncoder(), tmp_path)
    a.encode(["one"])
    a.save()
    b = DiskCachedEncoder(CountingEncoder(), tmp_path)
    b.encode(["one", "two"])
    b.save()
    inner = CountingEncoder()
    c = DiskCachedEncoder(inner, tmp_path)
    out = c.encode(["two", "one"])
    assert inner.calls == 0
    assert np.array_equal(out, HashEncoder().encode(["two", "one"]))
