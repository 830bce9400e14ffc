"""Opt-in int8 linear layers for the CPU (``quantization="int8"``).

Weights are int8 per output channel; activations are quantized to int8 per token, on the fly, so
an outlier in one token does not flatten the others (a per-tensor activation scale, as torch's
``quantize_dynamic`` and ONNX Runtime's dynamic int8 use, measured only 0.93 cosine to float32 on
all-MiniLM-L6-v2). The GEMM's int32 sums are exact and rescaled in float32. Two schemes, by CPU:

* ``s8s8`` (CPUs with VNNI or AMX, which multiply int8 into int32 directly): signed activations,
  ``torch._int_mm``:

      y = (round(x / s_x) @ round(W / s_w)^T) * s_x * s_w + b        s_x: [tokens, 1], s_w: [1, out]

* ``u7s8`` (other x86 CPUs, AVX2): ``torch._int_mm`` falls back to ~2-3 GOP/s there (measured on a
  2-core AVX2 EPYC: 13-17x slower than float32). oneDNN's u8 x s8 GEMM is fast there, but its AVX2
  kernel adds pairs of u8 x s8 products in saturating int16 (``vpmaddubsw``): full-range u8 inputs
  overflow. Activations are therefore quantized per token to **7-bit unsigned** codes with a
  zero point (asymmetric: [min, max] of the row onto 0..127), so a pair is at most 2 x 127 x 127 =
  32,258 < 32,767 and every sum stays exact:

      y = ((u @ round(W / s_w)^T) - z * colsum) * s_w * s_x + b       u = round(x / s_x) + z in 0..127

  ``colsum[o] = sum_i round(W / s_w)[o, i]``. Seven asymmetric bits lose little against eight
  symmetric ones on rows that are mostly one-signed (after GELU); on real all-MiniLM-L6-v2 weights
  the minimum cosine to float32 was 0.9947 against 0.9962 (256 texts; the gate is 0.99), and 7-bit
  symmetric codes failed it (0.9886). On that CPU the GEMM is ~2x the float32 one
  ([2048, 384] -> 1536: 7.7 against 15.9 ms; quantizing 0.26 ms, rescaling 0.85 ms).

The elementwise work around the GEMM (quantize the rows; rescale the int32 sums) is compiled by
Inductor into one C++ loop on each side. Run as separate eager ops it costs twice the GEMM itself
(measured, s8s8, [4096, 384] -> 1536 on 2 cores: 26.6 ms eager, 9.3 ms compiled, 6.0 ms of it the
GEMM). For ``u7s8`` the GEMM runs eagerly between the two compiled parts: Inductor takes oneDNN's
packed int8 weights only as constants of a frozen graph; and inputs of fewer than
``U7_COMPILED_MIN_ROWS`` rows (a short lone request) run the eager parts, which cost less there
than entering compiled code.
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
from dataclasses import dataclass

import torch
from torch import nn

from winnow.errors import ConfigError
from winnow.layers.linear import PackedLinear, is_tracing, onednn_available, replace_linears, traceable

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

# The largest unsigned activation code of the u7s8 scheme (module docstring).
_U7_MAX = 127.0


def quantize_rows_u7(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[tokens, in] -> (codes [tokens, in] uint8 in 0..127, zero points [tokens, 1], scales [tokens, 1])
    with ``x ~ (codes - zero_point) * scale``; the range always holds 0, so a zero stays exact."""
    rows = x.float()
    low, high = rows.amin(dim=1, keepdim=True).clamp_max(0), rows.amax(dim=1, keepdim=True).clamp_min(0)
    scale = ((high - low) / _U7_MAX).clamp_min(_EPS)  # [tokens, 1]
    zero_point = (-low / scale).round()  # [tokens, 1], in 0..127
    codes = ((rows / scale).round() + zero_point).clamp(0, _U7_MAX).to(torch.uint8)
    return codes, zero_point, scale


