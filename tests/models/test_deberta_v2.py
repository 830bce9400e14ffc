"""Native DeBERTa-v2/v3 against transformers on the same weights: fp32, each prompt alone, <= 1e-4.

Tiny random models are built here (``DebertaV2Config``, weights re-drawn with a wide spread), with
the local BERT tokenizer: the model does not care which tokenizer produced the ids. Position
buckets and relative spans are small so that the test prompts reach the log-bucket branch and the
clamping of distant positions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_models import PROMPTS, _bert_tokenizer, _spread_weights
from winnow import ModelLoadError, PoolingParams
from winnow.runner.batch import build_batch

ATOL = 1e-4
RAW = PoolingParams(use_activation=False)
# Longer than the buckets and spans below (up to ~60 tokens with [CLS]/[SEP]).
LONG = [
    "the quick brown fox jumps over the lazy dog " * 5,
    "what is the capital of brazil? brasilia is the capital city of the country " * 3,
]
ALL_PROMPTS = PROMPTS + LONG

BASE: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "hidden_act": "gelu",
    "initializer_range": 0.3,
}
VARIANTS: dict[str, dict[str, Any]] = {
    # DeBERTa-v3: buckets (8 here, 256 in v3), shared keys, layer-normed relative embeddings.
    "v3": {
        "relative_attention": True,
        "position_buckets": 8,
        "max_relative_positions": 24,
        "pos_att_type": ["p2c", "c2p"],
        "position_biased_input": False,
        "share_att_key": True,
        "norm_rel_ebd": "layer_norm",
        "type_vocab_size": 0,
    },
    # DeBERTa-v2 style: absolute positions too, no buckets, separate position projections.
    "v2": {
        "relative_attention": True,
        "position_buckets": -1,
        "max_relative_positions": 12,
        "pos_att_type": ["c2p", "p2c"],
        "position_biased_input": True,
        "share_att_key": False,
        "type_vocab_size": 2,
        "pooler_hidden_act": "tanh",
    },
    # deberta-v2-xlarge style: the convolution beside the first layer.
    "conv": {
        "relative_attention": True,
        "position_buckets": 8,
        "pos_att_type": "p2c|c2p",
        "position_biased_input": False,
        "share_att_key": True,
        "norm_rel_ebd": "layer_norm",
        "conv_kernel_size": 3,
        "conv_act": "gelu",
    },
    # The convolution after the only layer: that layer computes every token even when one is pooled.
    "conv_one_layer": {
        "relative_attention": True,
        "position_buckets": 8,
        "pos_att_type": "p2c|c2p",
        "share_att_key": True,
        "conv_kernel_size": 3,
        "num_hidden_layers": 1,
    },
    "c2p_only": {"relative_attention": True, "pos_att_type": ["c2p"], "max_relative_positions": 6},
    "p2c_only": {"relative_attention": True, "pos_att_type": ["p2c"], "position_buckets": 6, "share_att_key": True},
    "absolute": {"relative_attention": False, "pos_att_type": ["c2p", "p2c"]},  # scale still counts the terms
    "embed_proj": {"relative_attention": True, "pos_att_type": ["c2p", "p2c"], "embedding_size": 16},
}
HEADS = {
    "seq": "DebertaV2ForSequenceClassification",
    "tok": "DebertaV2ForTokenClassification",
    "base": "DebertaV2Model",
}


def build_deberta(root: Path, head: str, variant: str, num_labels: int = 2, seed: int = 0) -> Path:
    import transformers

    folder = root / f"deberta-{variant}-{head}-{num_labels}-{seed}"
    folder.mkdir(parents=True)
    tok = _bert_tokenizer(folder)
    config = transformers.DebertaV2Config(
        **{**BASE, **VARIANTS[variant]}, vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=num_labels
    )
    config.architectures = [HEADS[head]]
    torch.manual_seed(seed)
    model = getattr(transformers, HEADS[head])(config).eval()
    _spread_weights(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def deberta(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache: dict[tuple[str, str, int], Path] = {}

    def make(head: str, variant: str, num_labels: int = 2) -> Path:
        key = (head, variant, num_labels)
        if key not in cache:
            cache[key] = build_deberta(tmp_path_factory.mktemp("deberta"), head, variant, num_labels)
        return cache[key]

    return make


def _hf(hf_reference: Any, path: Path, head: str, *text: str) -> Any:
    model, tok = hf_reference(path, head)
    with torch.no_grad():
        return model(**tok(*text, return_tensors="pt"))


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


# Every label count on the v3 and v2 variants; two labels on the others.
SEQ_CASES = [(v, n) for v in ("v3", "v2") for n in (1, 2, 3)] + [(v, 2) for v in VARIANTS if v not in ("v3", "v2")]


@pytest.mark.parametrize(("variant", "num_labels"), SEQ_CASES)
def test_sequence_classifier_matches_transformers(variant, num_labels, deberta, make_llm, hf_reference):
    path = deberta("seq", variant, num_labels)
    llm = make_llm(path)
    assert llm.model_config.entry.is_native
    logits = llm.classify(ALL_PROMPTS, pooling_params=RAW, use_tqdm=False)
    probs = llm.classify(ALL_PROMPTS, use_tqdm=False)
    for prompt, got_logits, got_probs in zip(ALL_PROMPTS, logits, probs):
        ref = _hf(hf_reference, path, "seq", prompt).logits[0]
        assert ref.abs().max() > 0.5, "weights too tame for a meaningful comparison"
        ref_probs = torch.sigmoid(ref) if num_labels == 1 else torch.softmax(ref, -1)
        _close(torch.tensor(got_logits.outputs.probs), ref)
        _close(torch.tensor(got_probs.outputs.probs), ref_probs)
        assert got_probs.outputs.num_classes == num_labels


@pytest.mark.parametrize("variant", ["v3", "v2", "conv"])
def test_token_classifier_matches_transformers(variant, deberta, make_llm, hf_reference):
    path = deberta("tok", variant, 5)
    llm = make_llm(path)
    assert llm.model_config.task == "token_classify"
    raw = llm.encode(ALL_PROMPTS, RAW, pooling_task="token_classify", use_tqdm=False)
    probs = llm.encode(ALL_PROMPTS, pooling_task="token_classify", use_tqdm=False)
    for prompt, got_raw, got_probs in zip(ALL_PROMPTS, raw, probs):
        ref = _hf(hf_reference, path, "tok", prompt).logits[0]  # [num_tokens, 5], special tokens included
        assert got_raw.outputs.data.shape == ref.shape
        _close(got_raw.outputs.data, ref)
        _close(got_probs.outputs.data, torch.softmax(ref, -1))


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_bare_model_embeds_like_transformers(variant, deberta, make_llm, hf_reference):
    path = deberta("base", variant)
    llm = make_llm(path)
    out = llm.embed(ALL_PROMPTS, use_tqdm=False)
    for prompt, got in zip(ALL_PROMPTS, out):
        cls = _hf(hf_reference, path, "base", prompt).last_hidden_state[0, 0]
        _close(torch.tensor(got.outputs.embedding), F.normalize(cls, dim=-1))


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_sequence_classifier_checkpoint_serves_as_embedder(variant, deberta, make_llm, hf_reference):
    """convert="embed": the classifier's encoder alone; pooler and classifier weights are skipped."""
    path = deberta("seq", variant, 3)
    out = make_llm(path, convert="embed").embed(PROMPTS[:3], use_tqdm=False)
    model, tok = hf_reference(path, "seq")
    for prompt, got in zip(PROMPTS[:3], out):
        with torch.no_grad():
            cls = model.deberta(**tok(prompt, return_tensors="pt")).last_hidden_state[0, 0]
        _close(torch.tensor(got.outputs.embedding), F.normalize(cls, dim=-1))


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_sequence_classifier_serves_token_classify_when_asked(variant, deberta, make_llm, hf_reference):
    """The whole DeBERTa head per token: classifier(act(pooler.dense(h))); the pooler is part of the head."""
    path = deberta("seq", variant, 3)
    llm = make_llm(path, pooler_config={"task": "token_classify"})
    model, tok = hf_reference(path, "seq")
    out = llm.encode(ALL_PROMPTS, RAW, pooling_task="token_classify", use_tqdm=False)
    act = {"gelu": F.gelu, "tanh": torch.tanh}[model.config.pooler_hidden_act]
    for prompt, got in zip(ALL_PROMPTS, out):
        with torch.no_grad():
            hidden = model.deberta(**tok(prompt, return_tensors="pt")).last_hidden_state[0]
            ref = model.classifier(act(model.pooler.dense(hidden)))
        _close(got.outputs.data, ref)


