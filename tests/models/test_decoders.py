"""Native decoders (Qwen2, Qwen3, Llama, Mistral, Gemma, Gemma2, GPT-2) against transformers, fp32, <= 1e-4.

Tiny random models are built here (configs + ``from_config`` + ``save_pretrained``) with a local
WordPiece tokenizer whose vocabulary also holds the reranker tokens ("yes", "no", "Yes", "0", "1").
The reference runs each prompt alone (no padding; HF's decoder classifiers pool the last non-pad
token, and no prompt contains the pad id); winnow runs the prompts as one mixed-length batch.
The configs exercise grouped-query attention (kv heads < heads, down to one), head_dim from the
config, q/k/v and MLP biases, Qwen3's q/k norms, Gemma2's soft-capping, scaling and sliding windows
shorter than the prompts. LM-head score heads (spec §4.2) are checked against transformers'
own causal-LM logits.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_models import CHARS, PROMPTS, SPECIALS, WORDS
from winnow import LLM, ModelLoadError, PoolingParams

ATOL = 1e-4
RAW = PoolingParams(use_activation=False)
DECODERS = ["qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2"]
FAMILIES = [*DECODERS, "gpt2"]
RERANK_TOKENS = ["yes", "no", "Yes"]

_PREFIX = {
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "llama": "Llama",
    "mistral": "Mistral",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
    "gpt2": "GPT2",
}
_HEAD = {"seq": "ForSequenceClassification", "tok": "ForTokenClassification", "base": "Model", "lm": "ForCausalLM"}
# Per family: GQA everywhere (Gemma: one kv head), head_dim != hidden / heads where the config has one.
_FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    "qwen2": {"num_key_value_heads": 2},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 16},
    "llama": {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True},
    "mistral": {"num_key_value_heads": 2, "head_dim": 16},
    "gemma": {"num_key_value_heads": 1, "head_dim": 16, "hidden_act": "gelu_pytorch_tanh"},
    # Soft-capping on, a scale that is not head_dim**-0.5, and a window shorter than the long prompts.
    "gemma2": {"num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 5.0,
               "sliding_window": 12},
}  # fmt: skip


# -- building tiny models --------------------------------------------------------------------------


def _tokenizer() -> Any:
    """WordPiece over the shared test words plus the reranker tokens; no token type ids (decoders have none).

    transformers v5 loads any model_type="qwen2" folder with its own Qwen2Tokenizer (BPE), which turns
    this vocabulary into one token per character: winnow and the reference still see the same ids.
    """
    from transformers import BertTokenizerFast

    vocab = list(dict.fromkeys(SPECIALS + CHARS + [f"##{c}" for c in CHARS] + WORDS + RERANK_TOKENS))
    return BertTokenizerFast(
        vocab={t: i for i, t in enumerate(vocab)},
        do_lower_case=True,
        model_max_length=512,
        model_input_names=["input_ids", "attention_mask"],
    )


def _config(family: str, vocab_size: int, num_labels: int, extra: dict[str, Any]) -> Any:
    import transformers

    if family == "gpt2":
        base: dict[str, Any] = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 512}
    else:
        base = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
            **_FAMILY_CONFIG[family],
        }
    base.update(vocab_size=vocab_size, pad_token_id=0, bos_token_id=2, eos_token_id=3, num_labels=num_labels)
    base.update(extra)
    return getattr(transformers, f"{_PREFIX[family]}Config")(**base)


def _spread_weights(model: torch.nn.Module, seed: int, *, unit_offset: bool) -> None:
    """Re-draw every parameter so logits are far from zero. Norm scales stay near 1: Llama-style
    RMSNorm and LayerNorm store the scale (1 + 0.1 N), Gemma's RMSNorm stores scale - 1 (0.1 N)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = "norm" in name or name.split(".")[-2].startswith("ln_")
            if is_norm and name.endswith("weight"):
                p.copy_(0.1 * noise if unit_offset else 1.0 + 0.1 * noise)
            elif is_norm:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def build_decoder(folder: Path, family: str, head: str, *, num_labels: int = 2, seed: int = 0, **extra: Any) -> Path:
    """Save a tiny ``family`` model with ``head`` (seq / tok / base / lm) and the test tokenizer in ``folder``."""
    import transformers

    tok = _tokenizer()
    config = _config(family, len(tok), num_labels, extra)
    arch = "GPT2LMHeadModel" if (family, head) == ("gpt2", "lm") else _PREFIX[family] + _HEAD[head]
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    _spread_weights(model, seed, unit_offset=family.startswith("gemma"))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def make_decoder(tmp_path_factory: pytest.TempPathFactory):
    """``make_decoder(family, head, num_labels=2, seed=0, **config_extra)``, built once per session."""
    cache: dict[str, Path] = {}

    def make(family: str, head: str, **kwargs: Any) -> Path:
        key = repr((family, head, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = build_decoder(tmp_path_factory.mktemp(f"{family}-{head}"), family, head, **kwargs)
        return cache[key]

    return make


_HF_CACHE: dict[tuple[str, str], Any] = {}


def _hf(path: Path, head: str) -> tuple[Any, Any]:
    """transformers model (eager attention, fp32) and tokenizer for ``path``, loaded once."""
    import transformers

    key = (str(path), head)
    if key not in _HF_CACHE:
        auto = {
            "seq": transformers.AutoModelForSequenceClassification,
            "tok": transformers.AutoModelForTokenClassification,
            "base": transformers.AutoModel,
            "lm": transformers.AutoModelForCausalLM,
        }[head]
        model = auto.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
        _HF_CACHE[key] = (model, transformers.AutoTokenizer.from_pretrained(path))
    return _HF_CACHE[key]


def _hf_run(path: Path, head: str, text: str) -> Any:
    model, tok = _hf(path, head)
    enc = tok(text, return_tensors="pt", return_token_type_ids=False)
    assert (enc["input_ids"] != model.config.pad_token_id).all(), "a prompt holding the pad id would change HF pooling"
    with torch.no_grad():
        return model(**enc)


def _assert_close(got: Any, ref: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float32), ref.float(), atol=atol, rtol=0)


# -- parity per family x head ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_labels", [1, 2, 3])
def test_sequence_classifier_matches_transformers(family, num_labels, make_decoder, make_llm):
    path = make_decoder(family, "seq", num_labels=num_labels)
    llm = make_llm(path)
    assert llm.model_config.entry.is_native
    assert llm.model_config.pooler.seq_pooling.value == "LAST"
    logits = llm.classify(PROMPTS, pooling_params=RAW, use_tqdm=False)
    probs = llm.classify(PROMPTS, use_tqdm=False)
    for prompt, got_logits, got_probs in zip(PROMPTS, logits, probs):
        ref = _hf_run(path, "seq", prompt).logits[0]
        ref_probs = torch.sigmoid(ref) if num_labels == 1 else torch.softmax(ref, -1)
        _assert_close(got_logits.outputs.probs, ref)
        _assert_close(got_probs.outputs.probs, ref_probs)
        assert got_probs.outputs.num_classes == num_labels


@pytest.mark.parametrize("family", FAMILIES)
def test_token_classifier_matches_transformers(family, make_decoder, make_llm):
    path = make_decoder(family, "tok", num_labels=5)
    llm = make_llm(path)
    assert llm.model_config.task == "token_classify"
    raw = llm.encode(PROMPTS, RAW, pooling_task="token_classify", use_tqdm=False)
    probs = llm.encode(PROMPTS, pooling_task="token_classify", use_tqdm=False)
    for prompt, got_raw, got_probs in zip(PROMPTS, raw, probs):
        ref = _hf_run(path, "tok", prompt).logits[0]  # [num_tokens, 5]
        assert got_raw.outputs.data.shape == ref.shape
        _assert_close(got_raw.outputs.data, ref)
        _assert_close(got_probs.outputs.data, torch.softmax(ref, -1))


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_classifier_applies_score_per_token_when_asked(family, make_decoder, make_llm):
    """PoolerConfig(task="token_classify") on a sequence classifier: ``score`` on every token."""
    path = make_decoder(family, "seq", num_labels=3)
    llm = make_llm(path, pooler_config={"task": "token_classify"})
    model, tok = _hf(path, "seq")
    body = getattr(model, model.base_model_prefix)
    out = llm.encode(PROMPTS[:4], RAW, pooling_task="token_classify", use_tqdm=False)
    for prompt, got in zip(PROMPTS[:4], out):
        with torch.no_grad():
            hidden = body(**tok(prompt, return_tensors="pt", return_token_type_ids=False)).last_hidden_state[0]
            _assert_close(got.outputs.data, model.score(hidden))


@pytest.mark.parametrize("family", FAMILIES)
def test_bare_model_embeds_its_last_token(family, make_decoder, make_llm):
    path = make_decoder(family, "base")
    llm = make_llm(path)
    assert llm.model_config.task == "embed"
    assert llm.model_config.pooler.seq_pooling.value == "LAST"
    raw = llm.embed(PROMPTS, pooling_params=RAW, use_tqdm=False)
    normed = llm.embed(PROMPTS, use_tqdm=False)
    for prompt, got_raw, got in zip(PROMPTS, raw, normed):
        ref = _hf_run(path, "base", prompt).last_hidden_state[0, -1]
        _assert_close(got_raw.outputs.embedding, ref)
        _assert_close(got.outputs.embedding, torch.nn.functional.normalize(ref, dim=-1))


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma2", "gpt2"])
def test_batch_composition_and_order_do_not_change_results(family, make_decoder, make_llm):
    llm = make_llm(
        make_decoder(family, "seq", num_labels=3), max_model_len=200, max_num_batched_tokens=256, max_num_seqs=3
    )
    alone = [llm.classify(p, pooling_params=RAW, use_tqdm=False)[0].outputs.probs for p in PROMPTS]
    order = list(range(len(PROMPTS)))
    random.Random(0).shuffle(order)
    shuffled = llm.classify([PROMPTS[i] for i in order], pooling_params=RAW, use_tqdm=False)
    for i, got in zip(order, shuffled):
        _assert_close(got.outputs.probs, torch.tensor(alone[i]), atol=1e-5)


# -- family details ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        # Qwen2: layer 0 full attention, layer 1 sliding (layer_types from max_window_layers).
        ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}),
        ("mistral", {"sliding_window": 6}),  # every layer
        ("gemma2", {"sliding_window": 3, "attn_logit_softcapping": 2.0}),
        ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}}),
        ("qwen2", {"num_key_value_heads": 1}),  # multi-query
        ("llama", {"num_key_value_heads": 4}),  # plain multi-head
    ],
)
def test_config_variants_match_transformers(family, extra, make_decoder, make_llm):
    """Windows much shorter than the prompts, scaled RoPE, MQA/MHA: still equal to transformers."""
    path = make_decoder(family, "seq", num_labels=2, **extra)
    llm = make_llm(path)
    logits = llm.classify(PROMPTS, pooling_params=RAW, use_tqdm=False)
    for prompt, got in zip(PROMPTS, logits):
        _assert_close(got.outputs.probs, _hf_run(path, "seq", prompt).logits[0])


