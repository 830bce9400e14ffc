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
from winnow.runner.model_runner import ModelRunner


@dataclass(frozen=True)
class StepStats:
    """What one step did, for metrics and progress bars."""

    num_seqs: int
    num_tokens: int
    max_seqlen: int
    padding_fraction: float = 0.0  # share of attention work spent on padding (dense layers never see any)
    queue_seconds: tuple[float, ...] = ()  # per request: batch start minus arrival_time
    run_seconds: float = 0.0  # forward pass + pooling + copy to host


class EngineCore:
    def __init__(
        self, scheduler: Scheduler, runner: ModelRunner, *, on_step: Callable[[StepStats], None] | None = None
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.on_step = on_step  # observer for metrics; called after every executed batch

    def add_request(self, request: Request) -> None:
        self.scheduler.add(request)

    def abort_requests(self, request_ids: set[str]) -> None:
        self.scheduler.abort(request_ids)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_waiting > 0

    def schedule(self) -> list[Request]:
        return self.scheduler.schedule()

    def execute(self, requests: list[Request]) -> list[torch.Tensor]:
        started = time.monotonic()
        outputs = self.runner.execute(requests)
        if self.on_step is not None:
            lens = [r.num_tokens for r in requests]
            queued = tuple(max(0.0, started - r.arrival_time) for r in requests)
            padding = self.runner.padding_fraction(lens)
            self.on_step(StepStats(len(lens), sum(lens), max(lens), padding, queued, time.monotonic() - started))
        return outputs

    def warmup(self) -> None:
        """Run the largest batch the scheduler can form (max_model_len-token dummy prompts with the active
        task): fails fast on a budget the device cannot hold, and leaves the kernels warm."""
        config = self.runner.config
        seq_len = config.max_model_len
        num_seqs = max(1, min(self.scheduler.max_num_seqs, self.scheduler.max_num_batched_tokens // seq_len))
        prompt = TokenizedPrompt([i % config.vocab_size for i in range(seq_len)])
        params = PoolingParams(task=config.task)
        self.runner.execute([Request(f"warmup-{i}", prompt, params) for i in range(num_seqs)])

    def step(self) -> list[tuple[Request, torch.Tensor]]:
        """Schedule one batch, run it, return (request, output) for every request in it."""
        requests = self.schedule()
        if not requests:
            return []
        return list(zip(requests, self.execute(requests)))
