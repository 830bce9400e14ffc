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


def test_padding_fraction_counts_the_padded_cells_of_each_attention_group():
    """One group of lengths 2, 2, 8 computes a 3 x 8 x 8 grid, of which 2² + 2² + 8² cells are useful;
    groups of equal lengths pad nothing."""
    ids = [[1] * 2, [1] * 2, [1] * 8]
    one_group = build_batch(ids, [None] * 3, torch.device("cpu"), group_overhead=None)
    assert one_group.padding_fraction == pytest.approx(1 - (4 + 4 + 64) / (3 * 64))
    split = build_batch(ids, [None] * 3, torch.device("cpu"), group_overhead=1.0)
    assert [g.num_seqs for g in split.attn_groups] == [2, 1]
    assert split.padding_fraction == 0.0
