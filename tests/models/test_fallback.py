"""The transformers fallback: architectures without a native implementation (ALBERT, GPT-Neo here).

winnow unpacks its packed batch into a padded one for transformers and packs the outputs again, so
results must equal transformers run on each prompt alone, for a batch of mixed lengths. GPT-Neo has no
pad token, so the fallback runs its rows one at a time. The fallback is announced with one warning
and refuses what it cannot do (per-token classification with a sequence head, generative models).
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.tiny_models import PROMPTS
from winnow import LLM, ConfigError, ModelLoadError, PoolingParams

ATOL = 1e-4
RAW = PoolingParams(use_activation=False)


def _spy_on_transformers(llm, monkeypatch):
    """Record the shape of every input_ids batch the fallback hands to the transformers model."""
    hf_model = llm.engine.core.runner.model.hf_model
    shapes = []
    forward = hf_model.forward

    def spy(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(hf_model, "forward", spy)
    return shapes


def _reference_logits(hf_reference, path, head, prompt):
    model, tok = hf_reference(path, head)
    with torch.no_grad():
        return model(**tok(prompt, return_tensors="pt")).logits[0]


@pytest.mark.parametrize("num_labels", [1, 2, 3])
def test_albert_sequence_classifier_matches_transformers(num_labels, make_model, make_llm, hf_reference, monkeypatch):
    path = make_model("albert", "seq", num_labels=num_labels)
    llm = make_llm(path)
    assert llm.model_config.task == "classify"
    shapes = _spy_on_transformers(llm, monkeypatch)
    logits = llm.classify(PROMPTS, pooling_params=RAW, use_tqdm=False)
    assert len(shapes) == 1 and shapes[0][0] == len(PROMPTS)  # one padded batch of mixed lengths
    probs = llm.classify(PROMPTS, use_tqdm=False)
    for prompt, got_logits, got_probs in zip(PROMPTS, logits, probs):
        ref = _reference_logits(hf_reference, path, "seq", prompt)
        ref_probs = torch.sigmoid(ref) if num_labels == 1 else torch.softmax(ref, -1)
        torch.testing.assert_close(torch.tensor(got_logits.outputs.probs), ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor(got_probs.outputs.probs), ref_probs, atol=ATOL, rtol=0)
        assert got_probs.outputs.num_classes == num_labels


@pytest.mark.parametrize(("family", "head"), [("albert", "seq"), ("albert", "tok"), ("gpt-neo", "seq")])
def test_fallback_runs_in_bfloat16(family, head, make_model, make_llm):
    """What ``dtype="auto"`` picks on CPUs with bf16 instructions: the transformers model in bfloat16,
    the head's outputs within the low-precision tolerance of float32."""
    path = make_model(family, head, num_labels=3)
    task = "classify" if head == "seq" else "token_classify"
    half = make_llm(path, dtype="bfloat16").encode(PROMPTS[:4], pooling_task=task, use_tqdm=False)
    full = make_llm(path, dtype="float32").encode(PROMPTS[:4], pooling_task=task, use_tqdm=False)
    for got, expected in zip(half, full):
        got_data, expected_data = got.outputs.data, expected.outputs.data
        assert got_data.shape == expected_data.shape and got_data.dtype == torch.float32
        torch.testing.assert_close(got_data, expected_data, atol=2e-2, rtol=0)


