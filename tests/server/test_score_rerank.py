"""POST /score (+ /v1/score) and /rerank (+ /v1/rerank, /v2/rerank), spec §6.4-6.5.

Cross-encoder scores must equal ``LLM.score`` on the same folder; the embedding model serves the
same routes with cosine similarity. The cross-encoder server has a 64-token budget, so a large
rerank runs as hundreds of small batches and must still come back complete and in order.
"""

from __future__ import annotations

import pytest

from tests.server.conftest import USAGE_KEYS, assert_close, assert_error, assert_usage
from tests.tiny_models import WORDS
from winnow import PoolingParams

QUERY = "what is the capital of france?"
QUERIES = [QUERY, "who visited seattle?", "the quick brown fox"]
DOCS = ["paris is the capital of france.", "horses and cows are both animals", "rain", "barack obama visited seattle"]
FORMS = [("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2")]
ARITIES = {"1:1": (QUERY, DOCS[0]), "1:N": (QUERY, DOCS), "N:N": (QUERIES, DOCS[:3])}


def _offline(llm, queries, documents, **kwargs):
    """(scores, usage) as the offline engine computes them."""
    results = llm.score(queries, documents, use_tqdm=False, **kwargs)
    return [r.outputs.score for r in results], sum(len(r.prompt_token_ids) for r in results)


@pytest.mark.parametrize("route", ["/score", "/v1/score"])
@pytest.mark.parametrize("arity", list(ARITIES))
@pytest.mark.parametrize("form", FORMS, ids=["/".join(f) for f in FORMS])
def test_score_forms_match_offline_llm(cross_encoder, cross_encoder_llm, route, arity, form):
    queries, documents = ARITIES[arity]
    scores, num_tokens = _offline(cross_encoder_llm, queries, documents)
    body = cross_encoder.ok(route, {"model": "reranker", form[0]: queries, form[1]: documents})
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("score-") and body["object"] == "list" and body["model"] == "reranker"
    assert [(d["index"], d["object"]) for d in body["data"]] == [(i, "score") for i in range(len(scores))]
    assert_close([d["score"] for d in body["data"]], scores)
    assert_usage(body["usage"], num_tokens)


def test_score_without_activation_returns_logits(cross_encoder, cross_encoder_llm):
    logits, _ = _offline(cross_encoder_llm, QUERY, DOCS, pooling_params=PoolingParams(use_activation=False))
    body = cross_encoder.ok("/score", {"queries": QUERY, "documents": DOCS, "use_activation": False})
    assert_close([d["score"] for d in body["data"]], logits)
    assert any(not 0.0 <= s <= 1.0 for s in logits), "logits must differ from sigmoid scores"


def test_score_truncation_applies_per_pair(cross_encoder, cross_encoder_llm):
    long_doc = "the quick brown fox jumps over the lazy dog " * 10
    options = {"truncate_prompt_tokens": 12}
    scores, num_tokens = _offline(cross_encoder_llm, QUERY, [long_doc, DOCS[2]], tokenization_kwargs=options)
    body = cross_encoder.ok("/score", {"queries": QUERY, "documents": [long_doc, DOCS[2]], **options})
    assert_close([d["score"] for d in body["data"]], scores)
    assert_usage(body["usage"], num_tokens)
    assert num_tokens <= 2 * 12


def test_score_content_parts_are_text(cross_encoder, cross_encoder_llm):
    parts = {"content": [{"type": "text", "text": "paris is "}, {"type": "text", "text": "the capital"}]}
    scores, _ = _offline(cross_encoder_llm, QUERY, "paris is the capital")
    body = cross_encoder.ok("/score", {"queries": QUERY, "documents": [parts]})
    assert_close([body["data"][0]["score"]], scores)


def test_score_n_to_m_is_refused(cross_encoder):
    response = cross_encoder.post("/score", {"queries": QUERIES[:2], "documents": DOCS[:3]})
    assert_error(response, 400, "BadRequestError", "Input lengths must be either 1:1, 1:N or N:N")
    cross_encoder.assert_serving()


def test_score_without_pairs_is_refused(cross_encoder):
    assert_error(cross_encoder.post("/score", {"queries": QUERY}), 400, "Bad Request")


# -- rerank ----------------------------------------------------------------------------------------------


