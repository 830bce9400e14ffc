"""The opt-in int8 CPU path (``quantization="int8"``): the layer, what gets converted, the accuracy gates.

Accuracy is checked against transformers in float32: probabilities within 0.02 on random
classifiers of every native family that supports it, and (in test_default_model.py) cosine >= 0.99
on the real all-MiniLM-L6-v2 weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.models.test_deberta_v2 import build_deberta
from tests.models.test_decoders import build_decoder
from tests.models.test_modernbert import build_modernbert
from tests.tiny_models import PROMPTS
from winnow import LLM, ConfigError
from winnow.layers.linear import PackedLinear, cpu_has_fast
from winnow.layers.quant import Int8Linear, compiled_int8_linear, int8_linear, quantize_int8

PROB_ATOL = 0.02  # the gate for random classifiers


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 7, 64)  # [batch, tokens, in]: leading dims are kept
    got = Int8Linear(linear)(x)
    want = linear(x)
    assert got.shape == want.shape == (3, 7, 48)
    # Two roundings of at most half a step each, over 64 products: ~1% of the output scale.
    rel = (got - want).norm() / want.norm()
    assert rel < 0.02


def test_activation_scale_is_per_token():
    """An outlier token does not flatten the others (the failure of a per-tensor scale)."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 16, bias=False)
    x = torch.randn(2, 32)
    x[0, 0] = 1000.0
    got, want = Int8Linear(linear)(x), linear(x)
    assert (got[1] - want[1]).norm() / want[1].norm() < 0.02


def test_no_bias_and_half_inputs_keep_their_dtype():
    linear = nn.Linear(16, 8, bias=False)
    layer = Int8Linear(linear)
    assert torch.equal(layer.bias, torch.zeros(8))  # a zero bias: one kernel variant for every layer
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("tokens", [1, 2, 37, 300])
def test_compiled_kernel_equals_the_eager_ops(tokens):
    """One compiled function serves every token count (dynamic shapes) with the eager numbers."""
    fn = compiled_int8_linear()
    assert fn is not int8_linear, "Inductor could not compile here (the warning in the log says why)"
    torch.manual_seed(tokens)
    layer = Int8Linear(nn.Linear(96, 40))
    x = torch.randn(tokens, 96) * 3
    with torch.inference_mode():
        for bias in (layer.bias, None):
            want = int8_linear(x, layer.qweight, layer.weight_scale, bias)
            torch.testing.assert_close(fn(x, layer.qweight, layer.weight_scale, bias), want, atol=1e-5, rtol=1e-6)


def test_a_failed_compile_falls_back_to_the_eager_ops(monkeypatch, caplog):
    """No C++ compiler on the user's machine: the same numbers, eagerly, and a warning."""

    def broken(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no working C++ compiler")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    assert compiled_int8_linear.__wrapped__() is int8_linear
    assert "no working C++ compiler" in caplog.text


def test_only_matching_linears_are_replaced():
    model = nn.Module()
    model.ffn = nn.Linear(8, 8)
    model.attn = nn.Linear(8, 8)
    assert quantize_int8(model, (r"ffn",), torch.device("cpu")) == 1
    assert isinstance(model.ffn, Int8Linear)
    assert isinstance(model.attn, nn.Linear)


def test_other_linears_can_run_in_another_dtype_except_the_kept_ones():
    # oneDNN packs bf16 weights only on CPUs with bf16 instructions; which linears are picked is the
    # same in float32.
    others = torch.bfloat16 if cpu_has_fast(torch.bfloat16) else torch.float32
    model = nn.Module()
    model.ffn, model.attn, model.classifier = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
    assert quantize_int8(model, (r"ffn",), torch.device("cpu"), others=others, keep=("classifier",)) == 1
    assert isinstance(model.ffn, Int8Linear)
    assert isinstance(model.attn, PackedLinear) and model.attn.dtype == others
    assert type(model.classifier) is nn.Linear


@pytest.mark.skipif(not cpu_has_fast(torch.bfloat16), reason="this CPU has no bf16 matrix instructions")
def test_int8_models_run_attention_projections_in_bf16_where_the_cpu_has_it(make_model, make_llm):
    model = make_llm(make_model("bert", "seq", num_labels=3), quantization="int8").engine.core.runner.model
    layer = model.bert.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, Int8Linear)
    assert isinstance(layer.attention.self.qkv_proj, PackedLinear)
    assert layer.attention.self.qkv_proj.dtype == torch.bfloat16
    assert model.classifier.weight.dtype == torch.float32  # the head stays in the head dtype