def test_gemma2_soft_capping_and_window_change_the_result(make_decoder, make_llm):
    """The parity above is not vacuous: without soft-capping or the window the logits move."""
    path = make_decoder("gemma2", "seq", num_labels=2)
    long_prompt = [PROMPTS[5]]  # longer than the 12-token window
    base = torch.tensor(make_llm(path).classify(long_prompt, pooling_params=RAW, use_tqdm=False)[0].outputs.probs)
    for override in ({"attn_logit_softcapping": None}, {"sliding_window": 4096}):
        other = make_llm(path, hf_overrides=override).classify(long_prompt, pooling_params=RAW, use_tqdm=False)
        assert (torch.tensor(other[0].outputs.probs) - base).abs().max() > 1e-3, override


def test_gpt2_without_pad_token_matches_transformers(make_decoder, make_llm):
    """LAST pooling reads the last token directly: the native path needs no pad token."""
    path = make_decoder("gpt2", "seq", num_labels=3, pad_token_id=None)
    llm = make_llm(path)
    assert llm.model_config.hf_config.pad_token_id is None and llm.model_config.entry.is_native
    logits = llm.classify(PROMPTS, pooling_params=RAW, use_tqdm=False)
    for prompt, got in zip(PROMPTS, logits):
        model, tok = _hf(path, "seq")
        with torch.no_grad():
            ref = model(**tok(prompt, return_tensors="pt", return_token_type_ids=False)).logits[0]
        _assert_close(got.outputs.probs, ref)


