"""Score templates over HTTP: the server's --chat-template is the default score template, and the
request's instruction / chat_template_kwargs reach it; results equal the offline LLM's."""

from __future__ import annotations

from tests.server.conftest import assert_close, assert_error, live_server

TEMPLATE = (
    "{{ instruction | default('rank', true) }}: "
    "{{ (messages | selectattr('role', 'eq', 'query') | first).content }} [SEP] "
    "{{ (messages | selectattr('role', 'eq', 'document') | first).content }} the end"
)
QUERY, DOCS = "what is the capital of france?", ["paris is the capital of france.", "horses are animals"]


def test_server_chat_template_is_the_score_template(cross_encoder_path, make_llm):
    offline = make_llm(cross_encoder_path, chat_template=TEMPLATE)
    with live_server(cross_encoder_path, engine={"chat_template": TEMPLATE}) as live:
        scores = live.ok("/score", {"queries": QUERY, "documents": DOCS})
        expected = offline.score(QUERY, DOCS, use_tqdm=False)
        assert_close([d["score"] for d in scores["data"]], [e.outputs.score for e in expected])
        assert scores["usage"]["prompt_tokens"] == sum(len(e.prompt_token_ids) for e in expected)

        with_instruction = live.ok("/rerank", {"query": QUERY, "documents": DOCS, "instruction": "find the city"})
        expected = offline.score(QUERY, DOCS, chat_template_kwargs={"instruction": "find the city"}, use_tqdm=False)
        by_index = {r["index"]: r["relevance_score"] for r in with_instruction["results"]}
        assert_close([by_index[i] for i in range(len(DOCS))], [e.outputs.score for e in expected])
        plain = offline.score(QUERY, DOCS, use_tqdm=False)
        assert [e.outputs.score for e in expected] != [p.outputs.score for p in plain]  # the instruction mattered

        # Keys that would override the template or tokenization are refused, for scores and chats alike.
        for route, body in [
            ("/score", {"queries": QUERY, "documents": DOCS}),
            ("/classify", {"messages": [{"role": "user", "content": QUERY}]}),
        ]:
            response = live.post(route, {**body, "chat_template_kwargs": {"tokenize": True}})
            assert_error(response, 400, "BadRequestError", "chat_template_kwargs may not set ['tokenize']")