def test_int8_follows_auto_dtype_for_the_activations(make_model, monkeypatch):
    """``dtype="auto"`` means the same with int8: bfloat16 activations on a CPU that auto sends to
    bfloat16 (the feed-forward GEMMs in int8, the other linears in bf16, the head in float32)."""
    import winnow.config

    monkeypatch.setattr(winnow.config, "auto_cpu_dtype", lambda: torch.bfloat16)
    llm = LLM(str(make_model("bert", "seq", num_labels=3)), device="cpu", quantization="int8")
    assert llm.model_config.dtype == torch.bfloat16
    model = llm.engine.core.runner.model
    layer = model.bert.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, Int8Linear)
    assert model.classifier.weight.dtype == torch.float32
    if cpu_has_fast(torch.bfloat16):
        assert isinstance(layer.attention.self.qkv_proj, PackedLinear)
        assert layer.attention.self.qkv_proj.dtype == torch.bfloat16


def test_gpu_and_unsupported_models_are_refused():
    with pytest.raises(ConfigError, match="CPU path"):
        quantize_int8(nn.Linear(2, 2), (r".*",), torch.device("cuda"))
    with pytest.raises(ConfigError, match="not available"):
        quantize_int8(nn.Linear(2, 2), (), torch.device("cpu"))


def test_unknown_quantization_is_a_config_error(make_model):
    with pytest.raises(ConfigError, match="'int8'"):
        LLM(str(make_model("bert", "seq")), device="cpu", quantization="int4")


def test_gpt2_has_no_int8_path(tmp_path):
    path = build_decoder(tmp_path / "gpt2", "gpt2", "seq")
    with pytest.raises(ConfigError, match="not available for GPT2"):
        LLM(str(path), device="cpu", quantization="int8")


_ACTIVATIONS = [
    "float32",
    pytest.param(
        "bfloat16",  # what dtype="auto" runs with int8 on a CPU with bf16 instructions
        marks=pytest.mark.skipif(not cpu_has_fast(torch.bfloat16), reason="no bf16 matrix instructions"),
    ),
]


def _assert_probs_close(llm_int8: LLM, llm_fp32: LLM, prompts: list[str]) -> None:
    got = torch.tensor([o.outputs.probs for o in llm_int8.classify(prompts, use_tqdm=False)])
    want = torch.tensor([o.outputs.probs for o in llm_fp32.classify(prompts, use_tqdm=False)])
    spread = (want.amax(dim=0) - want.amin(dim=0)).max()
    assert spread > PROB_ATOL, "probabilities must vary across prompts by more than the gate"
    torch.testing.assert_close(got, want, atol=PROB_ATOL, rtol=0)
    assert not torch.equal(got, want), "int8 must actually change the computation"


@pytest.mark.parametrize("dtype", _ACTIVATIONS)
@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "distilbert"])
def test_bert_family_probabilities_within_gate(family, dtype, make_model, make_llm):
    path = make_model(family, "seq", num_labels=3)
    _assert_probs_close(make_llm(path, quantization="int8", dtype=dtype), make_llm(path), PROMPTS)


