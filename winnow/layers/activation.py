"""Hidden activations by the names Hugging Face configs use (``hidden_act``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from winnow.errors import ModelLoadError


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# "gelu" is the exact erf form; "gelu_new", "gelu_fast" and "gelu_pytorch_tanh" are the tanh
# approximation, which torch computes in one fused kernel.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ModelLoadError(
            f"hidden_act={name!r} is not supported natively; known: {', '.join(sorted(_ACTIVATIONS))}."
        ) from None


def is_supported_activation(name: object) -> bool:
    return isinstance(name, str) and name in _ACTIVATIONS
