"""``AsyncEngine``: many coroutines share one engine thread and its batches, on a real tiny model
(``cpu_workers=1``; several loop threads are covered in test_cpu_workers.py).

Covered: results equal the offline ``LLM`` for every client, requests of different clients share
forward passes, a cancelled client's waiting requests cost nothing, the waiting-queue limit,
graceful shutdown, and a failing batch failing only its own requests.

Determinism: nothing here depends on timing. ``run()`` enqueues its requests synchronously before
its first ``await``, and the engine accepts requests before ``start()``, so tests that need a known
queue submit first and start the loop thread afterwards. Where a test needs the loop thread to be
inside a batch, an ``on_step`` callback blocks on a ``Gate`` until the test releases it. Every
engine is shut down in a ``finally`` and the test checks that its thread is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from tests.tiny_models import PROMPTS
from winnow import EngineDeadError, EngineOverloadedError
from winnow.engine.async_engine import AsyncEngine
from winnow.engine.builder import Engine, EngineArgs, build_engine
from winnow.engine.engine_core import StepStats
from winnow.engine.request import Request
from winnow.inputs.prompts import TokenizedPrompt, TruncationOptions, parse_prompts
from winnow.params import PoolingParams

ATOL = 1e-5
TIMEOUT = 20.0  # seconds; only a bound for waits that should end at once
CLASSIFY = PoolingParams().with_task("classify")
_ids = itertools.count()


@pytest.fixture(scope="module")
def model_path(make_model):
    return make_model("bert", "seq", num_labels=3)


@pytest.fixture(scope="module")
def reference(model_path, make_llm):
    """``reference(prompts)`` -> the offline LLM's probabilities, one tensor per prompt."""
    llm = make_llm(model_path)

    def classify(prompts: list[str]) -> list[torch.Tensor]:
        return [torch.tensor(o.outputs.probs) for o in llm.classify(prompts, use_tqdm=False)]

    return classify