def test_gpt2_skips_the_mask_buffers_of_old_checkpoints(make_decoder, tmp_path):
    """Checkpoints saved by older transformers carry h.N.attn.bias / masked_bias buffers."""

    src = make_decoder("gpt2", "seq", num_labels=2)
    folder = Path(shutil.copytree(src, tmp_path / "old-gpt2"))
    state = load_file(folder / "model.safetensors")
    for i in range(2):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    got = LLM(str(folder), device="cpu").classify(PROMPTS, pooling_params=RAW, use_tqdm=False)
    for prompt, out in zip(PROMPTS, got):
        _assert_close(out.outputs.probs, _hf_run(src, "seq", prompt).logits[0])


@pytest.mark.parametrize(
    ("family", "override", "message"),
    [
        ("llama", {"hidden_act": "gelu_10"}, "gelu_10"),
        ("gemma", {"use_bidirectional_attention": True}, "bidirectional"),
        ("qwen2", {"architectures": ["LlamaForSequenceClassification"]}, "model_type='qwen2'"),
        ("qwen3", {"layer_types": ["full_attention", "chunked_attention"]}, "chunked_attention"),
        ("gpt2", {"activation_function": "swiglu"}, "swiglu"),
    ],
)
def test_unsupported_config_variants_are_load_errors(family, override, message, make_decoder):
    path = make_decoder(family, "seq", num_labels=2)
    with pytest.raises(ModelLoadError, match=message):
        LLM(str(path), device="cpu", hf_overrides=override)


