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


def test_onnx_matches_sentence_transformers(onnx_encoder) -> None:  # type: ignore[no-untyped-def]
    """Every sample embeds within cosine 0.9999 of sentence-transformers' own output."""
    from sentence_transformers import SentenceTransformer

    from semroute.export import default_model_dir

    st = SentenceTransformer(str(default_model_dir()), device="cpu", local_files_only=True)
    reference = st.encode(SAMPLE, normalize_embeddings=True, convert_to_numpy=True)
    ours = onnx_encoder.encode(SAMPLE)
    cosines = (ours * reference).sum(axis=1)
    assert cosines.min() >= 0.9999, cosines


def test_single_and_batched_embeddings_agree(onnx_encoder) -> None:  # type: ignore[no-untyped-def]
    """Padding to the batch's longest (attention-masked) does not change any embedding."""
    batch = onnx_encoder.encode(SAMPLE[:4])
    single = np.vstack([onnx_encoder.encode([t]) for t in SAMPLE[:4]])
    assert np.allclose(batch, single, atol=1e-5)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)


def test_no_fixed_padding_and_truncation_at_limit(onnx_encoder) -> None:  # type: ignore[no-untyped-def]
    """A short text is a handful of tokens (not padded to 128); a long one stops at max_tokens."""
    assert onnx_encoder.count_tokens("hello world") == 4  # [CLS] hello world [SEP]
    assert onnx_encoder.count_tokens("word " * 400) == onnx_encoder.max_tokens == 256


def test_manifest_fingerprint_matches_files(encoder_dir: Path) -> None:
    """The manifest fingerprint is the hash of the exported weights and tokenizer."""
    import json

    from semroute.export import fingerprint_files

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


@pytest.mark.slow
def test_int8_export_is_close_to_fp32(tmp_path: Path, onnx_encoder) -> None:  # type: ignore[no-untyped-def]
    """`--int8` produces a smaller model whose embeddings stay close to the fp32 ones."""
    from semroute.encoder import OnnxEncoder
    from semroute.export import export_encoder

    out = export_encoder(None, tmp_path / "int8", int8=True)
    int8 = OnnxEncoder.load(out)
    assert (out / "model.onnx").stat().st_size < 0.4 * (
        onnx_encoder.path / "model.onnx"
    ).stat().st_size
    assert int8.fingerprint != onnx_encoder.fingerprint
    cos = (int8.encode(SAMPLE[:5]) * onnx_encoder.encode(SAMPLE[:5])).sum(axis=1)
    assert cos.min() > 0.95, cos


def test_spin_setting_changes_nothing_but_threading(encoder_dir: Path, onnx_encoder) -> None:  # type: ignore[no-untyped-def]
    """encoder.spin=false (no busy-waiting worker threads) gives the same embeddings."""
    from semroute.encoder import OnnxEncoder

    quiet = OnnxEncoder.load(encoder_dir, threads=2, spin=False)
    assert np.allclose(quiet.encode(SAMPLE[:3]), onnx_encoder.encode(SAMPLE[:3]), atol=1e-6)
