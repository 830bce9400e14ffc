"""Result objects returned by ``LLM`` (the shapes of ``vllm.outputs``).

Every request output carries ``request_id``, the ``prompt_token_ids`` the model actually saw
(after truncation and special tokens) and ``outputs``, whose type depends on the call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch

_O = TypeVar("_O")


@dataclass(frozen=True)
class PoolingOutput:
    """Raw pooled output: classify ``[num_labels]``, token tasks ``[num_tokens, k]``, embed ``[dim]``."""

    data: torch.Tensor


@dataclass(frozen=True)
class ClassificationOutput:
    """Class probabilities (or calibrated logits when ``use_activation=False``)."""

    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)

    @staticmethod
    def from_base(output: PoolingOutput) -> ClassificationOutput:
        if output.data.ndim != 1:
            raise ValueError(f"classify expects a 1-D output, got shape {tuple(output.data.shape)}")
        return ClassificationOutput(output.data.tolist())


@dataclass(frozen=True)
class ScoringOutput:
    """One relevance score for a (query, document) pair."""

    score: float

    @staticmethod
    def from_base(output: PoolingOutput) -> ScoringOutput:
        if output.data.numel() != 1:
            raise ValueError(f"score expects a scalar output, got shape {tuple(output.data.shape)}")
        return ScoringOutput(float(output.data.reshape(()).item()))


@dataclass(frozen=True)
class EmbeddingOutput:
    """One embedding vector (L2-normalised unless ``use_activation=False``)."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)

    @staticmethod
    def from_base(output: PoolingOutput) -> EmbeddingOutput:
        if output.data.ndim != 1:
            raise ValueError(f"embed expects a 1-D output, got shape {tuple(output.data.shape)}")
        return EmbeddingOutput(output.data.tolist())


@dataclass(frozen=True)
class PoolingRequestOutput(Generic[_O]):
    """The result of one prompt (or one scored pair)."""

    request_id: str
    outputs: _O
    prompt_token_ids: list[int]
    num_cached_tokens: int = 0
    finished: bool = True
    error: str | None = field(default=None, repr=False)


_R = TypeVar("_R", bound="_TypedRequestOutput[Any]")


@dataclass(frozen=True)
class _TypedRequestOutput(PoolingRequestOutput[_O]):
    """A request output whose ``outputs`` are one typed view of a ``PoolingOutput`` (``outputs_class``).
    Real subclasses, as in vLLM, so that ``isinstance`` checks and ``from_base`` work."""

    outputs_class: ClassVar[type[ClassificationOutput] | type[ScoringOutput] | type[EmbeddingOutput]]

    @classmethod
    def from_base(cls: type[_R], result: PoolingRequestOutput[PoolingOutput]) -> _R:
        return cls(result.request_id, cls.outputs_class.from_base(result.outputs), result.prompt_token_ids)


@dataclass(frozen=True)
class ClassificationRequestOutput(_TypedRequestOutput[ClassificationOutput]):
    outputs_class = ClassificationOutput


@dataclass(frozen=True)
class ScoringRequestOutput(_TypedRequestOutput[ScoringOutput]):
    outputs_class = ScoringOutput


@dataclass(frozen=True)
class EmbeddingRequestOutput(_TypedRequestOutput[EmbeddingOutput]):
    outputs_class = EmbeddingOutput