# -- causal LMs: LM-head score heads and conversion (spec §4) --------------------------------------

QUERY = "what is the capital of france?"
DOCS = ["paris is the capital.", "horses and cows are both animals", "the quick brown fox"]


def _lm_logits(path: Path, text: str, tokens: list[str]) -> torch.Tensor:
    """transformers' causal-LM logits of ``tokens`` at the last position of ``text``."""
    ids = _hf(path, "lm")[1].convert_tokens_to_ids(tokens)
    return _hf_run(path, "lm", text).logits[0, -1, ids]


@pytest.mark.parametrize(
    ("family", "overrides", "tokens"),
    [
        # The original Qwen3-Reranker recipe.
        ("qwen3", {"classifier_from_token": ["no", "yes"], "is_original_qwen3_reranker": True}, ["no", "yes"]),
        # The mxbai-rerank-v2 recipe.
        ("qwen2", {"classifier_from_token": ["0", "1"], "method": "from_2_way_softmax"}, ["0", "1"]),
    ],
)
def test_two_way_softmax_reranker_matches_causal_lm_logits(family, overrides, tokens, make_decoder):
    path = make_decoder(family, "lm")
    arch = f"{_PREFIX[family]}ForSequenceClassification"
    llm = LLM(str(path), device="cpu", hf_overrides={"architectures": [arch], **overrides})
    assert llm.model_config.num_labels == 1 and not llm.model_config.use_sep_token
    scores = llm.score(QUERY, DOCS, use_tqdm=False)
    for doc, got in zip(DOCS, scores):
        logits = _lm_logits(path, QUERY + doc, tokens)  # use_sep_token=False: query + document as one text
        assert got.outputs.score == pytest.approx(float(torch.softmax(logits, -1)[1]), abs=1e-5)


