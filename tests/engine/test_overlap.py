"""Launching batch N+1 before collecting batch N (what the engine does on a GPU), run on the CPU.

On a GPU ``ModelRunner.launch`` returns with the work still queued on the device; here it returns
with the work done, but the engine-side bookkeeping is the same code: which batch is collected
when, whose results go where, what happens when a launch fails or the caller gives up. Each test
turns ``runner.overlaps`` on for a fresh engine and compares with the default, sequential one.
A failing launch under overlap is covered beside the sequential case, in test_async_engine.py.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import winnow.llm as llm_module
from tests.engine.test_async_engine import (
    assert_outputs,
    client_prompts,
    make_requests,
    run_bounded,
    serving,
)
from tests.tiny_models import PROMPTS
from winnow import LLM, InvalidInputError
from winnow.errors import PromptTooLongError
from winnow.runner.batch import to_device

ATOL = 1e-5


def overlapping_llm(path, **kwargs) -> LLM:
    """An engine stepped as on a GPU: one worker (``drain`` would run a CPU's workers instead of
    ``step``), launching each batch before collecting the previous one."""
    llm = LLM(str(path), device="cpu", cpu_workers=1, **kwargs)
    llm.engine.core.runner.overlaps = True
    return llm


def assert_same_probs(got, expected) -> None:
    torch.testing.assert_close(
        torch.tensor([o.outputs.probs for o in got]),
        torch.tensor([o.outputs.probs for o in expected]),
        atol=ATOL,
        rtol=0,
    )


def assert_answers_only_its_own(llm: LLM, reference: LLM) -> None:
    """After a failed or abandoned call, the next call's results are those of its own prompts."""
    assert_same_probs(llm.classify(PROMPTS[:3], use_tqdm=False), reference.classify(PROMPTS[:3], use_tqdm=False))


@pytest.fixture(scope="module")
def classifier(make_model):
    return make_model("bert", "seq", num_labels=3)


def test_the_runner_collects_launched_batches_in_any_order(classifier, make_llm):
    engine = make_llm(classifier).engine
    runner = engine.core.runner
    first, second = make_requests(engine, PROMPTS[:3]), make_requests(engine, PROMPTS[3:7])
    expected = runner.execute(first), runner.execute(second)
    launched_first, launched_second = runner.launch(first), runner.launch(second)
    assert_outputs(runner.collect(launched_second), expected[1])
    assert_outputs(runner.collect(launched_first), expected[0])


def test_offline_steps_return_every_batch_once_in_submission_order(classifier, make_llm):
    """max_num_seqs=2: many batches, each returned by the step after the one that launched it."""
    expected = make_llm(classifier).classify(PROMPTS, use_tqdm=False)
    llm = overlapping_llm(classifier, max_num_seqs=2)
    got = llm.classify(PROMPTS, use_tqdm=False)
    assert [o.prompt_token_ids for o in got] == [o.prompt_token_ids for o in expected]
    assert_same_probs(got, expected)
    assert not llm.engine.core.has_unfinished()


class Recorder:
    """Spies on an engine (the real functions run): the order in which prompts (or, for scores,
    pairs: ``InputProcessor.encode``) are tokenized and batches launched."""

    def __init__(self, llm: LLM, monkeypatch: pytest.MonkeyPatch, tokenizer: str = "process") -> None:
        self.events: list[tuple[str, int]] = []
        tokenize, launch = getattr(llm.engine.inputs, tokenizer), llm.engine.core.runner.launch

        def tokenized(prompts, *args, **kwargs):
            self.events.append(("tokenize", len(prompts)))
            return tokenize(prompts, *args, **kwargs)

        def launched(requests):
            self.events.append(("launch", len(requests)))
            return launch(requests)

        monkeypatch.setattr(llm.engine.inputs, tokenizer, tokenized)
        monkeypatch.setattr(llm.engine.core.runner, "launch", launched)

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.events if k == kind)


def test_prompts_are_tokenized_while_batches_run(classifier, make_llm, monkeypatch):
    """Where the engine overlaps (GPU), the next prompts are tokenized between launches, not all
    before the first; results are those of the sequential engine."""
    monkeypatch.setattr(llm_module, "_TOKENIZE_CHUNK", 4)
    prompts = PROMPTS * 4  # 32 prompts: 8 chunks
    expected = make_llm(classifier).classify(prompts, use_tqdm=False)
    llm = overlapping_llm(classifier, max_num_batched_tokens=64, max_model_len=64)
    recorder = Recorder(llm, monkeypatch)
    got = llm.classify(prompts, use_tqdm=False)
    assert recorder.count("tokenize") == 8
    kinds = [kind for kind, _ in recorder.events]
    assert 0 < kinds.index("launch") < 8  # some chunks before the first launch, the rest after it
    assert sum(n for kind, n in recorder.events if kind == "launch") == len(prompts)
    assert [o.prompt_token_ids for o in got] == [o.prompt_token_ids for o in expected]
    assert_same_probs(got, expected)


