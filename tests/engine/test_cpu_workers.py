"""``cpu_workers``: batches running side by side on the CPU, each on its share of the cores.

Covered: the core accounting (``CpuCores``), the option's checks and defaults, the offline drain
(same numbers as one worker and as transformers, in order; batches really run on several threads
with a share of the cores each; a lone request runs on the caller's thread with every core; the
caller's torch threads are restored; a failing batch fails the call and leaves the engine usable),
and the server's loop threads (concurrent clients get the offline numbers).

Which worker runs which batch is up to the OS scheduler; the tests assert only what holds whatever
the interleaving. Cores are set explicitly (``CpuCores(2, 2)``), so the tests mean the same on a
machine with any number of cores.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from tests.tiny_models import PROMPTS, WORDS
from winnow import LLM, ConfigError
from winnow.engine.async_engine import AsyncEngine
from winnow.engine.builder import EngineArgs, _cpu_workers, build_engine
from winnow.engine.cpu_cores import CpuCores
from winnow.engine.request import Request
from winnow.inputs.prompts import TruncationOptions, parse_prompts
from winnow.layers.quant import compile_variants, int8_scheme
from winnow.params import PoolingParams

ATOL = 1e-5  # float32; a batch on one thread sums in another order than on two
TIMEOUT = 20.0
# 64 texts of 1-30 vocabulary words (within the tiny models' 64 positions): many batches of 96 tokens.
TEXTS = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + (7 * i) % 30)) for i in range(64)]


# -- the core accounting ----------------------------------------------------------------------


def test_a_lone_batch_takes_every_core_and_busy_workers_share_them():
    cores = CpuCores(cores=4, workers=2)
    assert (cores.share, cores.free) == (2, 4)
    assert cores.take(1, 0) == 4  # one lone request: all of them
    assert not cores.can_start()
    cores.give_back(4)
    assert cores.take(5, 0) == 2  # a batch that emptied the queue is not a lone request: a share
    cores.give_back(2)
    first = cores.take(1, 3)  # more work waits: a share
    assert (first, cores.free, cores.can_start()) == (2, 2, True)
    assert cores.take(1, 0) == 2  # alone in the queue, but another worker runs: still a share
    assert not cores.can_start()
    cores.give_back(2)
    cores.give_back(2)
    assert cores.free == 4


def test_only_the_wide_worker_takes_every_core():
    """libgomp keeps an OpenMP team per thread that ran on several cores; two teams in the process
    stop every team spinning between operators, so one worker runs every lone batch."""
    cores = CpuCores(cores=4, workers=2)
    assert cores.lone(1, 0) and not cores.lone(2, 0) and not cores.lone(1, 1)
    assert cores.take(1, 0, wide=False) == 2  # lone, but not the wide worker: a share
    assert not cores.lone(1, 0)  # another worker runs
    cores.give_back(2)
    assert cores.take(1, 0, wide=True) == 4


def test_more_workers_than_cores_get_one_thread_each():
    assert CpuCores(cores=3, workers=2).share == 1
    assert CpuCores(cores=2, workers=2).share == 1
    with pytest.raises(ValueError, match="positive"):
        CpuCores(cores=2, workers=0)


# -- the option ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 3, True, 1.5])
def test_bad_cpu_workers_are_refused(value):
    with pytest.raises(ConfigError, match="cpu_workers must be an integer from 1 to the 2 torch threads"):
        _cpu_workers(value, torch.device("cpu"), 2, native=True)


def test_cpu_workers_defaults():
    cpu = torch.device("cpu")
    assert _cpu_workers(None, cpu, 8, native=True) == 2
    assert _cpu_workers(None, cpu, 1, native=True) == 1  # one core: nothing to share
    assert _cpu_workers(None, cpu, 8, native=False) == 1  # transformers' modules are not ours to vouch for
    assert _cpu_workers(3, cpu, 8, native=False) == 3  # asked for explicitly
    assert _cpu_workers(None, torch.device("cuda"), 8, native=True) == 1
    with pytest.raises(ConfigError, match="a GPU runs one batch at a time"):
        _cpu_workers(2, torch.device("cuda"), 8, native=True)


def test_the_serve_flag_reaches_the_engine_config(make_model):
    from winnow.cli import build_parser

    args = build_parser().parse_args(["serve", str(make_model("bert", "seq")), "--cpu-workers", "1"])
    assert args.cpu_workers == 1


# -- offline: LLM.drain -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(make_model):
    return make_model("bert", "seq", num_labels=3)


def two_workers(path, **kwargs) -> LLM:
    """Two workers sharing two cores, whatever this machine has; small batches, so many of them."""
    llm = LLM(str(path), device="cpu", dtype="float32", cpu_workers=1, max_num_batched_tokens=96, **kwargs)
    llm.engine.core.cpu = CpuCores(cores=2, workers=2)
    if kwargs.get("quantization") == "int8":  # as the builder does for the workers it sets up
        compile_variants(int8_scheme(), torch.float32, llm.engine.core.cpu.thread_counts)
    return llm


class LaunchLog:
    """Wraps ``runner.launch``: which thread ran each batch, on how many torch threads."""

    def __init__(self, llm: LLM) -> None:
        self.runs: list[tuple[int, int, int]] = []  # (thread id, torch threads, sequences)
        self.names: dict[int, str] = {}  # thread id -> thread name
        self.lock = threading.Lock()
        runner = llm.engine.core.runner
        launch = runner.launch

        def logged(requests):
            with self.lock:
                self.runs.append((threading.get_ident(), torch.get_num_threads(), len(requests)))
                self.names[threading.get_ident()] = threading.current_thread().name
            return launch(requests)

        runner.launch = logged


def probs(outputs) -> torch.Tensor:
    return torch.tensor([o.outputs.probs for o in outputs])


def test_two_workers_give_one_workers_numbers_in_order(model_path, make_llm, hf_reference):
    llm = two_workers(model_path)
    log = LaunchLog(llm)
    got = probs(llm.classify(TEXTS, use_tqdm=False))
    one = probs(make_llm(model_path, dtype="float32", cpu_workers=1).classify(TEXTS, use_tqdm=False))
    torch.testing.assert_close(got, one, atol=ATOL, rtol=0)
    model, tokenizer = hf_reference(model_path, "seq")
    with torch.no_grad():
        expected = torch.cat([model(**tokenizer(t, return_tensors="pt")).logits.softmax(-1) for t in TEXTS[:12]])
    torch.testing.assert_close(got[:12], expected, atol=1e-4, rtol=0)
    assert sum(n for _, _, n in log.runs) == len(TEXTS)  # every prompt ran exactly once
    assert len(log.runs) > 2


def test_batches_run_on_both_workers_with_a_share_of_the_cores(model_path):
    llm = two_workers(model_path)
    log = LaunchLog(llm)
    for _ in range(5):  # which worker wins each batch is the OS's choice; over 5 calls both do
        llm.classify(TEXTS, use_tqdm=False)
    assert len({thread for thread, _, _ in log.runs}) == 2
    assert {threads for _, threads, _ in log.runs} <= {1, 2}
    assert 1 in {threads for _, threads, _ in log.runs}  # side by side: one core each
    here = threading.get_ident()
    assert all(threads == 1 for thread, threads, _ in log.runs if thread != here)  # the helper is never wide
    assert llm.engine.core.cpu.free == 2  # every core given back


def test_each_batch_takes_at_most_its_workers_share_of_what_is_left(model_path):
    """So the call's last batches run side by side instead of one core idling at the end."""
    llm = two_workers(model_path)
    scheduler = llm.engine.core.scheduler
    schedule, seen = scheduler.schedule, []

    def recording(max_tokens=None):
        waiting = scheduler.waiting_tokens
        batch = schedule(max_tokens)
        seen.append((waiting, sum(r.num_tokens for r in batch), len(batch)))
        return batch

    scheduler.schedule = recording
    llm.classify(TEXTS, use_tqdm=False)
    assert sum(tokens for _, tokens, _ in seen) == seen[0][0]  # every waiting token ran once
    for waiting, tokens, size in seen:
        assert tokens <= min(96, -(-waiting // 2)) or size == 1  # the budget, or half of what waits


def test_a_lone_request_runs_here_on_every_core(model_path):
    llm = two_workers(model_path)
    torch.set_num_threads(2)
    log = LaunchLog(llm)
    llm.classify(PROMPTS[0], use_tqdm=False)
    assert log.runs == [(threading.get_ident(), 2, 1)]


def test_the_callers_torch_threads_are_restored(model_path):
    llm = two_workers(model_path)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        llm.classify(TEXTS, use_tqdm=False)  # batches on this thread ran on 1 thread
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_failing_batch_fails_the_call_and_the_engine_goes_on(model_path):
    llm = two_workers(model_path)
    runner = llm.engine.core.runner
    launch = runner.launch

    def failing(requests):
        if any(len(r.prompt.token_ids) > 25 for r in requests):  # the longest prompts' batches
            raise RuntimeError("boom")
        return launch(requests)

    runner.launch = failing
    with pytest.raises(RuntimeError, match="boom"):
        llm.classify(TEXTS, use_tqdm=False)
    runner.launch = launch
    core = llm.engine.core
    assert core.scheduler.num_waiting == 0  # the call's other requests were dropped
    assert core.cpu.free == core.cpu.cores
    assert len(llm.classify(TEXTS[:4], use_tqdm=False)) == 4


def test_int8_with_two_workers_matches_one_worker(model_path, make_llm):
    llm = two_workers(model_path, quantization="int8")
    one = make_llm(model_path, quantization="int8", cpu_workers=1, max_num_batched_tokens=96)
    torch.testing.assert_close(
        probs(llm.classify(TEXTS, use_tqdm=False)), probs(one.classify(TEXTS, use_tqdm=False)), atol=1e-3, rtol=0
    )


# -- the server's loop threads ------------------------------------------------------------------


def test_the_server_runs_a_loop_thread_per_worker(model_path, make_llm):
    expected = probs(make_llm(model_path, dtype="float32", cpu_workers=1).classify(TEXTS, use_tqdm=False))
    engine = build_engine(
        EngineArgs(model=str(model_path), device="cpu", dtype="float32", cpu_workers=1, max_num_batched_tokens=96)
    )
    engine.core.cpu = CpuCores(cores=2, workers=2)
    served = AsyncEngine(engine.core)
    assert len(served._threads) == 2
    params = PoolingParams().with_task("classify")

    async def clients() -> list[list[torch.Tensor]]:
        async def client(i: int, text: str) -> list[torch.Tensor]:
            prompts = engine.inputs.process(parse_prompts([text]), TruncationOptions())
            return await served.run([Request(f"w-{i}", prompts[0], params)])

        return await asyncio.gather(*(client(i, t) for i, t in enumerate(TEXTS)))

    served.start()
    try:
        results = asyncio.run(asyncio.wait_for(clients(), TIMEOUT))
    finally:
        served.shutdown(timeout=TIMEOUT)
    assert not any(t.is_alive() for t in served._threads)
    assert engine.core.cpu.free == 2
    torch.testing.assert_close(torch.stack([r[0] for r in results]), expected, atol=ATOL, rtol=0)


def test_the_servers_lone_requests_run_on_the_first_loop_thread_with_every_core(model_path):
    """Whichever loop thread wakes first, a lone request (every worker idle) runs on loop thread 0
    on both cores, and the other loop thread never runs on more than its share: one OpenMP team in
    the process (CpuCores)."""
    engine = build_engine(EngineArgs(model=str(model_path), device="cpu", dtype="float32", cpu_workers=1))
    engine.core.cpu = CpuCores(cores=2, workers=2)
    served = AsyncEngine(engine.core)
    runner, launch, runs = engine.core.runner, engine.core.runner.launch, []

    def logged(requests):
        runs.append((threading.current_thread().name, torch.get_num_threads(), len(requests)))
        return launch(requests)

    runner.launch = logged
    params = PoolingParams().with_task("classify")
    prompt = engine.inputs.process(parse_prompts([PROMPTS[0]]), TruncationOptions())[0]

    async def one_at_a_time() -> None:
        for i in range(12):
            await served.run([Request(f"lone-{i}", prompt, params)])

    async def together() -> None:
        await asyncio.gather(*(served.run([Request(f"many-{i}", prompt, params)]) for i in range(24)))

    served.start()
    try:
        asyncio.run(asyncio.wait_for(one_at_a_time(), TIMEOUT))
        assert runs == [("winnow-engine-0", 2, 1)] * 12
        asyncio.run(asyncio.wait_for(together(), TIMEOUT))
    finally:
        served.shutdown(timeout=TIMEOUT)
    assert all(threads == 1 for name, threads, _ in runs if name != "winnow-engine-0")
    assert engine.core.cpu.free == 2


def test_only_the_first_loop_thread_is_ready_for_a_lone_request(model_path):
    """The rule behind the test above, without the OS's choice of which thread wakes first."""
    engine = build_engine(EngineArgs(model=str(model_path), device="cpu", dtype="float32", cpu_workers=1))
    engine.core.cpu = CpuCores(cores=2, workers=2)
    served = AsyncEngine(engine.core)  # not started: nothing takes the requests added below
    params = PoolingParams().with_task("classify")
    prompt = engine.inputs.process(parse_prompts([PROMPTS[0]]), TruncationOptions())[0]
    engine.core.add_requests([Request("a", prompt, params)])
    assert served._ready(None, 0) and not served._ready(None, 1)  # lone: loop thread 0's
    batch, threads = served._next_batch(wide=False)  # had another thread taken it: a share of the cores
    assert ([r.request_id for r in batch], threads) == (["a"], 1)
    engine.core.cpu.give_back(threads)
    for rid in "bc":
        engine.core.add_requests([Request(rid, prompt, params)])
    assert served._ready(None, 0) and served._ready(None, 1)  # two waiting: anyone's
