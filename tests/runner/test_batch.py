"""Packing requests into a ``Batch``: the lone-request shortcut builds what the general path builds."""

from __future__ import annotations

import pytest
import torch

from winnow.runner.batch import _one_sequence, _pack, build_batch

CPU = torch.device("cpu")


@pytest.mark.parametrize("output_token", [None, "first", "last"])
@pytest.mark.parametrize("types", [None, [0, 0, 0, 1, 1]])
def test_a_lone_sequence_packs_like_the_general_path(output_token, types):
    ids = [101, 7, 8, 102, 9]
    fast = _one_sequence(ids, types, CPU, output_token)
    general = _pack([ids], [types], CPU, 64**2, output_token)
    for field in ("input_ids", "positions", "token_type_ids", "cu_seqlens", "output_rows"):
        a, b = getattr(fast, field), getattr(general, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), field
    for field in ("seq_lens", "max_seqlen", "attn_groups"):
        assert getattr(fast, field) == getattr(general, field), field


def test_build_batch_packs_one_and_several_sequences():
    one = build_batch([[5, 6, 7]], [None], CPU, group_overhead=64**2)
    two = build_batch([[5, 6, 7], [8, 9]], [None, None], CPU, group_overhead=64**2)
    assert one.seq_lens == (3,) and one.attn_groups[0].pad_index is None
    assert two.seq_lens == (3, 2) and torch.equal(two.positions, torch.tensor([0, 1, 2, 0, 1]))
