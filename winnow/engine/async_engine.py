"""Drives an ``EngineCore`` from background threads so many coroutines can share its batches.

``await engine.run(requests)`` from any number of clients: requests join one waiting queue (each
call's requests as one scheduler group, so calls take turns: engine/scheduler.py), a loop thread
batches whatever is waiting (so requests of different clients share a forward pass), and each
call's outputs are handed back to the awaiting coroutine on its own event loop, all at once. A
cancelled coroutine (client gone) has its still-waiting requests dropped before they cost any
compute. The model runs on the loop threads only: the event loop is never blocked by model work.
On a CPU with ``cpu_workers`` > 1 there is one loop thread per worker, each running its own batches
on its share of the cores (engine/cpu_cores.py); on a GPU one thread overlaps a batch's host work
with the previous batch's device work.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from winnow.engine.engine_core import EngineCore, InFlight
from winnow.engine.request import Request
from winnow.errors import EngineDeadError, EngineOverloadedError, InvalidInputError

logger = logging.getLogger(__name__)

_Output = torch.Tensor | BaseException
_SUBMIT_CHUNK = 4096  # requests queued per hold of the engine lock by ``run``
_Launch = tuple[list[Request], "InFlight | BaseException"]  # a batch and its handle, or why it failed to launch


@dataclass(eq=False)
class _Call:
    """One ``run`` call: its outputs gather here, under the engine's lock, and settle its one future
    when the last arrives (or the first error does). One future and one wake-up per call, not per
    request: a call of 200k prompts would otherwise create and gather 200k futures on the event loop."""

    future: asyncio.Future[list[torch.Tensor]]
    loop: asyncio.AbstractEventLoop
    outputs: list[torch.Tensor | None]
    remaining: int
    settled: bool = False

    def take(self, index: int, output: _Output) -> list[torch.Tensor] | BaseException | None:
        """Record one request's output; the call's result once it has one (then only once)."""
        if self.settled:
            return None
        if isinstance(output, BaseException):
            self.settled = True
            return output
        self.outputs[index] = output
        self.remaining -= 1
        if self.remaining:
            return None
        self.settled = True
        return self.outputs  # type: ignore[return-value]  # every slot is filled now


class AsyncEngine:
    def __init__(self, core: EngineCore, *, max_pending_requests: int | None = None) -> None:
        self.core = core
        # Requests submitted and not yet answered (waiting or running); beyond it, run() refuses.
        self.max_pending_requests = max_pending_requests
        self._cond = threading.Condition()
        self._pending: dict[str, tuple[_Call, int]] = {}  # request id -> its call and its place there
        self._groups = itertools.count(1)  # each call is one scheduler group (0: ``LLM``'s requests)
        self._reserved = 0  # admitted requests of calls still submitting their chunks
        self._stopping = False
        self._dead: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"winnow-engine-{i}", daemon=True)
            for i in range(core.workers)
        ]

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking work, finish every request already submitted, then stop the loop threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if any(t.ident is None for t in self._threads):  # never started: nothing will answer what was submitted
            self._fail_pending(EngineDeadError("The engine was shut down before it started."))
            return
        for thread in self._threads:
            thread.join(timeout)

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and all(t.is_alive() for t in self._threads) and not self._stopping

    @property
    def num_pending(self) -> int:
        """Requests submitted and not yet answered."""
        return len(self._pending)

    # -- submission ----------------------------------------------------------------------------

    async def run(self, requests: Sequence[Request]) -> list[torch.Tensor]:
        """Submit ``requests`` and wait for all their outputs (in the same order). The requests of one
        call form one scheduler group: a small call is not queued behind a large one's prompts."""
        if not requests:
            return []
        loop = asyncio.get_running_loop()
        call = _Call(loop.create_future(), loop, [None] * len(requests), len(requests))
        with self._cond:
            if self._dead is not None or self._stopping:
                raise EngineDeadError("The engine is shutting down or has stopped; no new requests are accepted.")
            limit, in_flight = self.max_pending_requests, len(self._pending) + self._reserved
            if limit is not None and in_flight + len(requests) > limit:
                raise EngineOverloadedError(
                    f"The server is at capacity ({in_flight} requests in flight, limit {limit}); retry later."
                )
            group = next(self._groups)
            self._reserved += len(requests)
        ids = [r.request_id for r in requests]
        submitted = 0
        try:
            # A chunk at a time, the event loop free between chunks: submitting 200k prompts at once
            # held it (and every other client) for ~0.1 s.
            for start in range(0, len(requests), _SUBMIT_CHUNK):
                if start:
                    await asyncio.sleep(0)
                    if call.future.done():  # a batch of it failed already
                        break
                chunk = requests[start : start + _SUBMIT_CHUNK]
                self._submit(call, group, chunk, ids[start : start + _SUBMIT_CHUNK], start)
                submitted += len(chunk)
            return await call.future
        except BaseException:
            # Only what this call queued: a refused chunk's ids may be another call's.
            self.abort(ids[:submitted], group, unreserve=len(requests) - submitted)
            raise

    def _submit(self, call: _Call, group: int, requests: Sequence[Request], ids: list[str], start: int) -> None:
        """Queue one chunk of a call; its reservation becomes pending requests."""
        with self._cond:
            if self._dead is not None or self._stopping:
                raise EngineDeadError("The engine is shutting down or has stopped; no new requests are accepted.")
            # Earlier chunks are pending already, so a repeat across chunks is caught here too.
            if len(set(ids)) != len(ids) or not self._pending.keys().isdisjoint(ids):
                raise InvalidInputError("Request ids must be unique among the requests in flight.")
            self._pending.update(zip(ids, zip(itertools.repeat(call), range(start, start + len(ids)))))
            self._reserved -= len(ids)
            self.core.add_requests(requests, group)
            cpu = self.core.cpu
            if cpu is not None and cpu.free == cpu.cores:
                self._cond.notify_all()  # every worker idle: a lone request is the wide worker's (_ready)
            else:
                self._cond.notify()

    def abort(self, request_ids: Sequence[str], group: int | None = None, *, unreserve: int = 0) -> None:
        """Drop these requests; ``group``: the call they came in, if known (only it is searched);
        ``unreserve``: how many of them were admitted but never submitted."""
        ids = set(request_ids)
        with self._cond:
            self._reserved -= unreserve
            self.core.abort_requests(ids, group)
            for rid in ids:
                self._pending.pop(rid, None)

    # -- the loop threads ----------------------------------------------------------------------

    def _loop(self, index: int) -> None:
        """Loop thread ``index``; thread 0 is the CPU's wide worker (``CpuCores``: the only one that
        runs a lone request on every core)."""
        # Where the runner overlaps (GPU), batch N+1 is launched before batch N is collected.
        in_flight: _Launch | None = None
        try:
            while True:
                with self._cond:
                    while not self._ready(in_flight, index):
                        self._cond.wait()
                    batch, threads = self._next_batch(wide=index == 0)
                if not batch and in_flight is None:
                    if self._stopping and not self.core.scheduler.num_waiting:
                        return  # stopping and drained
                    continue  # another worker took the work
                launched = self._launch(batch, threads) if batch else None
                if not self.core.overlaps:
                    in_flight, launched = launched, None
                if in_flight is not None:
                    self._finish(in_flight)
                in_flight = launched
                if threads is not None:  # a CPU batch is done on return: its cores are free again
                    self._give_back(threads)
        except BaseException as e:  # a dead loop must fail every waiter, whatever killed it
            logger.exception("The engine loop stopped")
            self._dead = e
            self._fail_pending(EngineDeadError(f"The engine stopped: {e}"))

    def _fail_pending(self, error: BaseException) -> None:
        with self._cond:
            pending, self._pending = self._pending, {}
            calls = {id(call): call for call, _ in pending.values() if call.take(0, error) is not None}
        for call in calls.values():
            hand_back(call.loop, [(call.future, error)])

    def _ready(self, in_flight: _Launch | None, index: int) -> bool:
        """Whether loop thread ``index`` has something to do (called under the lock)."""
        cpu, waiting = self.core.cpu, self.core.scheduler.num_waiting
        if in_flight is not None:
            return True
        if waiting and (cpu is None or cpu.can_start()):
            # A lone request waits for the wide worker (thread 0), which runs it on every core.
            return cpu is None or index == 0 or not cpu.lone(waiting, 0)
        return self._stopping and not waiting

    def _next_batch(self, *, wide: bool) -> tuple[list[Request], int | None]:
        """The next batch and its torch threads (None on a GPU); empty when the cores are taken.
        ``wide``: whether this is the worker that runs lone requests on every core."""
        cpu = self.core.cpu
        if cpu is None:
            return self.core.schedule(), None
        if not cpu.can_start():
            return [], None
        batch = self.core.schedule()
        if not batch:
            return [], None
        left = self.core.scheduler.num_waiting
        if left:
            self._cond.notify()  # one submission may hold several batches: wake another worker for the rest
        return batch, cpu.take(len(batch), left, wide=wide)

    def _give_back(self, threads: int) -> None:
        assert self.core.cpu is not None
        with self._cond:
            self.core.cpu.give_back(threads)
            self._cond.notify_all()

    def _launch(self, batch: list[Request], threads: int | None) -> _Launch:
        try:
            return batch, self.core.launch(batch, threads)
        except Exception as e:
            logger.exception("A batch of %d requests failed", len(batch))
            return batch, e

    def _finish(self, launch: _Launch) -> None:
        batch, in_flight = launch
        outputs: list[_Output]
        if isinstance(in_flight, BaseException):
            outputs = [in_flight] * len(batch)
        else:
            try:
                outputs = list(self.core.collect(in_flight))
            except Exception as e:
                logger.exception("A batch of %d requests failed", len(batch))
                outputs = [e] * len(batch)
        # One wake-up per event loop for the whole batch, not one per request: each is a syscall
        # and a loop iteration, taken from the cores the next forward pass is using.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        with self._cond:
            for request, output in zip(batch, outputs):
                entry = self._pending.pop(request.request_id, None)
                if entry is None:  # the client went away while its request ran
                    continue
                call, index = entry
                result = call.take(index, output)
                if result is not None:
                    by_loop.setdefault(call.loop, []).append((call.future, result))
        for loop, results in by_loop.items():
            hand_back(loop, results)


def hand_back(loop: asyncio.AbstractEventLoop, results: Sequence[tuple[asyncio.Future[Any], Any]]) -> None:
    """From any thread: settle each future with its output (an exception instance is raised in the
    awaiting coroutine), in one wake-up of their event loop. A loop that has closed has nobody
    waiting. Also used by the server's offload workers (server/offload.py)."""
    with contextlib.suppress(RuntimeError):  # "Event loop is closed"
        loop.call_soon_threadsafe(_resolve, results)


def _resolve(results: Sequence[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, output in results:
        if future.done():  # cancelled: the client went away
            continue
        if isinstance(output, BaseException):
            future.set_exception(output)
        else:
            future.set_result(output)
