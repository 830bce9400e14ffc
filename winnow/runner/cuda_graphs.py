"""CUDA graphs for small batches on a GPU (opt-in: ``cuda_graph_max_tokens``).

A short request on a GPU is launch-bound: each layer is a dozen kernels that take microseconds to
launch from Python and microseconds to run. A CUDA graph records one forward's kernels once and
replays them with one launch. A graph fixes its shapes and the addresses of its inputs, so the
runner captures one graph per token bucket (powers of two) over static buffers, and a batch runs
in the smallest bucket that holds it (``GraphBuffers.load``):

* its tokens go to the front of the bucket's buffers; the rest of the bucket (zeros at first, then
  whatever an earlier batch left: always valid ids and positions) forms one filler sequence after
  the real ones, which attends only to itself;
* ``cu_seqlens`` has one slot per possible sequence (bucket + 1 of them); the unused slots repeat
  the end, i.e. empty sequences, which the variable-length kernel skips;
* ``max_seqlen`` is the bucket size: the kernel needs an upper bound, not the exact value.

Only the variable-length attention kernel is capture-safe (the padded grid path sizes its work
from host-side group lists, which a graph would freeze), so graphs apply to native models in half
precision on CUDA. The capture is checked, bucket by bucket, against the eager forward on a sample
batch; an error or a mismatch leaves graphs off with a warning, and the eager path serves.

``benchmarks/gpu_check.py`` checks graph outputs against the eager ones on a GPU and times both;
the bookkeeping is tested on CPU (tests/runner/test_cuda_graphs.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from winnow.runner.batch import Batch, build_batch, to_device

logger = logging.getLogger(__name__)

_SMALLEST_BUCKET = 16
# Hidden states of a graph and of the eager forward differ by GEMM tiling only (bf16 rounding, ~1 %
# relative over a deep model); a filler leaking into real sequences, or stale boundaries, change the
# attention outputs by tens of percent. Relative to the states' norm: decoders' states reach tens.
_CHECK_RTOL = 5e-2


def capture_sizes(max_tokens: int) -> tuple[int, ...]:
    """Token buckets: powers of two from 16 up to the first one that holds ``max_tokens``."""
    sizes = [_SMALLEST_BUCKET]
    while sizes[-1] < max_tokens:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes)


def bucket_for(num_tokens: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds ``num_tokens``; None: the batch runs eagerly."""
    return next((size for size in sizes if size >= num_tokens), None)


