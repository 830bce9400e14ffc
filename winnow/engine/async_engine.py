"""Drives an ``EngineCore`` from one background thread so many coroutines can share its batches.

``await engine.run(requests)`` from any number of clients: requests join one waiting queue, the
loop thread batches whatever is waiting (so requests of different clients share a forward pass),
and each output is handed back to the awaiting coroutine on its own event loop. A cancelled
coroutine (client gone) has its still-waiting requests dropped before they cost any compute.
The model runs on the loop thread only: the event loop is never blocked by model work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence

import torch

from winnow.engine.engine_core import EngineCore
from winnow.engine.request import Request
from winnow.errors import EngineDeadError, EngineOverloadedError, InvalidInputError

logger = logging.getLogger(__name__)

_Pending = tuple["asyncio.Future[torch.Tensor]", asyncio.AbstractEventLoop]


class AsyncEngine:
    def __init__(self, core: EngineCore, *, max_pending_requests: int | None = None) -> None:
        self.core = core
        # Requests submitted and not yet answered (waiting or running); beyond it, run() refuses.
        self.max_pending_requests = max_pending_requests
        self._cond = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="winnow-engine", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking work, finish every request already submitted, then stop the loop thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        elif self._thread.ident is None:  # never started: nothing will answer what was submitted
            self._fail_pending(EngineDeadError("The engine was shut down before it started."))

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive() and not self._stopping

    @property
    def num_pending(self) -> int:
        """Requests submitted and not yet answered."""
        return len(self._pending)

    # -- submission ----------------------------------------------------------------------------

    async def run(self, requests: Sequence[Request]) -> list[torch.Tensor]:
        """Submit ``requests`` and wait for all their outputs (in the same order)."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[torch.Tensor]] = [loop.create_future() for _ in requests]
        with self._cond:
            if self._dead is not None or self._stopping:
                raise EngineDeadError("The engine is shutting down or has stopped; no new requests are accepted.")
            limit = self.max_pending_requests
            if limit is not None and len(self._pending) + len(requests) > limit:
                raise EngineOverloadedError(
                    f"The server is at capacity ({len(self._pending)} requests in flight, limit {limit}); retry later."
                )
            ids = [r.request_id for r in requests]
            if len(set(ids)) != len(ids) or any(rid in self._pending for rid in ids):
                raise InvalidInputError("Request ids must be unique among the requests in flight.")
            for request, future in zip(requests, futures):
                self._pending[request.request_id] = (future, loop)
                self.core.add_request(request)
            self._cond.notify()
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            self.abort([r.request_id for r in requests])
            raise

    def abort(self, request_ids: Sequence[str]) -> None:
        ids = set(request_ids)
        with self._cond:
            self.core.abort_requests(ids)
            for rid in ids:
                self._pending.pop(rid, None)

    # -- the loop thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self.core.has_unfinished() and not self._stopping:
                        self._cond.wait()
                    if not self.core.has_unfinished():
                        return  # stopping and drained
                    batch = self.core.schedule()
                self._execute(batch)
        except BaseException as e:  # a dead loop must fail every waiter, whatever killed it
            logger.exception("The engine loop stopped")
            self._dead = e
            self._fail_pending(EngineDeadError(f"The engine stopped: {e}"))

    def _fail_pending(self, error: BaseException) -> None:
        with self._cond:
            pending, self._pending = self._pending, {}
        for future, loop in pending.values():
            _hand_back(loop, future, error)

    def _execute(self, batch: list[Request]) -> None:
        try:
            outputs: list[torch.Tensor | BaseException] = list(self.core.execute(batch))
        except Exception as e:
            logger.exception("A batch of %d requests failed", len(batch))
            outputs = [e] * len(batch)
        with self._cond:
            waiters = [self._pending.pop(r.request_id, None) for r in batch]
        for waiter, output in zip(waiters, outputs):
            if waiter is not None:  # None: the client went away while its request ran
                future, loop = waiter
                _hand_back(loop, future, output)


def _hand_back(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[torch.Tensor], output: torch.Tensor | BaseException
) -> None:
    """Deliver a result on the client's own event loop; a client whose loop has closed is simply gone."""
    with contextlib.suppress(RuntimeError):  # "Event loop is closed"
        loop.call_soon_threadsafe(_resolve, future, output)


def _resolve(future: asyncio.Future[torch.Tensor], output: torch.Tensor | BaseException) -> None:
    if future.done():
        return
    if isinstance(output, BaseException):
        future.set_exception(output)
    else:
        future.set_result(output)
