"""The batch a model forward sees: sequences packed back to back, no padding in dense layers.

Tokens of all sequences are concatenated into one ``[num_tokens]`` stream, so every linear layer,
norm and activation runs on exactly the real tokens. Attention is the only op that needs to know
where sequences start: a varlen kernel reads ``cu_seqlens``; the padded SDPA path scatters rows
into a ``[num_seqs, max_seqlen]`` grid using ``pad_index`` and masks keys with ``attn_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [num_tokens] int64, all sequences concatenated
    positions: torch.Tensor  # [num_tokens] int64, 0-based position of each token in its sequence
    token_type_ids: torch.Tensor | None  # [num_tokens] int64, None when every type id is 0
    cu_seqlens: torch.Tensor  # [num_seqs + 1] int32, cu_seqlens[i] = first token of sequence i
    seq_lens: tuple[int, ...]  # host copy of the lengths, for splitting outputs without a device sync
    max_seqlen: int
    # Padded-attention view (None when all sequences have the same length: a plain reshape does).
    pad_index: torch.Tensor | None  # [num_tokens] int64, row of each token in the [num_seqs * max_seqlen] grid
    attn_mask: torch.Tensor | None  # [num_seqs, 1, 1, max_seqlen] bool, True where a key is a real token

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def first_token_index(self) -> torch.Tensor:
        """[num_seqs] index of each sequence's first token in the packed stream."""
        return self.cu_seqlens[:-1].long()

    @property
    def last_token_index(self) -> torch.Tensor:
        """[num_seqs] index of each sequence's last token in the packed stream."""
        return self.cu_seqlens[1:].long() - 1


def build_batch(
    token_ids: list[list[int]],
    token_type_ids: list[list[int] | None],
    device: torch.device,
    *,
    needs_padded_view: bool,
) -> Batch:
    """Pack sequences into a ``Batch`` on ``device`` (host work in numpy, one copy per tensor)."""
    seq_lens = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
    num_tokens = int(seq_lens.sum())
    max_seqlen = int(seq_lens.max())
    starts = np.zeros(len(seq_lens) + 1, dtype=np.int64)
    np.cumsum(seq_lens, out=starts[1:])
    # [num_tokens] position within the sequence: global index minus the sequence's start.
    positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(starts[:-1], seq_lens)

    ids = np.fromiter((t for seq in token_ids for t in seq), dtype=np.int64, count=num_tokens)
    types = None
    if any(t is not None for t in token_type_ids):
        types_np = np.zeros(num_tokens, dtype=np.int64)
        for start, tt in zip(starts[:-1], token_type_ids):
            if tt is not None:
                types_np[start : start + len(tt)] = tt
        types = torch.from_numpy(types_np).to(device, non_blocking=True)

    pad_index = attn_mask = None
    uniform = bool((seq_lens == max_seqlen).all())
    if needs_padded_view and not uniform:
        seq_of_token = np.repeat(np.arange(len(seq_lens), dtype=np.int64), seq_lens)
        pad_index = torch.from_numpy(seq_of_token * max_seqlen + positions).to(device, non_blocking=True)
        # [num_seqs, max_seqlen] -> [num_seqs, 1, 1, max_seqlen]: broadcast over heads and queries.
        mask = np.arange(max_seqlen)[None, :] < seq_lens[:, None]
        attn_mask = torch.from_numpy(mask).to(device, non_blocking=True)[:, None, None, :]

    return Batch(
        input_ids=torch.from_numpy(ids).to(device, non_blocking=True),
        positions=torch.from_numpy(positions).to(device, non_blocking=True),
        token_type_ids=types,
        cu_seqlens=torch.from_numpy(starts.astype(np.int32)).to(device, non_blocking=True),
        seq_lens=tuple(int(n) for n in seq_lens),
        max_seqlen=max_seqlen,
        pad_index=pad_index,
        attn_mask=attn_mask,
    )
