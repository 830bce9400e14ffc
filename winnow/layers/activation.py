"""Hidden activations by the names Hugging Face configs use (``hidden_act``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from winnow.errors import ModelLoadError


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


@dataclass(frozen=True)
class Activation:
    """An elementwise activation, and the oneDNN post-op (name, algorithm) that computes the same
    function inside a packed CPU GEMM (``layers/linear.py: linear_act``); None: no such post-op."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    onednn: tuple[str, str] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


# "gelu" is the exact erf form; "gelu_new", "gelu_fast" and "gelu_pytorch_tanh" are the tanh
# approximation, which torch computes in one fused kernel.
_GELU_TANH = Activation(_gelu_tanh, ("gelu", "tanh"))
_SILU = Activation(F.silu, ("swish", ""))
_ACTIVATIONS: dict[str, Activation] = {
    "gelu": Activation(F.gelu, ("gelu", "none")),
    "gelu_new": _GELU_TANH,
    "gelu_fast": _GELU_TANH,
    "gelu_pytorch_tanh": _GELU_TANH,
    "quick_gelu": Activation(_quick_gelu),
    "relu": Activation(F.relu, ("relu", "")),
    "silu": _SILU,
    "swish": _SILU,
    "tanh": Activation(torch.tanh, ("tanh", "")),
}


def get_activation(name: str) -> Activation:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ModelLoadError(
            f"hidden_act={name!r} is not supported natively; known: {', '.join(sorted(_ACTIVATIONS))}."
        ) from None


def is_supported_activation(name: object) -> bool:
    return isinstance(name, str) and name in _ACTIVATIONS
