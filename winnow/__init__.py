"""winnow: a fast serving engine for transformer classification models.

Public API (vLLM shapes): ``LLM``, ``PoolingParams``, ``PoolerConfig`` and the output classes.
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load lazily, below
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

# Names resolve on first use (PEP 562), so ``import winnow.cli`` does not load torch: the CLI sets
# the thread-pool environment before torch's OpenMP runtime reads it.
_EXPORTS = {
    "LLM": "winnow.llm",
    **dict.fromkeys(
        [
            "ConfigError",
            "EngineDeadError",
            "EngineOverloadedError",
            "InvalidInputError",
            "ModelLoadError",
            "PromptTooLongError",
            "UnsupportedTaskError",
            "WinnowError",
        ],
        "winnow.errors",
    ),
    **dict.fromkeys(
        [
            "ClassificationOutput",
            "ClassificationRequestOutput",
            "EmbeddingOutput",
            "EmbeddingRequestOutput",
            "PoolingOutput",
            "PoolingRequestOutput",
            "ScoringOutput",
            "ScoringRequestOutput",
        ],
        "winnow.outputs",
    ),
    **dict.fromkeys(["PoolerConfig", "PoolingParams", "PoolingType"], "winnow.params"),
}


def __getattr__(name: str) -> _typing.Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'winnow' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
