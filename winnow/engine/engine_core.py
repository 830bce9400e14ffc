"""The engine core: requests -> scheduler -> model runner -> outputs. ``AsyncEngine`` drives it from
background threads for the server; ``LLM`` calls ``step`` directly, or ``drain`` when the CPU's cores
are split among several workers (``cpu_workers``, engine/cpu_cores.py).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from winnow.engine.cpu_cores import CpuCores, use_threads
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


Finished = list[tuple[Request, torch.Tensor]]


class EngineCore:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        *,
        cpu: CpuCores | None = None,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.cpu = cpu  # the cores and how many workers share them; None on a GPU
        self.on_step = on_step  # observer for metrics; called after every executed batch (from any worker)
        # ``drain``'s other workers, started on first use and kept: a thread's first forward pass
        # starts its OpenMP team (milliseconds), which a fresh thread per call would pay every time.
        self._helpers: concurrent.futures.ThreadPoolExecutor | None = None
        self._in_flight: InFlight | None = None  # the batch ``step`` launched and has not yet returned

    def add_requests(self, requests: Sequence[Request], group: int = 0) -> None:
        """``group``: the call they came with; groups take turns to anchor batches (engine/scheduler.py)."""
        self.scheduler.extend(requests, group)

    def abort_requests(self, request_ids: set[str], group: int | None = None) -> None:
        """Drop these requests if they still wait, and a batch ``step`` launched that holds any of them.
        ``group``: the only group they can be waiting in, if known."""
        self.scheduler.abort(request_ids, group)
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

    def execute(self, requests: list[Request], threads: int | None = None) -> list[torch.Tensor]:
        return self.collect(self.launch(requests, threads))

    def launch(self, requests: list[Request], threads: int | None = None) -> InFlight:
        """``threads``: the torch threads this batch runs on (``CpuCores.take``); None: as they are."""
        if threads is not None:
            use_threads(threads)
        return InFlight(requests, time.monotonic(), self.runner.launch(requests))

    def collect(self, in_flight: InFlight) -> list[torch.Tensor]:
        outputs = self.runner.collect(in_flight.launched)
        if self.on_step is not None:
            requests, started = in_flight.requests, in_flight.started
            lens = [r.num_tokens for r in requests]
            queued = tuple(max(0.0, started - r.arrival_time) for r in requests)
            padding = in_flight.launched.batch.padding_fraction
            self.on_step(StepStats(len(lens), sum(lens), padding, queued, time.monotonic() - started))
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

    @property
    def workers(self) -> int:
        return self.cpu.workers if self.cpu is not None else 1

    def drain(self, on_finished: Callable[[Finished], None]) -> None:
        """Run every waiting request on ``workers`` threads, this one included, until none is left
        (``cpu_workers`` > 1; ``step`` is the one-worker loop). ``on_finished`` gets each batch's
        results, one call at a time. The first error stops every worker from starting another batch
        and is raised here once all have stopped; this thread's torch threads are restored."""
        assert self.cpu is not None, "drain splits CPU cores; a GPU runs one batch at a time"
        cpu, cond = self.cpu, threading.Condition()
        errors: list[BaseException] = []

        def next_batch(wide: bool) -> tuple[list[Request], int] | None:  # under ``cond``
            while self.scheduler.num_waiting and not cpu.can_start() and not errors:
                cond.wait()
            if errors or not self.scheduler.num_waiting:
                return None
            # What is left splits evenly over the workers: two 1-core batches at the end, not one
            # batch on one core while the other core idles (bert-base pairs: 0.81x one worker).
            share = -(-self.scheduler.waiting_tokens // cpu.workers)
            requests = self.scheduler.schedule(max_tokens=share)
            return requests, cpu.take(len(requests), self.scheduler.num_waiting, wide=wide)

        def work(batch: tuple[list[Request], int] | None, wide: bool) -> None:
            try:
                if batch is None:
                    with cond:
                        batch = next_batch(wide)
                while batch is not None:
                    requests, threads = batch
                    try:
                        outputs = self.execute(requests, threads)
                    finally:
                        with cond:
                            cpu.give_back(threads)
                            cond.notify_all()
                    with cond:
                        on_finished(list(zip(requests, outputs)))
                        batch = next_batch(wide)
            except BaseException as e:  # Ctrl-C in this thread, or a failed batch in any
                with cond:
                    errors.append(e)
                    cond.notify_all()

        threads_before = torch.get_num_threads()
        # This thread is the wide worker (CpuCores): the helpers never run a batch on every core.
        with cond:
            first = next_batch(wide=True)
        # The other workers join only if work is left: a lone request runs here, as with ``step``.
        helpers = []
        if self.scheduler.num_waiting:
            if self._helpers is None:
                self._helpers = concurrent.futures.ThreadPoolExecutor(cpu.workers - 1, "winnow-worker")
            helpers = [self._helpers.submit(work, None, False) for _ in range(cpu.workers - 1)]
        try:
            work(first, True)
        finally:
            concurrent.futures.wait(helpers)
            use_threads(threads_before)
        if errors:
            raise errors[0]

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
