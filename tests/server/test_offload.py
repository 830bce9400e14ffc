"""``Offload``: the server's worker threads for CPU work off the event loop.

Covered: results and exceptions reach the awaiting coroutine, many concurrent jobs each get their
own result, the event loop is woken once for all the results a worker finished together, a job
whose caller was cancelled before it started never runs, a long job does not hold up the others
(two workers), and shutdown finishes what was queued and refuses new work. Tests that need a worker
inside a job block it on a ``threading.Event``; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from winnow.engine import async_engine
from winnow.errors import InvalidInputError
from winnow.server.offload import Offload, default_workers

TIMEOUT = 10.0  # seconds; only a bound for waits that should end at once
_T = TypeVar("_T")


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    async def bounded() -> _T:
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(bounded())


@pytest.fixture
def offload():
    workers = Offload(workers=2)
    yield workers
    workers.shutdown(timeout=TIMEOUT)
    assert not any(t.is_alive() for t in workers._threads)


def blocker() -> tuple[threading.Event, threading.Event, Any]:
    """A job that signals ``started`` and then waits for ``release``."""
    started, release = threading.Event(), threading.Event()

    def job() -> str:
        started.set()
        assert release.wait(TIMEOUT)
        return "slow"

    return started, release, job


def test_result_and_exception_reach_the_caller(offload):
    async def main() -> None:
        assert await offload.run(lambda: 6 * 7) == 42

        def fails() -> None:
            raise InvalidInputError("bad prompt", param="input")

        with pytest.raises(InvalidInputError, match="bad prompt") as info:
            await offload.run(fails)
        assert info.value.param == "input"

    run(main())


def test_many_concurrent_jobs_each_get_their_own_result(offload):
    async def main() -> list[int]:
        return await asyncio.gather(*(offload.run(lambda i=i: i * i) for i in range(200)))

    assert run(main()) == [i * i for i in range(200)]


def test_jobs_finished_together_wake_the_event_loop_once():
    offload = Offload(workers=1)
    wakeups = 0

    async def main() -> list[str]:
        nonlocal wakeups
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += callback is async_engine._resolve
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        started, release, slow = blocker()
        first = asyncio.ensure_future(offload.run(slow))
        await asyncio.to_thread(started.wait, TIMEOUT)  # the only worker is inside the slow job
        rest = [asyncio.ensure_future(offload.run(lambda i=i: f"job {i}")) for i in range(10)]
        await asyncio.sleep(0)  # all ten are queued behind it
        release.set()
        return [await first, *await asyncio.gather(*rest)]

    try:
        assert run(main()) == ["slow", *(f"job {i}" for i in range(10))]
    finally:
        offload.shutdown(timeout=TIMEOUT)
    # One hand-back for the slow job, one for the ten queued behind it.
    assert wakeups == 2


def test_job_cancelled_before_it_starts_never_runs():
    offload = Offload(workers=1)
    ran: list[str] = []

    async def main() -> None:
        started, release, slow = blocker()
        first = asyncio.ensure_future(offload.run(slow))
        await asyncio.to_thread(started.wait, TIMEOUT)
        queued = asyncio.ensure_future(offload.run(lambda: ran.append("queued")))
        await asyncio.sleep(0)
        queued.cancel()  # the client went away while its job waited
        release.set()
        assert await first == "slow"
        assert await offload.run(lambda: "after") == "after"  # the worker went on past the cancelled job
        with pytest.raises(asyncio.CancelledError):
            await queued

    try:
        run(main())
    finally:
        offload.shutdown(timeout=TIMEOUT)
    assert ran == []


def test_a_long_job_does_not_hold_up_the_others(offload):
    async def main() -> None:
        started, release, slow = blocker()
        first = asyncio.ensure_future(offload.run(slow))
        await asyncio.to_thread(started.wait, TIMEOUT)
        assert await offload.run(lambda: "quick") == "quick"  # the second worker took it
        assert not first.done()
        release.set()
        assert await first == "slow"

    run(main())


def test_shutdown_finishes_queued_jobs_and_refuses_new_ones():
    offload = Offload(workers=1)

    async def main() -> None:
        started, release, slow = blocker()
        first = asyncio.ensure_future(offload.run(slow))
        await asyncio.to_thread(started.wait, TIMEOUT)
        queued = asyncio.ensure_future(offload.run(lambda: "queued"))
        await asyncio.sleep(0)
        stopping = asyncio.ensure_future(asyncio.to_thread(offload.shutdown, TIMEOUT))
        release.set()
        assert await first == "slow"
        assert await queued == "queued"
        await stopping
        with pytest.raises(RuntimeError, match="stopped"):
            await offload.run(lambda: None)

    run(main())
    assert not any(t.is_alive() for t in offload._threads)


def test_workers_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        Offload(workers=0)


def test_default_workers_grow_with_the_machine():
    assert [default_workers(c) for c in (None, 1, 2, 4, 8, 16, 64)] == [2, 2, 2, 2, 4, 8, 8]
