"""A lone request's traced forward (runner/lone_trace.py): one graph per input signature, traced
at one length, must give the eager forward's result at every length, for every family that opts
in; anything the tracer would freeze keeps the model eager; the runner uses it where it can.

The traced graphs are compared with the eager forward of the same weights; the eager forward is
what the parity tests compare with transformers.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.models.test_deberta_v2 import build_deberta
from tests.models.test_decoders import build_decoder
from tests.models.test_modernbert import build_modernbert
from tests.tiny_models import PROMPTS, build_model
from winnow import LLM
from winnow.engine.builder import EngineArgs, prepare_engine
from winnow.layers.linear import PackedLinear, cpu_has_fp16_weights, pack_linears
from winnow.layers.quant import TRACED_INT8_MAX_TOKENS
from winnow.models.base import ModelBase
from winnow.models.registry import native_architectures, resolve_architecture
from winnow.runner import model_runner
from winnow.runner.batch import Batch, build_batch
from winnow.runner.lone_trace import LoneForward
from winnow.runner.model_runner import load_model

CPU = torch.device("cpu")
MAX_LEN = 60  # the tiny BERT-like models take 64 positions; decoders 512
LENGTHS = [1, 2, 3, 5, 7, 8, 13, 21, 34, 55, MAX_LEN]

# Every family that sets ``traces_lone_requests``, token heads included; decoders with a sliding
# window shorter than the long lengths (Mistral: every layer; Gemma2: alternate layers, soft-capping).
BUILDERS: dict[str, Callable[[Path], Path]] = {
    "bert": functools.partial(build_model, family="bert", head="seq"),
    "bert-tok": functools.partial(build_model, family="bert", head="tok"),
    "roberta": functools.partial(build_model, family="roberta", head="seq"),
    "xlm-roberta-tok": functools.partial(build_model, family="xlm-roberta", head="tok"),
    "electra": functools.partial(build_model, family="electra", head="seq"),
    "distilbert": functools.partial(build_model, family="distilbert", head="seq"),
    "gpt2": functools.partial(build_decoder, family="gpt2", head="seq"),
    "qwen3": functools.partial(build_decoder, family="qwen3", head="seq"),
    "mistral-window": functools.partial(build_decoder, family="mistral", head="seq", sliding_window=5),
    "gemma": functools.partial(build_decoder, family="gemma", head="seq"),
    "gemma2": functools.partial(build_decoder, family="gemma2", head="seq"),
    # DeBERTa: log buckets and clamped distances within the long lengths; separate position
    # projections and absolute positions (v2); the convolution beside the first layer.
    "deberta-v3": functools.partial(build_deberta, head="seq", variant="v3"),
    "deberta-v2-tok": functools.partial(build_deberta, head="tok", variant="v2"),
    "deberta-conv": functools.partial(build_deberta, head="seq", variant="conv"),
    # ModernBERT: local layers of +-4 tokens, so every length from 10 on is windowed.
    "modernbert": functools.partial(build_modernbert, head="seq"),
    "modernbert-tok": functools.partial(build_modernbert, head="tok"),
}


def load_unpacked(path: Path, *, fp16_weights: bool = False) -> tuple[ModelBase, Any]:
    """The model with its plain ``nn.Linear``s, or with FBGEMM float16 weights (what
    ``dtype="auto"`` runs on AVX2 CPUs); the runner's oneDNN-packed models have their own test."""
    config = prepare_engine(EngineArgs(model=str(path), device="cpu", dtype="float32"))[0].model
    model = load_model(config, CPU)
    if fp16_weights:
        pack_linears(model, (), fp16_weights=True, keep=model.head_prefixes)
    return model, config