def rescale_u7(
    sums: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor, colsum: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``sums``: [tokens, out] float32, the GEMM's exact ``codes @ qweight^T`` times the weight scales;
    ``colsum``: [out], ``sum(qweight, in) * weight_scale``. Returns y [tokens, out] float32."""
    return (sums - zero_point * colsum) * scale + bias


@dataclass(frozen=True)
class U7Ops:
    """The u7s8 scheme's elementwise parts (compiled, or the eager functions)."""

    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = quantize_rows_u7
    rescale: Callable[..., torch.Tensor] = rescale_u7


_EAGER_U7 = U7Ops()

# Inputs of fewer rows run the eager quantize and rescale even where they are compiled: entering a
# compiled function costs ~60-90 us of dynamo and AOT wrappers per call, more than the eager ops over
# a few rows. Measured on a 2-core AVX2 EPYC, [rows, 768] -> 3072: quantize compiled / eager 90 / 58 us
# at 1 row, 78 / 78 at 22, 173 / 209 at 256; rescale 57 / 10, 73 / 44, 249 / 277. One MiniLM-shape
# request forward, int8: 8.4 -> 6.6 ms at 8 tokens, 12.0 -> 10.1 ms at 22.
U7_COMPILED_MIN_ROWS = 64

# A lone request's traced graph (runner/lone_trace.py) holds the eager quantize and rescale at every
# length, so under int8 it serves prompts of up to this many tokens; longer ones run eagerly, with
# the compiled parts. Measured on a 2-core AVX2 EPYC, one request's forward, eager / traced, ms:
# MiniLM 8 tokens 5.55 / 3.78, 64: 12.7-13.7 / 9.6-10.3, 128: 21.7 / 18.4, 200: 28.8 / 33.5;
# bert-base 22: 33.5 / 29.5, 128: 138.6 / 129.2, 200: 190.4 / 186.9.
TRACED_INT8_MAX_TOKENS = 128


def _has_u8s8_gemm() -> bool:
    return hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qlinear_prepack")


def int8_scheme() -> str:
    """``s8s8`` where the CPU multiplies signed int8 natively (AVX512-VNNI, AMX) or oneDNN's u8 x s8
    GEMM is missing; ``u7s8`` elsewhere (module docstring)."""
    if torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported() or not _has_u8s8_gemm():
        return "s8s8"
    return "u7s8"


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


@functools.cache
def compiled_u7_ops() -> U7Ops:
    """``quantize_rows_u7`` and ``rescale_u7`` compiled for any number of tokens and checked against
    the eager functions on a sample; the eager ones if either fails."""
    compiled = U7Ops(torch.compile(quantize_rows_u7, dynamic=True), torch.compile(rescale_u7, dynamic=True))
    try:
        _check_same_u7(compiled)
    except Exception as exc:  # as in compiled_int8_linear
        logger.warning("int8: compiling the quantize/rescale ops failed (%s); running them eagerly.", exc)
        return U7Ops()
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


def _check_same_u7(ops: U7Ops) -> None:
    x = _sample(5, torch.float32)[0]
    with torch.inference_mode():
        for got, want in zip(ops.quantize(x), quantize_rows_u7(x), strict=True):
            # A code may flip on a rounding tie when Inductor divides by a reciprocal (torch 2.6).
            torch.testing.assert_close(got.float(), want.float(), atol=1, rtol=1e-5)
        sums, colsum = x @ x.t(), x[:, 0]  # any [5, 5] and [5]
        zero_point, scale = x[:, 1:2], x[:, 2:3]
        torch.testing.assert_close(
            ops.rescale(sums, zero_point, scale, colsum, colsum), rescale_u7(sums, zero_point, scale, colsum, colsum)
        )


def compile_variants(scheme: str, dtype: torch.dtype, thread_counts: tuple[int, ...]) -> None:
    """Compile, now, every variant of the ``scheme``'s int8 kernel that a model with ``dtype``
    activations runs on these torch thread counts: dynamo compiles one per activation dtype, thread count and
    (s8s8) one-row or longer input (``test_the_compiled_kernel_has_few_variants``); u7s8 layers compile
    nothing below ``U7_COMPILED_MIN_ROWS`` rows. Compiling while another
    thread runs a model is unsafe: the tracer patches ``nn.Module.__call__`` for the whole process,
    so the other thread's layers enter it and fail (seen with torch 2.6: two CPU workers, the second
    worker's first one-thread batch compiling beside the first's forward). Here nothing else runs yet."""
    threads_before = torch.get_num_threads()
    try:
        for threads in sorted(set(thread_counts)):
            torch.set_num_threads(threads)
            # u7s8 runs its compiled parts on U7_COMPILED_MIN_ROWS rows or more only: one variant.
            for rows in (U7_COMPILED_MIN_ROWS,) if scheme == "u7s8" else (1, 2):
                x, qweight, weight_scale, bias = _sample(rows, dtype)
                with torch.inference_mode():
                    if scheme == "u7s8":
                        ops = compiled_u7_ops()
                        _, zero_point, scale = ops.quantize(x)
                        sums = torch.zeros(rows, bias.numel())  # as the GEMM returns them
                        ops.rescale(sums, zero_point, scale, weight_scale, bias)
                    else:
                        compiled_int8_linear()(x, qweight, weight_scale, bias)
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
        fn = int8_linear if is_tracing() else self.fn  # a traced graph holds the eager ops, not compiled code
        out = fn(x.reshape(-1, self.in_features), self.qweight, self.weight_scale, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8LinearU7(Int8Linear):
    """``Int8Linear`` by the u7s8 scheme (module docstring): the same int8 weights, multiplied by
    oneDNN's u8 x s8 GEMM from a pre-packed copy."""

    colsum: torch.Tensor  # [out] float32
    packed: torch.Tensor  # the int8 weight in oneDNN's opaque layout
    weight_zero_point: torch.Tensor  # [out] zeros (symmetric weights)

    def __init__(self, linear: nn.Linear, ops: U7Ops | None = None) -> None:
        super().__init__(linear)
        self.ops = ops or U7Ops()
        # A non-persistent buffer, as PackedLinear's weight: a traced graph reads it as an attribute.
        # int8, so module-wide casts to a float dtype leave it alone.
        self.register_buffer("packed", torch.ops.onednn.qlinear_prepack(self.qweight, None), persistent=False)
        self.register_buffer("colsum", self.qweight.float().sum(dim=1) * self.weight_scale)
        self.register_buffer("weight_zero_point", torch.zeros(self.out_features, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        rows = x.reshape(-1, self.in_features)  # [tokens, in]
        tracing = is_tracing()  # a graph holds the eager ops (compiled code cannot be traced)
        ops = _EAGER_U7 if tracing or rows.shape[0] < U7_COMPILED_MIN_ROWS else self.ops
        codes, zero_point, scale = ops.quantize(rows)
        # [tokens, out] float32: the exact int32 sums of codes @ qweight^T times weight_scale.
        sums = traceable(_u7_gemm)(codes, self.packed, self.weight_scale, self.weight_zero_point)
        out = ops.rescale(sums, zero_point, scale, self.colsum, self.bias).to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def _u7_gemm(codes: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """oneDNN's u8 x s8 GEMM, [tokens, in] codes -> [tokens, out] float32 sums times the weight scales.
    The activation's scale 1 and zero point 0 here: ``rescale_u7`` applies its per-token ones."""
    no_args: list[int | float | complex | None] = []  # typed: TorchScript reads the annotation
    return torch.ops.onednn.qlinear_pointwise(
        codes, 1.0, 0, packed, weight_scale, zero, None, 1.0, 0, torch.float32, "none", no_args, ""
    )


def quantize_int8(
    model: nn.Module,
    patterns: tuple[str, ...],
    device: torch.device,
    *,
    others: torch.dtype | None = None,
    keep: tuple[str, ...] = (),
    scheme: str | None = None,
) -> int:
    """Replace the ``nn.Linear`` modules whose names match ``patterns`` (regexes) with ``Int8Linear``
    (``Int8LinearU7`` by the u7s8 scheme); returns how many. ``others``: run the remaining linears'
    GEMMs in this dtype (``PackedLinear``), except those under a name prefix in ``keep`` (the head).
    ``scheme``: ``s8s8`` or ``u7s8``; None: this CPU's (``int8_scheme``)."""
    if device.type != "cpu":
        raise ConfigError("quantization='int8' is a CPU path; on a GPU use dtype='bfloat16' (the default there).")
    if not patterns:
        raise ConfigError(f"quantization='int8' is not available for {type(model).__name__}.")
    regexes = [re.compile(p) for p in patterns]
    build: Callable[[nn.Linear], nn.Module]
    if (scheme or int8_scheme()) == "u7s8":
        ops = compiled_u7_ops()
        build = functools.partial(Int8LinearU7, ops=ops)
    else:
        build = functools.partial(Int8Linear, fn=compiled_int8_linear())
    count = replace_linears(model, lambda name, _: any(r.fullmatch(name) for r in regexes), build)
    if others is not None and onednn_available():
        replace_linears(model, lambda name, _: not name.startswith(keep), lambda m: PackedLinear(m, others))
    return count
