"""How the CPU's cores are split among the engine's workers (``cpu_workers``).

torch runs one forward on a team of OpenMP threads that meet at a barrier after every operator: when
any other thread (the server's event loop, the tokenizer, another process) takes a core from one
member, the others wait. With several workers, each runs whole batches on its own share of the
cores, so a worker that loses its core stalls only itself, and two small batches keep two cores
busier than one batch split across both. Measured on 2 cores (docs/benchmarks.md): all-MiniLM-L6-v2
behind ``winnow serve`` 115 -> 138 items/s; offline 1.16x (MiniLM shape), 1.06x (bert-base shapes).

A lone request (a batch of one, nothing else waiting, no other worker running) takes every core, so
it is as fast as with one worker. Any other batch gets ``cores // workers`` threads, and a worker
starts a batch only when that many cores are free. Only a batch of one: a server under load often
empties its queue into each batch while more requests arrive, and a batch holding every core then
makes them wait for it (measured: served MiniLM back at ~110 items/s, the one-worker figure).

The caller serialises every call (it holds the engine's lock); the threads are set in the worker's
own thread (``use_threads``).
"""

from __future__ import annotations

import torch


class CpuCores:
    def __init__(self, cores: int, workers: int) -> None:
        if cores < 1 or workers < 1:
            raise ValueError(f"cores and workers must be positive, got {cores} and {workers}")
        self.cores = cores
        self.workers = workers
        self.share = max(1, cores // workers)  # threads per batch when batches run side by side
        self.free = cores

    def can_start(self) -> bool:
        return self.free >= self.share

    def take(self, num_requests: int, num_waiting: int) -> int:
        """Threads for a batch of ``num_requests`` about to start, ``num_waiting`` requests left queued."""
        lone = num_requests == 1 and num_waiting == 0 and self.free == self.cores
        threads = self.cores if lone else self.share
        self.free -= threads
        return threads

    def give_back(self, threads: int) -> None:
        self.free += threads


def use_threads(threads: int) -> None:
    """Run this thread's next torch operators on ``threads`` threads (a per-thread OpenMP setting)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
