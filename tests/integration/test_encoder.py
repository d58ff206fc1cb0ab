"""The exported ONNX encoder: parity with sentence-transformers, no padding, no torch at serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

SAMPLE = [
    "How do I reset my password?",
    "write a haiku about autumn leaves",
    "Summarise the following meeting notes: we agreed to ship on Friday and postpone the audit.",
    "what is 17% of 240",
    "My card payment was declined twice today, why?",
    "def f(x): return x * 2  # what does this do",
    "é ü ß — unicode and emoji 🙂 survive tokenisation",
    "word " * 400,  # over the token limit: truncated, not rejected
]


@pytest.fixture(scope="module")
def st_reference():  # type: ignore[no-untyped-def]
    """sentence-transformers' own embeddings of SAMPLE (torch, export extra)."""
    from sentence_transformers import SentenceTransformer

    from semroute.export import default_model_dir

    st = SentenceTransformer(str(default_model_dir()), device="cpu", local_files_only=True)
    return st.encode(SAMPLE, normalize_embeddings=True, convert_to_numpy=True)


def test_fp32_export_matches_sentence_transformers(fp32_encoder, st_reference) -> None:  # type: ignore[no-untyped-def]
    """The fp32 export embeds every sample within cosine 0.9999 of sentence-transformers."""
    cosines = (fp32_encoder.encode(SAMPLE) * st_reference).sum(axis=1)
    assert cosines.min() >= 0.9999, cosines


def test_served_int8_export_stays_close(onnx_encoder, fp32_encoder, st_reference) -> None:  # type: ignore[no-untyped-def]
    """The served int8 export (per-channel weights) is a quarter of the fp32 size and stays
    within cosine 0.98 of sentence-transformers on every sample."""
    assert onnx_encoder.manifest.int8 is True
    assert fp32_encoder.manifest.int8 is False
    assert onnx_encoder.fingerprint != fp32_encoder.fingerprint
    size = (onnx_encoder.path / "model.onnx").stat().st_size
    assert size < 0.3 * (fp32_encoder.path / "model.onnx").stat().st_size
    cosines = (onnx_encoder.encode(SAMPLE) * st_reference).sum(axis=1)
    assert cosines.min() >= 0.98, cosines


def test_single_and_batched_embeddings_agree(onnx_encoder) -> None:  # type: ignore[no-untyped-def]
    """A text embeds the same alone or in a batch. The served int8 model quantises activations
    per tensor, so a padded batch would not give this (see scripts/bench_encoder.py): it runs
    each text on its own, on whichever session (all threads or one) is free."""
    batch = onnx_encoder.encode(SAMPLE)
    single = np.vstack([onnx_encoder.encode([t]) for t in SAMPLE])
    assert np.allclose(batch, single, atol=1e-5)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)


def test_fp32_padded_batches_match_single_texts(fp32_encoder) -> None:  # type: ignore[no-untyped-def]
    """fp32 runs padded batches of similar-length texts; the attention mask keeps each text's
    embedding what it is alone."""
    assert fp32_encoder.per_text_threads == 0  # the padded-batch path
    batch = fp32_encoder.encode(SAMPLE)
    single = np.vstack([fp32_encoder.encode([t]) for t in SAMPLE])
    assert np.allclose(batch, single, atol=1e-5)


def test_no_fixed_padding_and_truncation_at_limit(onnx_encoder) -> None:  # type: ignore[no-untyped-def]
    """A short text is a handful of tokens (not padded to 128); a long one stops at max_tokens."""
    assert onnx_encoder.count_tokens("hello world") == 4  # [CLS] hello world [SEP]
    assert onnx_encoder.count_tokens("word " * 400) == onnx_encoder.max_tokens == 256


def test_manifest_fingerprint_matches_files(encoder_dir: Path) -> None:
    """The manifest fingerprint is the hash of the exported weights and tokenizer."""
    import json

    from semroute.encoder import fingerprint_files

    manifest = json.loads((encoder_dir / "manifest.json").read_text())
    assert manifest["fingerprint"] == fingerprint_files(
        encoder_dir / "model.onnx", encoder_dir / "tokenizer.json"
    )
    assert manifest["dimension"] == 384 and manifest["pooling"] == "mean"


def test_serving_path_never_imports_torch(default_index: Path, encoder_dir: Path) -> None:
    """Loading a Router and routing a query leaves torch and sentence-transformers unimported."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from semroute.router import Router\n"
        f"r = Router.load(Path({str(default_index)!r}), encoder_path=Path({str(encoder_dir)!r}))\n"
        "d = r.route('write a python function to sort a list')\n"
        "heavy = [m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules]\n"
        "print(d.route, heavy)\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("code ")


def test_spin_setting_changes_nothing_but_threading(encoder_dir: Path, onnx_encoder) -> None:  # type: ignore[no-untyped-def]
    """encoder.spin=false (no busy-waiting worker threads) gives the same embeddings."""
    from semroute.encoder import OnnxEncoder

    quiet = OnnxEncoder.load(encoder_dir, threads=2, spin=False)
    assert np.allclose(quiet.encode(SAMPLE[:3]), onnx_encoder.encode(SAMPLE[:3]), atol=1e-6)
