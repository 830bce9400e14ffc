"""CUDA-graph bookkeeping that runs on a CPU: buckets, the static buffers a graph reads, the filler
sequence's effect on real ones, and every way the graphs stay off. Capture and replay themselves
need a GPU: ``benchmarks/gpu_check.py`` compares them with the eager forward."""

from __future__ import annotations

import itertools
import logging
import os

import pytest
import torch

from tests.models.test_decoders import build_decoder
from tests.tiny_models import PROMPTS
from winnow import LLM
from winnow.errors import ConfigError
from winnow.layers.attention import AttentionSpec, packed_attention
from winnow.runner.batch import build_batch
from winnow.runner.cuda_graphs import CudaGraphs, GraphBuffers, bucket_for, capture_sizes
from winnow.runner.model_runner import ModelRunner

CPU = torch.device("cpu")


def test_buckets_are_powers_of_two_up_to_the_limit():
    assert capture_sizes(1) == (16,)
    assert capture_sizes(16) == (16,)
    assert capture_sizes(17) == (16, 32)
    assert capture_sizes(512) == (16, 32, 64, 128, 256, 512)
    sizes = capture_sizes(100)
    assert [bucket_for(n, sizes) for n in (1, 16, 17, 64, 65, 128, 129)] == [16, 16, 32, 64, 128, 128, None]


def test_buffers_hold_the_batch_then_a_filler_then_empty_sequences():
    buffers = GraphBuffers(32, CPU)
    batch = build_batch([[5, 6, 7], [8, 9], [10, 11, 12, 13]], [None, [0, 1], None], CPU)
    buffers.load(batch)
    assert torch.equal(buffers.input_ids[:9], batch.input_ids)
    assert torch.equal(buffers.positions[:9], batch.positions)
    assert torch.equal(buffers.token_type_ids[:9], torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 0]))
    # three real sequences, the filler [9, 32), then 29 empty sequences: 34 = 32 + 2 slots
    assert buffers.cu_seqlens.tolist() == [0, 3, 5, 9] + [32] * 30
    assert buffers.batch.max_seqlen == 32 and buffers.batch.input_ids is buffers.input_ids


def test_a_smaller_batch_rewrites_every_boundary_and_leaves_stale_tokens_in_the_filler():
    buffers = GraphBuffers(16, CPU)
    buffers.load(build_batch([[5] * 7, [6] * 6], [[1] * 7, None], CPU))
    buffers.load(build_batch([[9, 9]], [None], CPU))
    assert buffers.cu_seqlens.tolist() == [0, 2] + [16] * 16
    assert buffers.input_ids[:2].tolist() == [9, 9]
    assert buffers.token_type_ids[:2].tolist() == [0, 0]  # types of a typeless batch are zeroed
    assert buffers.input_ids[2:7].tolist() == [5] * 5  # stale, now part of the filler sequence


def _sequences_the_graph_sees(buffers: GraphBuffers) -> list[list[int]]:
    cu = buffers.cu_seqlens.tolist()
    ids = buffers.input_ids.tolist()
    return [ids[a:b] for a, b in itertools.pairwise(cu) if b > a]


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_real_sequences_are_unchanged_by_the_filler(family, make_model, tmp_path):
    """The graph's batch is the real sequences plus one filler of stale tokens; run that layout
    eagerly (on the CPU's grid path) and the real tokens' states equal the batch's own."""
    path = make_model("bert", "seq") if family == "bert" else build_decoder(tmp_path, "qwen3", "seq")
    llm = LLM(str(path), device="cpu", dtype="float32")
    runner, tokenizer = llm.engine.core.runner, llm.get_tokenizer()
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    buffers = GraphBuffers(64, CPU)
    buffers.input_ids.random_(1, 20)  # stale tokens of some earlier batch
    buffers.positions.copy_(torch.arange(64) % 8)
    batch = build_batch(ids, [None] * len(ids), CPU)
    buffers.load(batch)
    seen = _sequences_the_graph_sees(buffers)
    assert seen[:3] == ids and len(seen) == 4  # the real ones, then one filler
    with torch.inference_mode():
        expected = runner.model(batch)
        as_graph = runner.model(build_batch(seen, [None] * len(seen), CPU))
    torch.testing.assert_close(as_graph[: batch.num_tokens], expected, atol=1e-5, rtol=1e-5)


