"""One test per LLM(...) option not covered elsewhere: convert, tokenizer, max_model_len, device,
chat_template, hf_overrides, trust_remote_code and seed."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import PROMPTS
from winnow import LLM, ConfigError, ModelLoadError, PoolerConfig, PromptTooLongError


def test_convert_embed_serves_a_classifier_checkpoint_as_an_embedder(make_model, hf_reference):
    path = make_model("bert", "seq", num_labels=2)
    llm = LLM(str(path), device="cpu", convert="embed")
    assert (llm.model_config.architecture, llm.model_config.task) == ("BertModel", "embed")
    model, tok = hf_reference(path, "seq")
    for prompt, out in zip(PROMPTS[:3], llm.embed(PROMPTS[:3], use_tqdm=False)):
        with torch.no_grad():
            cls = model.bert(**tok(prompt, return_tensors="pt")).last_hidden_state[0, 0]
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), cls / cls.norm(), atol=1e-5, rtol=0)


def test_tokenizer_option_loads_another_folder(make_model, tmp_path):
    from transformers import AutoTokenizer

    path = make_model("bert", "seq", num_labels=2)
    cased = AutoTokenizer.from_pretrained(path, do_lower_case=False)  # a tokenizer that differs on upper case
    cased.save_pretrained(tmp_path)
    llm = LLM(str(path), device="cpu", tokenizer=str(tmp_path))
    got = llm.classify("HELLO world", use_tqdm=False)[0].prompt_token_ids
    assert got == cased("HELLO world").input_ids
    assert got != AutoTokenizer.from_pretrained(path)("HELLO world").input_ids


def test_a_tokenizer_folder_that_does_not_exist_is_named(make_model, tmp_path):
    with pytest.raises(ModelLoadError, match=r"Tokenizer folder '.*nowhere' does not exist"):
        LLM(str(make_model("bert", "seq", num_labels=2)), device="cpu", tokenizer=str(tmp_path / "nowhere"))


def test_max_model_len_caps_prompts(make_model):
    llm = LLM(str(make_model("bert", "seq", num_labels=2)), device="cpu", max_model_len=10)
    assert llm.model_config.max_model_len == 10
    with pytest.raises(PromptTooLongError, match="maximum context length is 10 tokens"):
        llm.classify(PROMPTS[3], use_tqdm=False)
    out = llm.classify(PROMPTS[3], tokenization_kwargs={"truncate_prompt_tokens": -1}, use_tqdm=False)
    assert len(out[0].prompt_token_ids) == 10


def test_device_auto_is_cpu_without_a_gpu(make_model):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto picks cuda")
    assert LLM(str(make_model("bert", "seq", num_labels=2))).engine.config.device == torch.device("cpu")


def test_constructor_chat_template_is_the_default_score_template(make_model):
    template = "{{ messages[0].content }} and {{ messages[1].content }}"
    llm = LLM(str(make_model("bert", "seq", num_labels=1)), device="cpu", chat_template=template)
    out = llm.score("hello", "world", use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.get_tokenizer()("hello and world").input_ids
    per_call = llm.score("hello", "world", chat_template="{{ messages[1].content }}", use_tqdm=False)[0]
    assert per_call.prompt_token_ids == llm.get_tokenizer()("world").input_ids


def test_hf_overrides_label_space(make_model):
    path = make_model("bert", "seq", num_labels=2)
    llm = LLM(str(path), device="cpu", hf_overrides={"id2label": {0: "negative", 1: "positive"}})
    assert llm.model_config.id2label == {0: "negative", 1: "positive"}
    relabelled = LLM(str(path), device="cpu", hf_overrides={"problem_type": "multi_label_classification"})
    probs = relabelled.classify(PROMPTS[0], use_tqdm=False)[0].outputs.probs
    assert abs(sum(probs) - 1.0) > 1e-3  # independent sigmoids, not a softmax


def test_trust_remote_code_and_seed_are_accepted(make_model):
    llm = LLM(str(make_model("bert", "seq", num_labels=2)), device="cpu", trust_remote_code=True, seed=1234)
    assert llm.engine.config.seed == 1234
    assert llm.model_config.trust_remote_code is True
    assert llm.classify(PROMPTS[0], use_tqdm=False)[0].outputs.num_classes == 2


def test_ignored_vllm_options_are_accepted(make_model):
    path = str(make_model("bert", "seq", num_labels=2))
    llm = LLM(path, device="cpu", enforce_eager=True, gpu_memory_utilization=0.9)
    assert llm.classify(PROMPTS[0], use_tqdm=False)[0].outputs.num_classes == 2


@pytest.mark.parametrize(
    ("head", "task", "active"),
    [
        ("tok", "reward", "token_classify"),
        ("seq", "reward", "token_classify"),
        ("seq", "embed", "embed"),
        ("seq", "classify", "classify"),
        ("seq", "score", "classify"),
    ],
)
def test_legacy_task_keyword(make_model, head, task, active):
    """task="reward" makes a sequence classifier's token task active; "embed" converts it to an embedder."""
    with pytest.warns(DeprecationWarning, match="task"):
        llm = LLM(str(make_model("bert", head, num_labels=3)), device="cpu", task=task)
    assert llm.model_config.task == active


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"logit_mean": "2"}, "logit_mean must be a finite number, got '2'"),
        ({"logit_sigma": float("nan")}, "logit_sigma must be a finite number"),
        ({"logit_scale": "4"}, "logit_scale must be a finite number"),
        ({"use_activation": "false"}, "use_activation must be a bool"),
        ({"normalize": 1}, "normalize must be a bool"),
        ({"step_tag_id": 1.5}, "step_tag_id must be an integer >= 0"),
        ({"returned_token_ids": "01"}, "returned_token_ids must be a list of integers"),
        ({"dimensions": 0}, "dimensions must be an integer >= 1"),
    ],
)
def test_pooler_config_values_are_type_checked(make_model, kwargs, message):
    # Unchecked, logit_mean="2" loaded and every request then failed with a TypeError.
    with pytest.raises(ConfigError, match=message):
        PoolerConfig(**kwargs)
    with pytest.raises(ConfigError, match=message):  # the dict form (CLI --pooler-config) too
        LLM(str(make_model("bert", "seq", num_labels=1)), device="cpu", pooler_config=kwargs)