class Gate:
    """Blocks the engine thread in its first ``on_step`` (after the batch ran, before its results are
    handed out) until the test calls ``released.set()``."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self, stats: StepStats) -> None:
        if not self.entered.is_set():
            self.entered.set()
            self.released.wait(TIMEOUT)  # bounded, so a failing test cannot hang the engine thread

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, TIMEOUT), "the engine never ran a batch"


class StepLog:
    """``on_step`` observer: the StepStats of every executed batch, optionally passed on to a Gate."""

    def __init__(self, gate: Gate | None = None) -> None:
        self.steps: list[StepStats] = []
        self.gate = gate

    def __call__(self, stats: StepStats) -> None:
        self.steps.append(stats)
        if self.gate is not None:
            self.gate(stats)

    @property
    def num_seqs(self) -> list[int]:
        return [s.num_seqs for s in self.steps]


@contextmanager
def serving(
    model_path, *, start: bool = True, gate: Gate | None = None, max_pending_requests: int | None = None, **engine_args
) -> Iterator[tuple[Engine, AsyncEngine, StepLog]]:
    """A fresh engine wrapped in an AsyncEngine, with a StepLog as its ``on_step``.

    Always shut down on exit (a held gate is released first), and the loop thread must be gone.
    """
    engine_args.setdefault("max_num_batched_tokens", 256)
    engine_args.setdefault("max_num_seqs", 8)
    # One loop thread: these tests reason about the order of batches (test_cpu_workers.py covers several).
    engine_args.setdefault("cpu_workers", 1)
    log = StepLog(gate)
    engine = build_engine(EngineArgs(model=str(model_path), device="cpu", **engine_args), on_step=log)
    served = AsyncEngine(engine.core, max_pending_requests=max_pending_requests)
    threads_before = set(threading.enumerate())
    if start:
        served.start()
    try:
        yield engine, served, log
    finally:
        if gate is not None:
            gate.released.set()
        served.shutdown(timeout=TIMEOUT)
        leaked = [t for t in threading.enumerate() if t not in threads_before and t.name.startswith("winnow-engine")]
        assert not leaked, "the engine thread is still running after shutdown()"


def make_requests(engine: Engine, prompts: list[str]) -> list[Request]:
    """Tokenize like the server does; every request gets a fresh, unique id."""
    tokenized = engine.inputs.process(parse_prompts(prompts), TruncationOptions())
    return [Request(f"req-{next(_ids)}", p, CLASSIFY) for p in tokenized]


def client_prompts(seed: int) -> list[str]:
    rng = random.Random(seed)
    return rng.choices(PROMPTS, k=rng.randint(1, 5))


def assert_outputs(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def run_bounded(coro):
    """``asyncio.run`` with a deadline: a broken engine fails the test instead of hanging it."""

    async def bounded():
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(bounded())


async def wait_until(condition, what: str, limit: int = 100_000) -> None:
    """Yield to the event loop until ``condition()`` holds (bounded: a broken engine fails, not hangs)."""
    for _ in range(limit):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"timed out waiting until {what}")


# -- results and batching ---------------------------------------------------------------------


def test_concurrent_clients_get_the_same_results_as_the_offline_llm(model_path, reference):
    """32 clients, 1-5 mixed prompts each, sharing small batches (8 seqs, 256 tokens)."""
    prompts = [client_prompts(seed) for seed in range(32)]
    expected = [reference(p) for p in prompts]

    async def main(engine: Engine, served: AsyncEngine) -> list[list[torch.Tensor]]:
        async def client(mine: list[str]) -> list[torch.Tensor]:
            return await served.run(make_requests(engine, mine))

        return await asyncio.gather(*(client(p) for p in prompts))

    with serving(model_path) as (engine, served, log):
        results = run_bounded(main(engine, served))
        assert served.is_healthy
        assert served.num_pending == 0
    for got, exp in zip(results, expected):
        assert_outputs(got, exp)
    assert sum(log.num_seqs) == sum(map(len, prompts))  # each request ran exactly once
    assert len(log.steps) > 1  # the budget forced several batches


def test_requests_of_different_clients_share_a_batch(model_path):
    prompts = [client_prompts(seed) for seed in range(32)]
    total = sum(map(len, prompts))

    async def main(engine: Engine, served: AsyncEngine) -> list[list[torch.Tensor]]:
        # The loop thread is not running yet. Each client task enqueues all its requests in its
        # first step (run() submits before its first await); once every request waits in the
        # queue, start the loop: its first batch is drawn from all 32 clients at once.
        tasks = [asyncio.create_task(served.run(make_requests(engine, p))) for p in prompts]
        await wait_until(lambda: engine.core.scheduler.num_waiting == total, "every client has submitted")
        served.start()
        return await asyncio.gather(*tasks)

    with serving(model_path, start=False, max_num_seqs=64, max_num_batched_tokens=4096) as (engine, served, log):
        results = run_bounded(main(engine, served))
    assert [len(r) for r in results] == [len(p) for p in prompts]
    assert max(log.num_seqs) > max(len(p) for p in prompts)  # a batch spanned several clients
    assert log.num_seqs[0] == min(64, total)
    assert sum(log.num_seqs) == total


# -- cancellation -----------------------------------------------------------------------------


def test_cancelled_client_waiting_requests_are_dropped(model_path, reference):
    others = ["hello", "what is the capital of france?", "rain"]

    async def main(engine: Engine, served: AsyncEngine) -> list[torch.Tensor]:
        gone = asyncio.create_task(served.run(make_requests(engine, PROMPTS[:5])))
        await wait_until(lambda: engine.core.scheduler.num_waiting == 5, "the client has submitted")
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert engine.core.scheduler.num_waiting == 0
        assert served.num_pending == 0
        served.start()
        return await served.run(make_requests(engine, others))

    with serving(model_path, start=False) as (engine, served, log):
        got = run_bounded(main(engine, served))
        assert served.is_healthy
    assert_outputs(got, reference(others))
    assert sum(log.num_seqs) == len(others)  # none of the cancelled client's requests ran


def test_client_cancelled_while_its_batch_runs_loses_only_its_own_requests(model_path, reference):
    """Its running batch finishes (results discarded), its waiting requests are dropped, others are served."""
    gate = Gate()
    others = ["the quick brown fox jumps over the lazy dog", "rain"]

    async def main(engine: Engine, served: AsyncEngine) -> list[torch.Tensor]:
        gone = asyncio.create_task(served.run(make_requests(engine, ["hello"] * 6)))
        await gate.wait_entered()  # the engine thread holds the client's first batch (2 requests)
        assert engine.core.scheduler.num_waiting == 4
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert engine.core.scheduler.num_waiting == 0
        gate.released.set()
        return await served.run(make_requests(engine, others))

    with serving(model_path, gate=gate, max_num_seqs=2) as (engine, served, log):
        got = run_bounded(main(engine, served))
        assert served.is_healthy
    assert_outputs(got, reference(others))
    assert log.num_seqs[0] == 2
    assert sum(log.num_seqs) == 2 + len(others)


# -- admission control ------------------------------------------------------------------------


def test_overload_is_refused_without_enqueuing_and_the_engine_keeps_serving(model_path, reference):
    prompts = ["hello", "rain", "a b c d e f g"]

    async def main(engine: Engine, served: AsyncEngine) -> None:
        first = asyncio.create_task(served.run(make_requests(engine, prompts)))
        await wait_until(lambda: served.num_pending == 3, "the first client has submitted")
        with pytest.raises(EngineOverloadedError):
            await served.run(make_requests(engine, ["hello", "rain"]))  # 3 + 2 > 4
        assert engine.core.scheduler.num_waiting == 3  # the refused requests were not enqueued
        assert served.num_pending == 3

        served.start()
        assert_outputs(await first, reference(prompts))
        with pytest.raises(EngineOverloadedError):
            await served.run(make_requests(engine, ["hello"] * 5))  # more than the limit at once
        four = PROMPTS[:4]
        assert_outputs(await served.run(make_requests(engine, four)), reference(four))  # exactly the limit
        assert served.is_healthy

    with serving(model_path, start=False, max_pending_requests=4) as (engine, served, _):
        run_bounded(main(engine, served))


# -- lifecycle --------------------------------------------------------------------------------


def test_shutdown_completes_every_request_in_flight(model_path, reference):
    gate = Gate()
    prompts = [client_prompts(seed) for seed in range(6)]

    async def main(engine: Engine, served: AsyncEngine) -> list[list[torch.Tensor]]:
        assert served.is_healthy
        tasks = [asyncio.create_task(served.run(make_requests(engine, p))) for p in prompts]
        await gate.wait_entered()  # one batch is running, the rest wait in the queue
        assert engine.core.scheduler.num_waiting > 0
        served.shutdown(timeout=0)  # begin shutting down, without waiting for the drain
        assert not served.is_healthy
        with pytest.raises(EngineDeadError):
            await served.run(make_requests(engine, ["hello"]))  # no new work while draining
        gate.released.set()
        results = await asyncio.gather(*tasks)
        served.shutdown(timeout=TIMEOUT)  # now wait for the thread
        with pytest.raises(EngineDeadError):
            await served.run(make_requests(engine, ["hello"]))
        return results

    with serving(model_path, gate=gate, max_num_seqs=3) as (engine, served, log):
        results = run_bounded(main(engine, served))
        assert not served.is_healthy
    for got, p in zip(results, prompts):
        assert_outputs(got, reference(p))
    assert sum(log.num_seqs) == sum(map(len, prompts))


def test_shutdown_of_an_idle_engine_stops_it(model_path):
    with serving(model_path) as (engine, served, _):
        assert served.is_healthy
        served.shutdown(timeout=TIMEOUT)
        assert not served.is_healthy
        with pytest.raises(EngineDeadError):
            run_bounded(served.run(make_requests(engine, ["hello"])))


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overlaps", [False, True], ids=["sequential", "overlapping"])
def test_failing_batch_fails_only_its_own_requests(model_path, reference, overlaps):
    """A token id outside the vocabulary (InputProcessor bypassed) makes the embedding lookup raise.
    With max_num_seqs=1 every request is its own batch, so the bad one fails alone; also with the
    GPU's launch-before-collect loop (tests/engine/test_overlap.py), forced on here."""
    good = ["hello", "horses and cows are both animals"]

    async def main(engine: Engine, served: AsyncEngine) -> None:
        vocab = engine.config.model.vocab_size
        bad = Request(f"req-{next(_ids)}", TokenizedPrompt(token_ids=[2, vocab + 10, 3]), CLASSIFY)
        failing = asyncio.create_task(served.run([bad]))
        neighbour = asyncio.create_task(served.run(make_requests(engine, good)))
        await wait_until(lambda: engine.core.scheduler.num_waiting == 3, "both clients have submitted")
        served.start()
        with pytest.raises(IndexError):
            await failing
        assert_outputs(await neighbour, reference(good))
        assert served.is_healthy
        later = ["rain", "the quick brown fox jumps over the lazy dog"]
        assert_outputs(await served.run(make_requests(engine, later)), reference(later))

    with serving(model_path, start=False, max_num_seqs=1) as (engine, served, _):
        engine.core.runner.overlaps = overlaps
        run_bounded(main(engine, served))


