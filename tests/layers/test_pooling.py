"""Head semantics (spec §3): activation choice, use_activation, calibration, pooling types, head dtype."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.tiny_models import PROMPTS
from winnow import LLM, ModelLoadError, PoolerConfig, PoolingParams

ATOL = 1e-4
RAW = PoolingParams(use_activation=False)


def _ref(hf_reference, path, prompt, head="seq"):
    model, tok = hf_reference(path, head)
    with torch.no_grad():
        return model(**tok(prompt, return_tensors="pt")).logits[0]


def _probs(llm, prompts=PROMPTS[:4], params=None):
    return [torch.tensor(o.outputs.probs) for o in llm.classify(prompts, pooling_params=params, use_tqdm=False)]


@pytest.mark.parametrize(
    ("problem_type", "num_labels", "act"),
    [
        ("regression", 1, lambda z: z),
        ("regression", 3, lambda z: z),
        ("multi_label_classification", 4, torch.sigmoid),
        ("single_label_classification", 4, lambda z: torch.softmax(z, -1)),
        (None, 1, torch.sigmoid),
        (None, 3, lambda z: torch.softmax(z, -1)),
    ],
)
def test_activation_follows_problem_type(problem_type, num_labels, act, make_model, make_llm, hf_reference):
    path = make_model("bert", "seq", num_labels=num_labels, config_extra={"problem_type": problem_type})
    for prompt, got in zip(PROMPTS[:4], _probs(make_llm(path))):
        torch.testing.assert_close(got, act(_ref(hf_reference, path, prompt)), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("config_extra", "act"),
    [
        ({"sentence_transformers": {"activation_fn": "torch.nn.modules.linear.Identity"}}, lambda z: z),
        ({"sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Sigmoid"}}, torch.sigmoid),
        ({"sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Tanh"}}, torch.tanh),
        ({"sbert_ce_default_activation_function": "torch.nn.modules.linear.Identity"}, lambda z: z),
    ],
)
def test_sentence_transformers_activation(config_extra, act, make_model, make_llm, hf_reference):
    path = make_model("bert", "seq", num_labels=1, config_extra=config_extra)
    for prompt, got in zip(PROMPTS[:4], _probs(make_llm(path))):
        torch.testing.assert_close(got, act(_ref(hf_reference, path, prompt)), atol=ATOL, rtol=0)


def test_activation_outside_torch_nn_modules_is_refused(make_model):
    path = make_model(
        "bert", "seq", num_labels=1, config_extra={"sentence_transformers": {"activation_fn": "os.system"}}
    )
    with pytest.raises(ModelLoadError, match=r"restricted to torch\.nn\.modules"):
        LLM(str(path), device="cpu")


def test_use_activation_per_request_and_per_model(make_model, make_llm, hf_reference):
    path = make_model("bert", "seq", num_labels=3)
    refs = [_ref(hf_reference, path, p) for p in PROMPTS[:4]]
    default, on, off = (_probs(make_llm(path), params=p) for p in (None, PoolingParams(use_activation=True), RAW))
    model_off = make_llm(path, pooler_config=PoolerConfig(use_activation=False))
    for ref, d, a, r, m in zip(refs, default, on, off, _probs(model_off)):
        torch.testing.assert_close(d, torch.softmax(ref, -1), atol=ATOL, rtol=0)
        torch.testing.assert_close(a, d, atol=0, rtol=0)
        torch.testing.assert_close(r, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(m, ref, atol=ATOL, rtol=0)
    # A request can turn the activation back on when the model default is off.
    back_on = _probs(model_off, params=PoolingParams(use_activation=True))
    torch.testing.assert_close(back_on[0], torch.softmax(refs[0], -1), atol=ATOL, rtol=0)


def test_mixed_activation_in_one_batch(make_model, make_llm):
    llm = make_llm(make_model("bert", "seq", num_labels=3))
    params = [PoolingParams(use_activation=i % 2 == 0) for i in range(4)]
    mixed = llm.classify(PROMPTS[:4], pooling_params=params, use_tqdm=False)
    for i, out in enumerate(mixed):
        alone = llm.classify(PROMPTS[i], pooling_params=params[i], use_tqdm=False)[0]
        assert out.outputs.probs == pytest.approx(alone.outputs.probs, abs=1e-6)
        assert (abs(sum(out.outputs.probs) - 1) < 1e-5) == (i % 2 == 0)


@pytest.mark.parametrize("alias", ["softmax", "activation"])
def test_legacy_activation_aliases(alias, make_model, make_llm):
    llm = make_llm(make_model("bert", "seq", num_labels=3))
    with pytest.warns(DeprecationWarning, match="use_activation"):
        params = PoolingParams(**{alias: False})
    assert params.use_activation is False
    got = _probs(llm, params=params)
    torch.testing.assert_close(got[0], _probs(llm, params=RAW)[0])
    with pytest.warns(DeprecationWarning):
        assert PoolerConfig(**{alias: False}).use_activation is False


@pytest.mark.parametrize("use_activation", [True, False])
def test_calibration_applies_before_activation_and_when_off(use_activation, make_model, make_llm, hf_reference):
    path = make_model("bert", "seq", num_labels=1)
    llm = make_llm(path, pooler_config=PoolerConfig(logit_mean=0.7, logit_sigma=2.0))
    got = _probs(llm, params=PoolingParams(use_activation=use_activation))
    for prompt, g in zip(PROMPTS[:4], got):
        z = (_ref(hf_reference, path, prompt) - 0.7) / 2.0
        torch.testing.assert_close(g, torch.sigmoid(z) if use_activation else z, atol=ATOL, rtol=0)


def test_legacy_calibration_names(make_model, make_llm, hf_reference):
    path = make_model("bert", "seq", num_labels=1)
    with pytest.warns(DeprecationWarning):
        config = PoolerConfig(logit_bias=0.5, logit_scale=4.0)
    assert (config.logit_mean, config.logit_sigma) == (0.5, 0.25)
    got = _probs(make_llm(path, pooler_config=config), params=RAW)
    z = (_ref(hf_reference, path, PROMPTS[0]) - 0.5) / 0.25
    torch.testing.assert_close(got[0], z, atol=ATOL, rtol=0)


@pytest.mark.parametrize("pooling", ["MEAN", "LAST", "CLS"])
def test_pooling_type_override(pooling, make_model, make_llm, hf_reference):
    """BERT classifier with another sequence pooling: classifier(pooler(POOL(hidden)))."""
    path = make_model("bert", "seq", num_labels=2)
    llm = make_llm(path, pooler_config={"pooling_type": pooling})
    model, tok = hf_reference(path, "seq")
    for prompt, got in zip(PROMPTS[:4], _probs(llm, params=RAW)):
        with torch.no_grad():
            hidden = model.bert(**tok(prompt, return_tensors="pt")).last_hidden_state[0]
            pooled = {"MEAN": hidden.mean(0), "LAST": hidden[-1], "CLS": hidden[0]}[pooling]
            ref = model.classifier(model.bert.pooler.activation(model.bert.pooler.dense(pooled)))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_step_pooling_keeps_tagged_rows_and_chosen_columns(make_model, make_llm, hf_reference):
    path = make_model("bert", "tok", num_labels=5)
    _, tok = hf_reference(path, "tok")
    tag = tok.convert_tokens_to_ids("the")
    llm = make_llm(path, pooler_config={"pooling_type": "STEP", "step_tag_id": tag, "returned_token_ids": [1, 3]})
    prompt = "the quick brown fox jumps over the lazy dog"
    out = llm.encode(prompt, RAW, pooling_task="token_classify", use_tqdm=False)[0]
    ids = torch.tensor(out.prompt_token_ids)
    ref = _ref(hf_reference, path, prompt, head="tok")[ids == tag][:, [1, 3]]
    assert out.outputs.data.shape == (2, 2)
    torch.testing.assert_close(out.outputs.data, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("tagged", [False, True], ids=["every-row", "tagged-rows"])
def test_step_pooling_activates_over_the_kept_columns_only(tagged, make_model, make_llm, hf_reference):
    """Spec §3.2 then §3.1: STEP keeps its columns (and tagged rows) and the activation runs after,
    over the kept columns: softmax(logits[:, returned_token_ids]), as vLLM's StepPool does."""
    path = make_model("bert", "tok", num_labels=3)
    model, tok = hf_reference(path, "tok")
    tag = tok.convert_tokens_to_ids("the") if tagged else None
    config = {"pooling_type": "STEP", "step_tag_id": tag, "returned_token_ids": [0, 1], "task": "token_classify"}
    llm = make_llm(path, pooler_config=config)
    prompt = "the quick brown fox jumps over the lazy dog"
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]  # [num_tokens, 3]
    rows = inputs["input_ids"][0] == tag if tagged else slice(None)
    # The model's columns, then one request's own (reordered) columns in the same batch.
    for params, cols in [(PoolingParams(), [0, 1]), (PoolingParams(returned_token_ids=[2, 0]), [2, 0])]:
        kept = logits[rows][:, cols]  # [num_kept_rows, len(cols)]
        raw = PoolingParams(use_activation=False, returned_token_ids=params.returned_token_ids)
        got, got_raw = (
            o.outputs.data
            for o in llm.encode([prompt, prompt], [params, raw], pooling_task="token_classify", use_tqdm=False)
        )
        assert got.shape == kept.shape == (2 if tagged else len(inputs["input_ids"][0]), 2)
        torch.testing.assert_close(got, kept.softmax(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(got_raw, kept, atol=1e-5, rtol=0)


def test_head_runs_in_float32_when_body_is_half(make_model):
    path = make_model("bert", "seq", num_labels=2)
    llm = LLM(str(path), device="cpu", dtype="bfloat16")
    model = llm.engine.core.runner.model
    assert model.bert.encoder.layer[0].output.dense.weight.dtype == torch.bfloat16
    assert model.classifier.weight.dtype == torch.float32
    assert model.bert.pooler.dense.weight.dtype == torch.float32
    model_head = LLM(str(path), device="cpu", dtype="bfloat16", hf_overrides={"head_dtype": "model"})
    assert model_head.engine.core.runner.model.classifier.weight.dtype == torch.bfloat16
    assert llm.classify(PROMPTS[0], use_tqdm=False)[0].outputs.num_classes == 2


def test_dtype_auto_is_float32_on_a_cpu_without_bf16_instructions(make_model, make_llm):
    # The suite's CPU "has no bf16 instructions" (conftest.auto_dtype_is_float32).
    llm = make_llm(make_model("bert", "seq", num_labels=2))
    assert llm.model_config.dtype == torch.float32


def _half_checkpoint(tmp_path, make_model, dtype: str):
    import json
    import shutil

    path = tmp_path / dtype
    shutil.copytree(make_model("bert", "seq", num_labels=2), path)
    config = json.loads((path / "config.json").read_text())
    config["dtype"] = dtype
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("saved", ["float16", "bfloat16"])
def test_dtype_auto_never_picks_half_precision_on_a_cpu_without_it(saved, tmp_path, make_model):
    """A half checkpoint on such a CPU still runs in float32 under auto (half matmuls there are ~100x slower)."""
    assert LLM(str(_half_checkpoint(tmp_path, make_model, saved)), device="cpu").model_config.dtype == torch.float32


def test_dtype_auto_follows_this_cpu(make_model, real_auto, hf_reference):
    """With the CPU's real answer: bfloat16 where it has bf16 matrix instructions (vLLM's auto runs
    float32 pooling checkpoints in half precision where supported), else float32 arithmetic, with
    float16-stored linear weights on an x86 CPU. The head stays float32 and the probabilities stay
    within the low-precision tolerance of transformers'."""
    from winnow.layers.linear import Fp16WeightLinear, cpu_has_fast, cpu_has_fp16_weights

    path = make_model("bert", "seq", num_labels=2)
    llm = LLM(str(path), device="cpu")
    bf16 = cpu_has_fast(torch.bfloat16)
    assert llm.model_config.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert llm.model_config.fp16_weights == (not bf16 and cpu_has_fp16_weights())
    model = llm.engine.core.runner.model
    assert model.classifier.weight.dtype == torch.float32
    fp16_layers = [n for n, m in model.named_modules() if isinstance(m, Fp16WeightLinear)]
    assert bool(fp16_layers) == llm.model_config.fp16_weights
    assert not any(n.startswith("classifier") for n in fp16_layers)
    for prompt, probs in zip(PROMPTS[:4], _probs(llm)):
        assert torch.allclose(probs, _ref(hf_reference, path, prompt).softmax(-1), atol=2e-2)


def test_int8_with_auto_dtype_keeps_what_auto_picks(make_model, real_auto):
    """With int8, ``auto`` still picks the dtype of everything but the int8 GEMMs: bfloat16 on a CPU
    with bf16 instructions (test_quant.py covers that path), float32 elsewhere, where the other
    linears (attention projections) take float16 weights like auto's."""
    from tests.conftest import REAL_AUTO_CPU_DTYPE
    from winnow.layers.linear import Fp16WeightLinear

    llm = LLM(str(make_model("bert", "seq", num_labels=2)), device="cpu", quantization="int8")
    assert llm.model_config.dtype == REAL_AUTO_CPU_DTYPE()
    qkv = llm.engine.core.runner.model.bert.encoder.layer[0].attention.self.qkv_proj
    assert isinstance(qkv, Fp16WeightLinear) == llm.model_config.fp16_weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_on_cpu_warns_only_without_hardware_support(dtype, make_model, caplog):
    from winnow.layers.linear import cpu_has_fast

    with caplog.at_level(logging.WARNING, logger="winnow"):
        LLM(str(make_model("bert", "seq", num_labels=2)), device="cpu", dtype=dtype)
    warned = any("matrix instructions" in r.getMessage() for r in caplog.records)
    assert warned == (not cpu_has_fast(dtype))
