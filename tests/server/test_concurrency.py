"""32 concurrent HTTP clients share the engine's batches and each gets exactly its own answer.

The classifier server runs at most 8 sequences / 128 tokens per forward pass. In the gated test the
engine thread is parked while all 32 requests queue up, so the batches that follow necessarily mix
prompts of different clients; the free-running test checks the same under real timing.
"""

from __future__ import annotations

import asyncio
import random
from functools import partial

import httpx

from tests.server.conftest import TIMEOUT, assert_close, engine_gate, in_background, wait_until
from tests.tiny_models import PROMPTS
from winnow import PoolingParams

NUM_CLIENTS = 32


def _workload(llm, seed: int) -> tuple[str, dict, list]:
    """One client's request (route, body) and the outputs the offline engine gives for it alone."""
    rng = random.Random(seed)
    texts = rng.choices(PROMPTS, k=rng.randint(1, 5))
    kind = seed % 4
    if kind == 0:  # a batch of texts
        return "/classify", {"input": texts}, [o.outputs.probs for o in llm.classify(texts, use_tqdm=False)]
    if kind == 1:  # a batch of token-id prompts
        ids = [list(llm.get_tokenizer()(t)["input_ids"]) for t in texts]
        prompts = [{"prompt_token_ids": i} for i in ids]
        return "/classify", {"input": ids}, [o.outputs.probs for o in llm.classify(prompts, use_tqdm=False)]
    if kind == 2:  # raw logits through /pooling
        outputs = llm.classify(texts, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
        return "/pooling", {"input": texts, "use_activation": False}, [o.outputs.probs for o in outputs]
    return "/classify", {"input": texts[0]}, [llm.classify(texts[0], use_tqdm=False)[0].outputs.probs]


def _outputs(route: str, body: dict) -> list:
    return [item["probs"] if route == "/classify" else item["data"] for item in body["data"]]


async def _send_all(url: str, requests: list[tuple[str, dict, list]], before_gather=None) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=NUM_CLIENTS, max_keepalive_connections=NUM_CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
        tasks = [asyncio.create_task(client.post(route, json=body)) for route, body, _ in requests]
        if before_gather is not None:
            await asyncio.to_thread(before_gather)
        return await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)


def _check(requests, responses) -> None:
    for (route, _, expected), response in zip(requests, responses):
        assert response.status_code == 200, response.text
        assert_close(_outputs(route, response.json()), expected)


def test_queued_clients_share_batches_and_get_their_own_results(classifier, classifier_llm):
    requests = [_workload(classifier_llm, seed) for seed in range(NUM_CLIENTS)]
    num_prompts = sum(len(expected) for _, _, expected in requests)
    plug_request = partial(classifier.post, "/classify", {"input": "hello"})
    with engine_gate(classifier) as gate, in_background(plug_request) as plug:
        gate.wait_parked()
        batches_before = classifier.metric("winnow_batch_size_count")
        seqs_before = classifier.metric("winnow_batch_size_sum")

        def all_queued_then_release() -> None:
            wait_until(lambda: gate.num_waiting == num_prompts, "every client's prompts to be queued")
            assert classifier.metric("winnow_queue_depth") == num_prompts
            gate.release()

        responses = asyncio.run(_send_all(classifier.url, requests, all_queued_then_release))
        assert plug().status_code == 200
    _check(requests, responses)
    batches = classifier.metric("winnow_batch_size_count") - batches_before
    assert classifier.metric("winnow_batch_size_sum") - seqs_before == num_prompts
    # Each batch holding one client's prompts only would need at least one batch per client.
    assert batches < NUM_CLIENTS
    assert batches >= num_prompts / 8  # max_num_seqs is respected
    assert classifier.metric("winnow_queue_depth") == 0


def test_free_running_clients_get_their_own_results(classifier, classifier_llm):
    requests = [_workload(classifier_llm, 100 + seed) for seed in range(NUM_CLIENTS)]
    in_flight_before = classifier.metric("winnow_requests_in_flight")
    _check(requests, asyncio.run(_send_all(classifier.url, requests)))
    assert classifier.metric("winnow_requests_in_flight") == in_flight_before == 0