def test_albert_token_classifier_matches_transformers(make_model, make_llm, hf_reference, monkeypatch):
    path = make_model("albert", "tok", num_labels=5)
    llm = make_llm(path)
    assert llm.model_config.task == "token_classify"
    shapes = _spy_on_transformers(llm, monkeypatch)
    raw = llm.encode(PROMPTS, RAW, pooling_task="token_classify", use_tqdm=False)
    assert len(shapes) == 1 and shapes[0][0] == len(PROMPTS)
    probs = llm.encode(PROMPTS, pooling_task="token_classify", use_tqdm=False)
    for prompt, got_raw, got_probs in zip(PROMPTS, raw, probs):
        ref = _reference_logits(hf_reference, path, "tok", prompt)  # [num_tokens, 5]
        assert got_raw.outputs.data.shape == ref.shape
        torch.testing.assert_close(got_raw.outputs.data, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(got_probs.outputs.data, torch.softmax(ref, -1), atol=ATOL, rtol=0)


def test_decoder_without_pad_token_matches_transformers(make_model, make_llm, hf_reference, monkeypatch):
    path = make_model("gpt-neo", "seq", num_labels=3)
    llm = make_llm(path)
    assert llm.model_config.hf_config.pad_token_id is None
    assert llm.model_config.entry.is_native is False
    shapes = _spy_on_transformers(llm, monkeypatch)
    logits = llm.classify(PROMPTS, pooling_params=RAW, use_tqdm=False)
    assert [s[0] for s in shapes] == [1] * len(PROMPTS)  # no pad token: one row per forward pass
    for prompt, got in zip(PROMPTS, logits):
        ref = _reference_logits(hf_reference, path, "seq", prompt)
        torch.testing.assert_close(torch.tensor(got.outputs.probs), ref, atol=ATOL, rtol=0)


def test_fallback_is_not_native_and_warns_once(make_model, caplog):
    path = make_model("albert", "seq", num_labels=2)
    with caplog.at_level(logging.WARNING, logger="winnow"):
        llm = LLM(str(path), device="cpu")  # a fresh engine: the cached ones logged long ago
    assert llm.model_config.entry.is_native is False
    assert llm.engine.core.runner.lone is None  # transformers' own modules: no traced lone-request graph
    warnings = [r for r in caplog.records if r.name.startswith("winnow") and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "slow path" in warnings[0].getMessage()
    assert "AlbertForSequenceClassification" in warnings[0].getMessage()


def test_fallback_sequence_classifier_refuses_token_classify(make_model):
    path = make_model("albert", "seq", num_labels=2)
    with pytest.raises(ConfigError, match="Unsupported task"):
        LLM(str(path), device="cpu", pooler_config={"task": "token_classify"})


def test_generative_architecture_is_refused(make_model):
    path = make_model("gpt2", "seq", num_labels=3)
    with pytest.raises(ModelLoadError, match="convert"):
        LLM(str(path), device="cpu", hf_overrides={"architectures": ["GPT2LMHeadModel"]})


def test_bare_decoder_embeds_with_its_last_token(make_model, make_llm, hf_reference):
    """A causal model's first token sees only itself: the fallback pools decoders at the last token."""
    path = make_model("gpt-neo", "base")
    llm = make_llm(path)
    assert llm.model_config.entry.is_native is False
    assert llm.model_config.pooler.seq_pooling.value == "LAST"
    model, tok = hf_reference(path, "base")
    raw = PoolingParams(use_activation=False)
    for prompt, got in zip(PROMPTS[:3], llm.embed(PROMPTS[:3], pooling_params=raw, use_tqdm=False)):
        with torch.no_grad():
            ref = model(**tok(prompt, return_tensors="pt")).last_hidden_state[0, -1]
        torch.testing.assert_close(torch.tensor(got.outputs.embedding), ref, atol=1e-4, rtol=0)


def test_a_roberta_like_fallback_cannot_take_its_unusable_positions(make_model, make_llm, hf_reference):
    """CamemBERT (RoBERTa's code, not native here) numbers positions after the pad id: of its 64 +
    pad_id + 1 position embeddings, 64 are usable. A prompt of 64 tokens matches transformers; one of
    65 is refused up front (transformers would fail with an IndexError inside the embedding)."""
    path = make_model("camembert", "seq", num_labels=2)
    llm = make_llm(path)
    assert not llm.model_config.entry.is_native
    assert llm.model_config.max_model_len == 64
    longest = {"prompt_token_ids": [0] + [5] * 62 + [2]}
    [got] = llm.classify(longest, pooling_params=RAW, use_tqdm=False)
    model, _ = hf_reference(path, "seq")
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([longest["prompt_token_ids"]])).logits[0]
    torch.testing.assert_close(torch.tensor(got.outputs.probs), ref, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="maximum context length"):
        llm.classify({"prompt_token_ids": [0] + [5] * 63 + [2]}, use_tqdm=False)
