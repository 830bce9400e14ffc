"""What every route shares: settings, the model's config and tokenizer, and (once loaded) the engine.

The configuration and tokenizer exist from the start, so routes are registered for the model's
task and ``/tokenize`` works at once; the weights load in the background and inference routes
answer 503 until the engine is loaded and warmed up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import hmac
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from fastapi import Request as HTTPRequest

from winnow.config import ModelConfig
from winnow.engine.async_engine import AsyncEngine
from winnow.engine.builder import Engine, EngineConfig, load_engine
from winnow.engine.request import Request
from winnow.errors import WinnowError
from winnow.inputs.prompts import InputProcessor, TokenizedPrompt
from winnow.params import PoolingParams
from winnow.server.errors import ClientDisconnectedError, ModelNotFoundError, NotReadyError, TooManyRequestsError
from winnow.server.metrics import Metrics
from winnow.server.offload import Offload, default_workers

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Young-generation GC passes start after this many more container objects were allocated than
# freed (Python's default: 700). A request's objects die by reference counting, but the ones alive
# at once in a busy server crossed 700 again and again: 1,408 passes holding the GIL, 0.46 s in a
# 12 s tiny-cls bench_serve run (~40 us per request, every thread stalled meanwhile); at 50,000,
# none in that run. Cyclic garbage is still collected, once this many objects have accumulated.
GC_YOUNG_THRESHOLD = 50_000

# Prompts in one call above which its engine requests and its answer are built in a worker thread:
# for 200k inputs each took ~0.3-0.5 s on the event loop, stalling every other client meanwhile.
# Below it the hand-off costs more than it saves (a Request: ~1.6 us).
LARGE_CALL = 2048


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    served_model_names: tuple[str, ...]
    api_keys: tuple[str, ...] = ()
    max_concurrent_requests: int = 512  # HTTP inference requests in flight; more get 429
    max_request_body_bytes: int = 64 * 1024 * 1024  # larger bodies get 413
    trust_request_chat_template: bool = False  # allow a per-request chat_template
    enable_docs: bool = True
    # Freeze what is alive after loading and raise the young GC threshold (see GC_YOUNG_THRESHOLD).
    # Both are process-wide, so only the CLI, which owns its process, turns this on.
    tune_gc: bool = False


class ServerState:
    def __init__(self, config: EngineConfig, inputs: InputProcessor, settings: ServerSettings) -> None:
        self.config = config
        self.inputs = inputs
        self.settings = settings
        self.metrics = Metrics()
        self.engine: AsyncEngine | None = None
        self.load_error: BaseException | None = None
        self.shutting_down = False
        self.started = int(time.time())
        self._in_flight = 0
        self._warned: set[str] = set()
        self._offload: Offload | None = None  # started by the first off_loop call
        # Ids are 128 random bits in hex, like uuid4().hex, from a generator seeded once from the OS:
        # uuid4 reads os.urandom on every call, a system call that took ~25 us on the event loop under
        # load here, twice per request. Ids must be unique, not unpredictable.
        self._ids = random.Random()
        self.metrics.queue_depth.set_function(self._queue_depth)

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model

    @property
    def served_name(self) -> str:
        return self.settings.served_model_names[0]

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self.engine.is_healthy and not self.shutting_down

    # -- lifecycle -----------------------------------------------------------------------------

    async def load(self, on_fatal: Callable[[], None] | None = None) -> None:
        """Load weights, warm up, start the engine loop threads. Runs off the event loop."""
        try:
            engine = await _in_own_thread(self._load_and_warm_up)
        except Exception as e:
            if isinstance(e, WinnowError):  # the operator's mistake, and its message says what to change
                logger.error("Loading the model failed: %s", e)
            else:  # a bug: the traceback is what someone will need
                logger.exception("Loading the model failed")
            self.load_error = e
            if on_fatal is not None:
                on_fatal()
            return
        if self.settings.tune_gc:
            _tune_gc_for_serving()
        async_engine = AsyncEngine(engine.core)
        async_engine.start()
        self.engine = async_engine
        logger.info("Model loaded and warmed up; ready to serve.")

    def _load_and_warm_up(self) -> Engine:
        engine = load_engine(self.config, self.inputs, on_step=self.metrics.observe_step)
        engine.core.warmup()
        return engine

    async def shutdown(self) -> None:
        self.shutting_down = True
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
        if self._offload is not None:
            await asyncio.to_thread(self._offload.shutdown)

    def _queue_depth(self) -> float:
        return float(self.engine.core.scheduler.num_waiting) if self.engine is not None else 0.0

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning("%s", message)

    # -- checks --------------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name and name not in self.settings.served_model_names:  # None or "": the default model
            raise ModelNotFoundError(f"The model `{name}` does not exist.", param="model")

    def check_api_key(self, authorization: str | None) -> bool:
        """Constant-time comparison against every configured key."""
        if not self.settings.api_keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        matches = [hmac.compare_digest(given, key.encode()) for key in self.settings.api_keys]
        return any(matches)

    def require_engine(self) -> AsyncEngine:
        if self.shutting_down:
            raise NotReadyError("The server is shutting down.")
        if self.load_error is not None:
            raise NotReadyError(f"The model failed to load: {self.load_error}")
        if self.engine is None:
            raise NotReadyError("The model is still loading; retry shortly.")
        return self.engine

    @property
    def in_flight(self) -> int:
        """Inference requests admitted and not yet answered (``/load``)."""
        return self._in_flight

    @asynccontextmanager
    async def admission(self) -> AsyncIterator[None]:
        """Count an inference request in flight; beyond the limit, refuse it with 429."""
        if self._in_flight >= self.settings.max_concurrent_requests:
            raise TooManyRequestsError(
                f"The server is at capacity ({self.settings.max_concurrent_requests} requests in flight); retry later."
            )
        self._in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.dec()

    # -- work ----------------------------------------------------------------------------------

    async def off_loop(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Tokenization and other CPU work run in a worker thread, never on the event loop
        (``server/offload.py``: measured ~9 % more requests/s than ``asyncio.to_thread`` when the
        server's own work is the limit, ``bench_serve.py --model tiny-cls``)."""
        if self._offload is None:
            self._offload = Offload(workers=default_workers(os.cpu_count()))
        return await self._offload.run(functools.partial(fn, *args))

    def new_id(self) -> str:
        return f"{self._ids.getrandbits(128):032x}"

    def response_id(self, prefix: str, http: HTTPRequest, request_id: str | None) -> str:
        """The client's ``X-Request-Id`` header or ``request_id`` field, else a fresh id."""
        return f"{prefix}-{http.headers.get('x-request-id') or request_id or self.new_id()}"

    async def run(
        self, http: HTTPRequest, prompts: Sequence[TokenizedPrompt], params: Sequence[PoolingParams]
    ) -> list[torch.Tensor]:
        """Submit prompts to the shared engine; drop them if the client disconnects first."""
        engine = self.require_engine()
        batch_id = self.new_id()

        def make_requests() -> list[Request]:
            return [Request(f"{batch_id}-{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params))]

        requests = await self.off_loop_if_large(len(prompts), make_requests)
        return await _until_disconnected(http, engine.run(requests))

    async def off_loop_if_large(self, size: int, fn: Callable[[], _T]) -> _T:
        """``fn()`` for a call of ``size`` prompts (building its engine requests, rendering its
        answer): in a worker thread above ``LARGE_CALL``, where it would hold the event loop for
        every other client; here below it."""
        return fn() if size <= LARGE_CALL else await self.off_loop(fn)


def _tune_gc_for_serving() -> None:
    """Everything alive after loading (modules, weights' wrappers, tokenizer) lives as long as the
    server: frozen, the cyclic GC stops re-scanning it. Unfrozen, a full collection walked ~360k
    objects for ~200 ms while holding the GIL, twice in a 23 s bench_serve run, stalling the engine."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def _in_own_thread(fn: Callable[[], _T]) -> _T:
    """``fn()`` in a thread that ends with it. Loading and warm-up run torch operators on every core,
    and libgomp keeps such a thread's OpenMP team for the thread's life: in a pooled thread
    (``asyncio.to_thread``) that team would outlive the start-up, and with the engine's own, the
    process would hold more OpenMP threads than cores, which slows every lone request
    (engine/cpu_cores.py)."""
    pool = concurrent.futures.ThreadPoolExecutor(1, "winnow-load")
    try:
        return await asyncio.wrap_future(pool.submit(fn))
    finally:
        pool.shutdown(wait=False)  # the thread exits once ``fn`` returns


async def _until_disconnected(http: HTTPRequest, work: Coroutine[Any, Any, _T]) -> _T:
    """Await ``work`` in this task; a watcher task cancels it if the client disconnects first
    (cheaper per request than running ``work`` as a second task and waiting on both)."""
    current = asyncio.current_task()
    assert current is not None
    gone = finished = False

    def on_disconnect(watcher: asyncio.Task[None]) -> None:
        nonlocal gone
        # ``finished``: the callback may already be scheduled when the work ends at the same moment.
        if not finished and not watcher.cancelled() and watcher.exception() is None:
            gone = True
            current.cancel()  # AsyncEngine.run aborts the still-waiting requests

    watcher = asyncio.ensure_future(_wait_for_disconnect(http))
    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        if hasattr(current, "uncancel"):  # Python 3.11+: this cancellation is handled here
            current.uncancel()
        raise ClientDisconnectedError("The client disconnected before its answer was ready.") from None
    finally:
        finished = True
        watcher.cancel()


async def _wait_for_disconnect(http: HTTPRequest) -> None:
    # The body was already read by FastAPI, so the next ASGI message is the disconnect (or nothing).
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return
