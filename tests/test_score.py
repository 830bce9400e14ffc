"""Cross-encoder scoring: pair encoding with token types, pairing rules, per-side limits, templates."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import PROMPTS
from winnow import InvalidInputError, PoolingParams, UnsupportedTaskError

QUERY = "what is the capital of france?"
DOCS = ["paris is the capital of france.", "horses and cows are both animals", "rain"]


def _pair_logit(hf_reference, path, q, d):
    model, tok = hf_reference(path, "seq")
    with torch.no_grad():
        return model(**tok(q, d, return_tensors="pt")).logits[0, 0]


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "electra", "distilbert"])
def test_cross_encoder_matches_transformers_pairs(family, make_model, make_llm, hf_reference):
    path = make_model(family, "seq", num_labels=1)
    llm = make_llm(path)
    assert llm.model_config.score_type == "cross-encoder"
    scores = llm.score(QUERY, DOCS, use_tqdm=False)
    _, tok = hf_reference(path, "seq")
    for doc, s in zip(DOCS, scores):
        assert s.prompt_token_ids == tok(QUERY, doc)["input_ids"]
        ref = torch.sigmoid(_pair_logit(hf_reference, path, QUERY, doc))
        assert s.outputs.score == pytest.approx(ref.item(), abs=1e-5)


def test_bert_pairs_use_token_types(make_model, make_llm, hf_reference):
    """[CLS] q [SEP] d [SEP] with types 0..0 1..1; dropping the types would change the score."""
    path = make_model("bert", "seq", num_labels=1)
    raw = make_llm(path).score(QUERY, DOCS[0], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    model, tok = hf_reference(path, "seq")
    enc = tok(QUERY, DOCS[0], return_tensors="pt")
    assert enc["token_type_ids"].sum() > 0
    with torch.no_grad():
        without_types = model(input_ids=enc["input_ids"]).logits[0, 0]
    assert raw[0].outputs.score == pytest.approx(_pair_logit(hf_reference, path, QUERY, DOCS[0]).item(), abs=1e-5)
    assert abs(raw[0].outputs.score - without_types.item()) > 1e-3


def test_roberta_pair_layout(make_model, make_llm):
    llm = make_llm(make_model("roberta", "seq", num_labels=1))
    tok = llm.get_tokenizer()
    ids = llm.score("hello", "world", use_tqdm=False)[0].prompt_token_ids
    q, d = tok("hello", add_special_tokens=False).input_ids, tok("world", add_special_tokens=False).input_ids
    assert ids == [tok.cls_token_id, *q, tok.sep_token_id, tok.sep_token_id, *d, tok.sep_token_id]


def test_matches_sentence_transformers_cross_encoder(make_model, make_llm):
    from sentence_transformers import CrossEncoder

    path = make_model("bert", "seq", num_labels=1)
    ce = CrossEncoder(str(path), device="cpu")
    expected = ce.predict([(QUERY, d) for d in DOCS])
    got = [s.outputs.score for s in make_llm(path).score(QUERY, DOCS, use_tqdm=False)]
    assert got == pytest.approx(list(expected), abs=1e-5)


def test_pairing_rules(make_model, make_llm):
    llm = make_llm(make_model("bert", "seq", num_labels=1))
    one_to_many = [s.outputs.score for s in llm.score(QUERY, DOCS, use_tqdm=False)]
    pairwise = [s.outputs.score for s in llm.score([QUERY] * 3, DOCS, use_tqdm=False)]
    single = llm.score(QUERY, DOCS[1], use_tqdm=False)
    assert one_to_many == pytest.approx(pairwise, abs=1e-6)
    assert [s.outputs.score for s in single] == pytest.approx(one_to_many[1:2], abs=1e-6)
    with pytest.raises(InvalidInputError, match="Input lengths must be either 1:1, 1:N or N:N"):
        llm.score([QUERY, QUERY], DOCS, use_tqdm=False)
    with pytest.raises(InvalidInputError, match="At least one text element"):
        llm.score([], DOCS, use_tqdm=False)
    with pytest.raises(InvalidInputError, match="At least one text_pair element"):
        llm.score(QUERY, [], use_tqdm=False)


def test_text_content_parts_are_accepted(make_model, make_llm):
    llm = make_llm(make_model("bert", "seq", num_labels=1))
    parts = {"content": [{"type": "text", "text": "paris is the capital "}, {"type": "text", "text": "of france."}]}
    assert llm.score(QUERY, parts, use_tqdm=False)[0].outputs.score == pytest.approx(
        llm.score(QUERY, DOCS[0], use_tqdm=False)[0].outputs.score, abs=1e-6
    )
    with pytest.raises(InvalidInputError, match="non-text"):
        llm.score(QUERY, {"content": [{"type": "image_url", "image_url": {"url": "x"}}]}, use_tqdm=False)


def test_per_side_token_limits(make_model, make_llm):
    llm = make_llm(make_model("bert", "seq", num_labels=1))
    tok = llm.get_tokenizer()
    long_doc = "the quick brown fox jumps over the lazy dog " * 3
    params = PoolingParams(extra_kwargs={"max_tokens_per_query": 3, "max_tokens_per_doc": 4})
    got = llm.score(QUERY, long_doc, pooling_params=params, use_tqdm=False)[0]
    q = tok(QUERY, add_special_tokens=False).input_ids[:3]
    d = tok(long_doc, add_special_tokens=False).input_ids[:4]
    assert got.prompt_token_ids == [tok.cls_token_id, *q, tok.sep_token_id, *d, tok.sep_token_id]
    with pytest.raises(InvalidInputError, match="max_tokens_per_doc"):
        llm.score(
            QUERY,
            long_doc,
            pooling_params=PoolingParams(extra_kwargs={"max_tokens_per_doc": 10_000}),
            use_tqdm=False,
        )


def test_truncation_of_the_whole_pair(make_model, make_llm):
    llm = make_llm(make_model("bert", "seq", num_labels=1))
    long_doc = "the quick brown fox jumps over the lazy dog " * 20
    with pytest.raises(InvalidInputError, match="Please reduce the length of the input prompt"):
        llm.score(QUERY, long_doc, use_tqdm=False)
    got = llm.score(QUERY, long_doc, tokenization_kwargs={"truncate_prompt_tokens": 20}, use_tqdm=False)[0]
    assert len(got.prompt_token_ids) == 20
    assert got.prompt_token_ids[-1] == llm.get_tokenizer().sep_token_id  # special tokens survive


def test_score_template_and_plain_concatenation(make_model, make_llm):
    path = make_model("bert", "seq", num_labels=1)
    llm = make_llm(path)
    tok = llm.get_tokenizer()
    template = (
        "{{ (messages | selectattr('role', 'eq', 'query') | first).content }} fox "
        "{{ (messages | selectattr('role', 'eq', 'document') | first).content }}"
    )
    templated = llm.score("hello", "world", chat_template=template, use_tqdm=False)[0]
    assert templated.prompt_token_ids == tok("hello fox world").input_ids
    concat = make_llm(path, hf_overrides={"use_sep_token": False}).score("hello", "world", use_tqdm=False)[0]
    assert concat.prompt_token_ids == tok("helloworld").input_ids


def test_score_requires_one_label(make_model, make_llm):
    llm = make_llm(make_model("bert", "seq", num_labels=2))
    with pytest.raises(UnsupportedTaskError, match=r"Scoring API is only enabled for num_labels == 1\."):
        llm.score(QUERY, DOCS, use_tqdm=False)
    token_model = make_llm(make_model("bert", "tok", num_labels=3))
    with pytest.raises(UnsupportedTaskError, match="does not support the Scoring API"):
        token_model.score(QUERY, DOCS, use_tqdm=False)


def test_use_activation_on_scores(make_model, make_llm, hf_reference):
    path = make_model("bert", "seq", num_labels=1)
    llm = make_llm(path)
    raw = llm.score(QUERY, DOCS[0], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)[0]
    assert raw.outputs.score == pytest.approx(_pair_logit(hf_reference, path, QUERY, DOCS[0]).item(), abs=1e-5)
    with pytest.raises(InvalidInputError, match="only supports"):
        llm.score(QUERY, DOCS[0], pooling_params=PoolingParams(dimensions=4), use_tqdm=False)


def test_a_large_cross_encoder_score_on_two_threads_equals_one_thread(make_model, make_llm, monkeypatch):
    """CPU, two workers: the pairs after the first chunk are planned half on a helper thread; the
    scores and token ids are the same, and a pair too long in either half is reported by its index."""
    from winnow import PromptTooLongError
    from winnow import llm as llm_module

    monkeypatch.setattr(llm_module, "_TOKENIZE_CHUNK", 4)
    llm = make_llm(make_model("bert", "seq", num_labels=1), cpu_workers=2)
    documents = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(30)]
    monkeypatch.setattr(llm_module, "_TWO_THREAD_TOKENIZE", 10**9)
    one_thread = llm.score("what is this?", documents, use_tqdm=False)
    monkeypatch.setattr(llm_module, "_TWO_THREAD_TOKENIZE", 8)
    two_threads = llm.score("what is this?", documents, use_tqdm=False)
    assert [o.prompt_token_ids for o in two_threads] == [o.prompt_token_ids for o in one_thread]
    assert [o.outputs.score for o in two_threads] == pytest.approx([o.outputs.score for o in one_thread], abs=1e-6)
    for bad in (7, 25):  # the first half of the rest, then the second
        broken = [(" ".join(["word"] * 200) if i == bad else d) for i, d in enumerate(documents)]
        with pytest.raises(PromptTooLongError, match=rf"\(index {bad}\)"):
            llm.score("what is this?", broken, use_tqdm=False)
