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
from winnow.layers.quant import (
    U7_COMPILED_MIN_ROWS,
    Int8Linear,
    Int8LinearU7,
    U7Ops,
    compiled_int8_linear,
    compiled_u7_ops,
    int8_linear,
    int8_scheme,
    quantize_int8,
    quantize_rows_u7,
    rescale_u7,
)

PROB_ATOL = 0.02  # the gate for random classifiers
SCHEMES = ["s8s8", "u7s8"]  # both run on any x86 CPU; int8_scheme() picks the fast one


@pytest.fixture
def scheme(request, monkeypatch):
    """Run the engine's int8 layers by ``request.param`` whatever this CPU would pick."""
    import winnow.runner.model_runner

    monkeypatch.setattr(winnow.runner.model_runner, "int8_scheme", lambda: request.param)
    return request.param


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


def _u7_reference(layer: Int8LinearU7, x: torch.Tensor) -> torch.Tensor:
    """What the u7s8 layer must compute, in float64: the dequantized codes times the dequantized weights."""
    codes, zero_point, scale = quantize_rows_u7(x)
    rows = (codes.double() - zero_point.double()) * scale.double()
    weight = layer.qweight.double() * layer.weight_scale.double()[:, None]
    return rows @ weight.t() + layer.bias.double()


@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_u7s8_layer_computes_its_codes_exactly(tokens):
    torch.manual_seed(tokens)
    linear = nn.Linear(96, 40)
    x = torch.randn(tokens, 96) * 3
    x[:, :48] = x[:, :48].abs()  # one-signed and two-signed halves
    layer = Int8LinearU7(linear)
    got = layer(x)
    torch.testing.assert_close(got.double(), _u7_reference(layer, x), atol=1e-4, rtol=1e-5)
    assert (got - linear(x)).norm() / linear(x).norm() < 0.02


