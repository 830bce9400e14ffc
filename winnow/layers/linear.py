"""CPU linears with weights pre-packed for oneDNN (the default on CPU, float32 and bfloat16).

``nn.Linear`` on a CPU calls an sgemm that re-lays the weight out on every call; oneDNN can keep
the weight in its blocked layout once, at load time. Measured on a 2-core AVX512 CPU: 1.2-1.7x
per GEMM at 20-64 tokens (single short requests), ~1.1x at 512 tokens. The arithmetic is the same
float32 (or bfloat16) GEMM: results differ from ``nn.Linear`` only in summation order (~1e-7).
This is the op that ``torch.compile``'s CPU freezing pass emits for linears; it is used here
directly, without compiling, so prompts of any length run without recompilation.

Memory: the packed weights are fresh anonymous memory (bert-base: ~250 MiB more than the plain
model). The originals were views of the memory-mapped checkpoint; their pages stay mapped while
other weights of the same file live, but they are clean file pages the kernel reclaims as needed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from winnow.layers.activation import Activation

# oneDNN's GEMM with a binary post-op (torch >= 2.1 builds with oneDNN).
_HAS_BINARY = hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn._linear_pointwise, "binary")

# Whether torch.jit.trace is recording this call (runner/lone_trace.py): layers then take the path
# a graph can hold. torch.jit's own is public but not re-exported, hence the alias.
is_tracing: Callable[[], bool] = torch.jit.is_tracing  # type: ignore[attr-defined]

# The batch size oneDNN picks the packed layout for; any batch size works with it.
_PACK_HINT_TOKENS = 64

# oneDNN costs ~13-20 us per call whatever the size. Below this many output features (a classifier's
# num_labels) the plain GEMM is faster at every row count up to 256; at 64-128 the two are even up to
# 64 rows and packing wins above. Measured, 2-core AVX512, float32: 384 -> 2 at 1 row 2.6 against
# 15.4 us, 384 -> 32 at 64 rows 18 against 23-35 us, 768 -> 64 at 256 rows 139-165 against 128 us.
_MIN_PACKED_OUT_FEATURES = 64


def cpu_has_fast(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware (AVX512-BF16 / AMX for half types)."""
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if dtype == torch.float16:
        return torch.cpu._is_amx_fp16_supported()
    return dtype == torch.float32


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_has_fp16_weights() -> bool:
    """Whether float16-stored weights multiply fast here: FBGEMM's AVX2 kernel (``Fp16WeightLinear``)."""
    return (
        "fbgemm" in torch.backends.quantized.supported_engines
        and torch.cpu._is_avx2_supported()
        and hasattr(torch.ops.quantized, "linear_dynamic_fp16")
    )


class PackedLinear(nn.Module):
    """Drop-in for an ``nn.Linear`` on the CPU (inference only). ``dtype``: the GEMM's dtype when it
    differs from the weight's (inputs are cast to it and outputs cast back); None: the weight's.
    ``plain_one_row``: also keep the plain weight and multiply a single row with it (a head's
    linear, which sees one row per sequence: a lone request's is one row). oneDNN's fixed cost per
    call is larger there than a plain GEMV: measured on a 2-core AVX2 EPYC, 2 threads, 384 -> 384
    82.6 against 28.7 us and 768 -> 768 108.7 against 78.9 us; from 2 rows the two are even (384)
    or oneDNN wins (768). Heads are small, so the second copy costs little."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None = None, *, plain_one_row: bool = False) -> None:
        super().__init__()
        self.dtype = dtype or linear.weight.dtype
        weight = linear.weight.detach().to(self.dtype)
        # An opaque oneDNN tensor: [out, in] logically. A non-persistent buffer: state_dict never
        # holds it, and a traced graph (runner/lone_trace.py) reads it as the module's attribute
        # (the tracer cannot make a constant of an opaque tensor).
        self.weight: torch.Tensor
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_HINT_TOKENS)
        self.register_buffer("weight", packed, persistent=False)
        self.plain_weight = weight if plain_one_row else None  # [out, in]
        self.bias = linear.bias.detach().to(self.dtype) if linear.bias is not None else None  # [out]
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor, post_op: tuple[str, str] = ("none", "")) -> torch.Tensor:
        """[..., in] -> [..., out]; ``post_op``: a oneDNN elementwise (name, algorithm) applied to
        the GEMM's output before it is written (see ``linear_act``)."""
        name, algorithm = post_op
        if self.plain_weight is not None and name == "none" and x.dtype == self.dtype and x.numel() == x.shape[-1]:
            return F.linear(x, self.plain_weight, self.bias)  # one row
        pointwise = traceable(_linear_pointwise)
        if x.dtype == self.dtype:
            return pointwise(x, self.weight, self.bias, name, algorithm)
        return pointwise(x.to(self.dtype), self.weight, self.bias, name, algorithm).to(x.dtype)


def _linear_pointwise(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, name: str, algorithm: str
) -> torch.Tensor:
    """oneDNN's GEMM on a packed weight, with an elementwise post-op (``name``, ``algorithm``)."""
    scalars: list[int | float | complex | None] = []
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, name, scalars, algorithm)


