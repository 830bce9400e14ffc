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
# the thread-pool environment before torch's OpenMP runtime reads it. Each name in ``__all__``
# lives in one of these modules (the TYPE_CHECKING imports above say which).
_MODULES = ("winnow.errors", "winnow.params", "winnow.outputs", "winnow.llm")


def __getattr__(name: str) -> _typing.Any:
    if name in __all__:
        for module_name in _MODULES:
            module = _importlib.import_module(module_name)
            if hasattr(module, name):
                globals()[name] = value = getattr(module, name)
                return value
    raise AttributeError(f"module 'winnow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
