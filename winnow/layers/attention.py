"""Self-attention over a packed batch: bidirectional or causal, multi-head or grouped-query,
full or sliding-window, with optional logit soft-capping.

The only layer that needs sequence boundaries. Queries, keys and values arrive packed
(``[num_tokens, heads * head_dim]``, already position-encoded); each attention group of the batch
(sequences of similar length, see ``runner/batch.py``) is scattered into its own right-padded grid,
attended, and gathered back, so padding costs attention work only, and only within a group.
torch's SDPA (its fused CPU/GPU kernels) runs every case it can express; soft-capping needs the
explicit formula. On a GPU in half precision, flash attention's variable-length kernel
(``torch.nn.attention.varlen``) takes the packed rows directly: no grid, no padding, one launch per
layer whatever the mix of lengths. Models with their own attention scores (DeBERTa's relative positions) reuse
``to_grid`` / ``from_grid``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from winnow.runner.batch import AttentionGroup, Batch


@dataclass(frozen=True)
class AttentionSpec:
    """How one layer attends. ``window``: a token sees keys at most ``window`` positions away
    (before it only, when causal). ``softcap``: scores become ``softcap * tanh(scores / softcap)``."""

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None  # None: same as num_heads
    causal: bool = False
    scale: float | None = None  # None: 1 / sqrt(head_dim)
    window: int | None = None
    softcap: float | None = None

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, spec: AttentionSpec
) -> torch.Tensor:
    """``q``: [num_tokens, heads * head_dim]; ``k``, ``v``: [num_tokens, kv_heads * head_dim] -> like ``q``."""
    if uses_varlen(q, spec):
        return varlen_attention(q, k, v, batch, spec, _varlen_kernel())
    groups = batch.attn_groups
    if not groups:
        raise RuntimeError(f"{_NO_GROUPS}: this layer does not run the variable-length kernel.")
    if len(groups) == 1:
        return _group_attention(q, k, v, groups[0], spec)
    out = q.new_empty(q.shape)
    for group in groups:
        rows = slice(group.token_start, group.token_end)
        out[rows] = _group_attention(q[rows], k[rows], v[rows], group, spec)
    return out


def fused_qkv_attention(qkv: torch.Tensor, batch: Batch, num_heads: int) -> torch.Tensor:
    """Bidirectional multi-head attention from one fused projection ``[num_tokens, 3 * hidden]``."""
    hidden = qkv.shape[1] // 3
    spec = AttentionSpec(num_heads=num_heads, head_dim=hidden // num_heads)
    groups = batch.attn_groups
    if len(groups) == 1 and groups[0].pad_index is None and not uses_varlen(qkv, spec):
        return _unpadded_qkv_attention(qkv, groups[0], spec)
    q, k, v = qkv.split(hidden, dim=1)  # views, no copy
    return packed_attention(q, k, v, batch, spec)


def _unpadded_qkv_attention(qkv: torch.Tensor, group: AttentionGroup, spec: AttentionSpec) -> torch.Tensor:
    """One group of equal-length sequences (a lone request, most often): the fused projection is
    already the grid, so q, k and v are three views of it. Three view ops instead of the general
    path's dozen: 32 against 50 us per layer for one 17-token sequence (MiniLM shape, bf16)."""
    heads, dim = spec.num_heads, spec.head_dim
    # [num_seqs * max_len, 3 * heads * dim] -> 3 x [num_seqs, heads, max_len, dim]. The length is
    # read from the tensor (-1), not the group, so a traced lone request serves every length.
    q, k, v = qkv.view(group.num_seqs, -1, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, scale=spec.scale)
    return out.transpose(1, 2).reshape(qkv.shape[0], heads * dim)  # [num_tokens, heads * dim]


# A CUDA graph's batch has no host-side attention groups (runner/cuda_graphs.py).
_NO_GROUPS = "a batch without attention groups needs the variable-length kernel"


# Flash attention's limits: half precision, head_dim a multiple of 8 up to 256.
_VARLEN_DTYPES = (torch.float16, torch.bfloat16)
_VARLEN_MAX_HEAD_DIM = 256


@functools.cache
def _varlen_kernel() -> Callable[..., Any] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    return varlen_attn


@functools.cache
def _asks_for_gqa(kernel: Callable[..., Any]) -> bool:
    """Whether ``kernel`` wants grouped-query attention announced (``enable_gqa=True``, torch 2.13's
    ``varlen_attn``, which refuses fewer key/value heads without it). torch 2.11's has no such
    argument (passing it is a TypeError) and reads the grouping from the shapes, as flash attention does."""
    return "enable_gqa" in inspect.signature(kernel).parameters


def varlen_eligible(device_type: str, dtype: torch.dtype, spec: AttentionSpec) -> bool:
    """Whether a layer fits the variable-length kernel: CUDA, half precision, no soft-capping,
    a head size flash attention supports."""
    return (
        device_type == "cuda"
        and dtype in _VARLEN_DTYPES
        and spec.softcap is None
        and spec.head_dim % 8 == 0
        and spec.head_dim <= _VARLEN_MAX_HEAD_DIM
    )


