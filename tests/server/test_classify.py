"""POST /classify and /v1/classify: every input form of spec §6.3, equal to the offline ``LLM``."""

from __future__ import annotations

import time
from unittest.mock import ANY

import pytest

from tests.server.conftest import USAGE_KEYS, assert_close, assert_error, assert_usage
from tests.tiny_models import PROMPTS
from winnow import PoolingParams

TEXTS = PROMPTS[:5]


def _token_ids(llm, text: str) -> list[int]:
    return list(llm.get_tokenizer()(text)["input_ids"])


def _expected(llm, prompts, **kwargs):
    """(probs, token count) per prompt from the offline engine."""
    outputs = llm.classify(prompts, use_tqdm=False, **kwargs)
    return [o.outputs.probs for o in outputs], [len(o.prompt_token_ids) for o in outputs]


def _input_form(llm, form: str):
    """(wire input, the same prompts for LLM.classify)."""
    if form == "str":
        return TEXTS[1], [TEXTS[1]]
    if form == "list[str]":
        return TEXTS, TEXTS
    if form == "list[int]":
        ids = _token_ids(llm, TEXTS[2])
        return ids, [{"prompt_token_ids": ids}]
    ids = [_token_ids(llm, t) for t in TEXTS]
    return ids, [{"prompt_token_ids": i} for i in ids]


@pytest.mark.parametrize("route", ["/classify", "/v1/classify"])
@pytest.mark.parametrize("form", ["str", "list[str]", "list[int]", "list[list[int]]"])
def test_input_forms_match_offline_llm(classifier, classifier_llm, route, form):
    wire, offline = _input_form(classifier_llm, form)
    probs, lengths = _expected(classifier_llm, offline)
    body = classifier.ok(route, {"model": "classifier", "input": wire})
    assert [d["index"] for d in body["data"]] == list(range(len(probs)))
    assert_close([d["probs"] for d in body["data"]], probs)
    assert_usage(body["usage"], sum(lengths))


def test_response_shape(classifier, classifier_llm):
    before = int(time.time())
    body = classifier.ok("/classify", {"input": TEXTS})
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("classify-") and len(body["id"]) > len("classify-")
    assert body["object"] == "list"
    assert before <= body["created"] <= int(time.time())
    assert body["model"] == "classifier"  # the first served name when `model` is omitted
    assert set(body["usage"]) == USAGE_KEYS
    id2label = classifier_llm.model_config.id2label
    for item in body["data"]:
        assert set(item) == {"index", "label", "probs", "num_classes"}
        assert item["num_classes"] == len(item["probs"]) == 2
        assert sum(item["probs"]) == pytest.approx(1.0, abs=1e-6)
        assert item["label"] == id2label[max(range(2), key=lambda i: item["probs"][i])]


def test_served_name_alias_is_echoed(classifier):
    assert classifier.ok("/classify", {"model": "clf-alias", "input": "hello"})["model"] == "clf-alias"


@pytest.mark.parametrize("flag", ["use_activation", "softmax", "activation"])
def test_activation_off_returns_logits(classifier, classifier_llm, flag):
    logits, _ = _expected(classifier_llm, TEXTS, pooling_params=PoolingParams(use_activation=False))
    body = classifier.ok("/classify", {"input": TEXTS, flag: False})
    assert_close([d["probs"] for d in body["data"]], logits)
    assert any(abs(sum(row) - 1.0) > 1e-3 for row in logits), "logits must differ from probabilities"
    for item, row in zip(body["data"], logits):
        assert item["label"] == f"LABEL_{row.index(max(row))}"


def test_activation_on_matches_default(classifier):
    default = classifier.ok("/classify", {"input": TEXTS})["data"]
    explicit = classifier.ok("/classify", {"input": TEXTS, "use_activation": True})["data"]
    assert default == explicit


def test_disagreeing_activation_aliases_are_refused(classifier):
    response = classifier.post("/classify", {"input": "hi", "use_activation": True, "softmax": False})
    assert_error(response, 400, "BadRequestError", "disagree")


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncate_prompt_tokens_sets_usage(classifier, classifier_llm, side):
    text = "hello " * 100  # far beyond max_model_len (64)
    options = {"truncate_prompt_tokens": 5, "truncation_side": side}
    probs, lengths = _expected(classifier_llm, text, tokenization_kwargs=options)
    body = classifier.ok("/classify", {"input": text, **options})
    assert lengths == [5]
    assert_usage(body["usage"], 5)
    assert_close(body["data"][0]["probs"], probs[0])


def test_truncate_minus_one_means_max_model_len(classifier):
    body = classifier.ok("/classify", {"input": "hello " * 100, "truncate_prompt_tokens": -1})
    assert body["usage"]["prompt_tokens"] == classifier.state.model_config.max_model_len == 64


