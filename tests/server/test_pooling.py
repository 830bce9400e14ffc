"""POST /pooling (spec §6.6) and POST /v1/embeddings (OpenAI shape), equal to the offline ``LLM``.

Covers the active task of each model, the float / base64 / bytes / bytes_only encodings with
embed_dtype and endianness, and the task checks (inactive, unsupported, removed, bad enum).
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.server.conftest import assert_close, assert_error, assert_usage
from tests.tiny_models import PROMPTS

TEXTS = PROMPTS[:4]


def _decode(raw: bytes, embed_dtype: str, endianness: str) -> np.ndarray:
    order = {"little": "<", "big": ">", "native": "="}[endianness]
    return np.frombuffer(raw, dtype=np.dtype(order + {"float32": "f4", "float16": "f2"}[embed_dtype]))


def test_classifier_pools_its_probabilities(classifier, classifier_llm):
    expected = classifier_llm.classify(TEXTS, use_tqdm=False)
    body = classifier.ok("/pooling", {"input": TEXTS, "task": "classify"})
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("pooling-") and body["object"] == "list" and body["model"] == "classifier"
    for i, (item, out) in enumerate(zip(body["data"], expected)):
        assert item["index"] == i and item["object"] == "pooling"
        assert len(item["data"]) == 2
        assert_close(item["data"], out.outputs.probs)
    assert_usage(body["usage"], sum(len(o.prompt_token_ids) for o in expected))
    assert classifier.ok("/pooling", {"input": TEXTS})["data"] == body["data"]  # classify is the default task


def test_token_classifier_pools_every_token(token_classifier, token_classifier_llm):
    expected = token_classifier_llm.encode(TEXTS, pooling_task="token_classify", use_tqdm=False)
    body = token_classifier.ok("/pooling", {"input": TEXTS})  # token_classify is the default task
    assert body["model"] == "ner"
    for item, out in zip(body["data"], expected):
        assert np.asarray(item["data"]).shape == (len(out.prompt_token_ids), 3)
        assert_close(item["data"], out.outputs.data)
    assert_usage(body["usage"], sum(len(o.prompt_token_ids) for o in expected))


def test_token_classifier_token_ids_input(token_classifier, token_classifier_llm):
    ids = list(token_classifier_llm.get_tokenizer()(TEXTS[1])["input_ids"])
    [expected] = token_classifier_llm.encode({"prompt_token_ids": ids}, pooling_task="token_classify", use_tqdm=False)
    [item] = token_classifier.ok("/pooling", {"input": ids, "task": "token_classify"})["data"]
    assert_close(item["data"], expected.outputs.data)


def test_token_classifier_without_activation(token_classifier, token_classifier_llm):
    from winnow import PoolingParams

    [expected] = token_classifier_llm.encode(
        TEXTS[1], PoolingParams(use_activation=False), pooling_task="token_classify", use_tqdm=False
    )
    [item] = token_classifier.ok("/pooling", {"input": TEXTS[1], "use_activation": False})["data"]
    assert_close(item["data"], expected.outputs.data)
    assert not np.allclose(np.asarray(item["data"]).sum(axis=1), 1.0)


def test_embedder_pools_embeddings(embedder, embedder_llm):
    expected = embedder_llm.embed(TEXTS, use_tqdm=False)
    body = embedder.ok("/pooling", {"input": TEXTS, "task": "embed"})
    for item, out in zip(body["data"], expected):
        assert len(item["data"]) == 32
        assert_close(item["data"], out.outputs.embedding)


def test_base64_encoding(embedder, embedder_llm):
    expected = embedder_llm.embed(TEXTS, use_tqdm=False)
    body = embedder.ok("/pooling", {"input": TEXTS, "encoding_format": "base64"})
    for item, out in zip(body["data"], expected):
        assert isinstance(item["data"], str)
        decoded = np.frombuffer(base64.b64decode(item["data"]), dtype="<f4")
        assert_close(decoded, out.outputs.embedding)


def test_bytes_encoding_with_metadata_header(token_classifier, token_classifier_llm):
    expected = token_classifier_llm.encode(TEXTS, pooling_task="token_classify", use_tqdm=False)
    response = token_classifier.post("/pooling", {"input": TEXTS, "encoding_format": "bytes", "request_id": "b1"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    meta = json.loads(response.headers["metadata"])
    assert meta["id"] == "pooling-b1" and meta["model"] == "ner" and isinstance(meta["created"], int)
    num_tokens = sum(len(o.prompt_token_ids) for o in expected)
    assert meta["usage"] == {"prompt_tokens": num_tokens, "total_tokens": num_tokens}
    assert meta["data"][0]["start"] == 0 and meta["data"][-1]["end"] == len(response.content)
    for i, (item, out) in enumerate(zip(meta["data"], expected)):
        assert item["index"] == i
        assert (item["embed_dtype"], item["endianness"]) == ("float32", "native")
        assert item["shape"] == [len(out.prompt_token_ids), 3]
        values = _decode(response.content[item["start"] : item["end"]], "float32", "native").reshape(item["shape"])
        assert_close(values, out.outputs.data)


def test_bytes_only_has_no_metadata(classifier, classifier_llm):
    expected = classifier_llm.classify(TEXTS, use_tqdm=False)
    response = classifier.post("/pooling", {"input": TEXTS, "encoding_format": "bytes_only"})
    assert response.status_code == 200, response.text
    assert "metadata" not in response.headers
    assert_close(_decode(response.content, "float32", "native").reshape(-1, 2), [o.outputs.probs for o in expected])


@pytest.mark.parametrize("endianness", ["big", "little", "native"])
@pytest.mark.parametrize("embed_dtype", ["float16", "float32"])
def test_embed_dtype_and_endianness(embedder, embedder_llm, embed_dtype, endianness):
    [expected] = embedder_llm.embed(TEXTS[1], use_tqdm=False)
    body = embedder.ok(
        "/pooling",
        {"input": TEXTS[1], "encoding_format": "base64", "embed_dtype": embed_dtype, "endianness": endianness},
    )
    raw = base64.b64decode(body["data"][0]["data"])
    values = _decode(raw, embed_dtype, endianness)
    reference = np.asarray(expected.outputs.embedding, dtype=np.float32).astype(np.dtype(embed_dtype))
    assert values.dtype.itemsize == reference.dtype.itemsize
    np.testing.assert_array_equal(values.astype(np.float32), reference.astype(np.float32))


def test_chat_form_on_pooling(classifier, classifier_llm):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    [expected] = classifier_llm.classify(
        "hello world", tokenization_kwargs={"add_special_tokens": False}, use_tqdm=False
    )
    body = classifier.ok("/pooling", {"messages": messages})
    assert_close(body["data"][0]["data"], expected.outputs.probs)
    assert_usage(body["usage"], len(expected.prompt_token_ids))


# -- task checks --------------------------------------------------------------------------------------


def test_inactive_task_names_the_flag(classifier):
    response = classifier.post("/pooling", {"input": "hi", "task": "token_classify"})
    error = assert_error(response, 400, "BadRequestError", "--pooler-config.task token_classify")
    assert error["param"] == "task"


def test_unsupported_task(token_classifier):
    response = token_classifier.post("/pooling", {"input": "hi", "task": "classify"})
    assert_error(response, 400, "BadRequestError", "Unsupported task: 'classify'")


def test_embed_task_on_token_classifier_is_unsupported(token_classifier):
    response = token_classifier.post("/pooling", {"input": "hi", "task": "embed"})
    assert_error(response, 400, "BadRequestError")
    assert response.json()["error"]["message"].startswith("Unsupported task: 'embed'")


def test_embed_task_on_classifier_is_a_bad_request(classifier):
    assert_error(classifier.post("/pooling", {"input": "hi", "task": "embed"}), 400, "BadRequestError")


@pytest.mark.parametrize("task", ["score", "encode"])
def test_removed_tasks(classifier, task):
    assert_error(classifier.post("/pooling", {"input": "hi", "task": task}), 400, "BadRequestError", "removed")


def test_unknown_task(classifier):
    assert_error(classifier.post("/pooling", {"input": "hi", "task": "plugin"}), 400)


def test_bad_encoding_format(classifier):
    response = classifier.post("/pooling", {"input": "hi", "encoding_format": "xml"})
    error = assert_error(response, 400, "Bad Request", "literal_error")
    assert "xml" in error["message"] or "encoding_format" in error["message"]
    assert "encoding_format" in error["param"]


def test_dimensions_not_supported(embedder):
    response = embedder.post("/pooling", {"input": "hi", "dimensions": 8})
    assert_error(response, 400, "BadRequestError", "dimensions is currently not supported")


# -- /v1/embeddings -----------------------------------------------------------------------------------


def test_openai_embeddings(embedder, embedder_llm):
    expected = embedder_llm.embed(TEXTS, use_tqdm=False)
    body = embedder.ok("/v1/embeddings", {"model": "embedder", "input": TEXTS})
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("embd-") and body["object"] == "list" and body["model"] == "embedder"
    num_tokens = sum(len(o.prompt_token_ids) for o in expected)
    assert body["usage"] == {"prompt_tokens": num_tokens, "total_tokens": num_tokens}
    for i, (item, out) in enumerate(zip(body["data"], expected)):
        assert set(item) == {"object", "embedding", "index"}
        assert item["object"] == "embedding" and item["index"] == i
        assert_close(item["embedding"], out.outputs.embedding)
        assert np.linalg.norm(item["embedding"]) == pytest.approx(1.0, abs=1e-5)


def test_openai_embeddings_single_string_and_token_ids(embedder, embedder_llm):
    ids = list(embedder_llm.get_tokenizer()(TEXTS[2])["input_ids"])
    [expected] = embedder_llm.embed(TEXTS[2], use_tqdm=False)
    by_text = embedder.ok("/v1/embeddings", {"input": TEXTS[2]})["data"]
    by_ids = embedder.ok("/v1/embeddings", {"input": ids})["data"]
    assert_close(by_text[0]["embedding"], expected.outputs.embedding)
    assert_close(by_ids[0]["embedding"], expected.outputs.embedding)


def test_openai_embeddings_base64(embedder, embedder_llm):
    expected = embedder_llm.embed(TEXTS, use_tqdm=False)
    body = embedder.ok("/v1/embeddings", {"input": TEXTS, "encoding_format": "base64"})
    for item, out in zip(body["data"], expected):
        assert_close(np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4"), out.outputs.embedding)


def test_openai_embeddings_dimensions_on_a_non_matryoshka_model(embedder):
    response = embedder.post("/v1/embeddings", {"input": "hi", "dimensions": 8})
    assert_error(response, 400, "BadRequestError", "matryoshka")


# -- /v2/embed (Cohere Embed v2) ----------------------------------------------------------------------------


def test_cohere_embed_float_and_base64(embedder, embedder_llm):
    expected = embedder_llm.embed(TEXTS, use_tqdm=False)
    body = embedder.ok("/v2/embed", {"model": "embedder", "texts": TEXTS, "embedding_types": ["float", "base64"]})
    assert set(body) == {"id", "embeddings", "texts", "meta", "response_type"}
    assert body["id"].startswith("embd-") and body["response_type"] == "embeddings_by_type"
    assert body["texts"] == TEXTS and set(body["embeddings"]) == {"float", "base64"}
    num_tokens = sum(len(o.prompt_token_ids) for o in expected)
    assert body["meta"] == {"api_version": {"version": "2"}, "billed_units": {"input_tokens": num_tokens}}
    for got, packed, out in zip(body["embeddings"]["float"], body["embeddings"]["base64"], expected):
        assert_close(got, out.outputs.embedding)
        assert_close(np.frombuffer(base64.b64decode(packed), dtype="<f4"), out.outputs.embedding)
    assert embedder.ok("/v2/embed", {"texts": TEXTS})["embeddings"].keys() == {"float"}  # the default type


def test_cohere_embed_binary_types_are_sentence_transformers_quantization(embedder, embedder_llm):
    try:
        from sentence_transformers.util.quantization import quantize_embeddings
    except ImportError:  # sentence-transformers before 5.x
        from sentence_transformers.quantization import quantize_embeddings

    floats = np.array([o.outputs.embedding for o in embedder_llm.embed(TEXTS, use_tqdm=False)])
    body = embedder.ok("/v2/embed", {"texts": TEXTS, "embedding_types": ["binary", "ubinary"]})
    assert body["embeddings"]["binary"] == quantize_embeddings(floats, precision="binary").tolist()
    assert body["embeddings"]["ubinary"] == quantize_embeddings(floats, precision="ubinary").tolist()
    assert len(body["embeddings"]["ubinary"][0]) == floats.shape[1] // 8


@pytest.mark.parametrize(("truncate", "side"), [("END", "right"), ("START", "left")])
def test_cohere_embed_truncate_cuts_the_named_end(embedder, embedder_llm, truncate, side):
    long_text = " ".join(TEXTS * 20)  # longer than max_model_len
    [expected] = embedder_llm.embed(
        long_text, tokenization_kwargs={"truncate_prompt_tokens": -1, "truncation_side": side}, use_tqdm=False
    )
    body = embedder.ok("/v2/embed", {"texts": [long_text], "truncate": truncate})
    assert_close(body["embeddings"]["float"][0], expected.outputs.embedding)
    short = embedder.ok("/v2/embed", {"texts": [long_text], "truncate": truncate, "max_tokens": 5})
    assert short["meta"]["billed_units"]["input_tokens"] == 5


@pytest.mark.parametrize(
    ("body", "contains"),
    [
        ({"texts": [" ".join(TEXTS * 20)], "truncate": "NONE"}, "Please reduce the length of the input prompt"),
        ({"texts": ["hi"], "embedding_types": ["int8"]}, "calibration"),
        ({"texts": ["hi"], "images": ["data:image/png;base64,AAAA"]}, "text-only"),
        ({"texts": []}, "texts"),
        ({"texts": ["hi"], "embedding_types": ["float32"]}, "embedding_types"),
        ({"texts": ["hi"], "output_dimension": 8}, "matryoshka"),
    ],
    ids=["too-long", "int8", "images", "no-texts", "bad-type", "dimension"],
)
def test_cohere_embed_refusals(embedder, body, contains):
    assert_error(embedder.post("/v2/embed", body), 400, contains=contains)
    embedder.assert_serving()


def test_cohere_embed_is_for_embedding_models_only(classifier):
    assert classifier.post("/v2/embed", {"texts": ["hi"]}).status_code == 404
