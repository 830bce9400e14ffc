"""Bad requests (spec §6.7): each gets its status and the error body
``{"error": {"message", "type", "param", "code"}}``, and the server keeps serving afterwards.

Also the server's own limits: a body over ``max_request_body_bytes`` (413) and more requests in
flight than ``max_concurrent_requests`` (429, made deterministic by parking the engine thread).
"""

from __future__ import annotations

from functools import partial

import pytest

from tests.server.conftest import assert_error, engine_gate, in_background, live_server
from tests.tiny_models import PROMPTS

TOO_LONG = "hello " * 100  # > max_model_len (64) tokens
REDUCE = "Please reduce the length of the input prompt"
LITERAL = "literal_error"
PAIRS = "Input lengths must be either 1:1, 1:N or N:N"
BAD = "BadRequestError"  # raised by winnow
SCHEMA = "Bad Request"  # the request failed the pydantic schema


def _case(server: str, route: str, body, status: int, error_type: str, contains: str, name: str):
    return pytest.param(server, route, body, status, error_type, contains, id=f"{route}-{name}")


CASES = [
    _case("classifier", "/classify", {"input": ""}, 400, BAD, "empty", "empty-string"),
    _case("classifier", "/classify", {"input": []}, 400, BAD, "at least one prompt", "empty-list"),
    _case("classifier", "/classify", {"input": ["ok", ""]}, 400, BAD, "Prompt 1 is empty", "one-empty"),
    _case("classifier", "/classify", {"input": [[]]}, 400, BAD, "empty", "empty-ids"),
    _case("classifier", "/classify", {"input": [1, 10**6]}, 400, BAD, "vocabulary", "oov-id"),
    _case("classifier", "/classify", {"input": TOO_LONG}, 400, BAD, REDUCE, "too-long"),
    _case("classifier", "/classify", {"input": ["ok", TOO_LONG]}, 400, BAD, "(index 1)", "2nd-too-long"),
    _case("classifier", "/pooling", {"input": TOO_LONG}, 400, BAD, REDUCE, "too-long"),
    _case(
        "classifier",
        "/classify",
        {"input": "hi", "truncate_prompt_tokens": 65},
        400,
        BAD,
        "truncate_prompt_tokens",
        "truncate-over-max-model-len",
    ),
    _case(
        "classifier",
        "/classify",
        {"input": "hi", "truncate_prompt_tokens": -2},
        400,
        SCHEMA,
        "truncate_prompt_tokens",
        "truncate-below-minus-one",
    ),
    _case("classifier", "/classify", {"input": "hi", "truncation_side": "mid"}, 400, SCHEMA, LITERAL, "side"),
    _case("classifier", "/classify", {"input": 5}, 400, SCHEMA, "input", "int-input"),
    _case("classifier", "/classify", {"input": [1, "a"]}, 400, SCHEMA, "input", "mixed-input"),
    _case("classifier", "/classify", {"inputs": "typo"}, 400, SCHEMA, "exactly one of `input`", "no-input"),
    _case("classifier", "/classify", {"input": "hi", "normalize": True}, 400, SCHEMA, "use_activation", "norm"),
    _case("classifier", "/pooling", {"input": "hi", "normalize": False}, 400, SCHEMA, "use_activation", "norm"),
    _case("classifier", "/classify", ["not", "an", "object"], 400, SCHEMA, "", "array-body"),
    _case("classifier", "/tokenize", {}, 400, SCHEMA, "prompt", "no-prompt"),
    _case("classifier", "/detokenize", {"tokens": "abc"}, 400, SCHEMA, "tokens", "str-tokens"),
    _case("cross_encoder", "/score", {"queries": ["a", "b"], "documents": ["c", "d", "e"]}, 400, BAD, PAIRS, "n-m"),
    _case("cross_encoder", "/score", {"queries": [], "documents": ["a"]}, 400, BAD, "At least one text", "no-query"),
    _case("cross_encoder", "/rerank", {"query": "a", "documents": []}, 400, BAD, "At least one text_pair", "no-doc"),
    _case("cross_encoder", "/rerank", {"query": TOO_LONG, "documents": ["a"]}, 400, BAD, REDUCE, "long-query"),
    _case("cross_encoder", "/score", {"queries": "a", "documents": [TOO_LONG]}, 400, BAD, REDUCE, "long-doc"),
    _case("cross_encoder", "/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, 400, SCHEMA, "top_n", "n"),
    _case(
        "cross_encoder",
        "/rerank",
        {"query": "a", "documents": ["b"], "max_tokens_per_doc": 64},
        400,
        BAD,
        "max_tokens_per_doc",
        "doc-limit",
    ),
    _case(
        "cross_encoder",
        "/rerank",
        {"query": "a", "documents": [{"content": [{"type": "image_url"}]}]},
        400,
        BAD,
        "text-only",
        "image",
    ),
    _case("cross_encoder", "/rerank", {"query": "a", "documents": [7]}, 400, SCHEMA, "documents", "int-doc"),
    _case("embedder", "/v1/embeddings", {"input": []}, 400, BAD, "at least one prompt", "empty-list"),
    _case("embedder", "/v1/embeddings", {"input": "hi", "encoding_format": "bytes"}, 400, SCHEMA, LITERAL, "fmt"),
    _case("embedder", "/pooling", {"input": "hi", "embed_dtype": "int4"}, 400, SCHEMA, LITERAL, "dtype"),
    _case("token_classifier", "/pooling", {"input": "hi", "endianness": "mid"}, 400, SCHEMA, LITERAL, "endian"),
    _case("token_classifier", "/pooling", {"input": "hi", "task": "plugin"}, 400, BAD, "No IOProcessor", "plugin"),
    _case("classifier", "/classify", {"input": [True, False]}, 400, SCHEMA, "input", "bool-ids"),
    _case("classifier", "/classify", {"input": [1.0, 5.0]}, 400, SCHEMA, "input", "float-ids"),
    _case("classifier", "/classify", {"input": "hi", "priority": 1}, 400, SCHEMA, "priority", "priority"),
]


@pytest.mark.parametrize(("server", "route", "body", "status", "error_type", "contains"), CASES)
def test_bad_request(request, server, route, body, status, error_type, contains):
    live = request.getfixturevalue(server)
    assert_error(live.post(route, body), status, error_type, contains)
    live.assert_serving()


def test_validation_error_names_the_field(classifier):
    error = assert_error(classifier.post("/classify", {"input": "hi", "truncate_prompt_tokens": -2}), 400)
    assert error["message"].startswith("1 validation error: ")
    assert error["param"] == "body.truncate_prompt_tokens"


def test_malformed_json(classifier):
    response = classifier.post("/classify", content=b'{"input": ', headers={"content-type": "application/json"})
    assert_error(response, 400, "Bad Request", "json")
    classifier.assert_serving()


LONE_SURROGATE = rb'"\ud800"'  # valid JSON for the standard library; no str the tokenizer or renderer can encode
DEEP = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize(
    ("server", "route", "raw"),
    [
        ("classifier", "/classify", b'{"input": ' + LONE_SURROGATE + b"}"),
        ("classifier", "/classify", b'{"input": ["ok", ' + LONE_SURROGATE + b"]}"),
        ("classifier", "/classify", b'{"input": "hi", "model": ' + LONE_SURROGATE + b"}"),
        ("classifier", "/classify", b'{"input": "hi", "request_id": ' + LONE_SURROGATE + b"}"),
        ("classifier", "/tokenize", b'{"prompt": ' + LONE_SURROGATE + b"}"),
        ("classifier", "/invocations", b'{"input": ' + LONE_SURROGATE + b"}"),
        ("cross_encoder", "/rerank", b'{"query": "a", "documents": [' + LONE_SURROGATE + b"]}"),
        ("embedder", "/v1/embeddings", b'{"input": ' + LONE_SURROGATE + b"}"),
        ("classifier", "/classify", b'{"input": "\xff\xfe"}'),
        ("classifier", "/classify", b'{"input": ' + DEEP + b"}"),
        ("classifier", "/invocations", b'{"input": ' + DEEP + b"}"),
    ],
    ids=[
        "surrogate",
        "in-list",
        "model",
        "request-id",
        "tokenize",
        "invocations",
        "rerank",
        "embeddings",
        "not-utf8",
        "deep",
        "deep-invocations",
    ],
)
def test_bodies_no_text_can_carry_are_400(request, server, route, raw):
    """The body is refused while parsing, with vLLM's error shape and a message saying what to send."""
    live = request.getfixturevalue(server)
    response = live.post(route, content=raw, headers={"content-type": "application/json"})
    error = assert_error(response, 400, contains="valid JSON")
    assert "UTF-8" in error["message"]
    live.assert_serving()


def test_a_body_not_sent_as_json_says_which_header_to_send(classifier):
    response = classifier.post("/classify", content=b'{"input": "hi"}', headers={"content-type": "text/plain"})
    assert_error(response, 400, "Bad Request", "Content-Type: application/json")


def test_an_emoji_as_a_surrogate_pair_is_text(classifier):
    """A surrogate pair is one character: JSON escapes it so, and it must be served."""
    raw = rb'{"prompt": "\ud83d\ude00"}'
    escaped = classifier.post("/tokenize", content=raw, headers={"content-type": "application/json"})
    assert escaped.status_code == 200
    assert escaped.json()["tokens"] == classifier.ok("/tokenize", {"prompt": "\U0001f600"})["tokens"]


@pytest.mark.parametrize(
    ("server", "route", "body"),
    [
        ("classifier", "/classify", {"input": "hi"}),
        ("classifier", "/pooling", {"input": "hi"}),
        ("classifier", "/tokenize", {"prompt": "hi"}),
        ("classifier", "/detokenize", {"tokens": [5]}),
        ("cross_encoder", "/score", {"queries": "a", "documents": "b"}),
        ("cross_encoder", "/rerank", {"query": "a", "documents": ["b"]}),
        ("embedder", "/v1/embeddings", {"input": "hi"}),
    ],
)
def test_unknown_model_is_404(request, server, route, body):
    live = request.getfixturevalue(server)
    response = live.post(route, {**body, "model": "x"})
    assert_error(response, 404, "NotFoundError", "The model `x` does not exist.")
    assert response.json()["error"]["message"] == "The model `x` does not exist."
    live.assert_serving()


# -- server limits --------------------------------------------------------------------------------------

BODY_LIMIT = 4096


@pytest.fixture(scope="module")
def limited(classifier_path):
    """At most one inference request in flight and 4 KiB bodies."""
    with live_server(
        classifier_path, max_concurrent_requests=1, max_request_body_bytes=BODY_LIMIT, served_model_names=("c",)
    ) as live:
        yield live


def test_body_over_the_limit_is_413(limited):
    big = {"input": ["hello world"] * 500}  # ~8 KB of JSON, declared in Content-Length
    assert_error(limited.post("/classify", big), 413, "PayloadTooLargeError", str(BODY_LIMIT))
    limited.assert_serving()


def test_chunked_body_over_the_limit_is_413(limited):
    chunks = [b'{"input": ['] + [b'"hello world", '] * 400 + [b'"end"]}']
    response = limited.client.post(
        "/classify", content=iter(chunks), headers={"content-type": "application/json"}
    )  # an iterator is sent chunked, without Content-Length
    assert_error(response, 413, "PayloadTooLargeError")
    limited.assert_serving()


def test_body_under_the_limit_is_served(limited):
    body = limited.ok("/classify", {"input": ["hello world"] * 100})
    assert len(body["data"]) == 100


def test_too_many_requests_in_flight_is_429(limited):
    first_request = partial(limited.post, "/classify", {"input": PROMPTS[:2]})
    with engine_gate(limited) as gate, in_background(first_request) as first:
        gate.wait_parked()  # the first request is inside the engine, holding the only slot
        second = limited.post("/classify", {"input": "hello"})
        assert_error(second, 429, "TooManyRequestsError", "at capacity")
        assert limited.get("/health").status_code == 200  # probes and tokenizer are not limited
        assert limited.get("/load").json() == {"server_load": 1}  # the parked request
        assert limited.post("/tokenize", {"prompt": "hi"}).status_code == 200
        assert limited.metric("winnow_requests_in_flight") == 1
        assert limited.metric("winnow_requests_total", route="/classify", status="429") >= 1
        gate.release()
        assert first().status_code == 200
    assert limited.metric("winnow_requests_in_flight") == 0
    assert limited.get("/load").json() == {"server_load": 0}
    assert len(limited.ok("/classify", {"input": "hello"})["data"]) == 1  # the slot is free again


def test_refused_bodies_are_counted(limited):
    before = limited.metric("winnow_requests_total", status="413")
    limited.post("/classify", {"input": ["hello world"] * 500})
    assert limited.metric("winnow_requests_total", status="413") == before + 1


def test_empty_model_name_means_the_default_model(classifier):
    assert classifier.post("/classify", {"input": "hi", "model": ""}).status_code == 200
