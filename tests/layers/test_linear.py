"""oneDNN pre-packed CPU linears: the same float32 GEMM as ``nn.Linear``, applied to every native model,
and activations fused into that GEMM (``linear_act``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from winnow import LLM
from winnow.layers.activation import _ACTIVATIONS, get_activation
from winnow.layers.linear import (
    Fp16WeightLinear,
    PackedLinear,
    cpu_has_fast,
    cpu_has_fp16_weights,
    linear_act,
    linear_add,
    onednn_available,
    pack_linears,
)

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


# One row (a lone short request), many rows, and leading dims that must be kept; 48 inputs each.
INPUT_SHAPES = [(1, 48), (37, 48), (3, 5, 48)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", INPUT_SHAPES)
def test_packed_linear_equals_nn_linear(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    torch.testing.assert_close(PackedLinear(linear)(x), linear(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not cpu_has_fast(torch.bfloat16), reason="this CPU has no bf16 matrix instructions")
def test_packed_linear_in_another_dtype_casts_in_and_out():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(7, 64)
    layer = PackedLinear(linear, torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: inputs and weights round by <= 2^-9 each, over 64 products.
    rel = (got - linear(x)).norm() / linear(x).norm()
    assert 1e-6 < rel < 1e-2


def test_only_linears_of_the_given_dtypes_are_packed():
    model = nn.Sequential(nn.Linear(8, 64), nn.Linear(8, 64).to(torch.bfloat16), nn.ReLU())
    assert pack_linears(model, (torch.float32,)) == 1
    assert isinstance(model[0], PackedLinear)
    assert type(model[1]) is nn.Linear


def test_narrow_linears_stay_plain():
    # A classifier's few outputs: oneDNN's per-call cost outweighs its faster GEMM.
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 63), nn.Linear(64, 2))
    assert pack_linears(model, (torch.float32,)) == 1
    assert [type(m) for m in model] == [PackedLinear, nn.Linear, nn.Linear]


@pytest.mark.parametrize("shape", [*INPUT_SHAPES, (48,)])
def test_a_head_linear_multiplies_one_row_with_its_plain_weight(shape):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80)
    x = torch.randn(*shape)
    got = PackedLinear(linear, plain_one_row=True)(x)
    torch.testing.assert_close(got, linear(x), atol=1e-5, rtol=1e-5)
    # Which GEMM ran: one row, the plain one's bits; more rows, oneDNN's packed one's.
    want = F.linear(x, linear.weight, linear.bias) if x.numel() == 48 else PackedLinear(linear)(x)
    assert torch.equal(got, want)


def test_only_the_heads_linears_keep_a_plain_weight():
    model = nn.Module()
    model.encoder, model.pooler = nn.Linear(8, 64), nn.Linear(64, 64)
    assert pack_linears(model, (torch.float32,), keep=("pooler",)) == 2
    assert isinstance(model.encoder, PackedLinear) and model.encoder.plain_weight is None
    assert isinstance(model.pooler, PackedLinear) and model.pooler.plain_weight is not None


def test_native_models_run_packed_on_cpu(make_model, make_llm):
    model = make_llm(make_model("bert", "seq")).engine.core.runner.model
    layer = model.bert.encoder.layer[0]
    # The tiny model's fused QKV (96 outputs) and feed-forward (64) are packed, its 2-label classifier not.
    assert isinstance(layer.attention.self.qkv_proj, PackedLinear)
    assert isinstance(layer.intermediate.dense, PackedLinear)
    assert type(model.classifier) is nn.Linear


# -- activations fused into the GEMM (linear_act) ---------------------------------------------------

FUSABLE = sorted(name for name, act in _ACTIVATIONS.items() if act.onednn is not None)


def test_every_common_activation_has_a_fused_form():
    assert {"gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "tanh"} <= set(FUSABLE)


@pytest.mark.parametrize("name", FUSABLE)
def test_fused_activation_equals_activation_after_linear(name):
    """Inputs of a few units, so every activation's curved part (and the tanh-GELU's difference
    from the exact one) is exercised."""
    torch.manual_seed(0)
    linear = nn.Linear(48, 96)
    x = 3 * torch.randn(37, 48)
    act = get_activation(name)
    expected = act(linear(x))
    got = linear_act(PackedLinear(linear), act, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_fused_gelu_tells_the_exact_form_from_the_tanh_one():
    torch.manual_seed(0)
    linear = nn.Linear(48, 96)
    x = 3 * torch.randn(37, 48)
    exact = linear_act(PackedLinear(linear), get_activation("gelu"), x)
    tanh = linear_act(PackedLinear(linear), get_activation("gelu_new"), x)
    assert (exact - tanh).abs().max() > 1e-4  # the two forms differ by up to ~5e-4 in [-3, 3]
    torch.testing.assert_close(exact, F.gelu(linear(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not cpu_has_fast(torch.bfloat16), reason="this CPU has no bf16 matrix instructions")
def test_fused_activation_in_bfloat16_stays_near_float32():
    torch.manual_seed(0)
    linear = nn.Linear(64, 128)
    x = torch.randn(20, 64)
    reference = F.gelu(linear(x))
    fused = linear_act(PackedLinear(linear.to(torch.bfloat16)), get_activation("gelu"), x.to(torch.bfloat16))
    assert fused.dtype == torch.bfloat16
    rel = (fused.float() - reference).norm() / reference.norm()
    assert rel < 1e-2


def test_unpacked_linear_or_unfusable_activation_runs_unfused():
    torch.manual_seed(0)
    linear = nn.Linear(16, 24)
    x = torch.randn(5, 16)
    quick_gelu = get_activation("quick_gelu")
    assert quick_gelu.onednn is None
    torch.testing.assert_close(linear_act(PackedLinear(linear), quick_gelu, x), quick_gelu(linear(x)))
    assert torch.equal(linear_act(linear, get_activation("gelu"), x), F.gelu(linear(x)))


# -- residual add fused into the GEMM (linear_add) --------------------------------------------------


@pytest.mark.parametrize("rows", [1, 37])
def test_fused_residual_add_equals_add_after_linear(rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 64)
    x, residual = torch.randn(rows, 96), torch.randn(rows, 64)
    got = linear_add(PackedLinear(linear), x, residual)
    torch.testing.assert_close(got, linear(x) + residual, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not cpu_has_fast(torch.bfloat16), reason="this CPU has no bf16 matrix instructions")
def test_fused_residual_add_in_bfloat16_rounds_once():
    """The fused sum is rounded to bfloat16 once; the unfused one rounds the GEMM's output first, so
    it lands further from the exact sum of the same bfloat16 operands."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 128).to(torch.bfloat16)
    x, residual = torch.randn(64, 256, dtype=torch.bfloat16), torch.randn(64, 128, dtype=torch.bfloat16)
    exact = F.linear(x.float(), linear.weight.float(), linear.bias.float()) + residual.float()
    packed = PackedLinear(linear)
    fused = linear_add(packed, x, residual)
    unfused = packed(x) + residual
    assert fused.dtype == torch.bfloat16
    fused_err = (fused.float() - exact).norm() / exact.norm()
    unfused_err = (unfused.float() - exact).norm() / exact.norm()
    assert fused_err < 4e-3  # one rounding: ~2^-9 relative
    assert fused_err < 0.9 * unfused_err