def uses_varlen(q: torch.Tensor, spec: AttentionSpec) -> bool:
    """Whether ``packed_attention`` runs the variable-length GPU kernel for this layer."""
    return varlen_eligible(q.device.type, q.dtype, spec) and _varlen_kernel() is not None


def varlen_window(spec: AttentionSpec) -> tuple[int, int]:
    """``spec`` as flash attention's (left, right) window: -1 is unbounded, right 0 is causal."""
    left = spec.window if spec.window is not None else -1
    right = 0 if spec.causal else left
    return left, right


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, spec: AttentionSpec, kernel: Any
) -> torch.Tensor:
    """Packed rows straight through a variable-length kernel with ``varlen_attn``'s signature."""
    heads, kv_heads, dim = spec.num_heads, spec.kv_heads, spec.head_dim
    out = kernel(
        q.unflatten(-1, (heads, dim)),  # [num_tokens, heads, dim]
        k.unflatten(-1, (kv_heads, dim)),  # [num_tokens, kv_heads, dim]
        v.unflatten(-1, (kv_heads, dim)),
        batch.cu_seqlens,
        batch.cu_seqlens,
        batch.max_seqlen,
        batch.max_seqlen,
        scale=spec.scale,
        window_size=varlen_window(spec),
        **({"enable_gqa": True} if kv_heads != heads and _asks_for_gqa(kernel) else {}),
    )
    return out.flatten(1)  # [num_tokens, heads * dim]


def to_grid(rows: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    """[group tokens, ...] -> [num_seqs, max_len, ...], zero-padded on the right."""
    if group.pad_index is None:  # max_len from the tensor, for traced graphs (runner/lone_trace.py)
        return rows.reshape(group.num_seqs, -1, *rows.shape[1:])
    grid = rows.new_zeros(group.num_seqs * group.max_len, *rows.shape[1:])
    grid.index_copy_(0, group.pad_index, rows)
    return grid.view(group.num_seqs, group.max_len, *rows.shape[1:])


def from_grid(grid: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    """[num_seqs, max_len, ...] -> [group tokens, ...], dropping the padding."""
    flat = grid.flatten(0, 1)  # [num_seqs * max_len, ...]
    return flat if group.pad_index is None else flat.index_select(0, group.pad_index)


def key_mask(group: AttentionGroup, spec: AttentionSpec, length: int) -> torch.Tensor | None:
    """Bool mask, True where a query may attend a key: [num_seqs or 1, 1, max_len (or 1), max_len], or None.

    Padding keys are masked; ``spec`` adds the causal triangle and the sliding window. ``length``:
    the grid's max_len, read from the grid (a traced lone request's graph serves every length).
    """
    mask = group.attn_mask  # [num_seqs, 1, 1, max_len] or None
    if not (spec.causal or spec.window is not None):
        return mask
    positions = torch.arange(length, device=group.device)
    distance = positions[:, None] - positions[None, :]  # [query, key]: query position minus key position
    allowed = torch.ones_like(distance, dtype=torch.bool)
    if spec.causal:
        allowed &= distance >= 0
    if spec.window is not None:
        allowed &= distance.abs() <= spec.window
    band = allowed[None, None]  # [1, 1, max_len, max_len]
    return band if mask is None else band & mask


def _group_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: AttentionGroup, spec: AttentionSpec
) -> torch.Tensor:
    """Packed rows of one group -> packed rows of the attention output."""
    heads, kv_heads, dim = spec.num_heads, spec.kv_heads, spec.head_dim
    # [group tokens, heads * dim] -> [num_seqs, heads, max_len, dim]
    qg = to_grid(q, group).unflatten(-1, (heads, dim)).transpose(1, 2)
    kg = to_grid(k, group).unflatten(-1, (kv_heads, dim)).transpose(1, 2)
    vg = to_grid(v, group).unflatten(-1, (kv_heads, dim)).transpose(1, 2)
    if kv_heads != heads:  # grouped-query attention: each key/value head serves heads // kv_heads queries
        kg = kg.repeat_interleave(heads // kv_heads, dim=1)
        vg = vg.repeat_interleave(heads // kv_heads, dim=1)
    if spec.softcap is not None:
        out = _softcapped(qg, kg, vg, key_mask(group, spec, qg.shape[2]), spec)
    elif spec.causal and spec.window is None:
        # Right padding: a real query's causal keys are all real, so the triangle alone is exact.
        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=spec.scale)
    else:
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=key_mask(group, spec, qg.shape[2]), scale=spec.scale)
    # [num_seqs, heads, max_len, dim] -> [group tokens, heads * dim]
    return from_grid(out.transpose(1, 2).flatten(2), group)


def _softcapped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, spec: AttentionSpec
) -> torch.Tensor:
    scale = spec.scale if spec.scale is not None else spec.head_dim**-0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [num_seqs, heads, max_len, max_len]
    assert spec.softcap is not None
    scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
