"""``Batch.output_rows``: when the pooler reads one token per sequence (CLS or LAST pooling and no
token-level task in the batch), the last layer computes only those tokens' outputs.

The parity tests (test_parity.py and the family files) already run classify through this path
against transformers; here: the rows themselves, the model's reduced output against its full one,
when the runner asks for it, and a batch that mixes sequence and token tasks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.engine.test_async_engine import make_requests
from tests.models.test_deberta_v2 import build_deberta
from tests.models.test_decoders import build_decoder
from tests.models.test_modernbert import build_modernbert
from tests.tiny_models import PROMPTS, build_model
from winnow import PoolingParams
from winnow.engine.request import Request
from winnow.runner.batch import build_batch

ATOL = 1e-5
BERT_LIKE = ["bert", "roberta", "xlm-roberta", "electra", "distilbert"]
CLASSIFY = PoolingParams().with_task("classify")
TOKEN_CLASSIFY = PoolingParams().with_task("token_classify")
# Every native family (decoders: one with soft-capping and a window); DeBERTa with the convolution
# after its only layer, which needs every token.
BUILDERS: dict[str, Callable[[Path], Path]] = {
    **{f: functools.partial(build_model, family=f, head="seq", num_labels=3) for f in BERT_LIKE},
    "gpt2": functools.partial(build_decoder, family="gpt2", head="seq", num_labels=3),
    "qwen3": functools.partial(build_decoder, family="qwen3", head="seq", num_labels=3),
    "gemma2": functools.partial(build_decoder, family="gemma2", head="seq", num_labels=3),
    "modernbert": functools.partial(build_modernbert, head="seq", num_labels=3),
    "deberta-v3": functools.partial(build_deberta, head="seq", variant="v3", num_labels=3),
    "deberta-conv-one-layer": functools.partial(build_deberta, head="seq", variant="conv_one_layer", num_labels=3),
}


@pytest.mark.parametrize(("token", "rows"), [("first", [0, 3, 4]), ("last", [2, 3, 7]), (None, None)])
def test_build_batch_names_each_sequences_first_or_last_token(token, rows):
    ids = [[5, 6, 7], [8], [9, 10, 11, 12]]
    batch = build_batch(ids, [None] * 3, torch.device("cpu"), output_token=token)
    if rows is None:
        assert batch.output_rows is None
    else:
        assert batch.output_rows.tolist() == rows
        assert batch.input_ids[batch.output_rows].tolist() == [seq[0 if token == "first" else -1] for seq in ids]


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("token", ["first", "last"])
def test_reduced_output_equals_the_full_forward_at_those_rows(family, token, tmp_path, make_llm):
    """Several attention groups (group_overhead=0) of different lengths, so rows cross group bounds."""
    engine = make_llm(BUILDERS[family](tmp_path)).engine
    model = engine.core.runner.model
    assert model.selects_output_rows
    ids = [r.prompt.token_ids for r in make_requests(engine, PROMPTS[:7])]
    ids.sort(key=len)
    full = build_batch(ids, [None] * len(ids), torch.device("cpu"), group_overhead=0.0)
    reduced = build_batch(ids, [None] * len(ids), torch.device("cpu"), group_overhead=0.0, output_token=token)
    assert len(full.attn_groups) > 1
    with torch.inference_mode():
        expected = model(full).index_select(0, reduced.output_rows)  # [num_seqs, hidden]
        got = model(reduced)
    assert got.shape == (len(ids), expected.shape[1])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_the_pooler_asks_for_one_token_only_when_every_request_reads_one(make_model, make_llm):
    runner = make_llm(make_model("bert", "seq", num_labels=3)).engine.core.runner
    assert runner.selects_rows
    assert runner.pooler.output_token([CLASSIFY, CLASSIFY]) == "first"  # BERT pools CLS
    assert runner.pooler.output_token([CLASSIFY, TOKEN_CLASSIFY]) is None
    embedder = make_llm(make_model("bert", "base"), pooler_config={"seq_pooling_type": "MEAN"}).engine.core.runner
    assert embedder.pooler.output_token([PoolingParams().with_task("embed")]) is None
    last = make_llm(make_model("bert", "seq", num_labels=3), pooler_config={"seq_pooling_type": "LAST"})
    assert last.engine.core.runner.pooler.output_token([CLASSIFY]) == "last"


def test_a_batch_mixing_sequence_and_token_tasks_equals_separate_batches(make_model, make_llm):
    engine = make_llm(make_model("bert", "seq", num_labels=3)).engine
    runner = engine.core.runner
    prompts = [r.prompt for r in make_requests(engine, PROMPTS[:6])]
    tasks = [CLASSIFY, TOKEN_CLASSIFY] * 3
    mixed = runner.execute([Request(f"m{i}", p, t) for i, (p, t) in enumerate(zip(prompts, tasks))])
    alone = [runner.execute([Request(f"a{i}", p, t)])[0] for i, (p, t) in enumerate(zip(prompts, tasks))]
    assert [m.shape for m in mixed] == [a.shape for a in alone]
    for got, expected in zip(mixed, alone):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert mixed[0].shape == (3,) and mixed[1].shape == (len(prompts[1].token_ids), 3)