def test_a_bad_prompt_in_a_later_chunk_fails_the_whole_call(classifier, make_llm, monkeypatch):
    """The call raises with the prompt's index in the caller's list, returns nothing, and leaves
    nothing queued or in flight: the next call answers only its own prompts."""
    monkeypatch.setattr(llm_module, "_TOKENIZE_CHUNK", 4)
    llm = overlapping_llm(classifier, max_num_batched_tokens=64, max_model_len=64)
    recorder = Recorder(llm, monkeypatch)
    with pytest.raises(InvalidInputError, match="Prompt 21 is empty"):
        llm.classify(PROMPTS * 2 + PROMPTS[:5] + [""], use_tqdm=False)
    assert recorder.count("launch") > 0  # the prompts before it had started
    assert not llm.engine.core.has_unfinished()
    assert_answers_only_its_own(llm, make_llm(classifier))


def test_on_a_cpu_a_bad_prompt_fails_the_call_before_any_work(classifier, monkeypatch):
    """A CPU engine does not overlap: every prompt is tokenized and checked before the first batch."""
    monkeypatch.setattr(llm_module, "_TOKENIZE_CHUNK", 4)
    llm = LLM(str(classifier), device="cpu", max_num_batched_tokens=64, max_model_len=64)
    recorder = Recorder(llm, monkeypatch)
    with pytest.raises(InvalidInputError, match="Prompt 21 is empty"):
        llm.classify(PROMPTS * 2 + PROMPTS[:5] + [""], use_tqdm=False)
    assert recorder.events == [("tokenize", 22)]


@pytest.mark.parametrize("shape", ["1:N", "N:N"])
def test_cross_encoder_pairs_are_tokenized_while_batches_run(shape, make_model, make_llm, monkeypatch):
    """Cross-encoder scores are planned a chunk of pairs at a time (each pair is its own prompt);
    scores, token ids and their order are those of the sequential engine."""
    monkeypatch.setattr(llm_module, "_TOKENIZE_CHUNK", 4)
    path = make_model("bert", "seq", num_labels=1)
    documents = PROMPTS * 2  # 16 pairs: 4 chunks
    queries = PROMPTS[2] if shape == "1:N" else list(reversed(documents))
    expected = make_llm(path).score(queries, documents, use_tqdm=False)
    llm = overlapping_llm(path, max_num_batched_tokens=64, max_model_len=64)
    recorder = Recorder(llm, monkeypatch, tokenizer="encode")
    got = llm.score(queries, documents, use_tqdm=False)
    assert recorder.count("tokenize") == 4
    kinds = [kind for kind, _ in recorder.events]
    assert 0 < kinds.index("launch") < 4
    assert [o.prompt_token_ids for o in got] == [o.prompt_token_ids for o in expected]
    torch.testing.assert_close(
        torch.tensor([o.outputs.score for o in got]),
        torch.tensor([o.outputs.score for o in expected]),
        atol=ATOL,
        rtol=0,
    )


@pytest.mark.parametrize("task", ["embed", "token_embed"])
def test_embedding_model_texts_are_tokenized_while_batches_run(task, make_model, make_llm, monkeypatch):
    """An embedding model's score embeds each distinct text once; the texts are tokenized a chunk at
    a time between launches, and scores (cosine or MaxSim) are those of the sequential engine."""
    monkeypatch.setattr(llm_module, "_TOKENIZE_CHUNK", 4)
    path = make_model("bert", "base", sentence_transformers={"pooling": "mean"})
    documents = [f"{p} {i}" for i, p in enumerate(PROMPTS * 2)]  # 16 documents + 1 query: 5 chunks
    expected = make_llm(path, pooler_config={"task": task}).score(PROMPTS[2], documents, use_tqdm=False)
    llm = overlapping_llm(path, max_num_batched_tokens=64, max_model_len=64, pooler_config={"task": task})
    recorder = Recorder(llm, monkeypatch)
    got = llm.score(PROMPTS[2], documents, use_tqdm=False)
    assert [n for kind, n in recorder.events if kind == "tokenize"] == [4, 4, 4, 4, 1]
    kinds = [kind for kind, _ in recorder.events]
    assert 0 < kinds.index("launch") < 5
    assert sum(n for kind, n in recorder.events if kind == "launch") == 17  # the query embedded once
    assert [o.prompt_token_ids for o in got] == [o.prompt_token_ids for o in expected]
    torch.testing.assert_close(
        torch.tensor([o.outputs.score for o in got]),
        torch.tensor([o.outputs.score for o in expected]),
        atol=ATOL,
        rtol=0,
    )


