"""Native ModernBERT against transformers on the same weights, fp32, <= 1e-4.

Tiny random models (4 layers: global, local, local, global) with a small sliding window, so the
prompts below cross it. The reference runs each prompt alone with its eager attention; winnow runs
all prompts in one packed batch of mixed lengths.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_models import PROMPTS, _bert_tokenizer, _write_st_files
from winnow import LLM, ModelLoadError, PoolingParams
from winnow.params import PoolingType

ATOL = 1e-4
RAW = PoolingParams(use_activation=False)
LOCAL_ATTENTION = 8  # local layers see +-4 tokens
LONG_PROMPTS = [
    "the quick brown fox jumps over the lazy dog " * 4,  # 38 tokens
    "barack obama visited seattle and paris and brasilia on a rainy monday in january",  # 22 tokens
    "what is the capital of france? " * 9 + "zebra quartz jukebox vexing wizards",  # ~100 tokens
]
ALL_PROMPTS = PROMPTS + LONG_PROMPTS
HEADS = {"seq": "ForSequenceClassification", "tok": "ForTokenClassification", "base": "Model"}


def build_modernbert(
    folder: Path,
    head: str,
    *,
    num_labels: int = 2,
    seed: int = 0,
    sentence_transformers: Any = None,
    weight_std: float = 0.2,
    **extra: Any,
) -> Path:
    """A 4-layer ModernBERT (hidden 64, 4 heads) with re-drawn weights and the tiny BERT tokenizer."""
    import transformers

    tok = _bert_tokenizer(folder)
    options: dict[str, Any] = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        "global_attn_every_n_layers": 3,
        "local_attention": LOCAL_ATTENTION,
        "pad_token_id": tok.pad_token_id,
        "cls_token_id": tok.cls_token_id,
        "bos_token_id": tok.cls_token_id,
        "sep_token_id": tok.sep_token_id,
        "eos_token_id": tok.sep_token_id,
        "num_labels": num_labels,
        **extra,
    }
    config = transformers.ModernBertConfig(**options)
    config.architectures = [f"ModernBert{HEADS[head]}"]
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.rsplit(".", 2)[-2]:  # LayerNorm weights near 1, biases near 0
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(weight_std * torch.randn(p.shape, generator=gen))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    if sentence_transformers:
        _write_st_files(folder, sentence_transformers)
    return folder


@pytest.fixture(scope="session")
def make_modernbert(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    cache: dict[str, Path] = {}

    def make(head: str, **kwargs: Any) -> Path:
        key = json.dumps([head, kwargs], sort_keys=True)
        if key not in cache:
            cache[key] = build_modernbert(tmp_path_factory.mktemp(f"modernbert-{head}"), head, **kwargs)
        return cache[key]

    return make


def _inputs(tok: Any, prompt: str) -> dict[str, torch.Tensor]:
    enc = tok(prompt, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _reference(hf_reference: Any, path: Path, head: str, prompt: str) -> Any:
    model, tok = hf_reference(path, head)  # eager attention, fp32
    with torch.no_grad():
        return model(**_inputs(tok, prompt))


def _close(got: Any, ref: torch.Tensor) -> None:
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float32), ref, atol=ATOL, rtol=0)


def test_prompts_cross_the_window_and_layers_alternate(make_modernbert, hf_reference):
    path = make_modernbert("seq")
    model, tok = hf_reference(path, "seq")
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    lengths = [len(tok(p)["input_ids"]) for p in ALL_PROMPTS]
    assert min(lengths) <= LOCAL_ATTENTION // 2 + 1  # some prompts fit inside one window...
    assert max(lengths) >= 10 * LOCAL_ATTENTION  # ...and one spans many


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("num_labels", [1, 2, 3])
def test_sequence_classifier_matches_transformers(pooling, num_labels, make_modernbert, make_llm, hf_reference):
    path = make_modernbert("seq", num_labels=num_labels, classifier_pooling=pooling)
    llm = make_llm(path)
    assert llm.model_config.entry.is_native
    assert llm.model_config.pooler.seq_pooling is {"cls": PoolingType.CLS, "mean": PoolingType.MEAN}[pooling]
    logits = llm.classify(ALL_PROMPTS, pooling_params=RAW, use_tqdm=False)
    probs = llm.classify(ALL_PROMPTS, use_tqdm=False)
    for prompt, got_logits, got_probs in zip(ALL_PROMPTS, logits, probs):
        ref = _reference(hf_reference, path, "seq", prompt).logits[0]
        _close(got_logits.outputs.probs, ref)
        _close(got_probs.outputs.probs, torch.sigmoid(ref) if num_labels == 1 else torch.softmax(ref, -1))
        assert got_probs.outputs.num_classes == num_labels


def test_token_classifier_matches_transformers(make_modernbert, make_llm, hf_reference):
    path = make_modernbert("tok", num_labels=5)
    llm = make_llm(path)
    assert llm.model_config.task == "token_classify"
    raw = llm.encode(ALL_PROMPTS, RAW, pooling_task="token_classify", use_tqdm=False)
    probs = llm.encode(ALL_PROMPTS, pooling_task="token_classify", use_tqdm=False)
    for prompt, got_raw, got_probs in zip(ALL_PROMPTS, raw, probs):
        ref = _reference(hf_reference, path, "tok", prompt).logits[0]  # [num_tokens, 5]
        assert got_raw.outputs.data.shape == ref.shape
        _close(got_raw.outputs.data, ref)
        _close(got_probs.outputs.data, torch.softmax(ref, -1))


def test_sequence_classifier_serves_token_classify(make_modernbert, make_llm, hf_reference):
    """PoolerConfig(task="token_classify"): prediction head + classifier on every token."""
    path = make_modernbert("seq", num_labels=3)
    llm = make_llm(path, pooler_config={"task": "token_classify"})
    model, tok = hf_reference(path, "seq")
    out = llm.encode(ALL_PROMPTS, RAW, pooling_task="token_classify", use_tqdm=False)
    for prompt, got in zip(ALL_PROMPTS, out):
        with torch.no_grad():
            hidden = model.model(**_inputs(tok, prompt)).last_hidden_state[0]
            _close(got.outputs.data, model.classifier(model.head(hidden)))


def test_bare_model_embeds_and_returns_hidden_states(make_modernbert, make_llm, hf_reference):
    path = make_modernbert("base")
    llm = make_llm(path)
    assert llm.model_config.task == "embed"
    assert llm.model_config.pooler.seq_pooling is PoolingType.CLS
    embeddings = llm.embed(ALL_PROMPTS, use_tqdm=False)
    tokens = make_llm(path, pooler_config={"task": "token_embed"}).encode(
        ALL_PROMPTS, RAW, pooling_task="token_embed", use_tqdm=False
    )
    for prompt, emb, tok_out in zip(ALL_PROMPTS, embeddings, tokens):
        hidden = _reference(hf_reference, path, "base", prompt).last_hidden_state[0]  # [num_tokens, hidden]
        _close(tok_out.outputs.data, hidden)
        _close(emb.outputs.embedding, F.normalize(hidden[0], dim=-1))


def test_bare_model_pools_as_sentence_transformers_says(make_modernbert, make_llm, hf_reference):
    path = make_modernbert("base", seed=1, sentence_transformers={"pooling": "mean", "max_seq_length": 256})
    llm = make_llm(path)
    assert llm.model_config.pooler.seq_pooling is PoolingType.MEAN
    for prompt, emb in zip(ALL_PROMPTS, llm.embed(ALL_PROMPTS, use_tqdm=False)):
        hidden = _reference(hf_reference, path, "base", prompt).last_hidden_state[0]
        _close(emb.outputs.embedding, F.normalize(hidden.mean(0), dim=-1))


def test_classifier_checkpoint_converted_to_embedder(make_modernbert, make_llm, hf_reference):
    """convert='embed' loads the body from a classifier checkpoint (``model.`` prefix, heads ignored)."""
    path = make_modernbert("seq", num_labels=2, classifier_pooling="mean")
    llm = make_llm(path, convert="embed")
    assert llm.model_config.architecture == "ModernBertModel"
    model, tok = hf_reference(path, "seq")
    for prompt, emb in zip(ALL_PROMPTS, llm.embed(ALL_PROMPTS, use_tqdm=False)):
        with torch.no_grad():
            hidden = model.model(**_inputs(tok, prompt)).last_hidden_state[0]
        _close(emb.outputs.embedding, F.normalize(hidden[0], dim=-1))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_batching_is_invisible(pooling, make_modernbert, make_llm):
    llm = make_llm(make_modernbert("seq", num_labels=3, classifier_pooling=pooling))
    together = llm.classify(ALL_PROMPTS, pooling_params=RAW, use_tqdm=False)
    for prompt, batched in zip(ALL_PROMPTS, together):
        alone = llm.classify(prompt, pooling_params=RAW, use_tqdm=False)[0]
        torch.testing.assert_close(
            torch.tensor(batched.outputs.probs), torch.tensor(alone.outputs.probs), atol=1e-5, rtol=0
        )


def test_config_variants_match_transformers(make_modernbert, make_llm, hf_reference):
    """Biases everywhere, other activations, global every 2nd layer, a wider window, scaled global RoPE."""
    path = make_modernbert(
        "seq",
        num_labels=2,
        seed=2,
        norm_bias=True,
        attention_bias=True,
        mlp_bias=True,
        classifier_bias=True,
        hidden_activation="gelu_pytorch_tanh",
        classifier_activation="silu",
        global_attn_every_n_layers=2,
        local_attention=16,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 80000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0},
        },
    )
    model, _ = hf_reference(path, "seq")
    assert model.config.layer_types[:2] == ["full_attention", "sliding_attention"]
    for prompt, got in zip(ALL_PROMPTS, make_llm(path).classify(ALL_PROMPTS, pooling_params=RAW, use_tqdm=False)):
        _close(got.outputs.probs, _reference(hf_reference, path, "seq", prompt).logits[0])


def test_window_size_is_observable(make_modernbert, make_llm):
    """A window one token wider changes the long prompts' logits far beyond ATOL, so parity pins it."""
    path = make_modernbert("seq", num_labels=3)
    exact = make_llm(path).classify(LONG_PROMPTS, pooling_params=RAW, use_tqdm=False)
    wider = make_llm(path, hf_overrides={"local_attention": LOCAL_ATTENTION + 2}).classify(
        LONG_PROMPTS, pooling_params=RAW, use_tqdm=False
    )
    for a, b in zip(exact, wider):
        assert (torch.tensor(a.outputs.probs) - torch.tensor(b.outputs.probs)).abs().max() > 100 * ATOL


