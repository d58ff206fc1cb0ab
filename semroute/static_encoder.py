"""A static embedding model distilled from the served encoder: one vector per vocabulary token.

Distillation (``distill_static``, run by ``make setup``) feeds every vocabulary token through
the served encoder on its own (``[CLS] token [SEP]``), centres the vectors and reduces them with
PCA. With a corpus, each token is also weighted SIF-style, ``a / (a + p(token))``, with ``p``
the token's share of the corpus; ``make setup`` gives none, as on Banking77 the weights from
its own train set made the two-stage gate answer half as many queries (docs/BENCHMARKS.md). A
query's embedding is the normalised sum of its tokens' rows: a tokenizer call, a gather and a
sum, tens of microseconds instead of the transformer's milliseconds, in pure numpy.

It is much weaker than the encoder it comes from, which is why it never routes alone:
``semroute.two_stage`` lets it decide only where leave-one-out on the exemplars showed that it
agrees with the full encoder (and, where a threshold applies, where leave-routes-out showed its
estimate of the full confidence clears it), and sends every other query to the full encoder.

The directory holds ``embeddings.npy`` (vocabulary x dimension, float32, weights applied),
``tokenizer.json`` and ``manifest.json`` (dimension, the source encoder's fingerprint, and this
model's own fingerprint: sha256 over the two other files). Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from semroute.encoder import TOKENIZER_FILE, OnnxEncoder, fingerprint_files
from semroute.errors import EncoderError
from semroute.types import Vectors

MANIFEST = "manifest.json"
EMBEDDINGS_FILE = "embeddings.npy"
STATIC_FORMAT = 1
DEFAULT_DIMENSION = 256
# SIF's ``a``: tokens much more frequent than this share of the corpus are damped.
DEFAULT_SIF_A = 1e-3


@dataclass(frozen=True)
class StaticManifest:
    dimension: int
    fingerprint: str
    source_fingerprint: str
    max_tokens: int
    format: int = STATIC_FORMAT

    @classmethod
    def read(cls, path: Path) -> StaticManifest:
        """Raises EncoderError naming the file and field when the manifest is unusable."""
        file = path / MANIFEST
        if not file.exists():
            raise EncoderError(
                f"{path}: no static model here ({MANIFEST} missing); run `make setup` or "
                f"`semroute encoder distill --out {path}`"
            )
        try:
            data = json.loads(file.read_text())
            manifest = cls(
                dimension=int(data["dimension"]),
                fingerprint=str(data["fingerprint"]),
                source_fingerprint=str(data["source_fingerprint"]),
                max_tokens=int(data.get("max_tokens", 256)),
                format=int(data.get("format", STATIC_FORMAT)),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise EncoderError(f"{file}: unreadable static model manifest ({exc!r}); re-distill") from exc
        if manifest.format > STATIC_FORMAT:
            raise EncoderError(
                f"{file}: static model format {manifest.format} is newer than this semroute "
                f"reads ({STATIC_FORMAT}); upgrade semroute or re-distill"
            )
        return manifest


class StaticEncoder:
    """A distilled static model loaded for inference (thread-safe: read-only arrays)."""

    def __init__(self, path: Path, manifest: StaticManifest, table: Vectors, tokenizer: Any) -> None:
        self.path = path
        self.manifest = manifest
        self._table = table
        self._tokenizer = tokenizer

    @classmethod
    def load(cls, path: Path) -> StaticEncoder:
        """Load a distilled directory; EncoderError says what is missing and what to do."""
        from tokenizers import Tokenizer

        path = Path(path)
        manifest = StaticManifest.read(path)
        for name in (EMBEDDINGS_FILE, TOKENIZER_FILE):
            if not (path / name).exists():
                raise EncoderError(f"{path}: {name} missing; re-distill the static model")
        table = np.load(path / EMBEDDINGS_FILE, allow_pickle=False).astype(np.float32)
        if table.ndim != 2 or table.shape[1] != manifest.dimension:
            raise EncoderError(
                f"{path}/{EMBEDDINGS_FILE}: shape {table.shape} does not match dimension "
                f"{manifest.dimension}; re-distill"
            )
        tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=manifest.max_tokens)
        return cls(path, manifest, table, tokenizer)

    @property
    def dimension(self) -> int:
        return self.manifest.dimension

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def source_fingerprint(self) -> str:
        """The fingerprint of the full encoder this model was distilled from."""
        return self.manifest.source_fingerprint

    def token_ids(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def encode(self, texts: Sequence[str], *, normalize: bool = True) -> Vectors:
        """Float32 (len(texts), dimension), rows L2-normalised unless ``normalize`` is off (the
        plain sums, for a caller that normalises later); a text with no known token: a zero
        row."""
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            ids = self.token_ids(text)
            if ids:
                out[i] = self._table[ids].sum(axis=0)
        if normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            np.divide(out, norms, out=out, where=norms > 0)
        return out


# ---- distillation --------------------------------------------------------------------------------


def token_vectors(encoder: OnnxEncoder, ids: Sequence[int]) -> Vectors:
    """The served encoder's embedding of each token alone, ``[CLS] token [SEP]`` (n, d)."""
    cls_id, sep_id = encoder.special_ids()
    out: Vectors = encoder.encode_token_ids([[cls_id, i, sep_id] for i in ids])
    return out