def test_a_client_whose_event_loop_closed_does_not_kill_the_engine(model_path):
    """The result for a client whose loop is gone is dropped; other clients keep being served."""
    with serving(model_path, start=False) as (engine, served, _):
        gone_loop = asyncio.new_event_loop()
        orphan = gone_loop.create_task(served.run(make_requests(engine, [PROMPTS[0]])))
        gone_loop.run_until_complete(asyncio.sleep(0))  # the request is enqueued, its future pending
        gone_loop.close()
        assert not orphan.done()
        served.start()

        async def other_client() -> list[torch.Tensor]:
            return await asyncio.wait_for(served.run(make_requests(engine, [PROMPTS[1]])), TIMEOUT)

        assert len(asyncio.run(other_client())) == 1
        assert served.is_healthy


def test_duplicate_request_ids_are_refused(model_path):
    from winnow import InvalidInputError

    with serving(model_path, start=False) as (engine, served, _):
        first = make_requests(engine, [PROMPTS[0]])
        twin = [Request(first[0].request_id, first[0].prompt, CLASSIFY)]

        async def submit_twice() -> None:
            pending = asyncio.ensure_future(served.run(first))
            await asyncio.sleep(0)
            with pytest.raises(InvalidInputError, match="unique"):
                await served.run(twin)
            with pytest.raises(InvalidInputError, match="unique"):
                await served.run(first + first)
            served.start()
            assert len(await asyncio.wait_for(pending, TIMEOUT)) == 1

        asyncio.run(submit_twice())