class GraphBuffers:
    """The static inputs of one bucket's graph, and the ``Batch`` that reads them."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)  # [size]
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)  # [size]
        self.token_type_ids = torch.zeros(size, dtype=torch.int64, device=device)  # [size]
        # [size + 2]: up to ``size`` real sequences, then the filler one; starts as one filler of every token.
        self.cu_seqlens = torch.full((size + 2,), size, dtype=torch.int32, device=device)
        self.cu_seqlens[0] = 0
        # Every model reads token types as a tensor here (zeros: what ``None`` means), so one graph serves both.
        self.batch = Batch(
            input_ids=self.input_ids,
            positions=self.positions,
            token_type_ids=self.token_type_ids,
            cu_seqlens=self.cu_seqlens,
            seq_lens=(size,),
            max_seqlen=size,
            attn_groups=(),  # the variable-length kernel reads cu_seqlens; the grid path refuses this batch
        )

    def load(self, batch: Batch) -> None:
        """Copy ``batch`` into the buffers (device-to-device and one pinned upload, no sync)."""
        n = batch.num_tokens
        assert n <= self.size, "the runner picks a bucket that holds the batch"
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        if batch.token_type_ids is None:
            self.token_type_ids[:n].zero_()
        else:
            self.token_type_ids[:n].copy_(batch.token_type_ids, non_blocking=True)
        self.cu_seqlens.copy_(
            to_device(self.host_cu_seqlens(batch.seq_lens), self.cu_seqlens.device), non_blocking=True
        )

    def host_cu_seqlens(self, seq_lens: tuple[int, ...]) -> np.ndarray:
        """[size + 2] int32: the real sequences' starts, the filler's, then empty sequences."""
        cu = np.full(self.size + 2, self.size, dtype=np.int32)
        cu[0] = 0
        np.cumsum(seq_lens, out=cu[1 : len(seq_lens) + 1])
        return cu


class CudaGraphs:
    """One captured forward per token bucket; ``run`` replays the one that fits a batch."""

    def __init__(self, graphs: dict[int, tuple[torch.cuda.CUDAGraph, GraphBuffers, torch.Tensor]]) -> None:
        self._graphs = graphs
        self.sizes = tuple(sorted(graphs))
        self.replays = 0  # batches served by a graph (benchmarks/gpu_check.py checks graphs really ran)

    def fits(self, batch: Batch) -> bool:
        return bucket_for(batch.num_tokens, self.sizes) is not None

    def run(self, batch: Batch) -> torch.Tensor:
        """[num_tokens, hidden]: every token's final state (the caller takes ``output_rows`` itself).
        The result is a view of the graph's output buffer: valid until the next ``run`` is queued
        on the stream (the runner's pooling, queued right after, reads it first)."""
        size = bucket_for(batch.num_tokens, self.sizes)
        assert size is not None
        graph, buffers, out = self._graphs[size]
        buffers.load(batch)
        graph.replay()
        self.replays += 1
        return out[: batch.num_tokens]

    @classmethod
    def capture(
        cls,
        model: Callable[[Batch], torch.Tensor],
        device: torch.device,
        max_tokens: int,
        *,
        vocab_size: int,
        max_len: int,
    ) -> CudaGraphs | None:
        """Capture every bucket up to ``max_tokens`` (largest first, sharing one memory pool) and check
        each against the eager forward on sequences of at most ``max_len`` tokens (the model's
        length); None, with a warning, if anything fails."""
        try:
            # The device made current (torch.cuda.graph's capture stream belongs to the current
            # device) and this thread's stream restored on every path, a failed capture included.
            with torch.cuda.device(device), torch.cuda.stream(torch.cuda.current_stream(device)):
                graphs = _capture_all(model, device, capture_sizes(max_tokens))
                captured = cls(graphs)
                for size in captured.sizes:
                    _check_bucket(captured, model, device, size, vocab_size=vocab_size, max_len=max_len)
                captured.replays = 0
        except Exception as exc:  # capture failures surface as many exception types
            # With the traceback: a failed capture's own message ("operation not permitted when
            # stream is capturing") names the first op that broke it only there.
            logger.warning(
                "CUDA graphs are off: %s: %s. The eager forward serves every batch.",
                type(exc).__name__,
                exc,
                exc_info=True,
            )
            return None
        logger.info("CUDA graphs captured for %s tokens", ", ".join(map(str, captured.sizes)))
        return captured


def _capture_all(
    model: Callable[[Batch], torch.Tensor], device: torch.device, sizes: tuple[int, ...]
) -> dict[int, tuple[torch.cuda.CUDAGraph, GraphBuffers, torch.Tensor]]:
    pool = torch.cuda.graph_pool_handle()
    graphs = {}
    for size in sorted(sizes, reverse=True):
        buffers = GraphBuffers(size, device)
        # Warm up on a side stream first (library handles, autotuning), as torch.cuda.graph asks.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            model(buffers.batch)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = model(buffers.batch)  # [size, hidden]
        graphs[size] = (graph, buffers, out)
    return graphs


def _check_bucket(
    graphs: CudaGraphs,
    model: Callable[[Batch], torch.Tensor],
    device: torch.device,
    size: int,
    *,
    vocab_size: int,
    max_len: int,
) -> None:
    """Two sequences filling ~3/4 of the bucket (each at most ``max_len`` tokens: a longer one would
    index past the position embeddings, a device-side assert that ends the process), random ids:
    the graph must give the eager states."""
    gen = torch.Generator().manual_seed(size)
    lens = [min(max_len, max(1, size // 2)), min(max_len, max(1, size // 4))]
    ids = [torch.randint(1, vocab_size, (n,), generator=gen).tolist() for n in lens]
    batch = build_batch(ids, [None, None], device)
    expected = model(batch).float()  # [tokens, hidden]
    got = graphs.run(batch).float()
    error = ((got - expected).norm() / expected.norm()).item()
    if not error <= _CHECK_RTOL:
        raise RuntimeError(f"the {size}-token graph's states differ from the eager forward's by {error:.3g} (relative)")