def test_u7s8_sums_do_not_saturate_at_the_largest_codes():
    """The AVX2 u8 x s8 kernel adds pairs of products in saturating int16: every code at 127 against
    weights of +-127 is the worst pair (32,258). Codes up to 255 (full u8) would clip here."""
    linear = nn.Linear(64, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([1.0, -1.0, 0.5, -0.5]).repeat_interleave(64).view(4, 64))
        linear.weight[2:, 32:] = 1.0  # rows mixing small and full-scale weights: scale from the max
    x = torch.ones(3, 64)
    x[1] = -1.0  # all at the zero point's far side
    x[2, ::2] = 0.0
    layer = Int8LinearU7(linear)
    torch.testing.assert_close(layer(x).double(), _u7_reference(layer, x), atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(layer(x), linear(x), atol=0.05, rtol=0.01)


def test_u7s8_codes_cover_0_to_127_and_keep_zero():
    x = torch.tensor([[-2.0, 0.0, 1.0, 6.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    codes, zero_point, scale = quantize_rows_u7(x)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 127
    assert codes[0].tolist()[0] == 0 and codes[0].tolist()[3] == 127
    assert torch.equal(codes[:, 1][:2], zero_point[:2, 0].to(torch.uint8))  # zero is a code
    torch.testing.assert_close((codes.float() - zero_point) * scale, x, atol=float(scale.max()) / 2, rtol=0)


def test_the_scheme_for_this_cpu_is_the_fast_one():
    """s8s8 (torch._int_mm) only where int8 is multiplied natively; AVX2 CPUs take u7s8."""
    native = torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()
    assert int8_scheme() == ("s8s8" if native else "u7s8")


@pytest.mark.parametrize("tokens", [1, 2, 37])
def test_compiled_u7_ops_equal_the_eager_ones(tokens):
    ops = compiled_u7_ops()
    assert ops.quantize is not quantize_rows_u7, "Inductor could not compile here (the warning in the log says why)"
    torch.manual_seed(tokens)
    x = torch.randn(tokens, 96) * 3
    with torch.inference_mode():
        (codes, zero_point, scale), (want_codes, want_zero_point, want_scale) = ops.quantize(x), quantize_rows_u7(x)
        # Inductor may divide by a reciprocal (torch 2.6): the scale's last bit, and a code on a tie.
        torch.testing.assert_close(scale, want_scale)
        torch.testing.assert_close(zero_point, want_zero_point)
        assert codes.dtype == torch.uint8 and (codes.int() - want_codes.int()).abs().max() <= 1
        sums, colsum, bias = torch.randn(tokens, 40), torch.randn(40), torch.randn(40)
        zero_point, scale = torch.rand(tokens, 1) * 127, torch.rand(tokens, 1)
        torch.testing.assert_close(
            ops.rescale(sums, zero_point, scale, colsum, bias), rescale_u7(sums, zero_point, scale, colsum, bias)
        )


def test_u7s8_runs_its_compiled_parts_on_enough_rows_only():
    """A few rows (a short lone request) run the eager quantize and rescale, which cost less there
    than entering compiled code; a batch of U7_COMPILED_MIN_ROWS rows or more runs the layer's own."""
    calls: list[str] = []

    def recorded(name, fn):
        def run(*args):
            calls.append(name)
            return fn(*args)

        return run

    ops = U7Ops(recorded("quantize", quantize_rows_u7), recorded("rescale", rescale_u7))
    layer = Int8LinearU7(nn.Linear(96, 40), ops)
    torch.manual_seed(0)
    batch = torch.randn(U7_COMPILED_MIN_ROWS, 96)
    few = layer(batch[:-1])
    assert calls == []
    many = layer(batch)
    assert calls == ["quantize", "rescale"]
    torch.testing.assert_close(many[:-1], few, atol=0, rtol=0)  # per-token scales: a row's result is its own


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
    ops = compiled_u7_ops.__wrapped__()
    assert (ops.quantize, ops.rescale) == (quantize_rows_u7, rescale_u7)
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


def _int8_llm(path: Path, dtype: str, scheme: str) -> LLM:
    llm = LLM(str(path), device="cpu", quantization="int8", dtype=dtype)
    layers = [m for m in llm.engine.core.runner.model.modules() if isinstance(m, Int8Linear)]
    assert layers, "no layer was converted"
    assert all(isinstance(m, Int8LinearU7) == (scheme == "u7s8") for m in layers)
    return llm


@pytest.mark.parametrize("scheme", SCHEMES, indirect=True)
@pytest.mark.parametrize("dtype", _ACTIVATIONS)
@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "distilbert"])
def test_bert_family_probabilities_within_gate(family, dtype, scheme, make_model, make_llm):
    path = make_model(family, "seq", num_labels=3)
    _assert_probs_close(_int8_llm(path, dtype, scheme), make_llm(path), PROMPTS)


def _build(family: str, root: Path) -> Path:
    if family == "deberta-v2":
        return build_deberta(root, "seq", "v3")
    if family == "modernbert":
        # 1/sqrt(hidden) instead of the usual 0.2: at 0.2 the gated MLP squares already extreme
        # activations through four layers (int8 then moves probabilities by ~0.04); a real-shape
        # ModernBERT-base at transformers' own init moves them by 0.0015.
        return build_modernbert(root / family, "seq", weight_std=0.125)
    return build_decoder(root / family, family, "seq")


@pytest.mark.parametrize("scheme", SCHEMES, indirect=True)
@pytest.mark.parametrize("dtype", _ACTIVATIONS)
@pytest.mark.parametrize("family", ["deberta-v2", "modernbert", "qwen3"])
def test_other_families_probabilities_within_gate(family, dtype, scheme, tmp_path):
    path = _build(family, tmp_path)
    _assert_probs_close(_int8_llm(path, dtype, scheme), LLM(str(path), device="cpu"), PROMPTS)


@pytest.mark.parametrize("scheme", ["u7s8"], indirect=True)
@pytest.mark.parametrize("family", ["modernbert", "qwen3"])
def test_gated_mlps_keep_their_down_projection_in_float_under_7bit_codes(family, scheme, tmp_path):
    """The down projection reads gate * up, heavy-tailed on both signs: 7-bit codes moved these
    classifiers' probabilities by 0.023-0.026 with it quantized, 0.008-0.018 without."""
    model = _int8_llm(_build(family, tmp_path), "float32", scheme).engine.core.runner.model
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert names == ({"Wi"} if family == "modernbert" else {"gate_up_proj"})


@pytest.mark.parametrize("scheme", SCHEMES, indirect=True)
@pytest.mark.parametrize("dtype", _ACTIVATIONS)
def test_batched_equals_single_prompts_under_int8(dtype, scheme, make_model):
    """Per-token activation scales: a prompt's result does not depend on its batch neighbours."""
    llm = _int8_llm(make_model("bert", "seq", num_labels=3), dtype, scheme)
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
    kernels = [quantize_rows_u7, rescale_u7] if int8_scheme() == "u7s8" else [int8_linear]
    for kernel in kernels:
        variants = len(_debug_get_cache_entry_list(kernel.__code__))
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
