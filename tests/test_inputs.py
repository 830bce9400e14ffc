"""Prompt forms, tokenization options, outputs' bookkeeping and the progress bar."""

from __future__ import annotations

import pytest
import torch
from tqdm import tqdm

from tests.tiny_models import PROMPTS
from winnow import ClassificationOutput, InvalidInputError, PoolingParams, UnsupportedTaskError


@pytest.fixture
def llm(make_model, make_llm):
    return make_llm(make_model("bert", "seq", num_labels=3))


def test_prompt_forms_are_equivalent(llm):
    text = PROMPTS[1]
    ids = llm.get_tokenizer()(text).input_ids
    forms = [text, [text], {"prompt": text}, [{"prompt_token_ids": ids}]]
    results = [llm.classify(f, use_tqdm=False)[0] for f in forms]
    for r in results:
        assert r.prompt_token_ids == ids
        assert r.outputs.probs == pytest.approx(results[0].outputs.probs, abs=1e-6)


def test_outputs_keep_input_order_and_carry_ids(llm):
    out = llm.classify(PROMPTS, use_tqdm=False)
    tok = llm.get_tokenizer()
    assert [o.prompt_token_ids for o in out] == [tok(p).input_ids for p in PROMPTS]
    ids = [int(o.request_id) for o in out]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(isinstance(o.outputs, ClassificationOutput) and o.finished for o in out)


def test_truncate_prompt_tokens(llm):
    text = "hello world " * 40
    tok = llm.get_tokenizer()
    right = llm.classify(text, tokenization_kwargs={"truncate_prompt_tokens": 5}, use_tqdm=False)[0]
    left = llm.classify(
        text, tokenization_kwargs={"truncate_prompt_tokens": 5, "truncation_side": "left"}, use_tqdm=False
    )[0]
    full = tok(text).input_ids
    assert right.prompt_token_ids == [full[0], *full[1:4], full[-1]]  # [CLS] first three words [SEP]
    assert left.prompt_token_ids == [full[0], *full[-4:-1], full[-1]]
    maxed = llm.classify(text * 3, tokenization_kwargs={"truncate_prompt_tokens": -1}, use_tqdm=False)[0]
    assert len(maxed.prompt_token_ids) == llm.model_config.max_model_len


def test_truncate_token_id_prompts(llm):
    ids = list(range(10, 30))
    out = llm.classify({"prompt_token_ids": ids}, tokenization_kwargs={"truncate_prompt_tokens": 6}, use_tqdm=False)
    left = llm.classify(
        {"prompt_token_ids": ids},
        tokenization_kwargs={"truncate_prompt_tokens": 6, "truncation_side": "left"},
        use_tqdm=False,
    )
    assert out[0].prompt_token_ids == ids[:6]
    assert left[0].prompt_token_ids == ids[-6:]


def test_legacy_truncate_keyword(llm):
    with pytest.warns(DeprecationWarning, match="tokenization_kwargs"):
        out = llm.classify("hello world " * 40, truncate_prompt_tokens=7, use_tqdm=False)
    assert len(out[0].prompt_token_ids) == 7


def test_hf_style_truncation_kwargs(llm):
    out = llm.classify("hello world " * 40, tokenization_kwargs={"truncation": True, "max_length": 9}, use_tqdm=False)
    assert len(out[0].prompt_token_ids) == 9


def test_add_special_tokens_false(llm):
    tok = llm.get_tokenizer()
    out = llm.classify("hello world", tokenization_kwargs={"add_special_tokens": False}, use_tqdm=False)[0]
    assert out.prompt_token_ids == tok("hello world", add_special_tokens=False).input_ids


def test_progress_bar_counts_every_prompt(llm):
    seen: list[int] = []

    class RecordingBar(tqdm):  # type: ignore[type-arg]
        def update(self, n: float | None = 1) -> bool | None:
            seen.append(int(n or 0))
            return super().update(n)

    prompts = PROMPTS * 4
    llm.classify(prompts, use_tqdm=RecordingBar)
    assert sum(seen) == len(prompts)


def test_reward_is_a_legacy_alias_of_token_classify(make_model, make_llm):
    llm = make_llm(make_model("bert", "tok", num_labels=2))
    with pytest.warns(DeprecationWarning, match="reward"):
        rewards = llm.reward(PROMPTS[:2], use_tqdm=False)
    encoded = llm.encode(PROMPTS[:2], pooling_task="token_classify", use_tqdm=False)
    for r, e in zip(rewards, encoded):
        torch.testing.assert_close(r.outputs.data, e.outputs.data)


