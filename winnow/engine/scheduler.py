"""The scheduler: which waiting requests run together in the next forward pass.

Pooling requests finish in one step (no decode, no KV cache), so scheduling is only batching.
Waiting requests are kept by *group* (one client call: the server's HTTP request, one ``LLM``
call), and the groups take turns to anchor a batch: the group whose turn it is contributes its
oldest request, then the requests in a bounded window whose lengths are closest to that anchor
join, until the token budget or the sequence cap is reached. Batches therefore hold similar
lengths, which keeps attention padding small; nothing starves (every group anchors a batch within
one round of turns, and a group's own requests are anchored oldest first); and a small call that
arrives behind a large one's thousands of prompts runs in one of the next batches instead of after
all of them. With one group (an offline call, or clients of one prompt each) this is plain FIFO
across batches. The budget counts what the runner pays for: real tokens for a packed runner,
``num_seqs * max_len`` for one that pads every layer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from itertools import islice

from winnow.engine.request import Request


class Scheduler:
    def __init__(
        self, *, max_num_batched_tokens: int, max_num_seqs: int, padded_cost: bool, window: int = 8192
    ) -> None:
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.padded_cost = padded_cost
        self.window = window
        # Group -> its waiting requests (arrival order); dict order is the order of turns.
        self.groups: dict[int, deque[Request]] = {}
        self.num_waiting = 0
        self.waiting_tokens = 0  # their prompt tokens, kept as requests come and go

    def add(self, request: Request, group: int = 0) -> None:
        self.extend((request,), group)

    def extend(self, requests: Sequence[Request], group: int = 0) -> None:
        """Queue ``requests``; requests added with the same ``group`` came in one call. A new group
        takes its turn after the groups already waiting."""
        if not requests:
            return  # an empty group would be a turn with nothing to anchor
        self.groups.setdefault(group, deque()).extend(requests)
        self.num_waiting += len(requests)
        self.waiting_tokens += sum(r.num_tokens for r in requests)

    def abort(self, request_ids: set[str], group: int | None = None) -> None:
        """Drop waiting requests (a client went away); running ones finish with their batch.
        ``group``: search only that group (its call is known), not every waiting request."""
        searched = list(self.groups.items()) if group is None else [(group, self.groups.get(group, deque()))]
        for key, requests in searched:
            kept = deque(r for r in requests if r.request_id not in request_ids)
            if len(kept) == len(requests):
                continue
            self.num_waiting -= len(requests) - len(kept)
            self.waiting_tokens -= sum(r.num_tokens for r in requests) - sum(r.num_tokens for r in kept)
            if kept:
                self.groups[key] = kept
            else:
                del self.groups[key]

    @property
    def waiting(self) -> list[Request]:
        """Every waiting request, group by group in the order of their turns."""
        return [r for requests in self.groups.values() for r in requests]

    def schedule(self, max_tokens: int | None = None) -> list[Request]:
        """Pop the next batch (empty when nothing waits). Never splits a request. ``max_tokens``: a
        smaller budget for this batch only (one request always fits)."""
        if not self.groups:
            return []
        budget = self.max_num_batched_tokens if max_tokens is None else min(max_tokens, self.max_num_batched_tokens)
        # The window: the first requests of each group in turn order; window[0], the oldest request
        # of the group whose turn it is, anchors the batch.
        window: list[Request] = []
        spans: list[tuple[int, int]] = []  # (group, how many of its requests are in the window)
        for group, requests in self.groups.items():
            taken = list(islice(requests, self.window - len(window)))
            window += taken
            spans.append((group, len(taken)))
            if len(window) >= self.window:
                break
        lengths = [r.num_tokens for r in window]
        distance = [abs(n - lengths[0]) for n in lengths]
        order = sorted(range(len(window)), key=distance.__getitem__)  # stable: ties keep queue order
        chosen: list[int] = []
        max_len = total = 0
        for i in order:
            n = lengths[i]
            cost = max(max_len, n) * (len(chosen) + 1) if self.padded_cost else total + n
            if chosen and (cost > budget or len(chosen) == self.max_num_seqs):
                break
            chosen.append(i)
            max_len, total = max(max_len, n), total + n
        self._remove(spans, set(chosen))
        self.num_waiting -= len(chosen)
        self.waiting_tokens -= total
        return [window[i] for i in sorted(chosen)]

    def _remove(self, spans: list[tuple[int, int]], picked: set[int]) -> None:
        """Take the picked window positions out of their groups; the anchor's group, if it still
        waits, moves to the back of the turns. Only the window's part of a group is touched, so a
        batch costs O(window), not O(waiting): a 200k-prompt call was rebuilt once per batch."""
        start = 0
        for group, count in spans:
            requests = self.groups[group]
            if any(start <= i < start + count for i in picked):
                head = [requests.popleft() for _ in range(count)]
                requests.extendleft(reversed([r for j, r in enumerate(head) if start + j not in picked]))
                if not requests:
                    del self.groups[group]
            start += count
        anchor_group = spans[0][0]
        if anchor_group in self.groups:
            self.groups[anchor_group] = self.groups.pop(anchor_group)