def test_user_pooling_override_is_ignored_with_a_warning(make_modernbert, make_llm, caplog):
    path = make_modernbert("seq", num_labels=2, classifier_pooling="mean")
    with caplog.at_level(logging.WARNING, logger="winnow"):
        llm = LLM(str(path), device="cpu", pooler_config={"pooling_type": "LAST"})
    assert llm.model_config.pooler.seq_pooling is PoolingType.MEAN
    assert any("ignoring seq_pooling_type=LAST" in r.getMessage() for r in caplog.records)
    got = llm.classify(ALL_PROMPTS, pooling_params=RAW, use_tqdm=False)
    default = make_llm(path).classify(ALL_PROMPTS, pooling_params=RAW, use_tqdm=False)
    for a, b in zip(got, default):
        assert a.outputs.probs == b.outputs.probs


@pytest.mark.parametrize("field", ["hidden_activation", "classifier_activation"])
def test_unknown_activation_is_a_load_error(field, make_modernbert):
    with pytest.raises(ModelLoadError, match=field):
        LLM(str(make_modernbert("seq")), device="cpu", hf_overrides={field: "no_such_act"})


def test_bfloat16_is_as_close_to_float32_as_transformers_own_bfloat16(make_modernbert, make_llm, hf_reference):
    """Half precision: RoPE still runs in float32 as in transformers; errors stay at transformers' own level."""
    import transformers

    path = make_modernbert("seq", num_labels=3)
    hf_bf16 = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation="eager", dtype=torch.bfloat16
    ).eval()
    out = make_llm(path, dtype="bfloat16").classify(ALL_PROMPTS, pooling_params=RAW, use_tqdm=False)
    _, tok = hf_reference(path, "seq")
    ours, theirs = 0.0, 0.0
    for prompt, got in zip(ALL_PROMPTS, out):
        ref = _reference(hf_reference, path, "seq", prompt).logits[0]
        with torch.no_grad():
            theirs = max(theirs, (hf_bf16(**_inputs(tok, prompt)).logits[0].float() - ref).abs().max().item())
        ours = max(ours, (torch.tensor(got.outputs.probs) - ref).abs().max().item())
    assert ours <= 2 * theirs, (ours, theirs)