def test_the_grid_path_refuses_a_batch_without_groups():
    q = torch.randn(16, 8)
    with pytest.raises(RuntimeError, match="variable-length kernel"):
        packed_attention(q, q, q, GraphBuffers(16, CPU).batch, AttentionSpec(num_heads=2, head_dim=4))


def test_a_failed_capture_leaves_graphs_off(make_model, caplog):
    runner = LLM(str(make_model("bert", "seq")), device="cpu").engine.core.runner
    with caplog.at_level(logging.WARNING):
        assert CudaGraphs.capture(runner.model, CPU, 32, vocab_size=100, max_len=64) is None  # no CUDA here
    assert "CUDA graphs are off" in caplog.text


def test_a_cpu_runner_never_captures(make_model, caplog):
    config = LLM(str(make_model("bert", "seq")), device="cpu").engine.core.runner.config
    with caplog.at_level(logging.WARNING):
        runner = ModelRunner(config, CPU, cuda_graph_max_tokens=64)
    assert runner.graphs is None
    assert "need a native model on a CUDA device" in caplog.text


@pytest.mark.parametrize(("value", "message"), [(64, "needs a CUDA device"), (-1, "0 \\(off\\) or a positive")])
def test_cuda_graph_option_is_checked(make_model, value, message):
    with pytest.raises(ConfigError, match=message):
        LLM(str(make_model("bert", "seq")), device="cpu", cuda_graph_max_tokens=value)


def test_the_serve_flag_reaches_the_engine_config(make_model, caplog, monkeypatch):
    from winnow.cli import main

    defaults = {"TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "20000"}
    for key, value in defaults.items():
        monkeypatch.setenv(key, os.environ.get(key, value))  # main() sets these defaults; restored afterwards
    with caplog.at_level(logging.ERROR):
        code = main(["serve", str(make_model("bert", "seq")), "--device", "cpu", "--cuda-graph-max-tokens", "64"])
    assert code == 2
    assert "cuda_graph_max_tokens needs a CUDA device" in caplog.text


class _Replay:
    """Stands in for captured graphs on a CPU: ``run`` is the eager forward, optionally disturbed."""

    def __init__(self, model, disturb: float) -> None:
        self.model, self.disturb = model, disturb

    def run(self, batch):
        out = self.model(batch)
        return out + self.disturb * out.abs().mean() * torch.randn_like(out)


@pytest.mark.parametrize(("disturb", "accepted"), [(0.0, True), (0.01, True), (1.0, False)])
def test_the_capture_check_accepts_rounding_and_refuses_real_differences(make_model, disturb, accepted):
    from winnow.runner.cuda_graphs import _check_bucket

    model = LLM(str(make_model("bert", "seq")), device="cpu", dtype="float32").engine.core.runner.model
    torch.manual_seed(0)
    with torch.inference_mode():
        if accepted:
            _check_bucket(_Replay(model, disturb), model, CPU, 32, vocab_size=100, max_len=64)
        else:
            with pytest.raises(RuntimeError, match="differ from the eager forward"):
                _check_bucket(_Replay(model, disturb), model, CPU, 32, vocab_size=100, max_len=64)


def test_the_capture_check_keeps_its_sequences_within_the_model_length(make_model):
    """A 512-token bucket of a model with 64 positions: the check's sequences are cut to 64 tokens
    (longer ones would index past the position table, which on a GPU kills the process)."""
    from winnow.runner.cuda_graphs import _check_bucket

    runner = LLM(str(make_model("bert", "seq")), device="cpu", dtype="float32").engine.core.runner
    max_len = runner.config.max_model_len
    assert max_len < 512 // 4
    seen = []

    def recording(batch):
        seen.append(batch.seq_lens)
        return runner.model(batch)

    with torch.inference_mode():
        _check_bucket(_Replay(runner.model, 0.0), recording, CPU, 512, vocab_size=100, max_len=max_len)
    assert seen == [(max_len, max_len)]
