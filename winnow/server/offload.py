"""``Offload``: the server's CPU work off the event loop (tokenization, score planning).

``asyncio.to_thread`` pays, per call, a ``concurrent.futures`` future chained to an asyncio one and
a wake-up of the event loop (a write to its self-pipe) when the call ends. Under concurrent load
most requests arrive while a worker is busy with earlier ones, so here a worker takes every job
waiting, runs them one after another, and wakes the event loop once for all of their results.
Several workers share the queue, so one large job (thousands of documents to tokenize) does not
hold up the small ones behind it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from winnow.engine.async_engine import hand_back

_T = TypeVar("_T")

# Tokenizing one request occupies a worker for its whole length (the Rust tokenizer runs each call on
# one thread in a server, TOKENIZERS_PARALLELISM=false), so a larger machine gets more workers, or
# big requests would queue behind each other: half the cores, from 2 to 8.
MIN_WORKERS, MAX_WORKERS = 2, 8


def default_workers(cores: int | None) -> int:
    return max(MIN_WORKERS, min(MAX_WORKERS, (cores or MIN_WORKERS) // 2))


_Job = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class Offload:
    def __init__(self, workers: int = 2, name: str = "winnow-offload") -> None:
        if workers < 1:
            raise ValueError(f"workers must be positive, got {workers}")
        self._cond = threading.Condition()
        self._jobs: list[_Job] = []
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    async def run(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` in a worker thread; its result or exception, as if awaited here (``fn`` returns
        no exception instances: those are raised)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("The offload workers have stopped.")
            self._jobs.append((fn, future, loop))
            self._cond.notify()
        return await future

    def shutdown(self, timeout: float | None = None) -> None:
        """Run the jobs already queued, then stop the workers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return  # stopping, nothing left
                jobs, self._jobs = self._jobs, []
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
            for fn, future, loop in jobs:
                if future.cancelled():  # the request is gone (client disconnected)
                    continue
                try:
                    output = fn()
                except BaseException as exc:  # raised in the awaiting coroutine, as to_thread would
                    output = exc
                by_loop.setdefault(loop, []).append((future, output))
            for loop, results in by_loop.items():
                hand_back(loop, results)
