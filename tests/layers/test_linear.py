"""oneDNN pre-packed CPU linears: the same float32 GEMM as ``nn.Linear``, applied to every native model,
and activations fused into that GEMM (``linear_act``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from winnow.layers.activation import _ACTIVATIONS, get_activation
from winnow.layers.linear import PackedLinear, cpu_has_fast, linear_act, onednn_available, pack_linears

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (37, 48), (3, 5, 48)])
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
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16), nn.ReLU())
    assert pack_linears(model, (torch.float32,)) == 1
    assert isinstance(model[0], PackedLinear)
    assert type(model[1]) is nn.Linear


def test_native_models_run_packed_on_cpu(make_model, make_llm):
    model = make_llm(make_model("bert", "seq")).engine.core.runner.model
    kinds = {type(m) for m in model.modules()}
    assert PackedLinear in kinds
    assert nn.Linear not in kinds  # every linear, the head included


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
