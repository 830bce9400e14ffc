"""Bare encoders as embedders, against sentence-transformers on the same folder; bi-encoder scoring."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import PROMPTS
from winnow import InvalidInputError, PoolingParams, UnsupportedTaskError


def _st_embed(path, texts, normalize=True):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    return model.encode(texts, convert_to_tensor=True, batch_size=3, normalize_embeddings=False)


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "electra", "distilbert"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embeddings_match_sentence_transformers(family, pooling, make_model, make_llm):
    path = make_model(family, "base", sentence_transformers={"pooling": pooling})
    llm = make_llm(path)
    assert llm.model_config.task == "embed"
    got = torch.tensor([o.outputs.embedding for o in llm.embed(PROMPTS, use_tqdm=False)])
    ref = _st_embed(path, PROMPTS)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(PROMPTS)), atol=1e-5, rtol=0)


def test_without_normalize_module_embeddings_are_raw(make_model, make_llm):
    path = make_model("bert", "base", sentence_transformers={"pooling": "mean", "normalize": False})
    got = torch.tensor([o.outputs.embedding for o in make_llm(path).embed(PROMPTS, use_tqdm=False)])
    torch.testing.assert_close(got, _st_embed(path, PROMPTS), atol=1e-5, rtol=0)
    assert not torch.allclose(got.norm(dim=1), torch.ones(len(PROMPTS)))


def test_use_activation_false_skips_normalisation(make_model, make_llm):
    llm = make_llm(make_model("bert", "base", sentence_transformers={"pooling": "mean"}))
    raw = llm.embed(PROMPTS[1], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)[0]
    norm = llm.embed(PROMPTS[1], use_tqdm=False)[0]
    raw_t, norm_t = torch.tensor(raw.outputs.embedding), torch.tensor(norm.outputs.embedding)
    torch.testing.assert_close(raw_t / raw_t.norm(), norm_t, atol=1e-6, rtol=0)


def test_max_seq_length_and_lower_case_come_from_sentence_transformers(make_model, make_llm):
    path = make_model("bert", "base", sentence_transformers={"max_seq_length": 20, "do_lower_case": True})
    llm = make_llm(path)
    assert llm.model_config.max_model_len == 20
    upper = llm.embed("HELLO WORLD", use_tqdm=False)[0]
    lower = llm.embed("hello world", use_tqdm=False)[0]
    assert upper.prompt_token_ids == lower.prompt_token_ids


def test_matryoshka_dimensions(make_model, make_llm):
    path = make_model("bert", "base", sentence_transformers={"pooling": "mean"})
    with pytest.raises(InvalidInputError, match="matryoshka"):
        make_llm(path).embed(PROMPTS[0], pooling_params=PoolingParams(dimensions=8), use_tqdm=False)
    llm = make_llm(path, hf_overrides={"is_matryoshka": True})
    full = torch.tensor(
        llm.embed(PROMPTS[0], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)[0].outputs.embedding
    )
    short = llm.embed(PROMPTS[0], pooling_params=PoolingParams(dimensions=8), use_tqdm=False)[0]
    torch.testing.assert_close(torch.tensor(short.outputs.embedding), full[:8] / full[:8].norm(), atol=1e-6, rtol=0)
    with pytest.raises(InvalidInputError, match="dimensions"):
        llm.embed(PROMPTS[0], pooling_params=PoolingParams(dimensions=999), use_tqdm=False)


def _st_reference(path, texts, dimensions=None):
    """What sentence-transformers returns: its pipeline (Normalize module included), truncated to
    ``dimensions``, then normalised again: normalize(emb[:k])."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    return model.encode(texts, convert_to_tensor=True, truncate_dim=dimensions, normalize_embeddings=True)


def test_matryoshka_in_a_mixed_batch_matches_each_request_alone(make_model, make_llm):
    """Requests of different clients share a batch: one asking for ``dimensions`` must not leave
    the others un-normalised (each gets exactly what it would get alone)."""
    path = make_model("bert", "base", sentence_transformers={"pooling": "mean"})
    llm = make_llm(path, hf_overrides={"is_matryoshka": True})
    params = [
        PoolingParams(),
        PoolingParams(dimensions=8),
        PoolingParams(use_activation=False),
        PoolingParams(dimensions=8, use_activation=False),
        PoolingParams(dimensions=16),
    ]
    prompts = PROMPTS[: len(params)]

    def embed(texts, pooling_params):
        outputs = llm.embed(texts, pooling_params=pooling_params, use_tqdm=False)
        return [torch.tensor(o.outputs.embedding) for o in outputs]

    mixed = embed(prompts, params)
    alone = [embed(text, p)[0] for text, p in zip(prompts, params)]
    raw = embed(prompts, PoolingParams(use_activation=False))  # [hidden] each: the pooled rows
    for got, one, text, p, full in zip(mixed, alone, prompts, params, raw):
        torch.testing.assert_close(got, one, atol=1e-6, rtol=0)
        if p.use_activation is False:
            torch.testing.assert_close(got, full[: p.dimensions], atol=1e-6, rtol=0)
        else:
            ref = _st_reference(path, [text], dimensions=p.dimensions)[0]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
            assert abs(float(got.norm()) - 1) < 1e-5


