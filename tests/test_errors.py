"""Bad input never crashes and never yields a partial answer: each raises a ValueError subclass
whose message says what to change, and the engine keeps working afterwards."""

from __future__ import annotations

import pytest

from tests.tiny_models import PROMPTS
from winnow import (
    LLM,
    ConfigError,
    InvalidInputError,
    ModelLoadError,
    PoolerConfig,
    PoolingParams,
    PromptTooLongError,
    UnsupportedTaskError,
)


@pytest.fixture
def llm(make_model, make_llm):
    return make_llm(make_model("bert", "seq", num_labels=3))


def _still_works(llm):
    assert not llm.engine.core.has_unfinished()
    assert llm.classify(PROMPTS[0], use_tqdm=False)[0].outputs.num_classes == 3


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: m.classify([]), InvalidInputError, "You must pass at least one prompt"),
        (lambda m: m.classify(["ok", ""]), InvalidInputError, "Prompt 1 is empty"),
        (lambda m: m.classify({"prompt_token_ids": []}), InvalidInputError, "empty"),
        (lambda m: m.classify([PROMPTS[0], 42]), InvalidInputError, "Prompt 1 has an unsupported form"),
        (
            lambda m: m.classify({"prompt_token_ids": [1, 10**6]}),
            InvalidInputError,
            "outside this model's vocabulary",
        ),
        (
            lambda m: m.classify(["ok", "hello " * 200]),
            PromptTooLongError,
            "Please reduce the length of the input prompt",
        ),
        (
            lambda m: m.classify("hi", tokenization_kwargs={"truncate_prompt_tokens": 10_000}),
            InvalidInputError,
            "truncate_prompt_tokens value .* is greater than max_model_len",
        ),
        (
            lambda m: m.classify("hi", tokenization_kwargs={"truncate_prompt_tokens": -5}),
            InvalidInputError,
            "-1",
        ),
        (
            lambda m: m.classify("hi", tokenization_kwargs={"truncate_prompt_tokens": 2}),
            InvalidInputError,
            "special",
        ),
        (
            lambda m: m.classify("hi", tokenization_kwargs={"truncation_side": "middle"}),
            InvalidInputError,
            "left",
        ),
        (lambda m: m.encode("hi"), InvalidInputError, "pooling_task required"),
        (lambda m: m.encode("hi", pooling_task="score"), InvalidInputError, "`score` task was removed"),
        (lambda m: m.encode("hi", pooling_task="token_classify"), UnsupportedTaskError, "Try switching"),
        (lambda m: m.embed("hi"), UnsupportedTaskError, "Embedding API is not supported"),
        (lambda m: m.score("q", ["d"]), UnsupportedTaskError, r"only enabled for num_labels == 1"),
        (
            lambda m: m.classify("hi", pooling_params=PoolingParams(dimensions=4)),
            InvalidInputError,
            r"Task 'classify' only supports \['use_activation'\] parameters, does not support \['dimensions'\]",
        ),
        (lambda m: m.classify("hi", lora_request=object()), InvalidInputError, "LoRA"),
    ],
)
def test_bad_input_raises_value_error_and_engine_survives(llm, call, error, message):
    with pytest.raises(error, match=message) as info:
        call(llm)
    assert isinstance(info.value, ValueError)
    _still_works(llm)


def test_token_classifier_rejects_classify(make_model, make_llm):
    llm = make_llm(make_model("bert", "tok", num_labels=3))
    with pytest.raises(
        UnsupportedTaskError, match=r"Unsupported task: 'classify' Supported tasks: \('token_classify',\)"
    ):
        llm.classify("hi", use_tqdm=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"runner": "generate"}, "pooling models only"),
        ({"convert": "magic"}, "convert"),
        ({"dtype": "int4"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"max_model_len": 100_000}, "max_model_len"),
        ({"max_num_batched_tokens": 8}, "max_num_batched_tokens"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"pooler_config": {"task": "embed"}}, "Unsupported task: 'embed'"),
        ({"pooler_config": {"task": "score"}}, "`score` task was removed; use `classify` instead."),
        ({"pooler_config": {"no_such_key": 1}}, "Unknown pooler config keys"),
        ({"pooler_config": {"pooling_type": "CLS", "seq_pooling_type": "MEAN"}}, "not both"),
        ({"pooler_config": {"pooling_type": "MAX"}}, "pooling type"),
        ({"pooler_config": {"logit_sigma": 0}}, "logit_sigma"),
    ],
)
def test_bad_engine_options(make_model, kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        LLM(str(make_model("bert", "seq", num_labels=3)), **{"device": "cpu", **kwargs})
    assert isinstance(info.value, ValueError)


def test_unknown_llm_keyword_is_a_type_error(make_model):
    with pytest.raises(TypeError, match="no_such_option"):
        LLM(str(make_model("bert", "seq", num_labels=3)), no_such_option=1)


def test_pooler_config_rejects_removed_encode_task():
    with pytest.raises(ConfigError, match="`encode` task was removed"):
        PoolerConfig(task="encode")


def test_unsupported_sentence_transformers_module(make_model, tmp_path):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(make_model("bert", "base", sentence_transformers={"pooling": "mean"}), folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="Dense"):
        LLM(str(folder), device="cpu")
