"""Operational routes and route registration (spec §6.1): /tokenize, /detokenize, /v1/models, /health,
/ping, /version, /metrics, /invocations, and which inference routes each kind of model gets."""

from __future__ import annotations

import pytest

import winnow
from tests.server.conftest import assert_close, assert_error, live_server, metric_value
from tests.tiny_models import PROMPTS

# -- tokenizer ----------------------------------------------------------------------------------------


def test_tokenize_matches_the_tokenizer(classifier, classifier_llm):
    tokenizer = classifier_llm.get_tokenizer()
    expected = tokenizer(PROMPTS[2])["input_ids"]
    body = classifier.ok("/tokenize", {"prompt": PROMPTS[2]})
    assert body == {"count": len(expected), "max_model_len": 64, "tokens": expected, "token_strs": None}


def test_tokenize_token_strs_and_no_special_tokens(classifier, classifier_llm):
    tokenizer = classifier_llm.get_tokenizer()
    expected = tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    body = classifier.ok("/tokenize", {"prompt": PROMPTS[1], "add_special_tokens": False, "return_token_strs": True})
    assert body["tokens"] == expected
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(expected)


def test_tokenize_chat_form(classifier, classifier_llm):
    messages = [{"role": "user", "content": "hello"}]
    body = classifier.ok("/tokenize", {"messages": messages})  # add_generation_prompt defaults to true here
    assert body["tokens"] == classifier_llm.get_tokenizer()("hello answer", add_special_tokens=False)["input_ids"]


def test_detokenize_round_trip(classifier):
    tokens = classifier.ok("/tokenize", {"prompt": PROMPTS[1], "add_special_tokens": False})["tokens"]
    assert classifier.ok("/detokenize", {"tokens": tokens}) == {"prompt": PROMPTS[1]}


@pytest.mark.parametrize("token", [10**6, -1])
def test_detokenize_out_of_vocabulary(classifier, token):
    response = classifier.post("/detokenize", {"tokens": [5, token]})
    error = assert_error(response, 400, "BadRequestError", "outside the vocabulary")
    assert error["param"] == "tokens"


# -- models, health, version ------------------------------------------------------------------------------


def test_models_lists_every_served_name(classifier, classifier_path):
    body = classifier.get("/v1/models").json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == ["classifier", "clf-alias"]
    for card in body["data"]:
        assert card["object"] == "model"
        assert card["max_model_len"] == 64
        assert card["root"] == str(classifier_path)
        assert card["parent"] is None
        assert isinstance(card["created"], int)
        [permission] = card["permission"]
        assert permission["object"] == "model_permission" and permission["organization"] == "*"


def test_load_counts_requests_in_flight(classifier):
    assert classifier.get("/load").json() == {"server_load": 0}  # nothing in flight between tests


@pytest.mark.parametrize(("method", "route"), [("GET", "/health"), ("GET", "/ping"), ("POST", "/ping")])
def test_health_probes(classifier, method, route):
    response = classifier.client.request(method, route)
    assert response.status_code == 200
    assert response.content == b""


def test_version(classifier):
    assert classifier.get("/version").json() == {"version": winnow.__version__}


def test_unknown_path_is_fastapi_404(classifier):
    response = classifier.get("/nope")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


def test_docs_and_openapi(classifier):
    assert classifier.get("/docs").status_code == 200
    paths = classifier.get("/openapi.json").json()["paths"]
    assert {"/classify", "/pooling", "/tokenize"} <= set(paths)
    assert "/score" not in paths


# -- metrics ------------------------------------------------------------------------------------------------


def test_metrics_count_routes_and_batches(classifier):
    classifier.ok("/classify", {"input": PROMPTS[:3]})
    assert classifier.post("/classify", {"input": []}).status_code == 400
    response = classifier.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric_value(text, "winnow_requests_total", route="/classify", status="200") >= 1
    assert metric_value(text, "winnow_requests_total", route="/classify", status="400") >= 1
    for name in (
        "winnow_batch_size_count",
        "winnow_batch_tokens_count",
        "winnow_queue_duration_seconds_count",
        "winnow_inference_duration_seconds_count",
        "winnow_request_duration_seconds_count",
        "winnow_prompt_tokens_total",
    ):
        assert metric_value(text, name) > 0, name
    assert "winnow_queue_depth 0.0" in text
    assert "winnow_requests_in_flight 0.0" in text