def one_sequence(length: int, *, token: str | None = "first", types: bool = False, vocab: int = 40) -> Batch:
    ids = [(7 * i + 3) % (vocab - 1) + 1 for i in range(length)]  # never 0 (a pad id)
    tt = [0] * (length // 2) + [1] * (length - length // 2) if types else None
    return build_batch([ids], [tt], CPU, output_token=token)  # type: ignore[arg-type]


def trace_and_compare(model: ModelBase, *, token: str | None, types: bool = False, vocab: int = 40) -> None:
    """Traced at 8 tokens; equal to the eager forward at every length in ``LENGTHS``."""
    lone = LoneForward.trace(model, [one_sequence(8, token=token, types=types, vocab=vocab)], MAX_LEN)
    assert lone is not None and set(lone.graphs) == {(types, token is not None)}
    with torch.inference_mode():
        for length in LENGTHS:
            batch = one_sequence(length, token=token, types=types, vocab=vocab)
            expected = model(batch)
            got = lone(batch)
            assert got.shape == expected.shape == ((1 if token else length), expected.shape[-1])
            # float32's default tolerances (rtol 1.3e-6): a GEMM may see the activations laid out
            # otherwise in the graph and sum in another order (GPT-2: up to 1.3e-6 of ~2.5).
            torch.testing.assert_close(got, expected, msg=f"{length} tokens")


@pytest.mark.parametrize("family", list(BUILDERS))
def test_one_graph_gives_the_eager_result_at_every_length(family, tmp_path):
    model, config = load_unpacked(BUILDERS[family](tmp_path))
    assert model.traces_lone_requests
    decoder = family in ("gpt2", "qwen3", "mistral-window", "gemma", "gemma2")
    token = None if family.endswith("-tok") else ("last" if decoder else "first")
    trace_and_compare(model, token=token, vocab=config.vocab_size)


@pytest.mark.parametrize("family", ["bert", "electra", "deberta-v2-tok"])
def test_token_types_are_an_input_of_their_own_graph(family, tmp_path):
    model, config = load_unpacked(BUILDERS[family](tmp_path))
    trace_and_compare(model, token="first", types=True, vocab=config.vocab_size)


@pytest.mark.skipif(not cpu_has_fp16_weights(), reason="FBGEMM float16 weights need an x86 AVX2 CPU")
@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_float16_weight_layers_trace_too(family, tmp_path):
    model, config = load_unpacked(BUILDERS[family](tmp_path), fp16_weights=True)
    assert model.traces_lone_requests
    trace_and_compare(model, token="last" if family == "qwen3" else "first", vocab=config.vocab_size)


def test_a_signature_without_a_graph_runs_eagerly(tmp_path):
    model, config = load_unpacked(BUILDERS["bert"](tmp_path))
    lone = LoneForward.trace(model, [one_sequence(8, token="first", vocab=config.vocab_size)], MAX_LEN)
    assert lone is not None
    batch = one_sequence(9, token=None, vocab=config.vocab_size)  # every token's state: no graph for it
    with torch.inference_mode():
        assert torch.equal(lone(batch), model(batch))


def test_an_error_in_the_graph_is_the_eager_forwards_error(tmp_path):
    """The interpreter wraps an operator's error in a RuntimeError; the caller sees the eager one."""
    model, config = load_unpacked(BUILDERS["bert"](tmp_path))
    lone = LoneForward.trace(model, [one_sequence(8, vocab=config.vocab_size)], MAX_LEN)
    assert lone is not None
    bad = build_batch([[2, config.vocab_size + 10, 3]], [None], CPU, output_token="first")
    with torch.inference_mode(), pytest.raises(IndexError):
        lone(bad)


def test_a_graph_that_fails_alone_gives_way_to_the_eager_forward(tmp_path, caplog):
    model, config = load_unpacked(BUILDERS["bert"](tmp_path))
    lone = LoneForward.trace(model, [one_sequence(8, vocab=config.vocab_size)], MAX_LEN)
    assert lone is not None

    def broken(*tensors: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a graph-only failure")

    lone.graphs[(False, True)] = broken
    batch = one_sequence(12, vocab=config.vocab_size)
    with caplog.at_level(logging.WARNING, logger="winnow.runner.lone_trace"), torch.inference_mode():
        assert torch.equal(lone(batch), model(batch))
    assert "graph failed where the eager forward did not: a graph-only failure" in caplog.text


def test_two_threads_share_a_graph(tmp_path):
    model, config = load_unpacked(BUILDERS["bert"](tmp_path))
    lone = LoneForward.trace(model, [one_sequence(8, vocab=config.vocab_size)], MAX_LEN)
    assert lone is not None
    batches = [one_sequence(n, vocab=config.vocab_size) for n in (3, 17, 40)]
    with torch.inference_mode():
        expected = [model(b) for b in batches]
    results: dict[tuple[int, int], torch.Tensor] = {}

    def work(worker: int) -> None:
        with torch.inference_mode():
            for repeat in range(20):
                i = (worker + repeat) % len(batches)
                results[(worker, repeat)] = lone(batches[i])

    threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (worker, repeat), got in results.items():
        assert torch.equal(got, expected[(worker + repeat) % len(batches)])


# -- what keeps a model eager --------------------------------------------------------------------


class _ToyModel(ModelBase):
    """An embedding and a linear, with one way of reading the batch that a graph cannot follow."""

    traces_lone_requests = True

    def __init__(self, reads: str) -> None:
        super().__init__()
        self.reads = reads
        self.embed = nn.Embedding(50, 4)
        self.proj = nn.Linear(4, 4)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.proj(self.embed(batch.input_ids))  # [T, 4]
        if self.reads == "host length":  # frozen at the traced length, silently
            return x * batch.max_seqlen
        if self.reads == "tensor as int":  # the tracer warns
            return x[: int(batch.input_ids.shape[0]) - 1]
        if self.reads == "not a tensor":  # the tracer cannot record a dict output
            return {"x": x}  # type: ignore[return-value]
        return x


@pytest.mark.parametrize(
    ("reads", "logged"),
    [
        ("host length", "the trace differs at 1 tokens"),
        ("tensor as int", "the trace froze a value"),
        ("not a tensor", "tracing failed"),
    ],
)
def test_a_forward_the_graph_cannot_follow_stays_eager(reads, logged, caplog):
    model = _ToyModel(reads)
    with caplog.at_level(logging.WARNING, logger="winnow.runner.lone_trace"), torch.inference_mode():
        assert LoneForward.trace(model, [one_sequence(8, token=None)], MAX_LEN) is None
    assert f"_ToyModel: lone requests run eagerly; {logged}" in caplog.text


def test_a_forward_that_reads_only_tensors_is_traced():
    model = _ToyModel("tensors only")
    with torch.inference_mode():
        lone = LoneForward.trace(model, [one_sequence(8, token=None)], MAX_LEN)
        assert lone is not None
        batch = one_sequence(11, token=None)
        assert torch.equal(lone(batch), model(batch))


def test_every_native_class_opts_in():
    """Every class the registry names runs a lone request from a graph; a new family that cannot
    (a forward that reads host-side lengths) would have to be named here on purpose."""
    classes = {resolve_architecture([arch]).load_class() for arch in native_architectures()}
    assert [c.__name__ for c in classes if not c.traces_lone_requests] == []


def test_onednn_packed_layers_trace_too(tmp_path):
    """float32 (and bfloat16 on CPUs with bf16 instructions) run oneDNN's packed linears, whose op
    the tracer reaches through a TorchScript function: the graph equals the eager forward."""
    llm = LLM(str(BUILDERS["bert"](tmp_path)), device="cpu", dtype="float32")
    runner = llm.engine.core.runner
    assert runner.lone is not None and set(runner.lone.graphs) == {(False, True)}
    assert any(isinstance(m, PackedLinear) for m in runner.model.modules())
    with torch.inference_mode():
        for length in LENGTHS:
            batch = one_sequence(length, vocab=runner.config.vocab_size)
            torch.testing.assert_close(runner.lone(batch), runner.model(batch))


# -- the runner ------------------------------------------------------------------------------------


@pytest.mark.skipif(not cpu_has_fp16_weights(), reason="dtype='auto' runs float16 weights on x86 AVX2 CPUs only")
def test_the_runner_traces_lone_requests_at_load_and_answers_as_in_a_batch(tmp_path, real_auto, hf_reference):
    if not LLM(str(BUILDERS["bert"](tmp_path / "probe")), device="cpu").model_config.fp16_weights:
        pytest.skip("this CPU's auto dtype is bfloat16, outside this test's 1e-3 of transformers")
    path = BUILDERS["bert"](tmp_path)
    llm = LLM(str(path), device="cpu")
    lone = llm.engine.core.runner.lone
    assert lone is not None
    assert set(lone.graphs) == {(False, True)}  # a 2-label classifier: texts; no pairs to score
    graph, replays = lone.graphs[(False, True)], []
    lone.graphs[(False, True)] = lambda *tensors: replays.append(len(tensors)) or graph(*tensors)
    batched = [o.outputs.probs for o in llm.classify(PROMPTS, use_tqdm=False)]
    replays.clear()  # (a batch's last one-prompt batches replay it too)
    alone = [llm.classify(p, use_tqdm=False)[0].outputs.probs for p in PROMPTS]
    assert replays == [3] * len(PROMPTS)  # ids, positions, output rows
    reference, tokenizer = hf_reference(path, "seq")
    for prompt, a, b in zip(PROMPTS, alone, batched):
        assert a == pytest.approx(b, abs=1e-5)  # float16 weights: the batch's GEMMs sum in other blocks
        with torch.no_grad():
            expected = reference(**tokenizer(prompt, return_tensors="pt")).logits[0].softmax(-1)
        assert a == pytest.approx(expected.tolist(), abs=1e-3)
    # A cross-encoder's pairs carry token types: their own graph.
    cross_encoder = LLM(str(build_model(tmp_path / "ce", "bert", "seq", num_labels=1)), device="cpu")
    assert set(cross_encoder.engine.core.runner.lone.graphs) == {(False, True), (True, True)}
    pairs = [("what is the capital of france?", "paris"), ("horses", "the quick brown fox")]
    queries, documents = [q for q, _ in pairs], [d for _, d in pairs]
    batched_scores = [o.outputs.score for o in cross_encoder.score(queries, documents, use_tqdm=False)]
    alone_scores = [cross_encoder.score(q, d, use_tqdm=False)[0].outputs.score for q, d in pairs]
    assert alone_scores == pytest.approx(batched_scores, abs=1e-5)


@pytest.mark.parametrize("scheme", ["u7s8", "s8s8"])
def test_int8_lone_requests_replay_the_eager_int8_ops(scheme, tmp_path, monkeypatch):
    """int8 layers run compiled elementwise parts (from 64 rows under u7s8, always under s8s8),
    which a graph cannot hold: traced, they take their eager functions, which compute the same
    numbers. The graph serves up to TRACED_INT8_MAX_TOKENS tokens; longer prompts run eagerly."""
    monkeypatch.setattr(model_runner, "int8_scheme", lambda: scheme)
    llm = LLM(str(BUILDERS["bert"](tmp_path)), device="cpu", quantization="int8")
    runner = llm.engine.core.runner
    assert runner.lone is not None and set(runner.lone.graphs) == {(False, True)}
    assert runner.lone.max_tokens == min(runner.config.max_model_len, TRACED_INT8_MAX_TOKENS)
    with torch.inference_mode():
        for length in LENGTHS:
            batch = one_sequence(length, vocab=runner.config.vocab_size)
            # A compiled quantize may round a tie the other way (one code step): int8's own tolerance.
            torch.testing.assert_close(runner.lone(batch), runner.model(batch), atol=2e-3, rtol=0)
    longest = LoneForward(runner.model, runner.lone.graphs, max_tokens=30)
    assert longest.fits(one_sequence(30)) and not longest.fits(one_sequence(31))
