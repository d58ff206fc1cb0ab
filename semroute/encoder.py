"""The runtime sentence encoder: tokenizers + onnxruntime, no torch.

Two details carry most of the speed: the packaged tokenizer pads every input to 128 tokens, so
padding is turned off for single texts and set to the batch's longest for batches (16-25 ms per
query with the fixed padding, about 2 ms without); and texts are truncated at the model's token
limit rather than rejected.

An int8 export (the served default) quantises activations at run time with one scale per
*tensor*, so in a padded batch a text's embedding would depend on the other texts in it
(``scripts/bench_encoder.py``: cosine down to 0.98 between a query embedded alone and in a
batch of 256). A router must give a query the same decision whatever else is in flight, so int8
encoders run every text on its own (no padding at all). A lone text on an idle encoder gets all
``threads`` cores (faster than one core: see the ``bench:encoder`` section of
docs/BENCHMARKS.md); when several texts are in flight each runs on one core, side by side,
which wastes no time synchronising threads. fp32 exports are batch-invariant and run padded
batches of similar-length texts.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semroute.config import EncoderSettings
from semroute.errors import EncoderError
from semroute.logs import ProgressCallback
from semroute.types import Encoder, Vectors

# The files of an exported encoder directory (written by ``semroute.export``).
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
ENCODER_FORMAT = 1


def fingerprint_files(*paths: Path) -> str:
    """sha256 over the given files, in order; names are not part of the hash."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()



@dataclass(frozen=True)
class EncoderManifest:
    """What ``manifest.json`` of an exported encoder says (``semroute.export`` writes it).

    ``extra`` keeps the keys this version does not model (``source``, ``quantization``, the
    fused operator counts, what a tuned encoder records), so they survive a read and a write.
    """

    dimension: int
    max_tokens: int
    fingerprint: str
    int8: bool = False
    pooling: str = "mean"
    normalized: bool = True
    format: int = ENCODER_FORMAT
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: object, where: str) -> EncoderManifest:
        """Raises EncoderError naming ``where`` and the field for a missing or mistyped field."""
        if not isinstance(data, dict):
            raise EncoderError(f"{where}: the manifest must be a JSON object; re-export")
        kinds: dict[str, type] = {
            "dimension": int, "max_tokens": int, "fingerprint": str, "int8": bool,
            "pooling": str, "normalized": bool, "format": int,
        }
        values: dict[str, Any] = {}
        for key, kind in kinds.items():
            if key not in data:
                if key in ("dimension", "max_tokens", "fingerprint"):
                    raise EncoderError(f"{where}: field {key!r} missing; re-export the encoder")
                continue
            value = data[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise EncoderError(
                    f"{where}: field {key!r} must be {kind.__name__}, got {value!r}; re-export"
                )
            values[key] = value
        if values.get("format", ENCODER_FORMAT) > ENCODER_FORMAT:
            raise EncoderError(
                f"{where}: encoder format {values['format']} is newer than this semroute reads "
                f"({ENCODER_FORMAT}); upgrade semroute or re-export with this version"
            )
        extra = {k: v for k, v in data.items() if k not in kinds}
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``from_dict`` reads back to an equal manifest."""
        return {
            "format": self.format, **self.extra, "dimension": self.dimension,
            "max_tokens": self.max_tokens, "pooling": self.pooling,
            "normalized": self.normalized, "int8": self.int8, "fingerprint": self.fingerprint,
        }


class OnnxEncoder:
    """An exported encoder directory (see ``semroute.export``) loaded for inference.

    Thread-safe: onnxruntime sessions may be run from several threads.
    """

    def __init__(
        self,
        path: Path,
        manifest: EncoderManifest,
        session: Any,
        tokenizer: Any,
        *,
        per_text_threads: int = 0,
        solo_session: Any = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self._session = session  # per-text mode: one intra-op thread
        self._solo_session = solo_session or session  # per-text mode: all threads
        self._tokenizer = tokenizer
        self._pad_id = int(tokenizer.token_to_id("[PAD]") or 0)
        # > 0: batch-dependent model (int8), each text runs alone, this many at once.
        self.per_text_threads = per_text_threads
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._active = 0  # per-text runs in progress

    @classmethod
    def load(
        cls, path: Path, threads: int = 2, spin: bool = True, spin_us: int = 500
    ) -> OnnxEncoder:
        """Load an exported encoder. Raises EncoderError saying what is missing and what to do."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise EncoderError(
                f"{path}: no exported encoder here ({MANIFEST} missing); run `make setup` or "
                f"`semroute encoder export --out {path}`"
            )
        try:
            raw = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise EncoderError(f"{manifest_path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
        manifest = EncoderManifest.from_dict(raw, str(manifest_path))
        for name in (MODEL_FILE, TOKENIZER_FILE):
            if not (path / name).exists():
                raise EncoderError(f"{path}: {name} missing; re-export the encoder")
        def session(intra_op_threads: int) -> Any:
            options = ort.SessionOptions()
            options.intra_op_num_threads = intra_op_threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if not spin:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            elif spin_us:
                # Bounded: a worker that spun on after a lone query would take the core from
                # the other texts of a batch (texts/s with and without: bench_encoder.py).
                options.add_session_config_entry(
                    "session.intra_op.spin_duration_us", str(spin_us)
                )
            return ort.InferenceSession(
                str(path / MODEL_FILE), options, providers=["CPUExecutionProvider"]
            )

        tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=manifest.max_tokens)
        if not manifest.int8:
            return cls(path, manifest, session(threads), tokenizer)
        return cls(
            path, manifest, session(1), tokenizer, per_text_threads=threads,
            solo_session=session(threads) if threads > 1 else None,
        )

    @classmethod
    def from_settings(cls, path: Path, settings: EncoderSettings) -> OnnxEncoder:
        """``load`` with the threading of ``settings`` (the ``encoder`` section)."""
        return cls.load(path, threads=settings.threads, spin=settings.spin, spin_us=settings.spin_us)

    @property
    def dimension(self) -> int:
        return self.manifest.dimension

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def max_tokens(self) -> int:
        return self.manifest.max_tokens

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text).ids)

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Embed texts; returns float32 (len(texts), dimension), each row L2-normalised.

        A batch is run as sub-batches of similar token length: the model is compute-bound, so
        every padding token costs as much as a real one (random batches of 32 Banking77 queries
        ran at about half the speed of length-sorted ones).
        """
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if len(texts) == 1:
            token_ids = [self._tokenizer.encode(texts[0]).ids]
        else:
            token_ids = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
        return self.encode_token_ids(token_ids)

    @property
    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` (no padding, truncation at ``max_tokens``)."""
        return self._tokenizer

    def special_ids(self) -> tuple[int, int]:
        """The ids of ``[CLS]`` and ``[SEP]`` (semroute.static_encoder feeds tokens alone)."""
        return (int(self._tokenizer.token_to_id("[CLS]") or 0),
                int(self._tokenizer.token_to_id("[SEP]") or 0))

    def encode_token_ids(self, token_ids: Sequence[list[int]]) -> Vectors:
        """``encode`` from token ids (special tokens included), with the same batching rules."""
        out = np.zeros((len(token_ids), self.dimension), dtype=np.float32)
        if not token_ids:
            return out
        if self.per_text_threads:
            if len(token_ids) == 1 or self.per_text_threads == 1:
                for i, ids in enumerate(token_ids):
                    out[i] = self._run_alone(ids)
            else:
                for i, vec in enumerate(self._executor().map(self._run_alone, token_ids)):
                    out[i] = vec
            return out
        for rows in _similar_length_groups([len(t) for t in token_ids]):
            out[rows] = self._run([token_ids[i] for i in rows])
        return out

    def _run_alone(self, token_ids: list[int]) -> Vectors:
        """Per-text mode: one text, on all threads if nothing else is running, else one core."""
        with self._lock:
            solo = self._active == 0
            self._active += 1
        try:
            vectors = self._run([token_ids], self._solo_session if solo else self._session)
            return np.asarray(vectors[0], dtype=np.float32)
        finally:
            with self._lock:
                self._active -= 1

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.per_text_threads, thread_name_prefix="semroute-encoder"
                )
            return self._pool

    def _run(self, token_ids: list[list[int]], session: Any = None) -> Vectors:
        longest = max(len(t) for t in token_ids)
        ids = np.full((len(token_ids), longest), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(token_ids), longest), dtype=np.int64)
        for row, tokens in enumerate(token_ids):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        (out,) = (session or self._session).run(
            ["embedding"], {"input_ids": ids, "attention_mask": mask}
        )
        return np.asarray(out, dtype=np.float32)