def test_params_list_must_match_prompts(llm):
    with pytest.raises(ValueError, match=r"The lengths of prompts \(2\) and params \(3\) must be the same"):
        llm.classify(PROMPTS[:2], pooling_params=[PoolingParams()] * 3, use_tqdm=False)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"use_activation": False}, "pooling_params must be a PoolingParams or a list of them .* not a dict"),
        ([PoolingParams(), {"use_activation": False}], r"pooling_params\[1\] is a dict, not a PoolingParams"),
    ],
)
def test_pooling_params_of_the_wrong_type_are_refused(llm, given, message):
    for prompts in (PROMPTS[0], PROMPTS[:2]):
        with pytest.raises(InvalidInputError, match=message):
            llm.classify(prompts, pooling_params=given, use_tqdm=False)


def test_score_pooling_params_must_be_one_object(make_model, make_llm):
    llm = make_llm(make_model("bert", "seq", num_labels=1))
    with pytest.raises(InvalidInputError, match="must be one PoolingParams, not a dict"):
        llm.score("q", "d", pooling_params={"use_activation": False}, use_tqdm=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"use_activation": "false"}, "use_activation must be a bool .*, got 'false'"),
        ({"softmax": 0}, "softmax must be a bool"),
        ({"dimensions": 2.5}, "dimensions must be an integer >= 1"),
        ({"dimensions": 0}, "dimensions must be an integer >= 1"),
        ({"step_tag_id": "7"}, "step_tag_id must be an integer >= 0"),
        ({"returned_token_ids": 3}, "returned_token_ids must be a list of integers"),
        ({"returned_token_ids": [0, True]}, r"returned_token_ids\[1\] must be an integer >= 0"),
        ({"extra_kwargs": [("max_tokens_per_doc", 3)]}, "extra_kwargs must be a dict"),
    ],
)
def test_pooling_params_values_are_type_checked(kwargs, message):
    # "false" is truthy: unchecked, it silently meant use_activation=True.
    with pytest.raises(InvalidInputError, match=message):
        PoolingParams(**kwargs)


def test_pooling_params_take_numpy_integers_as_python_ints():
    import numpy as np

    params = PoolingParams(step_tag_id=np.int64(7), returned_token_ids=[np.int32(0), 1])
    assert (params.step_tag_id, params.returned_token_ids) == (7, [0, 1])
    assert type(params.step_tag_id) is int


def test_per_request_returned_token_ids_are_checked_against_the_labels(make_model, make_llm):
    llm = make_llm(
        make_model("bert", "seq", num_labels=3), pooler_config={"pooling_type": "STEP", "task": "token_classify"}
    )
    with pytest.raises(InvalidInputError, match=r"returned_token_ids \[3\] are out of range: .* \[0, 3\)"):
        llm.encode("hi", PoolingParams(returned_token_ids=[1, 3]), pooling_task="token_classify", use_tqdm=False)
    out = llm.encode("hi", PoolingParams(returned_token_ids=[1]), pooling_task="token_classify", use_tqdm=False)
    assert out[0].outputs.data.shape[1] == 1


def test_encode_plugin_task_is_unsupported_offline(make_model, make_llm):
    # Offline vLLM lists the supported tasks; "No IOProcessor plugin installed" is the server's wording.
    llm = make_llm(make_model("bert", "tok", num_labels=2))
    with pytest.raises(
        UnsupportedTaskError, match=r"Unsupported task: 'plugin' Supported tasks: \('token_classify',\)"
    ):
        llm.encode("hi", pooling_task="plugin", use_tqdm=False)