def test_add_special_tokens_false(classifier, classifier_llm):
    probs, lengths = _expected(classifier_llm, TEXTS[1], tokenization_kwargs={"add_special_tokens": False})
    body = classifier.ok("/classify", {"input": TEXTS[1], "add_special_tokens": False})
    assert_usage(body["usage"], lengths[0])
    assert_close(body["data"][0]["probs"], probs[0])


def test_request_id_header_and_field(classifier):
    by_header = classifier.post("/classify", {"input": "hi"}, headers={"X-Request-Id": "from-header"})
    assert by_header.json()["id"] == "classify-from-header"
    assert classifier.ok("/classify", {"input": "hi", "request_id": "from-body"})["id"] == "classify-from-body"
    both = classifier.post("/classify", {"input": "hi", "request_id": "b"}, headers={"X-Request-Id": "h"})
    assert both.json()["id"] == "classify-h"


def test_generated_ids_are_unique_hex(classifier):
    ids = [classifier.ok("/classify", {"input": "hi"})["id"] for _ in range(20)]
    assert len(set(ids)) == len(ids)
    for rid in ids:
        prefix, _, token = rid.partition("-")
        assert prefix == "classify" and len(token) == 32 and int(token, 16) >= 0  # like uuid4().hex


def test_label_is_the_first_most_probable(classifier):
    body = classifier.ok("/classify", {"input": TEXTS})
    id2label = classifier.state.model_config.id2label
    for row in body["data"]:
        probs = row["probs"]
        assert row["label"] == id2label[probs.index(max(probs))]


def test_unknown_fields_are_ignored(classifier):
    body = classifier.ok("/classify", {"input": "hi", "user": "me", "encoding_format": "float", "whatever": [1]})
    assert len(body["data"]) == 1


# -- chat form ------------------------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "the quick brown fox"},
    {"role": "user", "content": "what is the capital of france?"},
    {"role": "assistant", "content": "paris"},
]
RENDERED = "the quick brown fox what is the capital of france? paris"


@pytest.mark.parametrize(
    ("options", "text", "add_special"),
    [
        ({}, RENDERED, False),
        ({"add_generation_prompt": True}, RENDERED + " answer", False),
        ({"continue_final_message": True}, RENDERED, False),
        ({"add_special_tokens": True}, RENDERED, True),
    ],
)
def test_chat_form_equals_rendered_completion(classifier, classifier_llm, options, text, add_special):
    probs, lengths = _expected(classifier_llm, text, tokenization_kwargs={"add_special_tokens": add_special})
    body = classifier.ok("/classify", {"messages": MESSAGES, **options})
    assert len(body["data"]) == 1  # one conversation, one result
    assert_usage(body["usage"], lengths[0])
    assert_close(body["data"][0]["probs"], probs[0])


def test_chat_content_parts_are_their_joined_text(classifier):
    """OpenAI content parts are text joined by newlines (vLLM's "string" content format), not a repr."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "the quick"}, {"type": "text", "text": "fox"}]}]
    plain = [{"role": "user", "content": "the quick\nfox"}]
    assert classifier.ok("/classify", {"messages": parts}) == {
        **classifier.ok("/classify", {"messages": plain}),
        **{k: ANY for k in ("id", "created")},
    }
    assert classifier.ok("/tokenize", {"messages": parts}) == classifier.ok("/tokenize", {"messages": plain})


@pytest.mark.parametrize(
    "content",
    [[{"type": "image_url", "image_url": {"url": "http://x"}}], [{"type": "text", "text": 5}], 7],
    ids=["image", "non-str-text", "number"],
)
def test_chat_content_that_is_not_text_is_refused(classifier, content):
    response = classifier.post("/classify", {"messages": [{"role": "user", "content": content}]})
    assert_error(response, 400, "BadRequestError", "messages[0].content must be a string or a list of text parts")


def test_chat_form_without_template_is_refused(cross_encoder):
    assert cross_encoder.state.config.chat_template is None
    response = cross_encoder.post("/classify", {"messages": MESSAGES})
    assert_error(response, 400, "BadRequestError", "no chat template")
    cross_encoder.assert_serving()


def test_chat_generation_prompt_and_continue_are_exclusive(classifier):
    response = classifier.post(
        "/classify", {"messages": MESSAGES, "add_generation_prompt": True, "continue_final_message": True}
    )
    assert_error(
        response, 400, contains="Cannot set both `continue_final_message` and `add_generation_prompt` to True."
    )


def test_request_chat_template_needs_trust(classifier):
    response = classifier.post("/classify", {"messages": MESSAGES, "chat_template": "{{ messages[0]['content'] }}"})
    assert_error(response, 400, "BadRequestError", "--trust-request-chat-template")


def test_input_and_messages_together_are_refused(classifier):
    assert_error(classifier.post("/classify", {"input": "hi", "messages": MESSAGES}), 400, "Bad Request")
