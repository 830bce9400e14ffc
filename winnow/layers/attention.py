"""Bidirectional self-attention over a packed batch.

The only layer that needs sequence boundaries. Input is the fused ``[num_tokens, 3 * hidden]``
projection; output ``[num_tokens, hidden]``. Rows are scattered into a padded
``[num_seqs, max_seqlen]`` grid for torch's SDPA (which picks its fused CPU/GPU kernel), then
gathered back, so padding costs attention work only, never dense-layer work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from winnow.runner.batch import Batch


def packed_attention(qkv: torch.Tensor, batch: Batch, num_heads: int) -> torch.Tensor:
    """Self-attention of each sequence over its own tokens. ``qkv``: [num_tokens, 3 * hidden]."""
    three_hidden = qkv.shape[1]
    hidden = three_hidden // 3
    head_dim = hidden // num_heads
    num_seqs, max_len = batch.num_seqs, batch.max_seqlen

    if batch.pad_index is None:
        # Every sequence has max_len tokens: the packed stream already is the padded grid.
        grid = qkv
    else:
        grid = qkv.new_zeros(num_seqs * max_len, three_hidden)
        grid.index_copy_(0, batch.pad_index, qkv)
    # [num_seqs * max_len, 3 * hidden] -> 3 x [num_seqs, num_heads, max_len, head_dim]
    q, k, v = grid.view(num_seqs, max_len, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.attn_mask)
    # [num_seqs, num_heads, max_len, head_dim] -> [num_seqs * max_len, hidden]
    out = out.transpose(1, 2).reshape(num_seqs * max_len, hidden)
    if batch.pad_index is None:
        return out
    return out.index_select(0, batch.pad_index)  # [num_tokens, hidden]