def test_a_pair_too_long_in_a_later_chunk_fails_the_whole_score_call(make_model, monkeypatch):
    """The error names the pair's index in the whole call; a call of the wrong shape fails at once."""
    monkeypatch.setattr(llm_module, "_TOKENIZE_CHUNK", 4)
    llm = overlapping_llm(make_model("bert", "seq", num_labels=1), max_num_batched_tokens=64, max_model_len=64)
    documents = [*PROMPTS, " ".join(["word"] * 80)]
    with pytest.raises(PromptTooLongError, match=r"\(index 8\)"):
        llm.score(PROMPTS[0], documents, use_tqdm=False)
    assert not llm.engine.core.has_unfinished()
    with pytest.raises(InvalidInputError, match="1:1, 1:N or N:N"):  # the call's shape, checked before any work
        llm.score(PROMPTS[:2], documents, use_tqdm=False)


def test_on_a_cpu_a_pair_too_long_fails_the_score_call_before_any_work(make_model, monkeypatch):
    """On a CPU a cross-encoder's first chunk of pairs is planned (so a call the model cannot serve
    fails at once), then all the rest, before the first batch."""
    monkeypatch.setattr(llm_module, "_TOKENIZE_CHUNK", 4)
    llm = LLM(str(make_model("bert", "seq", num_labels=1)), device="cpu", max_model_len=64)
    recorder = Recorder(llm, monkeypatch, tokenizer="encode")
    with pytest.raises(PromptTooLongError, match=r"\(index 8\)"):
        llm.score(PROMPTS[0], [*PROMPTS, " ".join(["word"] * 80)], use_tqdm=False)
    assert recorder.events == [("tokenize", 4), ("tokenize", 5)]


def test_offline_token_outputs_with_overlap(make_model, make_llm):
    """Token tasks cross the device/host split too (outputs split by sequence length on the host)."""
    path = make_model("bert", "tok", num_labels=4)
    expected = make_llm(path).encode(PROMPTS, pooling_task="token_classify", use_tqdm=False)
    got = overlapping_llm(path, max_num_seqs=3).encode(PROMPTS, pooling_task="token_classify", use_tqdm=False)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.outputs.data, e.outputs.data, atol=ATOL, rtol=0)


def test_an_interrupted_offline_run_leaves_no_batch_behind(classifier, make_llm):
    """The caller gives up mid-run (Ctrl-C in the progress bar): the launched batch is dropped,
    and the next call answers only its own prompts."""

    class Interrupting:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            if n:
                raise KeyboardInterrupt

    llm = overlapping_llm(classifier, max_num_seqs=2)
    with pytest.raises(KeyboardInterrupt):
        llm.classify(PROMPTS, use_tqdm=Interrupting)
    assert not llm.engine.core.has_unfinished()
    assert_answers_only_its_own(llm, make_llm(classifier))


def test_overlapping_server_engine_serves_every_client(classifier, make_llm):
    prompts = [client_prompts(seed) for seed in range(24)]
    llm = make_llm(classifier)
    expected = [[torch.tensor(o.outputs.probs) for o in llm.classify(p, use_tqdm=False)] for p in prompts]

    async def main(engine, served):
        return await asyncio.gather(*(served.run(make_requests(engine, p)) for p in prompts))

    with serving(classifier, start=False, max_num_seqs=4) as (engine, served, log):
        engine.core.runner.overlaps = True
        served.start()
        results = run_bounded(main(engine, served))
        assert served.num_pending == 0
    for got, exp in zip(results, expected):
        assert_outputs(got, exp)
    assert sum(log.num_seqs) == sum(map(len, prompts))
    assert len(log.steps) > 1


@pytest.mark.parametrize(
    ("values", "dtype", "expected"),
    [
        ([3, 1, 2], torch.int64, torch.tensor([3, 1, 2])),
        ((4, 5), torch.float32, torch.tensor([4.0, 5.0])),
        ([True, False], torch.bool, torch.tensor([True, False])),
        (np.array([7, 8], dtype=np.int32), None, torch.tensor([7, 8], dtype=torch.int32)),
    ],
)
def test_host_values_reach_the_device_with_their_dtype(values, dtype, expected):
    """The pinned, non-blocking copy the runner and pooler use (a plain copy on the CPU)."""
    got = to_device(values, torch.device("cpu"), dtype)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)