def test_token_id_prompts_take_numpy_and_torch_integers(llm):
    import numpy as np

    ids = llm.get_tokenizer()(PROMPTS[1]).input_ids
    expected = llm.classify({"prompt_token_ids": ids}, use_tqdm=False)[0].outputs.probs
    forms = [list(np.array(ids)), np.array(ids), torch.tensor(ids), list(torch.tensor(ids))]
    for form in forms:
        out = llm.classify({"prompt_token_ids": form}, use_tqdm=False)[0]
        assert out.prompt_token_ids == ids and all(type(t) is int for t in out.prompt_token_ids)
        assert out.outputs.probs == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([2, True, 3], r"Prompt 0: prompt_token_ids\[1\] is True \(bool\), not an integer token id"),
        (torch.tensor([2, 3]) > 2, r"prompt_token_ids\[0\] is False \(bool\)"),
        ([2, 3.0], r"prompt_token_ids\[1\] is 3.0 \(float\)"),
        ("2 3", "prompt_token_ids must be a list of ints, got str"),
    ],
)
def test_token_id_prompts_name_what_is_wrong(llm, ids, message):
    with pytest.raises(InvalidInputError, match=message):
        llm.classify({"prompt_token_ids": ids}, use_tqdm=False)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_a_long_text_is_read_only_as_far_as_its_kept_tokens(make_model, make_llm, monkeypatch, family, side):
    """Truncating (or refusing) a 60k-character text reads a window of it, not all of it, and keeps
    exactly the tokens transformers keeps from the whole text."""
    from transformers import AutoTokenizer

    path = make_model(family, "seq", num_labels=2)
    llm = make_llm(path)
    text = " ".join(f"{w} fox{i % 7}" for i, w in enumerate(PROMPTS[3].split() * 600))  # ~60k characters
    read: list[int] = []
    tokenizers = llm.engine.inputs.tokenizers
    real_encode, real_offsets = tokenizers.encode, tokenizers.encode_with_offsets
    monkeypatch.setattr(
        tokenizers, "encode", lambda inputs, **kw: read.append(len(inputs[0])) or real_encode(inputs, **kw)
    )
    monkeypatch.setattr(
        tokenizers, "encode_with_offsets", lambda texts: read.append(len(texts[0])) or real_offsets(texts)
    )
    options = {"truncate_prompt_tokens": 20, "truncation_side": side}
    [got] = llm.classify(text, tokenization_kwargs=options, use_tqdm=False)
    reference = AutoTokenizer.from_pretrained(path, truncation_side=side)
    assert got.prompt_token_ids == reference(text, truncation=True, max_length=20)["input_ids"]
    assert max(read) < len(text) // 10
    read.clear()
    with pytest.raises(ValueError, match=r"contains at least 65 input tokens"):  # max_model_len 64: refused
        llm.classify(text, use_tqdm=False)
    assert max(read) < len(text) // 10


