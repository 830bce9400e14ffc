"""A lone request's forward pass as one TorchScript graph, on a CPU.

Eager PyTorch runs Python between every two operators (module calls, argument parsing, the
dispatcher's Python side). Under a batch that is noise; under a lone short request it is a large
share of the forward: measured on a 2-core AVX2 EPYC, MiniLM-L6 at 8 tokens 3.0 ms eager against
1.9 ms as a graph, ~1.1-1.5 ms less at 22-64 tokens, bert-base at 22 tokens 28.7 against 25.8 ms.
A lone request (``Batch.num_seqs == 1``) is the same graph at every length, so the runner traces
the model at load, once per input signature its requests can bring (token types or not, output
rows or not), and replays the graph after: TorchScript runs it in C++, without Python in between
and without holding the GIL (a server's event loop runs meanwhile). A signature without a graph
runs eagerly; nothing is traced in the middle of a call. The graph calls the model's own modules:
no copy of the weights.

A trace is valid at every length only if the model reads the batch through the tensors passed in
(token ids, positions, token types, output rows) and shapes derived from them: never a host-side
length (``Batch.max_seqlen``, an attention group's ``max_len``) or a Python branch on one. Model
classes written so set ``ModelBase.traces_lone_requests``; each trace is also checked when it is
made: a tracer warning (a tensor read as a Python number, which the graph would freeze) or a result
that differs from the eager forward's at other lengths, and that signature stays eager (logged).

torch 2.13 marks ``torch.jit.trace`` deprecated in favour of ``torch.compile`` / ``torch.export``,
which take tens of seconds to compile a model and gained less here (docs/benchmarks.md). Where
tracing is missing or fails, the forward stays eager.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from winnow.runner.batch import Batch, build_batch

logger = logging.getLogger(__name__)

# (has token type ids, has output rows): what changes the traced graph's inputs.
Signature = tuple[bool, bool]
Graph = Callable[..., torch.Tensor]
# What the tracer warns with when it turns a tensor into a Python value, which the graph then freezes.
_TRACER_WARNING: type[Warning] = torch.jit.TracerWarning  # type: ignore[attr-defined]


class LoneForward:
    """``model(batch)`` for one-sequence batches, through the graph traced for the batch's
    ``Signature``, or eagerly for a signature that has none."""

    def __init__(self, model: nn.Module, graphs: dict[Signature, Graph], max_tokens: int) -> None:
        self.model = model
        self.graphs = graphs
        self.max_tokens = max_tokens

    @classmethod
    def trace(cls, model: nn.Module, examples: list[Batch], max_tokens: int) -> LoneForward | None:
        """Trace ``model`` on each one-sequence example (one per signature a request may bring);
        None if no graph passed its checks. ``max_tokens``: the longest prompt the graphs serve (the
        model's longest, or less where longer prompts run faster eagerly: int8's compiled parts)."""
        graphs = {}
        for example in examples:
            graph = _trace(model, example, max_tokens)
            if graph is not None:
                graphs[_signature(example)] = graph
        return cls(model, graphs, max_tokens) if graphs else None

    def fits(self, batch: Batch) -> bool:
        return batch.num_seqs == 1 and batch.num_tokens <= self.max_tokens

    def __call__(self, batch: Batch) -> torch.Tensor:
        """[num_tokens, hidden], or [1, hidden] for ``batch.output_rows``, as ``model(batch)``."""
        graph = self.graphs.get(_signature(batch))
        if graph is None:
            return self.model(batch)
        try:
            return graph(*_inputs(batch))
        except Exception as e:
            # The interpreter wraps an operator's error in a RuntimeError; the eager forward raises
            # the original (a token id out of range: IndexError), or answers if the graph was at fault.
            out = self.model(batch)
            name = type(self.model).__name__
            logger.warning("%s: a lone request's graph failed where the eager forward did not: %s", name, e)
            return out


def _trace(model: nn.Module, example: Batch, max_len: int) -> Graph | None:
    """The graph of ``model`` on ``example``'s signature, or None (logged) if it cannot be trusted
    at every length."""
    name = type(model).__name__
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph = torch.jit.trace(_FromTensors(model, example), _inputs(example), check_trace=False)
    except Exception as e:  # anything the tracer cannot follow leaves the model eager
        logger.warning("%s: lone requests run eagerly; tracing failed: %s", name, e)
        return None
    frozen = [str(w.message) for w in caught if issubclass(w.category, _TRACER_WARNING)]
    if frozen:
        logger.warning("%s: lone requests run eagerly; the trace froze a value: %s", name, frozen[0])
        return None
    traced = example.num_tokens
    for length in sorted({min(max_len, n) for n in (1, traced + 5, 2 * traced + 11)} - {traced}):
        batch = _like(example, length)
        try:
            torch.testing.assert_close(graph(*_inputs(batch)), model(batch))
        except Exception as e:  # a mismatch or a failure: both mean "not this graph"
            logger.warning("%s: lone requests run eagerly; the trace differs at %d tokens: %s", name, length, e)
            return None
    return graph


class _FromTensors(nn.Module):
    """The model on ``example``'s batch with the traced tensors put in (the tracer's entry point)."""

    def __init__(self, model: nn.Module, example: Batch) -> None:
        super().__init__()
        self.model = model
        self.example = example
        self.has_types, self.has_rows = _signature(example)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        ids, positions, *rest = tensors
        types = rest.pop(0) if self.has_types else None
        rows = rest.pop(0) if self.has_rows else None
        batch = dataclasses.replace(
            self.example, input_ids=ids, positions=positions, token_type_ids=types, output_rows=rows
        )
        return self.model(batch)


def _signature(batch: Batch) -> Signature:
    return batch.token_type_ids is not None, batch.output_rows is not None


def _inputs(batch: Batch) -> tuple[torch.Tensor, ...]:
    extra = (batch.token_type_ids, batch.output_rows)
    return (batch.input_ids, batch.positions, *(t for t in extra if t is not None))


def _like(example: Batch, length: int) -> Batch:
    """A one-sequence batch of ``length`` tokens shaped like ``example``: its ids (and token types)
    repeated, and the same output row (first or last token)."""
    ids = example.input_ids.tolist()
    types = None if example.token_type_ids is None else example.token_type_ids.tolist()
    token: Literal["first", "last"] | None = None
    if example.output_rows is not None:
        token = "first" if int(example.output_rows[0]) == 0 else "last"
    return build_batch(
        [[ids[i % len(ids)] for i in range(length)]],
        [None if types is None else [types[i % len(types)] for i in range(length)]],
        example.input_ids.device,
        output_token=token,
    )
