"""Native models against transformers on the same weights: logits and probabilities, fp32, <= 1e-4.

Every architecture x head, over a batch of mixed lengths. The reference runs each prompt alone
(no padding at all); winnow runs them together, so this also checks that batching is invisible.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.tiny_models import PROMPTS
from winnow import PoolingParams

ATOL = 1e-4  # fp32 on CPU; observed differences are ~1e-6
NATIVE = ["bert", "roberta", "xlm-roberta", "electra", "distilbert"]
RAW = PoolingParams(use_activation=False)


def _reference_logits(hf_reference, path, head, prompt):
    model, tok = hf_reference(path, head)
    with torch.no_grad():
        return model(**tok(prompt, return_tensors="pt")).logits[0]


@pytest.mark.parametrize("family", NATIVE)
@pytest.mark.parametrize("num_labels", [1, 2, 5])
def test_sequence_classifier_matches_transformers(family, num_labels, make_model, make_llm, hf_reference):
    path = make_model(family, "seq", num_labels=num_labels)
    llm = make_llm(path)
    assert llm.model_config.entry.is_native
    logits = llm.classify(PROMPTS, pooling_params=RAW, use_tqdm=False)
    probs = llm.classify(PROMPTS, use_tqdm=False)
    for prompt, got_logits, got_probs in zip(PROMPTS, logits, probs):
        ref = _reference_logits(hf_reference, path, "seq", prompt)
        ref_probs = torch.sigmoid(ref) if num_labels == 1 else torch.softmax(ref, -1)
        torch.testing.assert_close(torch.tensor(got_logits.outputs.probs), ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor(got_probs.outputs.probs), ref_probs, atol=ATOL, rtol=0)
        assert got_probs.outputs.num_classes == num_labels


@pytest.mark.parametrize("family", NATIVE)
def test_token_classifier_matches_transformers(family, make_model, make_llm, hf_reference):
    path = make_model(family, "tok", num_labels=5)
    llm = make_llm(path)
    assert llm.model_config.task == "token_classify"
    raw = llm.encode(PROMPTS, RAW, pooling_task="token_classify", use_tqdm=False)
    probs = llm.encode(PROMPTS, pooling_task="token_classify", use_tqdm=False)
    for prompt, got_raw, got_probs in zip(PROMPTS, raw, probs):
        ref = _reference_logits(hf_reference, path, "tok", prompt)  # [num_tokens, 5], special tokens included
        assert got_raw.outputs.data.shape == ref.shape
        torch.testing.assert_close(got_raw.outputs.data, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(got_probs.outputs.data, torch.softmax(ref, -1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", NATIVE)
def test_sequence_classifier_serves_token_classify_when_asked(family, make_model, make_llm, hf_reference):
    """PoolerConfig(task="token_classify"): the sequence head applied per token (vLLM semantics)."""
    path = make_model(family, "seq", num_labels=3)
    llm = make_llm(path, pooler_config={"task": "token_classify"})
    model, tok = hf_reference(path, "seq")
    out = llm.encode(PROMPTS[:3], RAW, pooling_task="token_classify", use_tqdm=False)
    for prompt, got in zip(PROMPTS[:3], out):
        with torch.no_grad():
            body = getattr(model, model.base_model_prefix)
            hidden = body(**tok(prompt, return_tensors="pt")).last_hidden_state[0]
            ref = _head_per_token(family, model, hidden)
        torch.testing.assert_close(got.outputs.data, ref, atol=ATOL, rtol=0)


def _head_per_token(family, model, hidden):
    if family == "bert":
        return model.classifier(hidden)  # the classifier alone: BERT's pooler belongs to [CLS] only
    if family == "distilbert":
        return model.classifier(torch.relu(model.pre_classifier(hidden)))
    head = model.classifier  # RoBERTa / XLM-R: tanh; ELECTRA: GELU between dense and out_proj
    act = head.activation if family == "electra" else torch.tanh
    return head.out_proj(act(head.dense(hidden)))


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_batch_composition_and_order_do_not_change_results(family, make_model, make_llm):
    llm = make_llm(make_model(family, "seq", num_labels=3), max_num_batched_tokens=96, max_num_seqs=3)
    alone = [llm.classify(p, use_tqdm=False)[0].outputs.probs for p in PROMPTS]
    together = [o.outputs.probs for o in llm.classify(PROMPTS, use_tqdm=False)]
    order = list(range(len(PROMPTS)))
    random.Random(0).shuffle(order)
    shuffled = llm.classify([PROMPTS[i] for i in order], use_tqdm=False)
    for i, got in zip(order, shuffled):
        torch.testing.assert_close(torch.tensor(got.outputs.probs), torch.tensor(alone[i]), atol=1e-5, rtol=0)
    for a, b in zip(alone, together):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=0)


def test_every_batch_equals_single_runs_for_many_prompts(make_model, make_llm):
    """Many prompts over several small batches: batch i of the engine equals each prompt alone."""
    llm = make_llm(make_model("bert", "tok", num_labels=3), max_num_batched_tokens=64, max_num_seqs=4)
    prompts = [PROMPTS[i % len(PROMPTS)][: 5 + 3 * i] for i in range(30)]
    batched = llm.encode(prompts, pooling_task="token_classify", use_tqdm=False)
    for prompt, got in zip(prompts, batched):
        single = llm.encode(prompt, pooling_task="token_classify", use_tqdm=False)[0]
        assert got.prompt_token_ids == single.prompt_token_ids
        torch.testing.assert_close(got.outputs.data, single.outputs.data, atol=1e-5, rtol=0)