def test_texts_are_tokenized_a_chunk_at_a_time_with_the_same_ids(llm, monkeypatch):
    """A large call reaches the tokenizer in chunks (each chunk's encodings are freed before the next
    is made, so no single free holds the GIL for long), and gets the ids transformers gives, in order;
    pairs too."""
    from winnow.inputs import prompts as prompts_module
    from winnow.inputs.prompts import TruncationOptions

    monkeypatch.setattr(prompts_module, "_ENCODE_CHUNK", 3)
    tokenizers = llm.engine.inputs.tokenizers
    calls: list[int] = []
    real_encode = tokenizers.encode
    monkeypatch.setattr(
        tokenizers, "encode", lambda inputs, **kw: calls.append(len(inputs)) or real_encode(inputs, **kw)
    )
    texts = [f"{p} {i}" for i, p in enumerate(PROMPTS * 2)]
    got = llm.engine.inputs.process(texts, TruncationOptions())
    tok = llm.get_tokenizer()
    assert [p.token_ids for p in got] == [tok(t).input_ids for t in texts]
    assert calls == [3] * (len(texts) // 3) + ([len(texts) % 3] if len(texts) % 3 else [])

    calls.clear()
    pairs = list(zip(texts, reversed(texts)))
    encoded = list(llm.engine.inputs.encode(pairs, TruncationOptions()))
    assert [e.ids for e in encoded] == [tok(a, b).input_ids for a, b in pairs]
    assert max(calls) == 3


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("limit", [20, 21])  # an odd budget gives the longer side the extra token
@pytest.mark.parametrize("long_side", ["first", "second"])
@pytest.mark.parametrize("short_words", [3, 40])  # 40 words: the short side must be truncated too
def test_a_pair_with_one_long_side_is_read_only_as_far_as_its_kept_tokens(
    make_model, make_llm, monkeypatch, side, limit, long_side, short_words
):
    """A (query, document) pair whose document is 60k characters: the document is read a window at
    a time, and the pair keeps exactly the tokens transformers' longest-first truncation keeps."""
    from transformers import AutoTokenizer

    from winnow.inputs.prompts import TruncationOptions

    path = make_model("bert", "seq", num_labels=1)
    processor = make_llm(path).engine.inputs
    long_text = " ".join(f"{w} fox{i % 7}" for i, w in enumerate(PROMPTS[3].split() * 600))
    short_text = " ".join(f"w{i % 9}" for i in range(short_words))
    pair = (long_text, short_text) if long_side == "first" else (short_text, long_text)
    read: list[int] = []
    tokenizers = processor.tokenizers
    real_encode, real_offsets = tokenizers.encode, tokenizers.encode_with_offsets
    monkeypatch.setattr(
        tokenizers,
        "encode",
        lambda inputs, **kw: read.extend(len(a) + len(b) for a, b in inputs) or real_encode(inputs, **kw),
    )
    monkeypatch.setattr(tokenizers, "encode_with_offsets", lambda t: read.append(len(t[0])) or real_offsets(t))
    [got] = processor.encode([pair], TruncationOptions(limit, side, add_special_tokens=True))
    reference = AutoTokenizer.from_pretrained(path, truncation_side=side)
    assert got.ids == reference(*pair, truncation=True, max_length=limit)["input_ids"]
    assert max(read) < len(long_text) // 10


@pytest.mark.parametrize("limit", [20, 21])  # an odd budget gives the longer side the extra token
@pytest.mark.parametrize("longer", ["first", "second", "tie"])
def test_a_pair_with_two_long_sides_keeps_what_transformers_keeps(make_model, make_llm, monkeypatch, limit, longer):
    """Both sides long: each is cut to a window (read whole, the tokenizer pairs every overflow window
    of one side with every window of the other: two 60k-character texts at 21 tokens took minutes),
    and the pair keeps exactly the tokens of transformers' longest-first truncation, odd token
    included."""
    from transformers import AutoTokenizer

    from winnow.inputs.prompts import TruncationOptions

    path = make_model("bert", "seq", num_labels=1)
    processor = make_llm(path).engine.inputs
    # Long enough to be cut (over 16 characters per kept token), short enough for transformers'
    # own pair truncation, the reference, to finish: it has the quadratic cost too.
    words = {"first": (500, 450), "second": (450, 500), "tie": (500, 500)}[longer]
    first = " ".join(f"fox{i % 7}" for i in range(words[0]))
    second = " ".join(f"cow{i % 5}" for i in range(words[1]))
    encoded: list[tuple[int, int]] = []
    tokenizers = processor.tokenizers
    real_encode = tokenizers.encode
    monkeypatch.setattr(
        tokenizers,
        "encode",
        lambda inputs, **kw: encoded.extend((len(a), len(b)) for a, b in inputs) or real_encode(inputs, **kw),
    )
    [got] = processor.encode([(first, second)], TruncationOptions(limit, "right", add_special_tokens=True))
    reference = AutoTokenizer.from_pretrained(path)
    assert got.ids == reference(first, second, truncation=True, max_length=limit)["input_ids"]
    [(sent_first, sent_second)] = encoded
    assert sent_first < len(first) and sent_second < len(second)  # both sides went to the tokenizer cut


def test_a_large_call_tokenized_on_two_threads_equals_one_thread_and_names_the_first_bad_prompt(
    make_model, make_llm, monkeypatch
):
    """CPU, two workers: a call of at least ``_TWO_THREAD_TOKENIZE`` prompts is split between the
    calling thread and a helper; the ids are the same, in order, and of two bad prompts the one with
    the lower index is reported, wherever it falls."""
    from winnow import llm as llm_module

    llm = make_llm(make_model("bert", "seq", num_labels=2), cpu_workers=2)
    assert llm.engine.core.workers == 2
    texts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(40)]
    monkeypatch.setattr(llm_module, "_TWO_THREAD_TOKENIZE", 10**9)
    one_thread = [o.prompt_token_ids for o in llm.classify(texts, use_tqdm=False)]
    monkeypatch.setattr(llm_module, "_TWO_THREAD_TOKENIZE", 8)
    helper_calls = []
    real_process = llm.engine.inputs.process
    monkeypatch.setattr(
        llm.engine.inputs,
        "process",
        lambda prompts, options, offset=0: helper_calls.append(offset) or real_process(prompts, options, offset=offset),
    )
    two_threads = [o.prompt_token_ids for o in llm.classify(texts, use_tqdm=False)]
    assert two_threads == one_thread
    assert sorted(helper_calls) == [0, 20]
    for bad in ([25], [5, 25]):
        broken = [("" if i in bad else t) for i, t in enumerate(texts)]
        with pytest.raises(InvalidInputError, match=f"Prompt {bad[0]} is empty"):
            llm.classify(broken, use_tqdm=False)
