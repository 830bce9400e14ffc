"""Opt-in int8 linear layers for the CPU (``quantization="int8"``).

Weights are int8 per output channel; activations are quantized to int8 per token, on the fly, so
an outlier in one token does not flatten the others (a per-tensor activation scale, as torch's
``quantize_dynamic`` and ONNX Runtime's dynamic int8 use, measured only 0.93 cosine to float32 on
all-MiniLM-L6-v2). The product runs as one int8 GEMM (``torch._int_mm``: VNNI on recent CPUs) and
is rescaled in float32:

    y = (round(x / s_x) @ round(W / s_w)^T) * s_x * s_w + b        s_x: [tokens, 1], s_w: [1, out]

Only the feed-forward layers of each block are quantized (models list them in ``quantizable``):
they carry two thirds of the FLOPs, and the attention projections, quantized too, pushed the
cosine on all-MiniLM-L6-v2 below 0.99.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from winnow.errors import ConfigError
from winnow.layers.linear import replace_linears

_EPS = 1e-12


class Int8Linear(nn.Module):
    """Drop-in for an ``nn.Linear`` (inference only)."""

    qweight: torch.Tensor  # [out, in] int8
    weight_scale: torch.Tensor  # [out] float32
    bias: torch.Tensor | None  # [out] float32

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # [out, in]
        scale = weight.abs().amax(dim=1).clamp_min(_EPS) / 127.0  # [out]
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).to(torch.int8))  # [out, in]
        self.register_buffer("weight_scale", scale)  # [out] float32
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()  # [tokens, in]
        x_scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(_EPS) / 127.0  # [tokens, 1]
        q = (rows / x_scale).round_().to(torch.int8)  # |rows / x_scale| <= 127 by construction
        out = torch._int_mm(q, self.qweight.t()).float()  # [tokens, out] exact int32 sums
        out.mul_(x_scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)


def quantize_int8(model: nn.Module, patterns: tuple[str, ...], device: torch.device) -> int:
    """Replace the ``nn.Linear`` modules whose names match ``patterns`` (regexes) with ``Int8Linear``."""
    if device.type != "cpu":
        raise ConfigError("quantization='int8' is a CPU path; on a GPU use dtype='bfloat16' (the default there).")
    if not patterns:
        raise ConfigError(f"quantization='int8' is not available for {type(model).__name__}.")
    compiled = [re.compile(p) for p in patterns]
    return replace_linears(model, lambda name, _: any(p.fullmatch(name) for p in compiled), Int8Linear)
