"""Bidirectional self-attention over a packed batch.

The only layer that needs sequence boundaries. Input is the fused ``[num_tokens, 3 * hidden]``
projection; output ``[num_tokens, hidden]``. Each attention group of the batch (sequences of
similar length, see ``runner/batch.py``) is scattered into its own padded grid for torch's SDPA
(which picks its fused CPU/GPU kernel) and gathered back, so padding costs attention work only,
never dense-layer work, and only within a group of similar lengths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from winnow.runner.batch import AttentionGroup, Batch


def packed_attention(qkv: torch.Tensor, batch: Batch, num_heads: int) -> torch.Tensor:
    """Self-attention of each sequence over its own tokens. ``qkv``: [num_tokens, 3 * hidden]."""
    groups = batch.attn_groups
    if len(groups) == 1:
        return _group_attention(qkv, groups[0], num_heads)
    out = qkv.new_empty(qkv.shape[0], qkv.shape[1] // 3)  # [num_tokens, hidden]
    for group in groups:
        rows = slice(group.token_start, group.token_end)
        out[rows] = _group_attention(qkv[rows], group, num_heads)
    return out


def _group_attention(qkv: torch.Tensor, group: AttentionGroup, num_heads: int) -> torch.Tensor:
    """``qkv``: [group tokens, 3 * hidden] -> [group tokens, hidden]."""
    three_hidden = qkv.shape[1]
    hidden = three_hidden // 3
    num_seqs, max_len = group.num_seqs, group.max_len
    if group.pad_index is None:
        grid = qkv  # every sequence has max_len tokens: the rows already are the grid
    else:
        grid = qkv.new_zeros(num_seqs * max_len, three_hidden)
        grid.index_copy_(0, group.pad_index, qkv)
    # [num_seqs * max_len, 3 * hidden] -> 3 x [num_seqs, num_heads, max_len, head_dim]
    q, k, v = grid.view(num_seqs, max_len, 3, num_heads, hidden // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=group.attn_mask)
    # [num_seqs, num_heads, max_len, head_dim] -> [num_seqs * max_len, hidden]
    out = out.transpose(1, 2).reshape(num_seqs * max_len, hidden)
    return out if group.pad_index is None else out.index_select(0, group.pad_index)
