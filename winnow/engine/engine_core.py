"""The engine core: requests -> scheduler -> model runner -> outputs. Synchronous and single-threaded;
``AsyncEngine`` drives it from a background thread for the server, ``LLM`` calls ``step`` directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from winnow.engine.request import Request
from winnow.engine.scheduler import Scheduler
from winnow.inputs.prompts import TokenizedPrompt
from winnow.params import PoolingParams
from winnow.runner.model_runner import Launched, ModelRunner


@dataclass(frozen=True)
class StepStats:
    """What one step did, for metrics and progress bars."""

    num_seqs: int
    num_tokens: int
    max_seqlen: int
    padding_fraction: float = 0.0  # share of attention work spent on padding (dense layers never see any)
    queue_seconds: tuple[float, ...] = ()  # per request: batch start minus arrival_time
    # Launch to outputs on the host (forward, pooling, copy); on a GPU it may overlap the next launch.
    run_seconds: float = 0.0


@dataclass(frozen=True)
class InFlight:
    """A launched batch: its requests, when it started, and the runner's handle on it."""

    requests: list[Request]
    started: float  # time.monotonic() at launch
    launched: Launched


class EngineCore:
    def __init__(
        self, scheduler: Scheduler, runner: ModelRunner, *, on_step: Callable[[StepStats], None] | None = None
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.on_step = on_step  # observer for metrics; called after every executed batch
        self._in_flight: InFlight | None = None  # the batch ``step`` launched and has not yet returned

    def add_request(self, request: Request) -> None:
        self.scheduler.add(request)

    def abort_requests(self, request_ids: set[str]) -> None:
        """Drop these requests if they still wait, and a batch ``step`` launched that holds any of them."""
        self.scheduler.abort(request_ids)
        if self._in_flight is not None and any(r.request_id in request_ids for r in self._in_flight.requests):
            self._in_flight = None

    def has_unfinished(self) -> bool:
        """Requests waiting, or a batch launched by ``step`` and not yet returned."""
        return self.scheduler.num_waiting > 0 or self._in_flight is not None

    @property
    def overlaps(self) -> bool:
        """Whether batches should be launched before the previous one is collected (GPU)."""
        return self.runner.overlaps

    def schedule(self) -> list[Request]:
        return self.scheduler.schedule()

    def execute(self, requests: list[Request]) -> list[torch.Tensor]:
        return self.collect(self.launch(requests))

    def launch(self, requests: list[Request]) -> InFlight:
        return InFlight(requests, time.monotonic(), self.runner.launch(requests))

    def collect(self, in_flight: InFlight) -> list[torch.Tensor]:
        outputs = self.runner.collect(in_flight.launched)
        if self.on_step is not None:
            requests, started = in_flight.requests, in_flight.started
            lens = [r.num_tokens for r in requests]
            queued = tuple(max(0.0, started - r.arrival_time) for r in requests)
            padding = self.runner.padding_fraction(lens)
            self.on_step(StepStats(len(lens), sum(lens), max(lens), padding, queued, time.monotonic() - started))
        return outputs

    def warmup(self) -> None:
        """Run the largest batch the scheduler can form (max_model_len-token dummy prompts with the active
        task): fails fast on a budget the device cannot hold, and leaves the kernels warm. Then one short
        prompt alone: the shape of a lone request (the compiled int8 kernels specialise on one row)."""
        config = self.runner.config
        seq_len = config.max_model_len
        num_seqs = max(1, min(self.scheduler.max_num_seqs, self.scheduler.max_num_batched_tokens // seq_len))
        prompt = TokenizedPrompt([i % config.vocab_size for i in range(seq_len)])
        params = PoolingParams(task=config.task)
        self.runner.execute([Request(f"warmup-{i}", prompt, params) for i in range(num_seqs)])
        self.runner.execute([Request("warmup-single", TokenizedPrompt(prompt.token_ids[:8]), params)])

    def step(self) -> list[tuple[Request, torch.Tensor]]:
        """Schedule one batch and run it; return (request, output) for every request that finished.

        Where the runner overlaps (GPU), the batch is launched before the previous one is collected,
        so a step returns the previous batch's results (and the last step the last batch's)."""
        requests = self.schedule()
        launched = self.launch(requests) if requests else None
        if not self.overlaps:
            return list(zip(requests, self.collect(launched))) if launched is not None else []
        previous, self._in_flight = self._in_flight, launched
        if previous is None:
            return []
        return list(zip(previous.requests, self.collect(previous)))
