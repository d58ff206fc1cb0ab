"""An embedding cache on disk for evaluation tooling (scripts/evaluate.py, benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


class DiskCachedEncoder:
    """An encoder wrapper that keeps every embedding it computes in ``cache_dir`` (one .npz per
    encoder fingerprint), so evaluation re-runs and index rebuilds embed nothing twice.

    Only for evaluation tooling: vectors are keyed by the SHA-1 of the text, so the same text
    always gets the vector its encoder produced.
    """

    def __init__(self, encoder: Any, cache_dir: Path, batch_size: int = 64) -> None:
        import hashlib

        self.inner = encoder
        self.batch_size = batch_size
        self._sha1 = hashlib.sha1
        tag = encoder.fingerprint.split(":")[-1][:16]
        self.file = Path(cache_dir) / f"embeddings-{tag}.npz"
        # Row i of the file is (key i, vector i). Keys are stored as raw (n, 20) uint8 rows:
        # a numpy bytes dtype would strip trailing NUL bytes from digests and break the lookup.
        self._keys: dict[bytes, int] = {}
        self._key_rows: list[bytes] = []
        self._vecs: list[npt.NDArray[np.float32]] = []
        if self.file.exists():
            data = np.load(self.file)
            key_rows = np.asarray(data["keys"], dtype=np.uint8)
            vectors = np.asarray(data["vectors"], dtype=np.float32)
            if key_rows.ndim != 2 or key_rows.shape[0] != vectors.shape[0]:
                raise ValueError(f"{self.file}: keys and vectors do not line up; delete the file")
            self._key_rows = [row.tobytes() for row in key_rows]
            self._vecs = list(vectors)
            self._keys = {k: i for i, k in enumerate(self._key_rows)}
        self._unsaved = 0
        self.save_every = 2048

    @property
    def dimension(self) -> int:
        return int(self.inner.dimension)

    @property
    def fingerprint(self) -> str:
        return str(self.inner.fingerprint)

    @property
    def max_tokens(self) -> int:
        return int(self.inner.max_tokens)

    def _key(self, text: str) -> bytes:
        return self._sha1(text.encode("utf-8")).digest()

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        keys = [self._key(t) for t in texts]
        missing = list(dict.fromkeys(i for i, k in enumerate(keys) if k not in self._keys))
        if missing:
            unique: dict[bytes, str] = {}
            for i in missing:
                unique.setdefault(keys[i], texts[i])
            items = sorted(unique.items(), key=lambda kv: len(kv[1]))  # less padding per batch
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                vecs = self.inner.encode([t for _, t in chunk])
                for (k, _), v in zip(chunk, vecs, strict=True):
                    self._keys[k] = len(self._vecs)
                    self._key_rows.append(k)
                    self._vecs.append(np.asarray(v, dtype=np.float32))
            self._unsaved += len(unique)
            # Rewriting the whole file per small batch would dominate an index build.
            if self._unsaved >= self.save_every:
                self.save()
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self._vecs[self._keys[k]] for k in keys]).astype(np.float32)

    def save(self) -> None:
        """Write the new embeddings to disk (also done every ``save_every`` new texts)."""
        if not self._unsaved:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        keys = np.frombuffer(b"".join(self._key_rows), dtype=np.uint8).reshape(-1, 20)
        tmp = self.file.with_suffix(".tmp.npz")
        np.savez(tmp, keys=keys, vectors=np.stack(self._vecs))
        tmp.replace(self.file)
        self._unsaved = 0