def _ranking(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


@pytest.mark.parametrize("route", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_sorts_and_echoes(cross_encoder, cross_encoder_llm, route):
    scores, num_tokens = _offline(cross_encoder_llm, QUERY, DOCS)
    body = cross_encoder.ok(route, {"model": "reranker", "query": QUERY, "documents": DOCS})
    assert set(body) == {"id", "model", "usage", "results"}  # no object/created (spec §6.5)
    assert body["id"].startswith("score-") and body["model"] == "reranker"
    assert body["usage"] == {"prompt_tokens": num_tokens, "total_tokens": num_tokens}
    results = body["results"]
    assert [r["index"] for r in results] == _ranking(scores)
    for r in results:
        assert set(r) == {"index", "document", "relevance_score"}
        assert r["document"] == {"text": DOCS[r["index"]], "multi_modal": None}
        assert_close(r["relevance_score"], scores[r["index"]])
    assert [r["relevance_score"] for r in results] == sorted((r["relevance_score"] for r in results), reverse=True)


def test_rerank_top_n(cross_encoder, cross_encoder_llm):
    scores, _ = _offline(cross_encoder_llm, QUERY, DOCS)
    results = cross_encoder.ok("/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2})["results"]
    assert [r["index"] for r in results] == _ranking(scores)[:2]
    everything = cross_encoder.ok("/rerank", {"query": QUERY, "documents": DOCS, "top_n": 10})["results"]
    assert len(everything) == len(DOCS)


def test_rerank_without_documents_echo(cross_encoder):
    results = cross_encoder.ok("/rerank", {"query": QUERY, "documents": DOCS, "return_documents": False})["results"]
    assert len(results) == len(DOCS)
    assert all(r["document"] is None for r in results)


def test_rerank_legacy_text_documents(cross_encoder):
    plain = cross_encoder.ok("/rerank", {"query": QUERY, "documents": DOCS})["results"]
    legacy = cross_encoder.ok("/rerank", {"query": QUERY, "documents": [{"text": d} for d in DOCS]})["results"]
    assert legacy == plain


def test_rerank_content_part_document_is_echoed_as_multi_modal(cross_encoder, cross_encoder_llm):
    parts = [{"type": "text", "text": "paris is the capital"}]
    [result] = cross_encoder.ok("/rerank", {"query": QUERY, "documents": [{"content": parts}]})["results"]
    assert result["document"] == {"text": None, "multi_modal": parts}
    assert_close(result["relevance_score"], _offline(cross_encoder_llm, QUERY, "paris is the capital")[0][0])


def test_rerank_single_document_string(cross_encoder, cross_encoder_llm):
    [result] = cross_encoder.ok("/rerank", {"query": QUERY, "documents": DOCS[2]})["results"]
    assert result["index"] == 0
    assert_close(result["relevance_score"], _offline(cross_encoder_llm, QUERY, DOCS[2])[0][0])


def test_rerank_max_tokens_per_doc(cross_encoder, cross_encoder_llm):
    params = PoolingParams(extra_kwargs={"max_tokens_per_doc": 2})
    scores, num_tokens = _offline(cross_encoder_llm, QUERY, DOCS, pooling_params=params)
    _, full_tokens = _offline(cross_encoder_llm, QUERY, DOCS)
    body = cross_encoder.ok("/rerank", {"query": QUERY, "documents": DOCS, "max_tokens_per_doc": 2})
    assert body["usage"]["prompt_tokens"] == num_tokens < full_tokens
    assert_close([r["relevance_score"] for r in sorted(body["results"], key=lambda r: r["index"])], scores)


def test_embedding_rerank_max_tokens_per_doc(embedder, embedder_llm):
    """An embedding model cuts its documents too, as the offline call does."""
    params = PoolingParams(extra_kwargs={"max_tokens_per_doc": 2})
    offline = embedder_llm.score(QUERY, DOCS, pooling_params=params, use_tqdm=False)
    body = embedder.ok("/rerank", {"query": QUERY, "documents": DOCS, "max_tokens_per_doc": 2})
    full = embedder.ok("/rerank", {"query": QUERY, "documents": DOCS})
    assert body["usage"]["prompt_tokens"] < full["usage"]["prompt_tokens"]
    got = [r["relevance_score"] for r in sorted(body["results"], key=lambda r: r["index"])]
    assert_close(got, [o.outputs.score for o in offline])
    assert got != [r["relevance_score"] for r in sorted(full["results"], key=lambda r: r["index"])]


def test_large_rerank_returns_every_document_in_order(cross_encoder, cross_encoder_llm):
    """2000 documents through a 64-token budget: hundreds of batches, no client-side item limit."""
    documents = [f"{WORDS[i % len(WORDS)]} {WORDS[(7 * i) % len(WORDS)]} {i}" for i in range(2000)]
    scores, num_tokens = _offline(cross_encoder_llm, QUERY, documents)
    batches_before = cross_encoder.metric("winnow_batch_size_count")
    body = cross_encoder.ok("/rerank", {"query": QUERY, "documents": documents, "return_documents": False})
    results = body["results"]
    assert len(results) == 2000
    assert sorted(r["index"] for r in results) == list(range(2000))
    got = [r["relevance_score"] for r in results]
    assert got == sorted(got, reverse=True)
    assert_close(got, [scores[r["index"]] for r in results])
    assert body["usage"]["prompt_tokens"] == num_tokens
    assert cross_encoder.metric("winnow_batch_size_count") - batches_before >= num_tokens / 64


# -- bi-encoder (embedding model) scoring ---------------------------------------------------------------------


@pytest.mark.parametrize("arity", list(ARITIES))
def test_embedder_scores_by_cosine(embedder, embedder_llm, arity):
    queries, documents = ARITIES[arity]
    scores, _ = _offline(embedder_llm, queries, documents)
    body = embedder.ok("/score", {"queries": queries, "documents": documents})
    assert_close([d["score"] for d in body["data"]], scores)
    assert set(body["usage"]) == USAGE_KEYS


def test_embedder_rerank(embedder, embedder_llm):
    scores, _ = _offline(embedder_llm, QUERY, DOCS)
    results = embedder.ok("/rerank", {"query": QUERY, "documents": DOCS})["results"]
    assert [r["index"] for r in results] == _ranking(scores)
    assert_close([r["relevance_score"] for r in results], [scores[r["index"]] for r in results])


def test_embedder_usage_counts_every_document(embedder):
    documents = [DOCS[2], DOCS[2], DOCS[0]]
    lengths = {t: embedder.ok("/tokenize", {"prompt": t})["count"] for t in (QUERY, *documents)}
    body = embedder.ok("/score", {"queries": QUERY, "documents": documents})
    assert body["usage"]["prompt_tokens"] == lengths[QUERY] + sum(lengths[d] for d in documents)