def traceable(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn``, or while a graph is being traced (runner/lone_trace.py) ``fn`` compiled by TorchScript
    (once). For oneDNN ops that take an empty list of optional scalars: the tracer cannot record
    that argument, a TorchScript function can (one call more, so only while tracing)."""
    return _scripted(fn) if is_tracing() else fn


@functools.cache
def _scripted(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return torch.jit.script(fn)


class Fp16WeightLinear(nn.Module):
    """Drop-in for a float32 ``nn.Linear`` on an x86 CPU (inference only): the weight is stored in
    float16, packed for FBGEMM, and widened to float32 inside the GEMM (F16C), which accumulates in
    float32. What ``dtype="auto"`` runs on CPUs without bf16 instructions. Measured on a 2-core AVX2
    EPYC against oneDNN's packed float32 GEMM: the 48 GEMMs of one bert-base request at 20 tokens
    24.5 against 33 ms (half the weight bytes, and a better small-row kernel), [2048, 768] -> 3072
    55 against 66 ms. The only rounding is the weight's to float16 (relative 2^-11, against bfloat16's
    2^-8): bert-base probabilities moved by 6.5e-5."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        bias = linear.bias.detach().float() if linear.bias is not None else None
        # An opaque FBGEMM object; a plain attribute, like PackedLinear.weight.
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] float32 -> [..., out] float32
        # torch looks for a ``__torch_function__`` override on every argument of an op. On the packed
        # weight, a TorchScript object, that lookup fails by throwing and catching a C++ exception:
        # ~16 us per call, more than the GEMM itself on one row. Nothing here overrides torch
        # functions, so the lookup is switched off for the call. Measured on a 2-core AVX2 EPYC, one
        # 22-token request's forward, interleaved: MiniLM 6.25 -> 5.41 ms, bert-base 39.8 -> 37.0 ms.
        with torch._C.DisableTorchFunction():
            return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


def linear_act(linear: nn.Module, act: Activation, x: torch.Tensor) -> torch.Tensor:
    """``act(linear(x))``, in one oneDNN call when ``linear`` is packed and oneDNN has ``act``: the
    activation runs on the GEMM's output tile while it is still in cache, instead of as a second
    pass over the whole [tokens, intermediate] tensor. Measured on a 2-core AVX512 CPU, MiniLM's
    384 -> 1536 feed-forward + GELU in bfloat16: 20 rows 93-133 -> 84-101 us, 2048 rows ~7.7 ->
    ~7.1 ms; end to end ~2 % off a short request, throughput within noise. The same function to
    ~1e-6 in float32; in bfloat16 closer to the float32 result, as the GEMM's output is not
    rounded before the activation."""
    if isinstance(linear, PackedLinear) and act.onednn is not None:
        return linear(x, act.onednn)
    return act(linear(x))


def linear_add(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``linear(x) + residual`` (a post-norm block's residual connection), in one oneDNN call when
    ``linear`` is packed and everything is in its dtype: the sum is formed on the GEMM's output tile,
    saving a pass over [tokens, out]. Measured on a 2-core AVX512 CPU in bfloat16, 256 rows:
    384 -> 384 221-231 -> 206-221 us, 1536 -> 384 784-807 -> 695-763 us; at 20 rows within noise.
    In bfloat16 closer to the float32 result, as the GEMM's output is not rounded before the sum."""
    if isinstance(linear, PackedLinear) and x.dtype == residual.dtype == linear.dtype and _HAS_BINARY:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, linear.weight, linear.bias, "add")
    return linear(x) + residual


def replace_linears(
    model: nn.Module, select: Callable[[str, nn.Linear], bool], build: Callable[[nn.Linear], nn.Module]
) -> int:
    """Swap each ``nn.Linear`` (exactly that type) that ``select(name, module)`` picks for
    ``build(module)``; returns how many were swapped."""
    targets = [name for name, module in model.named_modules() if type(module) is nn.Linear and select(name, module)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build(getattr(parent, child)))
    return len(targets)


def pack_linears(
    model: nn.Module, dtypes: tuple[torch.dtype, ...], *, fp16_weights: bool = False, keep: tuple[str, ...] = ()
) -> int:
    """Pre-pack every CPU ``nn.Linear`` whose weight dtype is in ``dtypes``, except narrow ones
    (``_MIN_PACKED_OUT_FEATURES``); returns how many. ``keep``: the name prefixes of the head, which
    runs in the head dtype: its linears keep their plain weight for one row (``PackedLinear``) and
    never become ``Fp16WeightLinear``s, which ``fp16_weights`` makes of the other float32 linears."""

    def select(_: str, m: nn.Linear) -> bool:
        return m.weight.device.type == "cpu" and m.weight.dtype in dtypes and m.out_features >= _MIN_PACKED_OUT_FEATURES

    count = 0
    if fp16_weights and cpu_has_fp16_weights():

        def select_fp16(name: str, m: nn.Linear) -> bool:
            return select(name, m) and m.weight.dtype == torch.float32 and not name.startswith(keep)

        count = replace_linears(model, select_fp16, Fp16WeightLinear)
    if onednn_available():
        head = functools.partial(PackedLinear, plain_one_row=True)
        count += replace_linears(model, lambda name, m: select(name, m) and name.startswith(keep), head)
        count += replace_linears(model, select, PackedLinear)
    return count
