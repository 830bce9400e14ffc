"""An LLM reranker over HTTP: a causal LM with an LM-head score head and a shipped-style template,
served by ``winnow serve``'s app; /rerank and /score equal the offline LLM."""

from __future__ import annotations

import pytest

from tests.models.test_decoders import build_decoder
from tests.server.conftest import assert_close, live_server

TEMPLATE = (
    "<Instruct>: {{ instruction | default('find the answer', true) }}\n"
    "<Query>: {{ (messages | selectattr('role', 'eq', 'query') | first).content }}\n"
    "<Document>: {{ (messages | selectattr('role', 'eq', 'document') | first).content }} the end"
)
OVERRIDES = {
    "architectures": ["Qwen3ForSequenceClassification"],
    "classifier_from_token": ["no", "yes"],
    "is_original_qwen3_reranker": True,
}
QUERY, DOCS = "what is the capital of france?", ["paris is the capital.", "horses are animals", "rain"]


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory):
    return build_decoder(tmp_path_factory.mktemp("qwen3-lm"), "qwen3", "lm")


def test_llm_reranker_endpoints_equal_the_offline_llm(reranker_path, make_llm):
    engine = {"hf_overrides": OVERRIDES, "chat_template": TEMPLATE}
    offline = make_llm(reranker_path, **engine)
    expected = [e.outputs.score for e in offline.score(QUERY, DOCS, use_tqdm=False)]
    with live_server(reranker_path, engine=engine) as live:
        scores = live.ok("/score", {"queries": QUERY, "documents": DOCS})
        assert_close([d["score"] for d in scores["data"]], expected)
        ranked = live.ok("/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2})
        assert [r["index"] for r in ranked["results"]] == sorted(range(3), key=lambda i: -expected[i])[:2]
        truncated = live.ok("/rerank", {"query": QUERY, "documents": [DOCS[0] * 20], "truncate_prompt_tokens": 60})
        assert truncated["usage"]["prompt_tokens"] <= 60
        assert 0.0 < truncated["results"][0]["relevance_score"] < 1.0
