"""The model runner: owns the model on its device, turns requests into a ``Batch``, runs the forward
pass and the pooler under ``torch.inference_mode``, and returns one CPU tensor per request.

``execute`` is ``launch`` (pack, forward, pool, start the copy to the host) then ``collect`` (wait,
split per request). The engine calls the two halves apart on a GPU so that the host prepares and
launches batch N+1 while the device still runs batch N.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from winnow.layers.linear import cpu_has_fast, pack_linears
from winnow.layers.pooling import PooledBatch, Pooler
from winnow.layers.quant import TRACED_INT8_MAX_TOKENS, compile_variants, int8_scheme, quantize_int8
from winnow.models.base import ModelBase
from winnow.models.files import find_weight_files
from winnow.models.loader import load_weights
from winnow.params import PoolingParams
from winnow.runner.batch import Batch, build_batch, take_rows
from winnow.runner.cuda_graphs import CudaGraphs
from winnow.runner.lone_trace import LoneForward

if TYPE_CHECKING:
    from winnow.config import ModelConfig
    from winnow.engine.request import Request

logger = logging.getLogger(__name__)


def load_model(config: ModelConfig, device: torch.device) -> ModelBase:
    """Build the registry's class for ``config`` with its weights, on ``device``."""
    entry = config.entry
    if not entry.is_native:
        from winnow.models.hf_fallback import HFFallbackModel

        return HFFallbackModel(config, device)
    return load_weights(
        entry.load_class(),
        config.hf_config,
        find_weight_files(config.path),
        dtype=config.dtype,
        head_dtype=config.pooler.head_dtype,
        device=device,
        token_score_head=config.token_score_head,
    )


# One SDPA call costs about as much as attending over a 64-token sequence on a CPU core (measured:
# per-call overhead ~30-60 us), so a CPU batch splits into length groups when that saves more padding.
# On a GPU each extra call is a kernel launch, so one group: half-precision layers skip the grid
# entirely (flash attention's varlen kernel, layers/attention.py); float32 and DeBERTa pad it.
_CPU_GROUP_OVERHEAD = 64**2

# The length of the one-sequence batches a lone request's graph is traced on (runner/lone_trace.py).
_TRACE_TOKENS = 8