def embed_many(
    encoder: Encoder,
    texts: Sequence[str],
    batch_size: int = 64,
    *,
    progress: ProgressCallback | None = None,
) -> Vectors:
    """Embed many texts ``batch_size`` at a time (bounded memory), in input order.

    Texts are sorted by length first so each batch holds similar lengths (little padding).
    ``progress(done, total)`` is called after each batch (``semroute.logs.stderr_progress``
    prints a line on stderr).
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), encoder.dimension), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out[chunk] = encoder.encode([texts[i] for i in chunk])
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return out


def _similar_length_groups(lengths: list[int], max_size: int = 64) -> list[list[int]]:
    """Row indices grouped so that padding stays small: sorted by length, a new group starts
    when a row is over 1.25x (+2 tokens) the group's shortest, or the group is full."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    for i in order:
        if (
            groups
            and len(groups[-1]) < max_size
            and lengths[i] <= 1.25 * lengths[groups[-1][0]] + 2
        ):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class CachedEncoder:
    """An LRU cache of single-text embeddings in front of an encoder.

    Only the texts that miss are sent to the encoder, in one batch.
    """

    def __init__(self, encoder: Encoder, size: int) -> None:
        self.inner = encoder
        self.size = size
        self.hits = 0
        self.misses = 0
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def dimension(self) -> int:
        return self.inner.dimension

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    def encode(self, texts: Sequence[str]) -> Vectors:
        if self.size == 0:
            self.misses += len(texts)
            return self.inner.encode(texts)
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, text in enumerate(texts):
                vec = self._cache.get(text)
                if vec is None:
                    missing.setdefault(text, []).append(i)
                else:
                    self._cache.move_to_end(text)
                    out[i] = vec
            self.hits += len(texts) - sum(len(v) for v in missing.values())
            self.misses += sum(len(v) for v in missing.values())
        if missing:
            fresh = self.inner.encode(list(missing))
            with self._lock:
                for (text, rows), vec in zip(missing.items(), fresh, strict=True):
                    out[rows] = vec
                    self._cache[text] = vec
                    self._cache.move_to_end(text)
                while len(self._cache) > self.size:
                    self._cache.popitem(last=False)
        return out
