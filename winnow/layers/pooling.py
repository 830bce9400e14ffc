"""The pooler: hidden states -> per-request outputs. The one place that knows head semantics.

For each request (vLLM 0.33, spec §3):

    p   = POOL(H)                     CLS / LAST / MEAN (sequence) or ALL / STEP (token)
    p   = cast(p, head_dtype)         float32 by default
    z   = HEAD(p)                     the model's classifier (classify tasks) or nothing (embed tasks)
    z   = (z - logit_mean) / logit_sigma          classify tasks, when set
    out = ACT(z) if use_activation else z         classify: activation; embed: L2 normalisation

Requests of different tasks may share a batch; each is pooled its own way. Models provide
``classify_head(pooled)`` and ``token_head(hidden)``; a model whose forward already returns one
row per sequence (the transformers fallback) sets ``returns_pooled``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from winnow.errors import ModelLoadError
from winnow.params import EMBED_TASKS, TOKEN_TASKS, PoolingParams, PoolingTask, PoolingType
from winnow.runner.batch import Batch, to_device

_ST_MODULE_PREFIX = "torch.nn.modules."


@dataclass(frozen=True)
class HeadActivation:
    """A classifier activation chosen once per model (spec §3.3).

    ``classify``: sigmoid for one output column, softmax over columns otherwise.
    ``identity``: raw values. ``sigmoid``: element-wise. ``module``: a ``torch.nn.modules`` class.
    """

    kind: str  # "classify" | "sigmoid" | "identity" | "module"
    module_path: str | None = None

    @staticmethod
    def from_st_path(path: str) -> HeadActivation:
        """Map a sentence-transformers ``activation_fn`` class path; only torch.nn.modules is allowed."""
        if not path.startswith(_ST_MODULE_PREFIX):
            raise ModelLoadError(
                f"activation_fn {path!r} is refused: it is restricted to torch.nn.modules for security reasons."
            )
        name = path.rsplit(".", 1)[-1]
        if name == "Identity":
            return HeadActivation("identity")
        if name in ("Sigmoid", "Softmax"):
            return HeadActivation("classify")
        return HeadActivation("module", path)

    def build(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.kind == "identity":
            return _identity
        if self.kind == "sigmoid":
            return torch.sigmoid
        if self.kind == "classify":
            return _classify_rule
        assert self.module_path is not None
        module_name, _, class_name = self.module_path.rpartition(".")
        try:
            module_cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            raise ModelLoadError(f"activation_fn {self.module_path!r} does not exist in torch.") from e
        fn: Callable[[torch.Tensor], torch.Tensor] = module_cls()
        return fn


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z


def _classify_rule(z: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(z) if z.shape[-1] < 2 else torch.softmax(z, dim=-1)


@dataclass(frozen=True)
class PooledBatch:
    """A batch's pooler outputs before they are split per sequence; on the device until ``to_host``."""

    seq_rows: tuple[int, ...]  # sequences with a sequence-level task, in batch order
    seq_out: torch.Tensor | None  # [len(seq_rows), k] float32
    tok_rows: tuple[int, ...]  # sequences with a token-level task
    tok_out: torch.Tensor | None  # [sum of their lengths, k] float32; STEP pooling: before ACT
    step_ids: torch.Tensor | None  # [num_tokens] the batch's input ids, for STEP pooling's tag filter

    def to_host(self, *, non_blocking: bool = False) -> PooledBatch:
        """Copies on the CPU. ``non_blocking`` (from a GPU): into pinned memory, valid only once the
        stream has reached this point (the runner records an event and waits on it)."""

        def host(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to("cpu", non_blocking=non_blocking)

        return PooledBatch(self.seq_rows, host(self.seq_out), self.tok_rows, host(self.tok_out), host(self.step_ids))


@dataclass(frozen=True)
class PoolerSpec:
    """Everything the pooler needs from the model config, resolved once at load time."""

    seq_pooling: PoolingType
    tok_pooling: PoolingType
    activation: HeadActivation
    use_activation: bool  # default when a request leaves use_activation unset
    logit_mean: float | None
    logit_sigma: float | None
    step_tag_id: int | None
    returned_token_ids: tuple[int, ...] | None
    head_dtype: torch.dtype


# Pooling types that read one token per sequence: which one.
_ONE_TOKEN: dict[PoolingType, Literal["first", "last"]] = {PoolingType.CLS: "first", PoolingType.LAST: "last"}


class Pooler:
    """Turns a batch's hidden states into one CPU float32 tensor per request."""

    def __init__(self, spec: PoolerSpec, model: torch.nn.Module) -> None:
        self.spec = spec
        self.act = spec.activation.build()
        self.classify_head: Callable[[torch.Tensor], torch.Tensor] | None = getattr(model, "classify_head", None)
        self.token_head: Callable[[torch.Tensor], torch.Tensor] | None = getattr(model, "token_head", None)
        self.returns_pooled = bool(getattr(model, "returns_pooled", False))

    def output_token(self, params: Sequence[PoolingParams]) -> Literal["first", "last"] | None:
        """The one token per sequence this batch's pooling reads, if there is one (``Batch.output_rows``)."""
        if self.returns_pooled or any(p.task in TOKEN_TASKS for p in params):
            return None
        return _ONE_TOKEN.get(self.spec.seq_pooling)

    def pool(self, hidden: torch.Tensor, batch: Batch, params: Sequence[PoolingParams]) -> PooledBatch:
        """The device half: pooling, head and activation for the whole batch, no host synchronisation
        (STEP pooling's activation waits for ``split``, which picks its columns).
        ``hidden``: [num_tokens, H], or [num_seqs, H] when the model pooled or returned ``batch.output_rows``."""
        seq_rows = [i for i, p in enumerate(params) if p.task not in TOKEN_TASKS]
        tok_rows = [i for i, p in enumerate(params) if p.task in TOKEN_TASKS]
        seq_out = tok_out = step_ids = None
        if seq_rows:
            already = self.returns_pooled or batch.output_rows is not None
            pooled = hidden if already else self._pool_sequences(hidden, batch)  # [num_seqs, H]
            if tok_rows:  # a mixed batch: the sequence-level rows only
                pooled = pooled.index_select(0, to_device(seq_rows, hidden.device, torch.int64))
            seq_out = self._finish(pooled, [params[i] for i in seq_rows]).float()
        if tok_rows:
            tokens = self._select_tokens(hidden, batch, tok_rows)  # [sum of their lengths, H]
            token_params = [params[i] for i in tok_rows for _ in range(batch.seq_lens[i])]
            if self.spec.tok_pooling is PoolingType.STEP:
                # ACT runs over the columns STEP keeps (spec §3.2), which each request may choose: in split.
                tok_out = self._logits(tokens, token_params[0].task).float()
                step_ids = batch.input_ids
            else:
                tok_out = self._finish(tokens, token_params).float()
        return PooledBatch(tuple(seq_rows), seq_out, tuple(tok_rows), tok_out, step_ids)

    def split(self, pooled: PooledBatch, batch: Batch, params: Sequence[PoolingParams]) -> list[torch.Tensor]:
        """The host half: one output per sequence from host tensors (``PooledBatch.to_host``)."""
        results: list[torch.Tensor | None] = [None] * batch.num_seqs
        if pooled.seq_out is not None:
            for row, value in zip(pooled.seq_rows, pooled.seq_out):
                results[row] = self._truncate_embedding(value, params[row])
        if pooled.tok_out is not None:
            lens = [batch.seq_lens[i] for i in pooled.tok_rows]
            for row, value in zip(pooled.tok_rows, pooled.tok_out.split(lens)):  # value: [seq_lens[row], k]
                if pooled.step_ids is None:
                    results[row] = self._truncate_embedding(value, params[row])
                else:
                    value = self._step_filter(value, params[row], batch, row, pooled.step_ids)
                    results[row] = self._activate(value, params[row])
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    # -- pooling ------------------------------------------------------------------------------

    def _pool_sequences(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        kind = self.spec.seq_pooling
        if kind is PoolingType.CLS:
            return hidden.index_select(0, batch.first_token_index)  # [num_seqs, H]
        if kind is PoolingType.LAST:
            return hidden.index_select(0, batch.last_token_index)
        # MEAN over every prompt token (special tokens included), accumulated in float32.
        seq_ids = torch.repeat_interleave(  # [num_tokens] the sequence each packed token belongs to
            torch.arange(batch.num_seqs, device=hidden.device),
            to_device(batch.seq_lens, hidden.device, torch.int64),
            output_size=batch.num_tokens,
        )
        sums = hidden.new_zeros(batch.num_seqs, hidden.shape[1], dtype=torch.float32)  # [num_seqs, H]
        sums.index_add_(0, seq_ids, hidden.float())
        lens = to_device(batch.seq_lens, hidden.device, torch.float32)  # [num_seqs]
        return sums / lens[:, None]  # [num_seqs, H]

    def _select_tokens(self, hidden: torch.Tensor, batch: Batch, rows: list[int]) -> torch.Tensor:
        """[sum of the rows' lengths, H]: the tokens of sequences ``rows``, in order."""
        if len(rows) == batch.num_seqs:
            return hidden
        starts = batch.host_starts
        index = torch.cat([torch.arange(starts[i], starts[i] + batch.seq_lens[i]) for i in rows])
        return hidden.index_select(0, to_device(index.numpy(), hidden.device))

    # -- heads --------------------------------------------------------------------------------

    def _finish(self, x: torch.Tensor, params: list[PoolingParams]) -> torch.Tensor:
        """Apply head, calibration and activation to rows ``x`` [n, H]; ``params`` has one entry per row."""
        z = self._logits(x, params[0].task)  # [n, k]
        use_act = [self._use_activation(p) for p in params]
        if params[0].task in EMBED_TASKS:
            return self._embed(z, params, use_act)
        return _select_rows(self.act(z), z, use_act)

    def _logits(self, x: torch.Tensor, task: PoolingTask | None) -> torch.Tensor:
        """Rows ``x`` [n, H] in the head dtype, through the head and calibration: [n, num_labels].
        Embedding tasks have neither: their rows come back as they are, [n, H]."""
        x = x.to(self.spec.head_dtype)
        if task in EMBED_TASKS:
            return x
        if not self.returns_pooled:
            head = self.token_head if task in TOKEN_TASKS else self.classify_head
            assert head is not None, "the registry only assigns classify tasks to models with a head"
            x = head(x)  # [n, num_labels]
        if self.spec.logit_mean is not None:
            x = x - self.spec.logit_mean
        if self.spec.logit_sigma is not None:
            x = x / self.spec.logit_sigma
        return x

    def _use_activation(self, params: PoolingParams) -> bool:
        return self.spec.use_activation if params.use_activation is None else params.use_activation

    def _embed(self, x: torch.Tensor, params: list[PoolingParams], use_act: list[bool]) -> torch.Tensor:
        """L2-normalise rows ``x`` [n, H] that ask for it. A Matryoshka row (``dimensions`` set) stays
        raw: it is normalised after its truncation, per request in ``_truncate_embedding``."""
        normalise = [act and p.dimensions is None for act, p in zip(use_act, params)]
        return _select_rows(F.normalize(x, p=2, dim=-1), x, normalise)

    def _truncate_embedding(self, value: torch.Tensor, params: PoolingParams) -> torch.Tensor:
        """Matryoshka truncation ([.., dim] -> [.., dimensions]), then the L2 normalisation it deferred."""
        if params.task not in EMBED_TASKS or params.dimensions is None:
            return value
        return self._activate(value, params)

    def _activate(self, value: torch.Tensor, params: PoolingParams) -> torch.Tensor:
        """One request's ACT on the host, for what ``pool`` left raw: [.., k] -> [.., k], or
        [.., dimensions] for an embedding (Matryoshka truncation comes before its normalisation)."""
        if params.task in EMBED_TASKS:
            value = value[..., : params.dimensions]  # dimensions None: every column
            return F.normalize(value, p=2, dim=-1) if self._use_activation(params) else value
        return self.act(value) if self._use_activation(params) else value

    def _step_filter(
        self, value: torch.Tensor, params: PoolingParams, batch: Batch, row: int, ids: torch.Tensor
    ) -> torch.Tensor:
        """STEP pooling of sequence ``row`` (spec §3.2): ``value`` [seq_len, k] -> [num_tagged, len(cols)],
        the columns ``returned_token_ids`` (if any) of the rows whose token is ``step_tag_id`` (if set)."""
        tag = params.step_tag_id if params.step_tag_id is not None else self.spec.step_tag_id
        cols = params.returned_token_ids if params.returned_token_ids is not None else self.spec.returned_token_ids
        if cols:
            value = value[:, list(cols)]  # [seq_len, len(cols)]
        if tag is not None:
            start = batch.host_starts[row]
            prompt = ids[start : start + batch.seq_lens[row]]  # [seq_len] this sequence's token ids
            value = value[prompt == tag]  # [num_tagged, ..]
        return value


def _select_rows(activated: torch.Tensor, raw: torch.Tensor, use_act: list[bool]) -> torch.Tensor:
    """Row i of ``activated`` where ``use_act[i]``, else of ``raw``; both [n, k], ``use_act`` n long."""
    if all(use_act):
        return activated
    if not any(use_act):
        return raw
    # [n] -> [n, 1]: one flag per row, broadcast over the row's columns.
    mask = to_device(use_act, raw.device, torch.bool).view(-1, *([1] * (raw.ndim - 1)))
    return torch.where(mask, activated, raw)  # [n, k]