def test_token_embed_when_selected(make_model, make_llm):
    path = make_model("bert", "base", sentence_transformers={"pooling": "mean"})
    llm = make_llm(path, pooler_config={"task": "token_embed"})
    out = llm.encode(PROMPTS[1], pooling_task="token_embed", use_tqdm=False)[0]
    assert out.outputs.data.shape == (len(out.prompt_token_ids), 32)
    torch.testing.assert_close(out.outputs.data.norm(dim=1), torch.ones(len(out.prompt_token_ids)), atol=1e-5, rtol=0)


def test_step_token_embed_normalises_the_kept_columns(make_model, make_llm):
    """STEP keeps its columns before the head's L2 normalisation, as for classifiers (spec §3.2)."""
    path = make_model("bert", "base", sentence_transformers={"pooling": "mean"})
    cols = [3, 0, 7, 1]
    llm = make_llm(path, pooler_config={"task": "token_embed", "pooling_type": "STEP", "returned_token_ids": cols})
    raw, got = (
        o.outputs.data
        for o in llm.encode(
            [PROMPTS[1], PROMPTS[1]],
            [PoolingParams(use_activation=False), PoolingParams()],
            pooling_task="token_embed",
            use_tqdm=False,
        )
    )
    assert got.shape == raw.shape == (len(raw), len(cols))
    torch.testing.assert_close(got, torch.nn.functional.normalize(raw, dim=-1), atol=1e-6, rtol=0)


def test_bi_encoder_score_is_cosine_of_embeddings(make_model, make_llm):
    path = make_model("bert", "base", sentence_transformers={"pooling": "mean"})
    llm = make_llm(path)
    docs = PROMPTS[1:5]
    scores = llm.score(PROMPTS[0], docs, use_tqdm=False)
    ref = _st_embed(path, [PROMPTS[0], *docs])
    expected = torch.nn.functional.cosine_similarity(ref[:1], ref[1:])
    torch.testing.assert_close(torch.tensor([s.outputs.score for s in scores]), expected, atol=1e-5, rtol=0)
    q_ids = llm.embed(PROMPTS[0], use_tqdm=False)[0].prompt_token_ids
    d_ids = llm.embed(docs[0], use_tqdm=False)[0].prompt_token_ids
    assert scores[0].prompt_token_ids == [*q_ids, 0, *d_ids]  # query + [pad] + document
    assert "_" in scores[0].request_id


def test_bi_encoder_score_cuts_each_side_to_its_token_limit(make_model, make_llm):
    """max_tokens_per_query / max_tokens_per_doc cut an embedding model's texts as a cross-encoder's:
    the score is that of the cut texts; a limit out of range is refused."""
    path = make_model("bert", "base", sentence_transformers={"pooling": "mean"})
    llm = make_llm(path)
    query, docs = "what is the capital of france", ["the quick brown fox jumps", "paris is the capital"]
    params = PoolingParams(extra_kwargs={"max_tokens_per_query": 3, "max_tokens_per_doc": 2})
    got = llm.score(query, docs, pooling_params=params, use_tqdm=False)
    ref = _st_embed(path, ["what is the", "the quick", "paris is"])
    expected = torch.nn.functional.cosine_similarity(ref[:1], ref[1:])
    torch.testing.assert_close(torch.tensor([s.outputs.score for s in got]), expected, atol=1e-5, rtol=0)
    uncut = llm.score(query, docs, use_tqdm=False)
    assert all(len(g.prompt_token_ids) < len(u.prompt_token_ids) for g, u in zip(got, uncut))
    with pytest.raises(InvalidInputError, match="max_tokens_per_doc"):
        llm.score(query, docs, pooling_params=PoolingParams(extra_kwargs={"max_tokens_per_doc": 10_000}))


def test_late_interaction_score_is_maxsim_of_token_embeddings(make_model, make_llm):
    """token_embed models score a pair by MaxSim: each query token's best document token, summed."""
    path = make_model("bert", "base", sentence_transformers={"pooling": "mean"})
    llm = make_llm(path, pooler_config={"task": "token_embed"})
    docs = PROMPTS[1:5]
    scores = llm.score(PROMPTS[0], docs, use_tqdm=False)
    tokens = [o.outputs.data for o in llm.encode([PROMPTS[0], *docs], pooling_task="token_embed", use_tqdm=False)]
    expected = [float((tokens[0] @ d.T).max(dim=1).values.sum()) for d in tokens[1:]]
    got = torch.tensor([s.outputs.score for s in scores])
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)
    assert len(set(expected)) == len(expected)  # distinct documents, distinct scores: the order is checked


def test_embedder_refuses_classification_and_classifier_refuses_embedding(make_model, make_llm):
    embedder = make_llm(make_model("bert", "base", sentence_transformers={"pooling": "mean"}))
    with pytest.raises(UnsupportedTaskError, match="Classification API is not supported"):
        embedder.classify("hello", use_tqdm=False)
    classifier = make_llm(make_model("bert", "seq", num_labels=2))
    with pytest.raises(UnsupportedTaskError, match="Embedding API is not supported"):
        classifier.embed("hello", use_tqdm=False)
