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

Only one worker, the *wide* one, ever runs a lone request on every core. libgomp (torch's OpenMP)
keeps a team of threads for each thread that ran a parallel operator, for that thread's life, and
once the process holds more OpenMP threads than cores it throttles every team's spin between
operators (to none under ``OMP_WAIT_POLICY=PASSIVE``, what ``winnow serve`` sets): each operator
then pays a futex wake-up. Measured on 2 cores: a lone all-MiniLM-L6-v2 request behind
``winnow serve`` took 12.0-13.0 ms of forward while the process held several teams, 8.6-9.5 ms with one.

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

    @property
    def thread_counts(self) -> tuple[int, ...]:
        """Every torch thread count a batch may run on: all cores (a lone request) and a share."""
        return (self.cores, self.share) if self.share != self.cores else (self.cores,)

    def can_start(self) -> bool:
        return self.free >= self.share

    def lone(self, num_requests: int, num_waiting: int) -> bool:
        """Whether a batch of ``num_requests``, with ``num_waiting`` left queued, is the only work."""
        return num_requests == 1 and num_waiting == 0 and self.free == self.cores

    def take(self, num_requests: int, num_waiting: int, *, wide: bool = True) -> int:
        """Threads for a batch of ``num_requests`` about to start, ``num_waiting`` requests left queued.
        ``wide``: whether the worker asking is the one that runs lone requests on every core."""
        threads = self.cores if wide and self.lone(num_requests, num_waiting) else self.share
        self.free -= threads
        return threads

    def give_back(self, threads: int) -> None:
        self.free += threads


def use_threads(threads: int) -> None:
    """Run this thread's next torch operators on ``threads`` threads (a per-thread OpenMP setting)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