@pytest.mark.parametrize("variant", ["v3", "v2", "conv"])
def test_mixed_batch_equals_single_prompts(variant, deberta, make_llm):
    """Batching (several attention groups, padding inside them) must not change any result."""
    llm = make_llm(deberta("seq", variant, 2))
    together = llm.classify(ALL_PROMPTS, pooling_params=RAW, use_tqdm=False)
    for prompt, got in zip(ALL_PROMPTS, together):
        alone = llm.classify([prompt], pooling_params=RAW, use_tqdm=False)[0]
        torch.testing.assert_close(
            torch.tensor(got.outputs.probs), torch.tensor(alone.outputs.probs), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_one_padded_group_equals_many_groups(variant, deberta, make_llm):
    """The model itself: one padded grid over all lengths vs. one group per sequence."""
    llm = make_llm(deberta("base", variant))
    model = llm.engine.core.runner.model
    tok = llm.get_tokenizer()
    ids = [tok(p)["input_ids"] for p in ALL_PROMPTS]
    with torch.inference_mode():
        one = build_batch(ids, [None] * len(ids), torch.device("cpu"), group_overhead=None)
        many = build_batch(ids, [None] * len(ids), torch.device("cpu"), group_overhead=0.0)
        assert len(one.attn_groups) == 1 and one.attn_groups[0].pad_index is not None
        assert len(many.attn_groups) > 1
        torch.testing.assert_close(model(one), model(many), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_relative_positions_are_projected_at_load_not_per_forward(variant, deberta, make_llm):
    """Kr and Qr depend on the weights alone: a forward of T tokens runs each layer's projections
    on its T rows only (HF projects every relative-embedding row in every layer), and equals
    transformers all the same (the parity tests above)."""
    llm = make_llm(deberta("base", variant))
    model = llm.engine.core.runner.model
    layers = list(model.encoder.layer)
    attention = layers[0].attention.self
    span = model.encoder.span
    assert attention.pos_key.shape == attention.pos_query.shape == (4, 8, 2 * span)  # [heads, head_dim, 2 span]
    # share_att_key=False (v2): the separate position projections served the load only, and are gone.
    assert not any(hasattr(layer.attention.self, n) for layer in layers for n in ("pos_key_proj", "pos_query_proj"))
    rows: list[int] = []  # the rows each projection multiplies, call by call
    names = ("qkv_proj", "pos_key_proj", "pos_query_proj")
    projections = [getattr(layer.attention.self, name, None) for layer in layers for name in names]

    def count(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        rows.append(len(args[0]))

    hooks = [m.register_forward_hook(count) for m in projections if m is not None]
    try:
        with torch.inference_mode():
            model(build_batch([list(range(5, 12))], [None], torch.device("cpu")))
    finally:
        for hook in hooks:
            hook.remove()
    assert rows == [7] * len(layers)


QUERY = "what is the capital of france?"
DOCS = ["paris is the capital of france.", "horses and cows are both animals", "rain", LONG[1]]


def test_cross_encoder_pairs_match_transformers(deberta, make_llm, hf_reference):
    """Token types (type_vocab_size=2) reach the embeddings: [CLS] q [SEP] d [SEP], types 0..0 1..1."""
    path = deberta("seq", "v2", 1)
    llm = make_llm(path)
    assert llm.model_config.score_type == "cross-encoder"
    scores = llm.score(QUERY, DOCS, use_tqdm=False)
    raw = llm.score(QUERY, DOCS, pooling_params=RAW, use_tqdm=False)
    model, tok = hf_reference(path, "seq")
    for doc, s, r in zip(DOCS, scores, raw):
        enc = tok(QUERY, doc, return_tensors="pt")
        assert s.prompt_token_ids == enc["input_ids"][0].tolist()
        with torch.no_grad():
            ref = model(**enc).logits[0, 0]
            without_types = model(input_ids=enc["input_ids"]).logits[0, 0]
        assert r.outputs.score == pytest.approx(ref.item(), abs=ATOL)
        assert s.outputs.score == pytest.approx(torch.sigmoid(ref).item(), abs=ATOL)
        assert abs(ref - without_types) > 1e-3  # the types matter, so the check above means something


def test_unused_absolute_positions_in_checkpoint_are_accepted(deberta, make_llm, hf_reference, tmp_path):
    """A v3 checkpoint may carry a position table it never uses; transformers ignores it, so do we."""
    from safetensors.torch import load_file, save_file

    src = deberta("seq", "v3", 2)
    folder = tmp_path / "with-positions"
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = load_file(folder / "model.safetensors")
    weights["deberta.embeddings.position_embeddings.weight"] = torch.randn(64, 32)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    got = make_llm(folder).classify(PROMPTS[:2], pooling_params=RAW, use_tqdm=False)
    for prompt, g in zip(PROMPTS[:2], got):
        _close(torch.tensor(g.outputs.probs), _hf(hf_reference, src, "seq", prompt).logits[0])


def test_max_model_len_follows_the_config(deberta, make_llm):
    assert make_llm(deberta("seq", "v3", 2)).model_config.max_model_len == 64


def test_unsupported_activation_is_a_clear_error(deberta, tmp_path):
    from winnow import LLM

    folder = tmp_path / "bad-act"
    src = deberta("seq", "v3", 2)
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["pooler_hidden_act"] = "mish"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="pooler_hidden_act"):
        LLM(str(folder), device="cpu")


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_one_and_two_token_prompts(variant, deberta, make_llm, hf_reference):
    """Grids of length 1 and 2 (one distance column / three) next to longer prompts."""
    path = deberta("seq", variant, 2)
    model, _ = hf_reference(path, "seq")
    prompts = [[2], [2, 3], [2, 40, 41, 42, 3], list(range(5, 50))]
    got = make_llm(path).classify([{"prompt_token_ids": p} for p in prompts], pooling_params=RAW, use_tqdm=False)
    for ids, g in zip(prompts, got):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0]
        _close(torch.tensor(g.outputs.probs), ref)
