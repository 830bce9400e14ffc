"""Shipped score templates render byte for byte as their models expect; template-aware truncation
cuts the document and keeps the query and the template's suffix."""

from __future__ import annotations

import pytest

from winnow import InvalidInputError
from winnow.inputs.scoring import load_template, shipped_templates

MESSAGES = [{"role": "query", "content": "What is the capital of France?"}, {"role": "document", "content": "Paris."}]

QWEN3 = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    "<Instruct>: {instruction}\n<Query>: What is the capital of France?\n<Document>: Paris.<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
MXBAI = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{instruction}query: What is the capital of France?\ndocument: Paris.\n"
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
    "relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:<|im_end|>\n<|im_start|>assistant\n"
)
BGE_GEMMA = (
    "A: What is the capital of France?\nB: Paris.\nGiven a query A and a passage B, determine whether the passage "
    "contains an answer to the query by providing a prediction of either 'Yes' or 'No'."
)
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@pytest.fixture(scope="module")
def tokenizer(make_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_model("bert", "seq", num_labels=1))


def _render(tokenizer, name, **kwargs):
    return tokenizer.apply_chat_template(MESSAGES, chat_template=load_template(name), tokenize=False, **kwargs)


def test_every_shipped_template_is_covered():
    assert shipped_templates() == ["bge_reranker_v2_gemma", "mxbai_rerank_v2", "qwen3_reranker"]


def test_qwen3_reranker(tokenizer):
    assert _render(tokenizer, "qwen3_reranker") == QWEN3.format(instruction=DEFAULT_INSTRUCTION)
    assert _render(tokenizer, "qwen3_reranker", instruction="Find the city") == QWEN3.format(
        instruction="Find the city"
    )


def test_mxbai_rerank_v2(tokenizer):
    assert _render(tokenizer, "mxbai_rerank_v2") == MXBAI.format(instruction="")
    with_instruction = MXBAI.format(instruction="instruction: Find the city\n")
    assert _render(tokenizer, "mxbai_rerank_v2", instruction="Find the city") == with_instruction


def test_bge_reranker_v2_gemma(tokenizer):
    assert _render(tokenizer, "bge_reranker_v2_gemma") == BGE_GEMMA


def test_templates_load_by_name_file_or_text(tmp_path):
    assert load_template("qwen3_reranker") == load_template("qwen3_reranker.jinja")
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0].content }}")
    assert load_template(str(path)) == "{{ messages[0].content }}"
    assert load_template("{{ messages[1].content }}") == "{{ messages[1].content }}"
    with pytest.raises(InvalidInputError, match="shipped template"):
        load_template("no_such_template")


TEMPLATE = (
    "{{ (messages | selectattr('role', 'eq', 'query') | first).content }} [SEP] "
    "{{ (messages | selectattr('role', 'eq', 'document') | first).content }} the end"
)


def test_template_aware_truncation_cuts_the_document_only(make_model, make_llm):
    llm = make_llm(make_model("bert", "seq", num_labels=1))
    tok = llm.get_tokenizer()
    query, doc = "what is the capital of france?", "the quick brown fox jumps over the lazy dog " * 10
    full = llm.score(query, "", chat_template=TEMPLATE, use_tqdm=False)[0].prompt_token_ids
    got = llm.score(
        query, doc, chat_template=TEMPLATE, tokenization_kwargs={"truncate_prompt_tokens": 30}, use_tqdm=False
    )
    ids = got[0].prompt_token_ids
    assert len(ids) <= 30
    suffix = [*tok("the end", add_special_tokens=False).input_ids, tok.sep_token_id]
    assert ids[-len(suffix) :] == suffix  # the template's suffix survives
    q_ids = tok(query, add_special_tokens=False).input_ids
    assert ids[1 : 1 + len(q_ids)] == q_ids  # the whole query survives
    assert len(ids) > len(full)  # and part of the document is kept
    # Without the template, vLLM-style truncation would have cut into the suffix: check that it is long.
    untruncated = tok(f"{query} [SEP] {doc} the end").input_ids
    assert len(untruncated) > 30


def test_template_alone_too_long_is_an_error(make_model, make_llm):
    llm = make_llm(make_model("bert", "seq", num_labels=1))
    with pytest.raises(InvalidInputError, match="template and the query alone"):
        llm.score(
            "the quick brown fox " * 10,
            "dog",
            chat_template=TEMPLATE,
            tokenization_kwargs={"truncate_prompt_tokens": 8},
            use_tqdm=False,
        )


def test_an_engine_template_that_does_not_compile_is_refused_at_load(make_model, make_llm):
    """The engine's own template is the operator's: a syntax error fails loading, not every request."""
    from winnow import ConfigError

    path = make_model("bert", "seq", num_labels=1)
    with pytest.raises(ConfigError, match="chat_template does not compile: TemplateSyntaxError"):
        make_llm(path, chat_template="{{ (messages | first).content ")
    for name in shipped_templates():  # every shipped one compiles
        assert make_llm(path, chat_template=name).engine.config.chat_template == load_template(name)
