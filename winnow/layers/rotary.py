"""Rotary position embeddings (the rotate-half form of Llama, Qwen, Gemma and ModernBERT).

Tables are computed per forward pass from the packed batch's positions, so every token gets the
rotation of its own position in its own sequence. Scaled variants (linear, llama3, yarn...) take
their frequencies from transformers' own rope initialisers, so they match by construction.
"""

from __future__ import annotations

from typing import Any

import torch

from winnow.errors import ModelLoadError


class RotaryEmbedding:
    def __init__(self, inv_freq: torch.Tensor, scaling: float = 1.0) -> None:
        self.inv_freq = inv_freq.float()  # [head_dim / 2], on the CPU
        self.scaling = scaling
        # A copy per device, made on first use: a copy per call would synchronise a GPU's stream.
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @staticmethod
    def from_config(config: Any, head_dim: int, layer_type: str | None = None) -> RotaryEmbedding:
        """Frequencies from ``config.rope_parameters`` (per ``layer_type`` when the config nests them)."""
        params = dict(getattr(config, "rope_parameters", None) or {})
        if layer_type is not None and isinstance(params.get(layer_type), dict):
            params = params[layer_type]
        rope_type = params.get("rope_type", "default")
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        if rope_type == "default":
            # On the CPU explicitly: models are built under torch.device("meta"), which would capture this.
            steps = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu")
            inv_freq = 1.0 / (float(theta) ** (steps / head_dim))
            return RotaryEmbedding(inv_freq)
        if rope_type == "dynamic":
            raise ModelLoadError("Dynamic RoPE scaling depends on the sequence length and is not supported natively.")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ModelLoadError(f"RoPE type {rope_type!r} is not supported.")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device=torch.device("cpu"), layer_type=layer_type)
        return RotaryEmbedding(inv_freq, float(scaling))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[num_tokens] positions -> cos, sin tables [num_tokens, head_dim], computed in float32."""
        inv_freq = self._on_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._on_device[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * inv_freq  # [T, head_dim / 2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
        return (angles.cos() * self.scaling).to(dtype), (angles.sin() * self.scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: [num_tokens, heads, head_dim]; ``cos``, ``sin``: [num_tokens, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
