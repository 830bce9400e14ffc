"""oneDNN pre-packed CPU linears: the same float32 GEMM as ``nn.Linear``, applied to every native model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from winnow.layers.linear import PackedLinear, cpu_has_fast, onednn_available, pack_linears

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
