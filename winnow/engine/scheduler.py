"""The scheduler: which waiting requests run together in the next forward pass.

Pooling requests finish in one step (no decode, no KV cache), so scheduling is only batching:
take the oldest waiting request (so nothing starves), then add the requests in a bounded window
whose lengths are closest to it, until the token budget or the sequence cap is reached. Batches
therefore hold similar lengths, which keeps attention padding small, and order is FIFO across
batches. The budget counts what the runner pays for: real tokens for a packed runner,
``num_seqs * max_len`` for one that pads every layer.
"""

from __future__ import annotations

from collections import deque
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
        self.waiting: deque[Request] = deque()
        self.waiting_tokens = 0  # their prompt tokens, kept as requests come and go

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        self.waiting_tokens += request.num_tokens

    def abort(self, request_ids: set[str]) -> None:
        """Drop waiting requests (a client went away); running ones finish with their batch."""
        self.waiting = deque(r for r in self.waiting if r.request_id not in request_ids)
        self.waiting_tokens = sum(r.num_tokens for r in self.waiting)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def schedule(self, max_tokens: int | None = None) -> list[Request]:
        """Pop the next batch (empty when nothing waits). Never splits a request. ``max_tokens``: a
        smaller budget for this batch only (one request always fits)."""
        if not self.waiting:
            return []
        budget = self.max_num_batched_tokens if max_tokens is None else min(max_tokens, self.max_num_batched_tokens)
        window = list(islice(self.waiting, self.window))
        anchor_len = window[0].num_tokens
        order = sorted(range(len(window)), key=lambda i: (abs(window[i].num_tokens - anchor_len), i))
        chosen: list[int] = []
        max_len = total = 0
        for i in order:
            n = window[i].num_tokens
            cost = max(max_len, n) * (len(chosen) + 1) if self.padded_cost else total + n
            if chosen and (cost > budget or len(chosen) == self.max_num_seqs):
                break
            chosen.append(i)
            max_len, total = max(max_len, n), total + n
        picked = set(chosen)
        rest = islice(self.waiting, len(window), None)
        self.waiting = deque([r for i, r in enumerate(window) if i not in picked] + list(rest))
        self.waiting_tokens -= total
        return [window[i] for i in sorted(chosen)]