def test_no_post_processing_reranker_on_tied_gemma(make_decoder):
    """bge-reranker-v2-gemma: one token, sigmoid of its logit; the LM head is the tied embedding."""
    path = make_decoder("gemma", "lm", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    overrides = {"architectures": ["GemmaForSequenceClassification"], "classifier_from_token": ["Yes"]}
    llm = LLM(str(path), device="cpu", hf_overrides={**overrides, "method": "no_post_processing"})
    for doc, got in zip(DOCS, llm.score(QUERY, DOCS, use_tqdm=False)):
        logit = _lm_logits(path, QUERY + doc, ["Yes"])[0]
        assert got.outputs.score == pytest.approx(float(torch.sigmoid(logit)), abs=1e-5)


@pytest.mark.parametrize("family", ["gemma", "gpt2"])
def test_no_post_processing_with_three_tokens_is_a_softmax_over_their_logits(family, make_decoder):
    path = make_decoder(family, "lm", tie_word_embeddings=True)
    arch = f"{_PREFIX[family]}ForSequenceClassification"
    llm = LLM(
        str(path),
        device="cpu",
        hf_overrides={"architectures": [arch], "classifier_from_token": RERANK_TOKENS, "method": "no_post_processing"},
    )
    assert llm.model_config.num_labels == 3
    for prompt, got in zip(PROMPTS, llm.classify(PROMPTS, use_tqdm=False)):
        ref = torch.softmax(_lm_logits(path, prompt, RERANK_TOKENS), -1)
        _assert_close(got.outputs.probs, ref, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_convert_classify_without_a_score_head_names_the_missing_weight(family, make_decoder):
    """...and says what to do instead: an embedder, or a head built from LM-head rows."""
    path = make_decoder(family, "lm")
    with pytest.raises(ModelLoadError, match=r"missing weights \[score\.weight\]; unexpected weights none") as err:
        LLM(str(path), device="cpu", convert="classify")
    assert "no trained classification head" in str(err.value) and "classifier_from_token" in str(err.value)


@pytest.mark.parametrize("family", ["qwen3", "gemma", "gpt2"])
def test_convert_embed_on_a_causal_lm_gives_last_token_states(family, make_decoder):
    path = make_decoder(family, "lm", tie_word_embeddings=family != "qwen3")
    llm = LLM(str(path), device="cpu", convert="embed")
    assert llm.model_config.entry.architecture == f"{_PREFIX[family]}Model"
    for prompt, got in zip(PROMPTS, llm.embed(PROMPTS, use_tqdm=False)):
        ref = _hf_run(path, "base", prompt).last_hidden_state[0, -1]  # AutoModel of the causal-LM folder
        _assert_close(got.outputs.embedding, torch.nn.functional.normalize(ref, dim=-1))


def test_gpt2_classifier_loads_a_checkpoint_saved_without_its_body_prefix(make_decoder, tmp_path):
    """openai-community/gpt2 is saved as the bare GPT2Model ("h.0...", "wte.weight"): convert="classify"
    accepts those names and builds the head from the tied embedding."""
    source = make_decoder("gpt2", "lm", tie_word_embeddings=True)
    folder = Path(shutil.copytree(source, tmp_path / "bare-gpt2"))
    state = load_file(folder / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in state.items() if not k.startswith("lm_head.")}
    assert "wte.weight" in bare and not any(k.startswith("transformer.") for k in bare)
    save_file(bare, folder / "model.safetensors", metadata={"format": "pt"})
    overrides = {"classifier_from_token": ["no", "yes"], "method": "from_2_way_softmax"}
    llm = LLM(str(folder), device="cpu", convert="classify", hf_overrides=overrides)
    for doc, got in zip(DOCS, llm.score(QUERY, DOCS, use_tqdm=False)):
        logits = _lm_logits(source, QUERY + doc, ["no", "yes"])
        assert got.outputs.score == pytest.approx(float(torch.softmax(logits, -1)[1]), abs=1e-5)


def test_untied_model_without_an_lm_head_is_an_error(make_decoder, tmp_path):
    """An untied causal LM missing lm_head.weight must not silently use its input embedding."""
    source = make_decoder("qwen3", "lm")
    folder = Path(shutil.copytree(source, tmp_path / "no-head"))
    state = {k: v for k, v in load_file(folder / "model.safetensors").items() if not k.startswith("lm_head.")}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    overrides = {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"]}
    with pytest.raises(ModelLoadError, match="needs the LM head"):
        LLM(str(folder), device="cpu", hf_overrides={**overrides, "is_original_qwen3_reranker": True})


def test_token_heads_refuse_soft_capped_logits(make_decoder):
    from winnow import ConfigError

    path = make_decoder("gemma2", "lm", final_logit_softcapping=30.0)
    overrides = {"architectures": ["Gemma2ForSequenceClassification"], "classifier_from_token": ["Yes"]}
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        LLM(str(path), device="cpu", hf_overrides={**overrides, "method": "no_post_processing"})