def test_shutdown_before_start_answers_every_submitted_request(model_path):
    with serving(model_path, start=False) as (engine, served, _):

        async def submit_then_shut_down() -> None:
            pending = asyncio.ensure_future(served.run(make_requests(engine, PROMPTS[:2])))
            await asyncio.sleep(0)
            served.shutdown()
            with pytest.raises(EngineDeadError, match="before it started"):
                await asyncio.wait_for(pending, TIMEOUT)

        asyncio.run(submit_then_shut_down())


# -- calls: turns between them, one hand-back each ---------------------------------------------


def test_a_small_call_behind_a_large_one_runs_in_the_next_batch(model_path, reference):
    """Each ``run`` call is one scheduler group: a one-prompt call submitted after a 24-prompt call
    (2 prompts per batch) runs in the second batch, not after the twelve batches of the first."""
    large = ["hello", "rain"] * 12
    small = ["the quick brown fox jumps over the lazy dog, twice over and once more"]
    launched: list[list[str]] = []

    async def main(engine: Engine, served: AsyncEngine) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        first = asyncio.create_task(served.run(make_requests(engine, large)))
        second = asyncio.create_task(served.run(small_requests := make_requests(engine, small)))
        await wait_until(lambda: engine.core.scheduler.num_waiting == len(large) + 1, "both calls have submitted")
        small_ids.update(r.request_id for r in small_requests)
        served.start()
        return await first, await second

    small_ids: set[str] = set()
    with serving(model_path, start=False, max_num_seqs=2) as (engine, served, _):
        launch = engine.core.launch

        def recording_launch(requests: list[Request], threads: int | None = None):
            launched.append([r.request_id for r in requests])
            return launch(requests, threads)

        engine.core.launch = recording_launch  # type: ignore[method-assign]
        got_large, got_small = run_bounded(main(engine, served))
    assert_outputs(got_large, reference(large))
    assert_outputs(got_small, reference(small))
    assert len(launched) == 13
    assert small_ids <= set(launched[1])


def test_a_call_is_answered_with_one_wake_up_of_its_event_loop(model_path, reference):
    """Twelve prompts in six batches settle one future, in one event-loop wake-up, not twelve."""
    from winnow.engine import async_engine

    prompts = PROMPTS[:4] * 3
    wakeups = 0

    async def main(engine: Engine, served: AsyncEngine) -> list[torch.Tensor]:
        nonlocal wakeups
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            nonlocal wakeups
            wakeups += callback is async_engine._resolve
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        return await served.run(make_requests(engine, prompts))

    with serving(model_path, max_num_seqs=2) as (engine, served, log):
        got = run_bounded(main(engine, served))
        assert served.num_pending == 0
    assert_outputs(got, reference(prompts))
    assert len(log.steps) == 6
    assert wakeups == 1


