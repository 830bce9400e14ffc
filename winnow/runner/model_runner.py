"""The model runner: owns the model on its device, turns requests into a ``Batch``, runs the forward
pass and the pooler under ``torch.inference_mode``, and returns one CPU tensor per request.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from winnow.layers.pooling import Pooler
from winnow.models.files import find_weight_files
from winnow.models.loader import load_weights
from winnow.runner.batch import build_batch

if TYPE_CHECKING:
    from winnow.config import ModelConfig
    from winnow.engine.request import Request

logger = logging.getLogger(__name__)


def load_model(config: ModelConfig, device: torch.device) -> nn.Module:
    """Build the registry's class for ``config`` with its weights, on ``device``."""
    entry = config.entry
    if not entry.is_native:
        from winnow.models.hf_fallback import HFFallbackModel

        return HFFallbackModel(config, device)
    return load_weights(
        entry.load_class(),
        config.hf_config,
        find_weight_files(config.path),
        dtype=config.dtype,
        head_dtype=config.pooler.head_dtype,
        device=device,
    )


class ModelRunner:
    def __init__(self, config: ModelConfig, device: torch.device, model: nn.Module | None = None) -> None:
        self.config = config
        self.device = device
        self.model = model if model is not None else load_model(config, device)
        self.pooler = Pooler(config.pooler, self.model)
        # The transformers fallback pads every layer; native models pad inside attention only.
        self.pads_dense_layers = not config.entry.is_native

    @torch.inference_mode()
    def execute(self, requests: list[Request]) -> list[torch.Tensor]:
        batch = build_batch(
            [r.prompt.token_ids for r in requests],
            [r.prompt.token_type_ids for r in requests],
            self.device,
            needs_padded_view=True,
        )
        hidden = self.model(batch)  # [num_tokens, hidden]
        return self.pooler(hidden, batch, [r.params for r in requests])
