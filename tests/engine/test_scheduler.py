"""The scheduler alone: which waiting requests form the next batch.

Pure Python, no model: real ``Request`` objects whose only relevant property is their length.
The contract under test:

* the oldest waiting request is in every next batch (nothing starves), and no batch exceeds
  ``max_num_seqs``;
* the token budget holds (real tokens, or ``num_seqs * max_len`` when the runner pads), except that
  a request that fits nowhere is still scheduled, alone;
* batches group similar lengths, and every request is scheduled exactly once;
* within a batch, requests keep their queue order (arrival order within a group);
* aborted requests are never scheduled; only the first ``window`` waiting requests are considered;
* groups (one client call each) take turns to anchor a batch: a small call behind a large one
  runs in the next batch, and with one group the order is FIFO.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from winnow.engine.request import Request
from winnow.engine.scheduler import Scheduler
from winnow.inputs.prompts import TokenizedPrompt
from winnow.params import PoolingParams

PARAMS = PoolingParams(task="classify")


def make_request(rid: int, length: int) -> Request:
    return Request(str(rid), TokenizedPrompt(token_ids=[7] * length), PARAMS, arrival_time=float(rid))


def make_scheduler(lengths: Iterable[int], **kwargs) -> tuple[Scheduler, list[Request]]:
    """A scheduler with one request per length, added in order (request id = position)."""
    kwargs.setdefault("padded_cost", False)
    scheduler = Scheduler(**kwargs)
    requests = [make_request(i, n) for i, n in enumerate(lengths)]
    for r in requests:
        scheduler.add(r)
    return scheduler, requests


def drain(scheduler: Scheduler, limit: int = 10_000) -> list[list[Request]]:
    """Call schedule() until the queue is empty; return the batches in order."""
    batches = []
    while scheduler.num_waiting:
        batch = scheduler.schedule()
        assert batch, "schedule() returned nothing while requests were waiting"
        batches.append(batch)
        assert len(batches) <= limit, "the scheduler does not make progress"
    return batches


def ids(batch: list[Request]) -> list[int]:
    return [int(r.request_id) for r in batch]


def cost(batch: list[Request], padded: bool) -> int:
    lens = [r.num_tokens for r in batch]
    return len(lens) * max(lens) if padded else sum(lens)


def random_lengths(seed: int, n: int = 200, longest: int = 300) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([rng.randint(1, 20), rng.randint(1, longest)]) for _ in range(n)]


# -- fairness and caps ------------------------------------------------------------------------


def test_empty_queue_schedules_nothing():
    scheduler = Scheduler(max_num_batched_tokens=100, max_num_seqs=4, padded_cost=False)
    assert scheduler.schedule() == []
    assert scheduler.num_waiting == 0


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_oldest_waiting_request_is_always_in_the_next_batch(seed, padded):
    lengths = random_lengths(seed)
    scheduler, _ = make_scheduler(lengths, max_num_batched_tokens=600, max_num_seqs=16, padded_cost=padded)
    while scheduler.num_waiting:
        oldest = scheduler.waiting[0]
        batch = scheduler.schedule()
        assert oldest in batch
        assert 1 <= len(batch) <= 16


def test_a_long_request_is_not_starved_by_a_stream_of_short_ones():
    """Short requests keep arriving, but the long one at the head goes in the very next batch."""
    scheduler = Scheduler(max_num_batched_tokens=200, max_num_seqs=8, padded_cost=False)
    scheduler.add(make_request(0, 150))
    for i in range(1, 40):
        scheduler.add(make_request(i, 3))
    assert ids(scheduler.schedule())[0] == 0


def test_every_request_is_scheduled_exactly_once():
    lengths = random_lengths(seed=11)
    scheduler, requests = make_scheduler(lengths, max_num_batched_tokens=500, max_num_seqs=10)
    scheduled = [r for batch in drain(scheduler) for r in batch]
    assert sorted(ids(scheduled)) == list(range(len(requests)))


@pytest.mark.parametrize("max_num_seqs", [1, 3, 8])
def test_batches_never_exceed_max_num_seqs(max_num_seqs):
    scheduler, _ = make_scheduler([4] * 50, max_num_batched_tokens=10_000, max_num_seqs=max_num_seqs)
    batches = drain(scheduler)
    assert max(len(b) for b in batches) == max_num_seqs  # the cap is reached, and never passed
    assert len(batches) == -(-50 // max_num_seqs)


# -- token budget -----------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_token_budget_holds_for_every_batch(seed, padded):
    budget = 400
    lengths = random_lengths(seed, longest=budget)  # every request fits the budget on its own
    scheduler, _ = make_scheduler(lengths, max_num_batched_tokens=budget, max_num_seqs=64, padded_cost=padded)
    for batch in drain(scheduler):
        assert cost(batch, padded) <= budget, (padded, [r.num_tokens for r in batch])


def test_padded_cost_counts_padding():
    """Nine 10-token requests and one 90-token one: 180 real tokens, but 900 padded cells."""
    lengths = [90] + [10] * 9
    packed, _ = make_scheduler(lengths, max_num_batched_tokens=200, max_num_seqs=10, padded_cost=False)
    padded, _ = make_scheduler(lengths, max_num_batched_tokens=200, max_num_seqs=10, padded_cost=True)
    assert len(packed.schedule()) == 10  # 180 real tokens fit
    first = padded.schedule()
    assert cost(first, padded=True) <= 200
    assert len(first) == 2  # 2 * 90 = 180 fits, 3 * 90 = 270 does not


@pytest.mark.parametrize("padded", [False, True])
def test_request_larger_than_the_budget_is_scheduled_alone(padded):
    budget = 100
    scheduler, _ = make_scheduler([5, 5, 250, 5, 5], max_num_batched_tokens=budget, max_num_seqs=8, padded_cost=padded)
    batches = drain(scheduler)
    oversized = [b for b in batches if any(r.num_tokens > budget for r in b)]
    assert [ids(b) for b in oversized] == [[2]]
    for b in batches:
        if b not in oversized:
            assert cost(b, padded) <= budget


@pytest.mark.parametrize("padded", [False, True])
def test_request_at_the_head_is_scheduled_even_when_it_alone_fills_the_budget(padded):
    scheduler, _ = make_scheduler([100, 1, 1, 1], max_num_batched_tokens=100, max_num_seqs=8, padded_cost=padded)
    assert ids(scheduler.schedule()) == [0]
    assert ids(scheduler.schedule()) == [1, 2, 3]


# -- length grouping --------------------------------------------------------------------------


def test_mixed_lengths_are_grouped_into_similar_length_batches():
    """50 requests alternating 5 and 100 tokens. FIFO chunks of 8 would mix both lengths in every
    batch (20x padding in attention); the scheduler keeps them apart, except at most once, where
    one length runs out and the batch is topped up with the other."""
    lengths = [5 if i % 2 == 0 else 100 for i in range(50)]
    scheduler, _ = make_scheduler(lengths, max_num_batched_tokens=1000, max_num_seqs=8)
    batches = drain(scheduler)

    scheduled = [r for b in batches for r in b]
    assert sorted(ids(scheduled)) == list(range(50))  # each exactly once

    ratios = [max(r.num_tokens for r in b) / min(r.num_tokens for r in b) for b in batches]
    assert sum(ratio > 1.5 for ratio in ratios) <= 1, ratios
    padded_cells = sum(cost(b, padded=True) for b in batches)
    fifo_cells = sum(8 * 100 for _ in range(0, 50, 8))  # every FIFO chunk of 8 contains a 100
    assert padded_cells <= 0.7 * fifo_cells, (padded_cells, fifo_cells)


@pytest.mark.parametrize("seed", range(3))
def test_grouping_keeps_batches_tight_on_random_lengths(seed):
    """Random lengths in a queue much larger than a batch: most batches span a narrow length range."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, 256) for _ in range(400)]
    scheduler, _ = make_scheduler(lengths, max_num_batched_tokens=100_000, max_num_seqs=16)
    batches = drain(scheduler)
    assert sorted(ids([r for b in batches for r in b])) == list(range(400))
    spans = sorted(max(r.num_tokens for r in b) - min(r.num_tokens for r in b) for b in batches)
    median_span = spans[len(spans) // 2]
    assert median_span <= 32, spans  # a FIFO chunk of 16 would span ~200 tokens


# -- order ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_batch_keeps_arrival_order(seed):
    scheduler, _ = make_scheduler(random_lengths(seed), max_num_batched_tokens=800, max_num_seqs=12)
    for batch in drain(scheduler):
        assert ids(batch) == sorted(ids(batch))
        assert [r.arrival_time for r in batch] == sorted(r.arrival_time for r in batch)


def test_requests_left_behind_keep_their_relative_order():
    scheduler, _ = make_scheduler([5, 90, 5, 80, 5, 70, 5], max_num_batched_tokens=1000, max_num_seqs=4)
    assert ids(scheduler.schedule()) == [0, 2, 4, 6]
    assert ids(scheduler.waiting) == [1, 3, 5]


# -- abort ------------------------------------------------------------------------------------


def test_aborted_requests_are_never_scheduled():
    scheduler, _ = make_scheduler([10] * 20, max_num_batched_tokens=1000, max_num_seqs=4)
    aborted = {"0", "3", "7", "19"}
    scheduler.abort(aborted)
    assert scheduler.num_waiting == 16
    scheduled = {r.request_id for b in drain(scheduler) for r in b}
    assert scheduled == {str(i) for i in range(20)} - aborted


def test_abort_of_unknown_or_already_scheduled_ids_is_harmless():
    scheduler, _ = make_scheduler([10] * 6, max_num_batched_tokens=1000, max_num_seqs=2)
    first = scheduler.schedule()
    scheduler.abort({r.request_id for r in first} | {"no-such-request"})
    assert scheduler.num_waiting == 4
    assert ids(scheduler.schedule()) == [2, 3]


# -- window -----------------------------------------------------------------------------------


def test_only_the_first_window_requests_are_considered():
    """The anchor is 10 tokens; better matches (10 tokens) wait beyond the window and are ignored."""
    lengths = [10, 60, 70, 80] + [10] * 6
    scheduler, _ = make_scheduler(lengths, max_num_batched_tokens=10_000, max_num_seqs=4, window=4)
    assert ids(scheduler.schedule()) == [0, 1, 2, 3]

    wide, _ = make_scheduler(lengths, max_num_batched_tokens=10_000, max_num_seqs=4, window=len(lengths))
    assert ids(wide.schedule()) == [0, 4, 5, 6]  # same queue, wide window: the 10-token requests


def test_window_of_one_is_fifo():
    scheduler, _ = make_scheduler(random_lengths(3, n=30), max_num_batched_tokens=10_000, max_num_seqs=8, window=1)
    assert [ids(b) for b in drain(scheduler)] == [[i] for i in range(30)]


def test_waiting_tokens_follow_adds_batches_and_aborts():
    scheduler, _ = make_scheduler([10, 20, 30, 40], max_num_batched_tokens=60, max_num_seqs=8)
    assert scheduler.waiting_tokens == 100
    batch = scheduler.schedule()
    assert scheduler.waiting_tokens == 100 - sum(r.num_tokens for r in batch)
    scheduler.abort({r.request_id for r in scheduler.waiting if r.num_tokens == 40})
    assert scheduler.waiting_tokens == sum(r.num_tokens for r in scheduler.waiting)
    while scheduler.schedule():
        pass
    assert scheduler.waiting_tokens == 0


def test_a_smaller_budget_holds_for_one_batch_only():
    scheduler, _ = make_scheduler([10] * 10, max_num_batched_tokens=60, max_num_seqs=16)
    assert len(scheduler.schedule(max_tokens=25)) == 2
    assert len(scheduler.schedule(max_tokens=5)) == 1  # one request always fits
    assert len(scheduler.schedule(max_tokens=1000)) == 6  # never above max_num_batched_tokens
    assert len(scheduler.schedule()) == 1


# -- groups (one client call each) ------------------------------------------------------------


def add_group(scheduler: Scheduler, group: int, first_id: int, lengths: list[int]) -> list[Request]:
    requests = [make_request(first_id + i, n) for i, n in enumerate(lengths)]
    for r in requests:
        scheduler.add(r, group)
    return requests


def test_groups_take_turns_to_anchor_a_batch():
    scheduler = Scheduler(max_num_batched_tokens=1000, max_num_seqs=1, padded_cost=False)
    add_group(scheduler, 1, 0, [10] * 4)  # ids 0-3
    add_group(scheduler, 2, 100, [10])
    add_group(scheduler, 3, 200, [10, 10])
    order = [ids(b) for b in drain(scheduler)]
    assert order == [[0], [100], [200], [1], [201], [2], [3]]


def test_a_small_call_behind_a_large_one_runs_in_the_next_batch():
    """3,000 short prompts of one call, then one long prompt of another: the long one anchors the
    second batch (first come, first served would run it last, its length matching no other)."""
    scheduler = Scheduler(max_num_batched_tokens=640, max_num_seqs=64, padded_cost=False)
    add_group(scheduler, 1, 0, [10] * 3000)
    add_group(scheduler, 2, 5000, [300])
    first, second = scheduler.schedule(), scheduler.schedule()
    assert 5000 not in ids(first)
    assert ids(second)[0] == 5000  # the anchor: its group's turn came first
    assert sum(r.num_tokens for r in second) <= 640  # filled from the large call up to the budget
    assert len(second) == 1 + (640 - 300) // 10
    rest = drain(scheduler)
    assert all(5000 not in ids(b) for b in rest)
    assert sorted(i for b in [first, second, *rest] for i in ids(b)) == [*range(3000), 5000]


@pytest.mark.parametrize("seed", range(5))
def test_a_group_keeps_its_arrival_order_across_turns(seed):
    rng = random.Random(seed)
    scheduler = Scheduler(max_num_batched_tokens=300, max_num_seqs=6, padded_cost=False)
    lengths = {g: [rng.randint(1, 120) for _ in range(rng.randint(1, 40))] for g in range(1, 6)}
    groups = {g: add_group(scheduler, g, 1000 * g, lens) for g, lens in lengths.items()}
    scheduled: list[int] = []
    while scheduler.num_waiting:
        heads = {}  # each group's oldest waiting request
        for r in scheduler.waiting:
            heads.setdefault(int(r.request_id) // 1000, int(r.request_id))
        batch = ids(scheduler.schedule())
        assert batch[0] in heads.values()  # the anchor is its group's oldest
        for g in groups:
            mine = [i for i in batch if i // 1000 == g]
            assert mine == sorted(mine)  # a group's requests keep their arrival order in a batch
        scheduled += batch
    assert sorted(scheduled) == sorted(int(r.request_id) for rs in groups.values() for r in rs)


def test_every_waiting_group_anchors_within_one_round_of_turns():
    scheduler = Scheduler(max_num_batched_tokens=10_000, max_num_seqs=2, padded_cost=False)
    for g in range(1, 5):
        add_group(scheduler, g, 1000 * g, [10 * g] * 10)  # lengths differ: no group fills another's batch
    groups_seen = [{int(r.request_id) // 1000 for r in scheduler.schedule()} for _ in range(4)]
    assert set().union(*groups_seen) == {1, 2, 3, 4}


def test_one_group_is_first_come_first_served_across_batches():
    scheduler, _ = make_scheduler([10] * 12, max_num_batched_tokens=1000, max_num_seqs=5)
    assert [ids(b) for b in drain(scheduler)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]


def test_the_window_spans_groups_in_turn_order():
    """Window 4: group 1's two requests, then group 2's first two; group 2's third is beyond it."""
    scheduler = Scheduler(max_num_batched_tokens=10_000, max_num_seqs=3, padded_cost=False, window=4)
    add_group(scheduler, 1, 0, [10, 90])
    add_group(scheduler, 2, 100, [80, 70, 10])
    assert ids(scheduler.schedule()) == [0, 100, 101]  # closest to 10 within the window: 70, 80 (not 90)
    # group 1 anchored this batch, so group 2 is first in turn now
    assert [ids([r]) for r in scheduler.waiting] == [[102], [1]]


def test_abort_drops_a_whole_group_and_keeps_the_others_turns():
    scheduler = Scheduler(max_num_batched_tokens=1000, max_num_seqs=1, padded_cost=False)
    add_group(scheduler, 1, 0, [10, 10])
    gone = add_group(scheduler, 2, 100, [20, 20, 20])
    add_group(scheduler, 3, 200, [30])
    scheduler.abort({r.request_id for r in gone})
    assert scheduler.num_waiting == 3
    assert scheduler.waiting_tokens == 50
    assert [ids(b) for b in drain(scheduler)] == [[0], [200], [1]]


def test_abort_within_a_group_searches_only_that_group():
    scheduler = Scheduler(max_num_batched_tokens=1000, max_num_seqs=8, padded_cost=False)
    [kept] = add_group(scheduler, 1, 0, [10])
    gone = add_group(scheduler, 2, 100, [20, 30])
    scheduler.abort({kept.request_id, *(r.request_id for r in gone)}, group=2)
    assert scheduler.waiting == [kept]
    assert (scheduler.num_waiting, scheduler.waiting_tokens) == (1, 10)
    scheduler.abort({"0"}, group=7)  # a group with nothing waiting
    assert scheduler.waiting == [kept]


def test_adding_no_requests_adds_no_group():
    scheduler = Scheduler(max_num_batched_tokens=100, max_num_seqs=4, padded_cost=False)
    scheduler.extend([], group=3)
    assert scheduler.groups == {} and scheduler.schedule() == []