def _build(family: str, root: Path) -> Path:
    if family == "deberta-v2":
        return build_deberta(root, "seq", "v3")
    if family == "modernbert":
        # 1/sqrt(hidden) instead of the usual 0.2: at 0.2 the gated MLP squares already extreme
        # activations through four layers (int8 then moves probabilities by ~0.04); a real-shape
        # ModernBERT-base at transformers' own init moves them by 0.0015.
        return build_modernbert(root / family, "seq", weight_std=0.125)
    return build_decoder(root / family, family, "seq")


@pytest.mark.parametrize("dtype", _ACTIVATIONS)
@pytest.mark.parametrize("family", ["deberta-v2", "modernbert", "qwen3"])
def test_other_families_probabilities_within_gate(family, dtype, tmp_path):
    path = _build(family, tmp_path)
    fp32 = LLM(str(path), device="cpu")
    int8 = LLM(str(path), device="cpu", quantization="int8", dtype=dtype)
    converted = [n for n, m in int8.engine.core.runner.model.named_modules() if isinstance(m, Int8Linear)]
    assert converted, "no layer was converted"
    _assert_probs_close(int8, fp32, PROMPTS)


@pytest.mark.parametrize("dtype", _ACTIVATIONS)
def test_batched_equals_single_prompts_under_int8(dtype, make_model, make_llm):
    """Per-token activation scales: a prompt's result does not depend on its batch neighbours."""
    llm = make_llm(make_model("bert", "seq", num_labels=3), quantization="int8", dtype=dtype)
    batched = [o.outputs.probs for o in llm.classify(PROMPTS, use_tqdm=False)]
    single = [llm.classify([p], use_tqdm=False)[0].outputs.probs for p in PROMPTS]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), atol=1e-6, rtol=0)


def test_the_compiled_kernel_has_few_variants(make_model, tmp_path):
    """dynamo keeps at most 8 compilations of a function per process, then runs it eagerly. Models
    with and without biases, lone and batched requests (one-row batches are their own variant),
    float32 and bfloat16 activations, one and two torch threads (two CPU workers; Inductor's
    kernels are compiled for a thread count), all in one process, must stay within it."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    # Count this scenario's variants only: earlier tests call the kernel with bias-less, non-inference
    # and half-precision inputs, each its own variant, which no model run makes.
    torch._dynamo.reset()
    models = [make_model("bert", "seq", num_labels=3), build_decoder(tmp_path / "qwen3", "qwen3", "seq")]
    dtypes = ["float32", "bfloat16"] if cpu_has_fast(torch.bfloat16) else ["float32"]
    for path in models:
        for dtype in dtypes:
            llm = LLM(str(path), device="cpu", quantization="int8", dtype=dtype)
            llm.classify(PROMPTS[0], use_tqdm=False)
            llm.classify(PROMPTS, use_tqdm=False)
    variants = len(_debug_get_cache_entry_list(int8_linear.__code__))
    assert 0 < variants <= 4 * len(dtypes) <= 8  # dtypes x {1, 2} threads x {1, more} rows


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="two CPU workers need two torch threads")
def test_loading_compiles_every_variant_the_workers_run(make_model):
    """Nothing compiles once the model is loaded: not a lone request (its last layer runs one row),
    not a batch, not a one-thread batch on a second worker. Compiling while another worker runs a
    forward is unsafe (quant.compile_variants), so loading compiles them all up front."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # forget what earlier tests compiled: this load must compile its own variants
    llm = LLM(str(make_model("bert", "seq", num_labels=3)), device="cpu", quantization="int8", cpu_workers=2)
    graphs = counters["stats"]["unique_graphs"]
    llm.classify(PROMPTS[0], use_tqdm=False)  # a lone request: every core
    llm.classify(PROMPTS * 8, use_tqdm=False)  # batches side by side: one thread each
    llm.engine.core.warmup()  # the server's warm-up: the largest batch, then a lone prompt
    assert counters["stats"]["unique_graphs"] == graphs