@pytest.mark.parametrize("group_overhead", [None, 0.0])
def test_one_padded_group_and_one_group_per_length(group_overhead, make_modernbert, hf_reference):
    """None: every prompt in one right-padded grid (the GPU layout); 0: groups without padding."""
    from winnow.models.files import find_weight_files
    from winnow.models.loader import load_weights
    from winnow.models.modernbert import ModernBertModel
    from winnow.runner.batch import build_batch

    path = make_modernbert("base")
    hf_model, tok = hf_reference(path, "base")
    files = find_weight_files(path)
    model = load_weights(
        ModernBertModel,
        hf_model.config,
        files,
        dtype=torch.float32,
        head_dtype=torch.float32,
        device=torch.device("cpu"),
    )
    ids = [tok(p)["input_ids"] for p in ALL_PROMPTS]
    batch = build_batch(ids, [None] * len(ids), torch.device("cpu"), group_overhead=group_overhead)
    if group_overhead is None:
        assert len(batch.attn_groups) == 1 and batch.attn_groups[0].pad_index is not None
    else:
        assert all(g.pad_index is None for g in batch.attn_groups)
    with torch.inference_mode():
        hidden = model(batch).split(batch.seq_lens)
    for prompt, got in zip(ALL_PROMPTS, hidden):
        _close(got, _reference(hf_reference, path, "base", prompt).last_hidden_state[0])