def sif_weights(
    counts: npt.NDArray[np.float64], a: float = DEFAULT_SIF_A
) -> npt.NDArray[np.float32]:
    """``a / (a + p)`` with ``p`` each token's smoothed share of the corpus (add-one)."""
    p = (counts + 1.0) / float(counts.sum() + counts.size)
    return (a / (a + p)).astype(np.float32)


def pca_rows(vectors: Vectors, dimension: int) -> Vectors:
    """Centre the rows and keep their ``dimension`` leading principal components."""
    x = vectors.astype(np.float64)
    x -= x.mean(axis=0)
    # The d x d covariance is small (384 x 384): eigh on it, not an SVD of the rows.
    eigvals, eigvecs = np.linalg.eigh(x.T @ x)
    basis = eigvecs[:, np.argsort(eigvals)[::-1][: min(dimension, x.shape[1])]]
    out: Vectors = (x @ basis).astype(np.float32)
    return out


def count_tokens(tokenizer: Any, texts: Iterable[str], vocab_size: int) -> npt.NDArray[np.float64]:
    counts = np.zeros(vocab_size, dtype=np.float64)
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        np.add.at(counts, ids, 1.0)
    return counts


def distill_static(
    encoder_dir: Path,
    out: Path,
    *,
    corpus: Sequence[str] = (),
    dimension: int = DEFAULT_DIMENSION,
    sif_a: float = DEFAULT_SIF_A,
    threads: int = 2,
) -> Path:
    """Distil the encoder at ``encoder_dir`` into a static model at ``out`` (replaced whole).

    ``corpus`` gives the token frequencies of the SIF weights (none: every token weighs 1).
    Special and ``[unused]`` tokens get a zero row. Returns ``out``.
    """
    encoder = OnnxEncoder.load(encoder_dir, threads=threads)
    tokenizer = encoder.tokenizer
    vocab: dict[str, int] = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    kept = sorted(i for tok, i in vocab.items() if not (tok.startswith("[") and tok.endswith("]")))
    vectors = token_vectors(encoder, kept)
    table = np.zeros((size, min(dimension, vectors.shape[1])), dtype=np.float32)
    table[kept] = pca_rows(vectors, dimension)
    if corpus:
        table *= sif_weights(count_tokens(tokenizer, corpus, size), sif_a)[:, None]
    extra = {
        "method": "per-token embeddings of the served encoder, centred, PCA"
                  + (", SIF-weighted" if corpus else ""),
        "source": str(Path(encoder_dir).resolve()),
        "vocabulary": size,
        "tokens_distilled": len(kept),
        "sif_a": sif_a if corpus else None,
        "corpus_texts": len(corpus),
    }
    return write_static_model(out, table, Path(encoder_dir) / TOKENIZER_FILE,
                              source_fingerprint=encoder.fingerprint,
                              max_tokens=encoder.max_tokens, extra=extra)


def write_static_model(
    out: Path,
    table: Vectors,
    tokenizer_file: Path,
    *,
    source_fingerprint: str,
    max_tokens: int = 256,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a static model directory (replaced whole, atomically); returns ``out``."""
    from semroute.export import _replace_dir

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".distill-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        np.save(tmp / EMBEDDINGS_FILE, np.asarray(table, dtype=np.float32), allow_pickle=False)
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        manifest = {
            "format": STATIC_FORMAT,
            "kind": "static",
            **dict(extra or {}),
            "source_fingerprint": source_fingerprint,
            "dimension": int(table.shape[1]),
            "max_tokens": max_tokens,
            "fingerprint": fingerprint_files(tmp / EMBEDDINGS_FILE, tmp / TOKENIZER_FILE),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
