"""winnow: a fast serving engine for transformer classification models.

Public API (vLLM shapes): ``LLM``, ``PoolingParams``, ``PoolerConfig`` and the output classes.
"""

from winnow.errors import (
    ConfigError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidInputError,
    ModelLoadError,
    PromptTooLongError,
    UnsupportedTaskError,
    WinnowError,
)
from winnow.llm import LLM
from winnow.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from winnow.params import PoolerConfig, PoolingParams, PoolingType

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "ClassificationOutput",
    "ClassificationRequestOutput",
    "ConfigError",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "EngineDeadError",
    "EngineOverloadedError",
    "InvalidInputError",
    "ModelLoadError",
    "PoolerConfig",
    "PoolingOutput",
    "PoolingParams",
    "PoolingRequestOutput",
    "PoolingType",
    "PromptTooLongError",
    "ScoringOutput",
    "ScoringRequestOutput",
    "UnsupportedTaskError",
    "WinnowError",
    "__version__",
]