def test_residual_add_falls_back_when_not_packed_or_dtypes_differ():
    torch.manual_seed(0)
    linear = nn.Linear(16, 64)
    x, residual = torch.randn(5, 16), torch.randn(5, 64)
    assert torch.equal(linear_add(linear, x, residual), linear(x) + residual)
    packed = PackedLinear(linear)
    got = linear_add(packed, x.double(), residual.double())  # a dtype the packed GEMM does not take
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, (linear(x) + residual).double(), atol=1e-5, rtol=1e-5)


# -- float16-stored weights (what dtype="auto" runs on x86 CPUs without bf16 instructions) --------

fp16_weights = pytest.mark.skipif(not cpu_has_fp16_weights(), reason="no FBGEMM float16 GEMM on this CPU")


@fp16_weights
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", INPUT_SHAPES)
def test_fp16_weight_linear_is_the_float32_gemm_of_the_rounded_weight(bias, shape):
    """The only rounding is the weight's: the same as nn.Linear over the float16-rounded weight."""
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    got = Fp16WeightLinear(linear)(x)
    assert got.dtype == torch.float32
    rounded = F.linear(x, linear.weight.half().float(), linear.bias)
    torch.testing.assert_close(got, rounded, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, linear(x)), "the weight must actually be rounded"
    torch.testing.assert_close(got, linear(x), atol=2e-3, rtol=2e-3)


@fp16_weights
def test_fp16_weight_linear_never_looks_up_attributes_of_its_packed_weight(monkeypatch):
    """Looking up a missing attribute of the packed weight (a TorchScript object) throws a C++
    exception, which torch's check for ``__torch_function__`` overrides did on every call."""
    lookups: list[str] = []
    real = torch._C.ScriptObject.__getattr__

    def spy(obj: object, name: str) -> object:
        lookups.append(name)
        return real(obj, name)

    layer = Fp16WeightLinear(nn.Linear(48, 80))
    monkeypatch.setattr(torch._C.ScriptObject, "__getattr__", spy)
    with torch.inference_mode():
        layer(torch.randn(3, 48))
    assert lookups == []
    with pytest.raises(AttributeError):  # the spy does see lookups
        layer.packed.no_such_attribute  # noqa: B018
    assert lookups == ["no_such_attribute"]


@fp16_weights
def test_fp16_weights_skip_the_head_and_narrow_linears():
    model = nn.Module()
    model.encoder, model.classifier, model.narrow = nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 2)
    assert pack_linears(model, (torch.float32,), fp16_weights=True, keep=("classifier",)) == 2
    assert isinstance(model.encoder, Fp16WeightLinear)
    assert isinstance(model.classifier, PackedLinear) if onednn_available() else type(model.classifier) is nn.Linear
    assert type(model.narrow) is nn.Linear


@fp16_weights
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_auto_float16_weights_match_transformers(family, make_model, hf_reference, monkeypatch):
    """dtype="auto" on an x86 CPU without bf16 instructions: probabilities within 1e-3 of
    transformers' float32 (bfloat16's tolerance is 2e-2), and not bit-equal to dtype="float32"."""
    import winnow.config
    from tests.conftest import REAL_AUTO_CPU_FP16_WEIGHTS
    from tests.tiny_models import PROMPTS

    monkeypatch.setattr(winnow.config, "auto_cpu_fp16_weights", REAL_AUTO_CPU_FP16_WEIGHTS)
    path = make_model(family, "seq", num_labels=3)
    llm = LLM(str(path), device="cpu")
    assert llm.model_config.fp16_weights and llm.model_config.dtype == torch.float32
    model, tokenizer = hf_reference(path, "seq")
    with torch.inference_mode():
        want = model(**tokenizer(PROMPTS, return_tensors="pt", padding=True)).logits.softmax(-1)
    got = torch.tensor([o.outputs.probs for o in llm.classify(PROMPTS, use_tqdm=False)])
    exact = torch.tensor([o.outputs.probs for o in LLM(str(path), device="cpu", dtype="float32").classify(PROMPTS)])
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    torch.testing.assert_close(exact, want, atol=1e-4, rtol=0)
    assert not torch.equal(got, exact)