def test_pooler_config_must_be_a_pooler_config_or_a_dict(make_model):
    with pytest.raises(ConfigError, match=r"pooler_config must be a PoolerConfig or a dict of its fields, not a str"):
        LLM(str(make_model("bert", "seq", num_labels=3)), device="cpu", pooler_config="CLS")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_labels": "three"}, "num_labels must be a positive integer, got 'three'"),
        ({"num_labels": 0}, "num_labels must be a positive integer"),
        ({"id2label": {"neg": "a", "neu": "b", "pos": "c"}}, "id2label maps an output index to a label name"),
        ({"id2label": ["a", "b", "c"]}, "id2label must be a dict"),
        ({"id2label": {0: "a", 2: "c"}}, r"id2label keys must be 0..1, got \[0, 2\]"),
        ({"num_labels": 3, "id2label": {0: "a", 1: "b"}}, "num_labels=3 but id2label has 2 labels"),
        # A typo used to fall back to softmax without a word.
        ({"problem_type": "multi_label"}, "problem_type='multi_label' is not one of single_label_classification"),
        ("num_labels=3", "hf_overrides must be a dict"),
    ],
)
def test_hf_overrides_label_values_are_checked(make_model, overrides, message):
    with pytest.raises(ConfigError, match=message):
        LLM(str(make_model("bert", "seq", num_labels=3)), device="cpu", hf_overrides=overrides)


def test_hf_overrides_id2label_takes_json_string_keys(make_model):
    llm = LLM(
        str(make_model("bert", "seq", num_labels=2)), device="cpu", hf_overrides={"id2label": {"0": "no", "1": "yes"}}
    )
    assert llm.model_config.id2label == {0: "no", 1: "yes"}


def test_step_returned_token_ids_must_be_columns_of_the_output(make_model):
    # Unchecked, the model loaded and every request then failed with an IndexError in the pooler.
    path = str(make_model("bert", "seq", num_labels=3))
    step = {"pooling_type": "STEP", "task": "token_classify"}
    with pytest.raises(ConfigError, match=r"returned_token_ids \[7\] are out of range: .* 3 labels.*\[0, 3\)"):
        LLM(path, device="cpu", pooler_config={**step, "returned_token_ids": [0, 7]})
    llm = LLM(path, device="cpu", pooler_config={**step, "returned_token_ids": [2, 0]})
    assert llm.encode("hello world", pooling_task="token_classify", use_tqdm=False)[0].outputs.data.shape[1] == 2
