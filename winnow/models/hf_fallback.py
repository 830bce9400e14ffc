"""The slow path: architectures without a native implementation run through transformers' own classes.

The packed batch is unpacked into a right-padded ``[num_seqs, max_len]`` batch for transformers,
and its outputs are packed again, so the pooler applies winnow's head semantics (calibration,
activation, per-request options) exactly as for native models. A sequence classifier returns
one row of logits per sequence (``returns_pooled``); a token classifier returns per-token logits;
a bare encoder returns hidden states for the pooler to pool.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from winnow.errors import ModelLoadError
from winnow.models.base import ModelBase
from winnow.runner.batch import Batch, build_batch, to_device

if TYPE_CHECKING:
    from winnow.config import ModelConfig

logger = logging.getLogger(__name__)


class HFFallbackModel(ModelBase):
    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        super().__init__()
        import transformers

        kind = config.entry.kind
        auto_class = {
            "sequence_classifier": transformers.AutoModelForSequenceClassification,
            "token_classifier": transformers.AutoModelForTokenClassification,
            "encoder": transformers.AutoModel,
        }[kind]
        try:
            model, info = auto_class.from_pretrained(
                str(config.path),
                config=config.hf_config,
                dtype=config.dtype,
                output_loading_info=True,
                trust_remote_code=config.trust_remote_code,
            )
        except Exception as e:
            raise ModelLoadError(f"transformers could not load {config.path}: {type(e).__name__}: {e}") from e
        if info.get("missing_keys"):
            raise ModelLoadError(f"The checkpoint is missing weights: {sorted(info['missing_keys'])[:8]}.")
        self.hf_model = model.to(device).eval().requires_grad_(False)
        self.kind = kind
        self.returns_pooled = kind == "sequence_classifier"
        pad = getattr(config.hf_config, "pad_token_id", None)
        # Without a pad token transformers cannot find each row's last token: run rows one by one.
        self.pad_token_id: int | None = int(pad) if pad is not None else None
        # Pass token types exactly when the tokenizer produces them, as a transformers pipeline would.
        self.uses_token_types = config.tokenizer_gives_token_types

    def forward(self, batch: Batch) -> torch.Tensor:
        if self.pad_token_id is None and batch.num_seqs > 1 and self.returns_pooled:
            return torch.cat([self._run(_single(batch, i)) for i in range(batch.num_seqs)])
        return self._run(batch)

    def _run(self, batch: Batch) -> torch.Tensor:
        num_seqs, max_len = batch.num_seqs, batch.max_seqlen
        flat_index = _grid_index(batch)  # [num_tokens] row of each token in the padded grid
        ids = batch.input_ids.new_full((num_seqs * max_len,), self.pad_token_id or 0)
        ids[flat_index] = batch.input_ids
        mask = torch.zeros(num_seqs * max_len, dtype=torch.long, device=ids.device)
        mask[flat_index] = 1
        kwargs: dict[str, Any] = {
            "input_ids": ids.view(num_seqs, max_len),
            "attention_mask": mask.view(num_seqs, max_len),
        }
        if self.uses_token_types:
            types = torch.zeros_like(ids)
            if batch.token_type_ids is not None:
                types[flat_index] = batch.token_type_ids
            kwargs["token_type_ids"] = types.view(num_seqs, max_len)
        out = self.hf_model(**kwargs)
        if self.kind == "sequence_classifier":
            return out.logits  # [num_seqs, num_labels]
        rows = out.logits if self.kind == "token_classifier" else out.last_hidden_state  # [num_seqs, max_len, k]
        return rows.reshape(num_seqs * max_len, -1).index_select(0, flat_index)  # [num_tokens, k]

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden  # transformers already applied the token classifier


def _grid_index(batch: Batch) -> torch.Tensor:
    """[num_tokens] row of each token in a right-padded [num_seqs, max_seqlen] grid. Built on the host
    from the lengths and uploaded once: on a GPU, building it there from the lengths would wait for
    the device (a host tensor's upload and ``repeat_interleave``'s output size)."""
    rows = np.concatenate([np.arange(n) + i * batch.max_seqlen for i, n in enumerate(batch.seq_lens)])
    return to_device(rows, batch.input_ids.device, torch.int64)


def _single(batch: Batch, i: int) -> Batch:
    start, n = batch.host_starts[i], batch.seq_lens[i]
    sl = slice(start, start + n)
    types = None if batch.token_type_ids is None else batch.token_type_ids[sl]
    return build_batch(
        [batch.input_ids[sl].tolist()], [None if types is None else types.tolist()], batch.input_ids.device
    )
