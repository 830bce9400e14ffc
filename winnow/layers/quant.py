"""Opt-in int8 linear layers for the CPU (``quantization="int8"``).

Weights are int8 per output channel; activations are quantized to int8 per token, on the fly, so
an outlier in one token does not flatten the others (a per-tensor activation scale, as torch's
``quantize_dynamic`` and ONNX Runtime's dynamic int8 use, measured only 0.93 cosine to float32 on
all-MiniLM-L6-v2). The product runs as one int8 GEMM (``torch._int_mm``: VNNI on recent CPUs) and
is rescaled in float32:

    y = (round(x / s_x) @ round(W / s_w)^T) * s_x * s_w + b        s_x: [tokens, 1], s_w: [1, out]

The elementwise work around the GEMM (quantize the rows; rescale the int32 sums) is compiled by
Inductor into one C++ loop on each side. Run as separate eager ops it costs twice the GEMM itself
(measured, [4096, 384] -> 1536 on 2 cores: 26.6 ms eager, 9.3 ms compiled, 6.0 ms of it the GEMM).
If compiling fails (no C++ compiler, an unsupported platform), the eager ops run instead, with the
same numbers.

Only the feed-forward layers of each block are quantized (models list them in ``quantizable``):
they carry two thirds of the FLOPs, and the attention projections, quantized too, pushed the
cosine on all-MiniLM-L6-v2 below 0.99. The activations between the int8 GEMMs are in the model's
dtype: with ``dtype="auto"`` on a CPU with bf16 instructions that is bfloat16, and the other
linears are packed bf16 GEMMs like the default's; on real all-MiniLM-L6-v2 weights the minimum
cosine is 0.9918-0.9956 (float32 activations: 0.9930-0.9963), and the suite's three BERT shapes
run 1.15-1.21x faster than with float32 activations (the float32 LayerNorms, GELUs, residual adds
and casts around each GEMM were a quarter of the time). With ``dtype="float32"`` on such a CPU the
runner still has the other linears (attention projections; not the head) run their GEMMs in
bfloat16 (``others``): they were half the int8 model's time in float32 (bert-base, 1,286 tokens:
859 -> 588 ms per forward).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable

import torch
from torch import nn

from winnow.errors import ConfigError
from winnow.layers.linear import PackedLinear, onednn_available, replace_linears

logger = logging.getLogger(__name__)

_EPS = 1e-12


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """[tokens, in] -> [tokens, out] in ``x``'s dtype; ``qweight``: [out, in] int8, ``weight_scale``: [out]."""
    rows = x.float()
    x_scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(_EPS) / 127.0  # [tokens, 1]
    q = (rows / x_scale).round().to(torch.int8)  # |rows / x_scale| <= 127 by construction
    out = torch._int_mm(q, qweight.t()).float() * x_scale * weight_scale  # exact int32 sums, rescaled
    if bias is not None:
        out = out + bias
    return out.to(x.dtype)


Int8LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@functools.cache
def compiled_int8_linear() -> Int8LinearFn:
    """``int8_linear`` compiled for any number of tokens and checked against the eager ops on a
    sample; the eager function if either fails. Compiled once per process (measured on 2 cores:
    ~17 s the first time, ~6 s once Inductor's on-disk cache holds it)."""
    compiled = torch.compile(int8_linear, dynamic=True)
    try:
        _check_same(compiled)
    except Exception as exc:  # a missing or broken compiler surfaces as many exception types
        logger.warning("int8: compiling the quantize/rescale ops failed (%s); running them eagerly.", exc)
        return int8_linear
    return compiled


def _sample(rows: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs for ``int8_linear`` as a model passes them (dynamo guards on the difference): the
    activations [rows, 24] in ``dtype`` an inference tensor, the layer's buffers (16 output
    channels) ordinary ones."""
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(False):
        weight_scale, bias = torch.rand(16, generator=gen), torch.randn(16, generator=gen)
        qweight = torch.randint(-127, 128, (16, 24), dtype=torch.int8, generator=gen)
    with torch.inference_mode():
        x = torch.randn(rows, 24, generator=gen).to(dtype)
    return x, qweight, weight_scale, bias


def _check_same(fn: Int8LinearFn) -> None:
    """Run ``fn`` as the runner will (inference mode, float32) and compare with the eager ops."""
    args = _sample(5, torch.float32)
    with torch.inference_mode():  # as the runner calls it: compile that variant
        torch.testing.assert_close(fn(*args), int8_linear(*args))


def compile_variants(dtype: torch.dtype, thread_counts: tuple[int, ...]) -> None:
    """Compile, now, every variant of the int8 kernel that a model with ``dtype`` activations runs
    on these torch thread counts: dynamo compiles one per activation dtype, thread count and
    one-row or longer input (``test_the_compiled_kernel_has_few_variants``). Compiling while another
    thread runs a model is unsafe: the tracer patches ``nn.Module.__call__`` for the whole process,
    so the other thread's layers enter it and fail (seen with torch 2.6: two CPU workers, the second
    worker's first one-thread batch compiling beside the first's forward). Here nothing else runs yet."""
    fn = compiled_int8_linear()
    if fn is int8_linear:
        return
    threads_before = torch.get_num_threads()
    try:
        for threads in sorted(set(thread_counts)):
            torch.set_num_threads(threads)
            for rows in (1, 2):
                args = _sample(rows, dtype)
                with torch.inference_mode():
                    fn(*args)
    finally:
        torch.set_num_threads(threads_before)


class Int8Linear(nn.Module):
    """Drop-in for an ``nn.Linear`` (inference only)."""

    qweight: torch.Tensor  # [out, in] int8
    weight_scale: torch.Tensor  # [out] float32
    bias: torch.Tensor  # [out] float32

    def __init__(self, linear: nn.Linear, fn: Int8LinearFn = int8_linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # [out, in]
        scale = weight.abs().amax(dim=1).clamp_min(_EPS) / 127.0  # [out]
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).to(torch.int8))  # [out, in]
        self.register_buffer("weight_scale", scale)  # [out] float32
        # Always a bias (zeros if the layer has none): dynamo compiles the kernel once per variant of
        # its inputs and global state, up to 8 per process, then runs the eager ops. The variants
        # are the activations' dtype x torch threads (1 or 2 with two CPU workers) x one-row or
        # longer batches; a None bias doubled them, and one benchmark process with Qwen3 (no biases)
        # beside BERT shapes, in both dtypes, ran out of compilations.
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(linear.out_features)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        out = self.fn(x.reshape(-1, self.in_features), self.qweight, self.weight_scale, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_int8(
    model: nn.Module,
    patterns: tuple[str, ...],
    device: torch.device,
    *,
    others: torch.dtype | None = None,
    keep: tuple[str, ...] = (),
) -> int:
    """Replace the ``nn.Linear`` modules whose names match ``patterns`` (regexes) with ``Int8Linear``;
    returns how many. ``others``: run the remaining linears' GEMMs in this dtype (``PackedLinear``),
    except those under a name prefix in ``keep`` (the head)."""
    if device.type != "cpu":
        raise ConfigError("quantization='int8' is a CPU path; on a GPU use dtype='bfloat16' (the default there).")
    if not patterns:
        raise ConfigError(f"quantization='int8' is not available for {type(model).__name__}.")
    regexes = [re.compile(p) for p in patterns]
    fn = compiled_int8_linear()
    count = replace_linears(model, lambda name, _: any(r.fullmatch(name) for r in regexes), lambda m: Int8Linear(m, fn))
    if others is not None and onednn_available():
        replace_linears(model, lambda name, _: not name.startswith(keep), lambda m: PackedLinear(m, others))
    return count