def test_metrics_count_prompt_tokens(classifier):
    before = classifier.metric("winnow_prompt_tokens_total")
    body = classifier.ok("/classify", {"input": PROMPTS[:3]})
    assert classifier.metric("winnow_prompt_tokens_total") - before == body["usage"]["prompt_tokens"]


def test_unmatched_paths_are_counted_apart(classifier):
    classifier.get("/does-not-exist")
    assert classifier.metric("winnow_requests_total", route="unmatched", status="404") >= 1


# -- /invocations (SageMaker) ---------------------------------------------------------------------------------


def _strip(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def test_invocations_classify(classifier):
    request = {"input": PROMPTS[:3]}
    assert _strip(classifier.ok("/invocations", request)) == _strip(classifier.ok("/classify", request))


def test_invocations_rerank_and_score(cross_encoder):
    rerank = {"query": PROMPTS[2], "documents": PROMPTS[:4]}
    assert _strip(cross_encoder.ok("/invocations", rerank)) == _strip(cross_encoder.ok("/rerank", rerank))
    score = {"queries": PROMPTS[2], "documents": PROMPTS[:4]}
    assert _strip(cross_encoder.ok("/invocations", score)) == _strip(cross_encoder.ok("/score", score))


def test_invocations_pooling(token_classifier):
    request = {"input": PROMPTS[:2]}
    assert _strip(token_classifier.ok("/invocations", request)) == _strip(token_classifier.ok("/pooling", request))


def test_invocations_refuses_a_body_that_fits_no_api(classifier):
    assert_error(classifier.post("/invocations", {"nothing": 1}), 400, "BadRequestError", "matches none")
    assert_error(classifier.post("/invocations", content=b"{oops", headers={"content-type": "application/json"}), 400)
    # What to change, as the model's first API (/classify here) would say it.
    error = assert_error(classifier.post("/invocations", {"input": "hi", "normalize": True}), 400, "BadRequestError")
    assert "As ClassifyRequest: " in error["message"] and "use_activation" in error["message"]


# -- route registration ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank"])
def test_no_scoring_on_a_two_label_classifier(classifier, route):
    response = classifier.post(route, {"query": "a", "documents": ["b"], "queries": "a"})
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


@pytest.mark.parametrize("route", ["/classify", "/v1/classify", "/score", "/rerank"])
def test_token_classifier_has_no_classify_or_score(token_classifier, route):
    response = token_classifier.post(route, {"input": "a", "query": "a", "documents": ["b"]})
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


@pytest.mark.parametrize("server", ["classifier", "cross_encoder", "token_classifier"])
def test_embeddings_only_for_embedding_models(request, server):
    live = request.getfixturevalue(server)
    response = live.post("/v1/embeddings", {"input": "a"})
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


def test_embedder_has_no_classify(embedder):
    assert embedder.post("/classify", {"input": "a"}).status_code == 404


def test_classify_on_a_token_classify_instance_is_501(classifier_path, make_llm):
    """A 2-label classifier started with pooler_config.task token_classify: /classify exists but answers 501."""
    pooler = {"task": "token_classify"}
    [expected] = make_llm(classifier_path, pooler_config=pooler).encode(
        "hello world", pooling_task="token_classify", use_tqdm=False
    )
    with live_server(classifier_path, engine={"pooler_config": pooler}) as live:
        response = live.post("/classify", {"input": "hello world"})
        assert_error(response, 501, "NotImplementedError", "The model does not support Classification API")
        [item] = live.ok("/pooling", {"input": "hello world"})["data"]  # the default task follows the config
        assert_close(item["data"], expected.outputs.data)
        assert len(item["data"]) == len(expected.prompt_token_ids)
