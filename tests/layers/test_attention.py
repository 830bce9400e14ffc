"""Packed attention: the grid path every device runs, and the variable-length GPU path's mapping.

The GPU kernel (flash attention's ``varlen_attn``) cannot run on this CPU, so its mapping (tensor
views, ``cu_seqlens``, window and causal flags, grouped-query heads) is checked by calling
``varlen_attention`` with a reference kernel written here from ``varlen_attn``'s documented
semantics, one sequence at a time, with no padding. ``benchmarks/gpu_check.sh`` runs the real
kernel through the model parity tests on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from winnow.layers.attention import (
    AttentionSpec,
    _varlen_kernel,
    fused_qkv_attention,
    packed_attention,
    uses_varlen,
    varlen_attention,
    varlen_eligible,
    varlen_window,
)
from winnow.runner.batch import build_batch

LENGTHS = [1, 5, 17, 9, 33, 2]


def reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """``varlen_attn`` as documented in torch 2.13: key j is visible from query i when
    i - left <= j <= i + right (a bound of -1 is unbounded); sequences are the ``cu_seq`` slices;
    fewer key/value heads than query heads only with ``enable_gqa``, each serving a run of query heads."""
    if q.shape[1] != k.shape[1] and not enable_gqa:
        raise ValueError("torch 2.13 refuses grouped-query heads without enable_gqa=True")
    return _reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size)


def reference_varlen_attn_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    """torch 2.11's ``varlen_attn`` (the GPU machine's torch): no ``enable_gqa``
    argument (passing one is a TypeError); grouped-query heads are read from the shapes."""
    return _reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size)


def _reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size):
    assert cu_q is cu_k and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    left, right = window_size
    out = torch.empty_like(q)
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        n = end - start
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        visible = torch.ones(n, n, dtype=torch.bool)
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [heads, n, dim]
        ks = ks.repeat_interleave(qs.shape[0] // ks.shape[0], dim=0)
        vs = vs.repeat_interleave(qs.shape[0] // vs.shape[0], dim=0)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=visible, scale=scale).transpose(0, 1)
    return out


SPECS = {
    "bidirectional": AttentionSpec(num_heads=4, head_dim=8),
    "causal": AttentionSpec(num_heads=4, head_dim=8, causal=True),
    "window": AttentionSpec(num_heads=4, head_dim=8, window=3),
    "causal-window": AttentionSpec(num_heads=4, head_dim=8, causal=True, window=4),
    "gqa-scaled": AttentionSpec(num_heads=4, head_dim=8, num_kv_heads=2, causal=True, scale=0.3),
}


KERNELS = {"torch-2.13": reference_varlen_attn, "torch-2.11": reference_varlen_attn_2_11}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("group_overhead", [None, 16.0])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_varlen_mapping_equals_the_grid_path(name, group_overhead, kernel):
    spec = SPECS[name]
    batch = build_batch(
        [[0] * n for n in LENGTHS], [None] * len(LENGTHS), torch.device("cpu"), group_overhead=group_overhead
    )
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch.num_tokens, spec.num_heads * spec.head_dim, generator=gen)
    k, v = (torch.randn(batch.num_tokens, spec.kv_heads * spec.head_dim, generator=gen) for _ in range(2))
    grid = packed_attention(q, k, v, batch, spec)
    varlen = varlen_attention(q, k, v, batch, spec, KERNELS[kernel])
    assert varlen.shape == grid.shape == q.shape
    torch.testing.assert_close(varlen, grid, atol=1e-5, rtol=0)


def test_window_flags():
    assert varlen_window(AttentionSpec(num_heads=1, head_dim=8)) == (-1, -1)
    assert varlen_window(AttentionSpec(num_heads=1, head_dim=8, causal=True)) == (-1, 0)
    assert varlen_window(AttentionSpec(num_heads=1, head_dim=8, window=64)) == (64, 64)
    assert varlen_window(AttentionSpec(num_heads=1, head_dim=8, causal=True, window=64)) == (64, 0)


def test_only_half_precision_cuda_layers_flash_supports_go_varlen():
    spec = AttentionSpec(num_heads=2, head_dim=64)
    assert varlen_eligible("cuda", torch.bfloat16, spec)
    assert varlen_eligible("cuda", torch.float16, AttentionSpec(num_heads=2, head_dim=128, causal=True, window=8))
    assert not varlen_eligible("cpu", torch.bfloat16, spec)
    assert not varlen_eligible("cuda", torch.float32, spec)  # flash has no fp32 kernel
    assert not varlen_eligible("cuda", torch.bfloat16, AttentionSpec(num_heads=2, head_dim=64, softcap=50.0))
    assert not varlen_eligible("cuda", torch.bfloat16, AttentionSpec(num_heads=2, head_dim=12))
    assert not varlen_eligible("cuda", torch.bfloat16, AttentionSpec(num_heads=2, head_dim=512))
    assert not uses_varlen(torch.zeros(3, 128, dtype=torch.bfloat16), spec)  # a CPU tensor


@pytest.mark.parametrize("lengths", [[17], [6, 6, 6], [1]])
def test_unpadded_fused_qkv_equals_the_reference(lengths):
    """One group without padding (a lone request, or sequences of one length) reads q, k and v as
    views of the fused projection; every sequence must still attend only to itself."""
    batch = build_batch([[0] * n for n in lengths], [None] * len(lengths), torch.device("cpu"))
    assert len(batch.attn_groups) == 1 and batch.attn_groups[0].pad_index is None
    heads, dim = 4, 8
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch.num_tokens, 3 * heads * dim, generator=gen)
    q, k, v = (t.unflatten(-1, (heads, dim)) for t in qkv.split(heads * dim, dim=1))  # [tokens, heads, dim]
    want = reference_varlen_attn(q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_seqlen, batch.max_seqlen)
    got = fused_qkv_attention(qkv, batch, heads)
    assert got.shape == (batch.num_tokens, heads * dim)
    torch.testing.assert_close(got, want.flatten(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["bidirectional", "causal-window", "gqa-scaled"])
def test_the_installed_torchs_kernel_accepts_the_call(name):
    """The installed torch's real ``varlen_attn`` takes winnow's arguments: on a CPU it gets as far
    as the flash kernel's dispatch (which has no CPU implementation) instead of refusing the
    arguments themselves. ``varlen_attn``'s keywords changed between torch 2.11 and 2.13."""
    kernel = _varlen_kernel()
    if kernel is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    spec = SPECS[name]
    batch = build_batch([[0] * n for n in LENGTHS], [None] * len(LENGTHS), torch.device("cpu"))
    q = torch.zeros(batch.num_tokens, spec.num_heads * spec.head_dim, dtype=torch.bfloat16)
    kv = torch.zeros(batch.num_tokens, spec.kv_heads * spec.head_dim, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="_flash_attention_forward"):
        varlen_attention(q, kv, kv, batch, spec, kernel)