@dataclass(frozen=True)
class Launched:
    """A batch whose work is queued on the device; ``ModelRunner.collect`` turns it into outputs."""

    order: list[int]  # order[k]: the index, in the caller's list, of the k-th sequence of the batch
    batch: Batch
    params: list[PoolingParams]
    pooled: PooledBatch  # host tensors, filled once ``ready`` has completed
    ready: torch.cuda.Event | None  # None: the work is already done (CPU)


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        device: torch.device,
        model: ModelBase | None = None,
        quantization: str | None = None,
        cuda_graph_max_tokens: int = 0,
        cpu_threads: tuple[int, ...] = (),
    ) -> None:
        """``cpu_threads``: the torch thread counts the engine's CPU workers run batches on
        (engine/cpu_cores.py); empty: this thread's."""
        self.config = config
        self.device = device
        self.model = model if model is not None else load_model(config, device)
        if quantization == "int8":
            # int8 already trades exactness for speed: bf16 GEMMs for the rest where the CPU has them
            # (a bfloat16 model has them anyway; this covers int8 with dtype="float32").
            fast_bf16 = config.dtype == torch.float32 and device.type == "cpu" and cpu_has_fast(torch.bfloat16)
            scheme = int8_scheme()
            narrower = self.model.quantizable_7bit if scheme == "u7s8" else None
            quantize_int8(
                self.model,
                self.model.quantizable if narrower is None else narrower,
                device,
                others=torch.bfloat16 if fast_bf16 else None,
                keep=self.model.head_prefixes,
                scheme=scheme,
            )
            compile_variants(scheme, config.dtype, cpu_threads or (torch.get_num_threads(),))
        if device.type == "cpu" and config.entry.is_native:
            # Half-precision linears are packed only where the CPU has instructions for them.
            pack_linears(
                self.model,
                tuple(d for d in (torch.float32, torch.bfloat16) if cpu_has_fast(d)),
                fp16_weights=config.fp16_weights,
                keep=self.model.head_prefixes,
            )
        self.pooler = Pooler(config.pooler, self.model)
        # Models that can return only the pooled token's row skip the last layer's feed-forward for the rest.
        self.selects_rows = self.model.selects_output_rows
        # The transformers fallback pads every layer; native models pad inside attention only.
        self.pads_dense_layers = not config.entry.is_native
        self.group_overhead = _CPU_GROUP_OVERHEAD if device.type == "cpu" else None
        # On a GPU the engine launches the next batch before collecting this one, so host work
        # (packing, kernel launches, splitting outputs) overlaps device work. On a CPU the host is
        # the device: collecting later would only delay the answers.
        self.overlaps = device.type == "cuda"
        # Batches of up to this many tokens replay a captured forward (runner/cuda_graphs.py).
        self.graphs = self._capture_graphs(cuda_graph_max_tokens) if cuda_graph_max_tokens else None
        # A lone request on a CPU replays a traced graph of the forward (runner/lone_trace.py); under
        # int8 up to TRACED_INT8_MAX_TOKENS tokens (the graph holds the eager quantize and rescale).
        traceable = device.type == "cpu" and self.model.traces_lone_requests
        max_tokens = config.max_model_len if quantization is None else min(config.max_model_len, TRACED_INT8_MAX_TOKENS)
        self.lone = self._trace_lone(max_tokens) if traceable else None

    @torch.inference_mode()
    def _capture_graphs(self, max_tokens: int) -> CudaGraphs | None:
        if self.device.type != "cuda" or not self.config.entry.is_native:
            logger.warning("CUDA graphs need a native model on a CUDA device; running eagerly.")
            return None
        return CudaGraphs.capture(
            self.model, self.device, max_tokens, vocab_size=self.config.vocab_size, max_len=self.config.max_model_len
        )

    @torch.inference_mode()
    def _trace_lone(self, max_tokens: int) -> LoneForward | None:
        """Trace the forward of a lone request of up to ``max_tokens`` with the default task's pooled
        row; for a cross-encoder with token types (BERT's), pairs carry them: a second graph with them."""
        config, params = self.config, [PoolingParams(task=self.config.task)]
        token = self.pooler.output_token(params) if self.selects_rows else None
        n = min(_TRACE_TOKENS, max_tokens)
        ids = [i % config.vocab_size for i in range(n)]
        types: list[list[int] | None] = [None]
        if config.score_type == "cross-encoder" and getattr(config.hf_config, "type_vocab_size", 1) > 1:
            types.append([0] * (n // 2) + [1] * (n - n // 2))
        examples = [build_batch([ids], [t], self.device, output_token=token) for t in types]
        return LoneForward.trace(self.model, examples, max_tokens)

    def forward(self, batch: Batch) -> torch.Tensor:
        """[num_tokens, hidden], or [num_seqs, hidden] for ``batch.output_rows``: a captured graph
        when one holds the batch (GPU), a lone request's traced graph (CPU), else the eager model."""
        if self.graphs is not None and self.graphs.fits(batch):
            return take_rows(self.graphs.run(batch), batch.output_rows)
        if self.lone is not None and self.lone.fits(batch):
            return self.lone(batch)
        return self.model(batch)

    def execute(self, requests: list[Request]) -> list[torch.Tensor]:
        """One output per request, in the order given."""
        return self.collect(self.launch(requests))

    @torch.inference_mode()
    def launch(self, requests: list[Request]) -> Launched:
        """Queue the batch's work on the device and return without waiting for it (on a CPU the work
        is done on return). The batch runs sorted by length, so attention groups are runs of
        similar lengths."""
        order = sorted(range(len(requests)), key=lambda i: requests[i].num_tokens)
        ordered = [requests[i] for i in order]
        params = [r.params for r in ordered]
        batch = build_batch(
            [r.prompt.token_ids for r in ordered],
            [r.prompt.token_type_ids for r in ordered],
            self.device,
            group_overhead=self.group_overhead,
            output_token=self.pooler.output_token(params) if self.selects_rows else None,
        )
        hidden = self.forward(batch)  # [num_tokens, hidden], or [num_seqs, hidden] for batch.output_rows
        pooled = self.pooler.pool(hidden, batch, params)
        if self.device.type != "cuda":
            return Launched(order, batch, params, pooled.to_host(), None)
        ready = torch.cuda.Event()
        host = pooled.to_host(non_blocking=True)
        # On the model's device's stream: a bare record() uses the *current* device's, which for
        # device="cuda:1" would be cuda:0's, and collect would read the copy before it lands.
        ready.record(torch.cuda.current_stream(self.device))
        return Launched(order, batch, params, host, ready)

    @torch.inference_mode()
    def collect(self, launched: Launched) -> list[torch.Tensor]:
        """Wait for a launched batch and split its outputs per request, in the order given to ``launch``."""
        if launched.ready is not None:
            launched.ready.synchronize()
        outputs = self.pooler.split(launched.pooled, launched.batch, launched.params)
        restored: list[torch.Tensor] = [outputs[0]] * len(outputs)
        for position, index in enumerate(launched.order):
            restored[index] = outputs[position]
        return restored
