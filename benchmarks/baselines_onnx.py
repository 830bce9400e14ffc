"""ONNX Runtime baselines for ``bench_suite.py``: export, BERT fusions, int8 dynamic quantization, sessions.

This is the ONNX path of CPU embedding / reranking servers (e.g. Infinity's optimum engine) for BERT encoders:

1. ``torch.onnx.export`` of the transformers model with dynamic batch and sequence axes, opset 17.
   The TorchScript exporter (``dynamo=False``) on ``attn_implementation="eager"`` is used on purpose:
   onnxruntime's transformer optimizer recognises the attention subgraph that this pair produces and
   fuses it into one ``Attention`` node per layer. With SDPA (either exporter) or with the dynamo
   exporter (either attention) the graph comes out differently and the optimizer fuses neither the
   attention nor the embeddings (checked with torch 2.13 / onnxruntime 1.32: 0 ``Attention`` and 0
   ``EmbedLayerNormalization`` nodes, against one ``Attention`` per layer here).
2. ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")``: EmbedLayerNormalization,
   Attention, SkipLayerNormalization, BiasGelu fusions. :func:`op_counts` reads them back from the
   saved file so that a cached export still reports them.
3. ``onnxruntime.quantization.quantize_dynamic`` of the optimized model: QInt8 weights (activations are
   quantized to uint8 at run time, so the kernels are u8s8, the fast VNNI path), ``per_channel=True``
   (one scale per output column: better accuracy at the same speed), ``reduce_range=False`` (7-bit
   weights only help CPUs without VNNI, where u8s8 products can saturate). MatMul, Attention and
   EmbedLayerNormalization all get quantized (QAttention, DynamicQuantizeMatMul after session fusion).
4. ``InferenceSession`` on the CPU provider, ``ORT_ENABLE_ALL``, ``intra_op_num_threads`` = cores,
   ``inter_op_num_threads`` = 1, sequential execution.

:class:`OrtClassifier` makes a session look like a transformers classifier (``model(**inputs).logits``,
``model.config.num_labels``), so the same batching loops that drive the transformers baseline drive it.
"""

from __future__ import annotations

import collections
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.optimizer import optimize_model
from transformers import AutoModel, AutoModelForSequenceClassification

OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# Fused operators worth reporting: proof that the optimizer (and the quantizer) did their work.
FUSED_OPS = (
    "EmbedLayerNormalization",
    "Attention",
    "SkipLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "LayerNormalization",
    "MatMul",
    "QEmbedLayerNormalization",
    "QAttention",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
)


@dataclass(frozen=True)
class OnnxModels:
    """The optimized fp32 model, its int8 quantization, and the fused-operator counts of both."""

    fp32: Path
    int8: Path
    fp32_ops: dict[str, int]
    int8_ops: dict[str, int]


class _Encoder(torch.nn.Module):
    """The bare encoder with a tensor output: traced as is, ``BertModel`` stops the TorchScript
    exporter with "got multiple values for argument 'use_cache'" (transformers 5.x)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> Any:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


def export_onnx(folder: Path, target: Path, head: bool = True) -> None:
    """TorchScript-export the eager-attention transformers model with dynamic batch and sequence axes:
    the sequence classifier's ``logits`` (``head``), or the bare encoder's ``last_hidden_state``."""
    kwargs: dict[str, Any] = {"attn_implementation": "eager", "dtype": torch.float32}
    if head:
        model, output = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs), "logits"
    else:
        model, output = _Encoder(AutoModel.from_pretrained(folder, **kwargs)), "last_hidden_state"
    dummy = tuple(torch.ones((2, 16), dtype=torch.long) for _ in INPUT_NAMES)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    axes[output] = {0: "batch"} if head else {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.inference_mode():
        # The legacy exporter is deprecated and the tracer warns about python-side shape checks in
        # transformers' mask code; the suite's agreement check verifies the exported graph instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            dummy,
            str(target),
            input_names=list(INPUT_NAMES),
            output_names=[output],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def optimize_bert(source: Path, target: Path, num_heads: int, hidden_size: int) -> None:
    """onnxruntime's BERT fusions (what TEI / Infinity / Optimum apply for the CPU)."""
    optimized = optimize_model(str(source), model_type="bert", num_heads=num_heads, hidden_size=hidden_size)
    optimized.save_model_to_file(str(target))


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization of the optimized fp32 model (see the module docstring for the options)."""
    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=False,
        # Shape inference cannot see through the fused contrib ops (Attention, SkipLayerNormalization);
        # without a default the quantizer stops with "Unable to find data type for weight_name".
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def op_counts(path: Path) -> dict[str, int]:
    """How many of each :data:`FUSED_OPS` operator the saved model holds (absent ones omitted)."""
    counts = collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


def build_onnx_models(folder: Path, root: Path, num_heads: int, hidden_size: int, head: bool = True) -> OnnxModels:
    """Export (see :func:`export_onnx` for ``head``), optimize and quantize ``folder`` under
    ``root/<folder name>-onnx`` (``-encoder-onnx`` without the head); reuse what is there."""
    out = root / f"{folder.name}-{'onnx' if head else 'encoder-onnx'}"
    fp32, int8 = out / "model-opt.onnx", out / "model-opt-int8.onnx"
    if not (fp32.exists() and int8.exists()):
        work = out.with_name(out.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        export_onnx(folder, work / "model.onnx", head)
        optimize_bert(work / "model.onnx", work / fp32.name, num_heads, hidden_size)
        quantize_int8(work / fp32.name, work / int8.name)
        (work / "model.onnx").unlink()  # only the optimized models are used
        shutil.rmtree(out, ignore_errors=True)
        work.rename(out)
        print(f"[onnx] exported, optimized and quantized {folder.name} into {out}")
    else:
        print(f"[onnx] reusing {out}")
    return OnnxModels(fp32, int8, op_counts(fp32), op_counts(int8))


def make_session(path: Path, threads: int) -> ort.InferenceSession:
    """A CPU session that owns ``threads`` cores for its operators and runs nodes one after another."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtClassifier:
    """An ONNX Runtime session behind the transformers calling convention: ``model(**inputs).logits``."""

    def __init__(self, session: ort.InferenceSession, num_labels: int) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.config = SimpleNamespace(num_labels=num_labels)

    def __call__(self, **inputs: torch.Tensor) -> Any:
        feeds = {name: inputs[name].numpy() for name in self.input_names}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(None, feeds)[0]))


def versions() -> dict[str, str]:
    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