def test_a_call_fails_whole_when_one_of_its_batches_fails(model_path, reference):
    """The first failed batch fails the call at once; its other requests are dropped, never answered
    twice, and the engine serves the next call."""
    good = ["hello", "rain", "horses and cows are both animals"]

    async def main(engine: Engine, served: AsyncEngine) -> None:
        vocab = engine.config.model.vocab_size
        bad = Request(f"req-{next(_ids)}", TokenizedPrompt(token_ids=[2, vocab + 10, 3]), CLASSIFY)
        with pytest.raises(IndexError):
            await served.run([*make_requests(engine, good[:1]), bad, *make_requests(engine, good[1:])])
        await wait_until(lambda: served.num_pending == 0, "the failed call's requests are dropped")
        assert served.is_healthy
        assert_outputs(await served.run(make_requests(engine, good)), reference(good))

    with serving(model_path, max_num_seqs=1) as (engine, served, _):
        run_bounded(main(engine, served))


def test_a_large_call_is_submitted_a_chunk_at_a_time_with_the_loop_free_between(model_path, monkeypatch):
    """Chunks of 2, the loop thread stopped: the queue grows 2, 4, 6, 7 while this coroutine gets a
    turn between chunks; cancelled, the call leaves nothing queued, pending or reserved."""
    from winnow.engine import async_engine

    monkeypatch.setattr(async_engine, "_SUBMIT_CHUNK", 2)

    async def main(engine: Engine, served: AsyncEngine) -> list[int]:
        run = asyncio.ensure_future(served.run(make_requests(engine, PROMPTS[:7])))
        seen = []
        for _ in range(4):
            await asyncio.sleep(0)
            seen.append(engine.core.scheduler.num_waiting)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        return seen

    with serving(model_path, start=False) as (engine, served, _):
        assert run_bounded(main(engine, served)) == [2, 4, 6, 7]
        assert (engine.core.scheduler.num_waiting, served.num_pending, served._reserved) == (0, 0, 0)


def test_a_call_submitted_in_chunks_gets_the_offline_results(model_path, reference, monkeypatch):
    from winnow.engine import async_engine

    monkeypatch.setattr(async_engine, "_SUBMIT_CHUNK", 2)
    prompts = PROMPTS[:7]
    with serving(model_path) as (engine, served, _):
        got = run_bounded(served.run(make_requests(engine, prompts)))
        assert (served.num_pending, served._reserved) == (0, 0)
    assert_outputs(got, reference(prompts))


def test_capacity_counts_the_chunks_a_call_has_yet_to_submit(model_path, monkeypatch):
    from winnow.engine import async_engine

    monkeypatch.setattr(async_engine, "_SUBMIT_CHUNK", 2)

    async def main(engine: Engine, served: AsyncEngine) -> None:
        large = asyncio.ensure_future(served.run(make_requests(engine, PROMPTS[:8])))
        await asyncio.sleep(0)  # its first chunk is queued, six requests are reserved
        assert (served.num_pending, served._reserved) == (2, 6)
        with pytest.raises(EngineOverloadedError):
            await served.run(make_requests(engine, ["hello"]))  # 8 + 1 > 8
        large.cancel()
        with pytest.raises(asyncio.CancelledError):
            await large

    with serving(model_path, start=False, max_pending_requests=8) as (engine, served, _):
        run_bounded(main(engine, served))
        assert (engine.core.scheduler.num_waiting, served.num_pending, served._reserved) == (0, 0, 0)


def test_a_repeated_id_in_a_later_chunk_refuses_the_call_and_leaves_nothing_behind(model_path, monkeypatch):
    from winnow import InvalidInputError
    from winnow.engine import async_engine

    monkeypatch.setattr(async_engine, "_SUBMIT_CHUNK", 2)
    with serving(model_path, start=False) as (engine, served, _):
        requests = make_requests(engine, PROMPTS[:3])
        repeated = [*requests, Request(requests[0].request_id, requests[0].prompt, CLASSIFY)]  # chunks [0, 1], [2, 0]
        with pytest.raises(InvalidInputError, match="unique"):
            run_bounded(served.run(repeated))
        assert (engine.core.scheduler.num_waiting, served.num_pending, served._reserved) == (0, 0, 0)
