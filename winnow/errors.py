"""Exceptions raised by winnow.

Every error a user can cause is a ``ValueError`` subclass whose message says what to change
(older vLLM clients and tests catch ``ValueError``). The server maps these classes to HTTP
status codes in one table (``winnow/server/errors.py``).

    WinnowError
    ├── InvalidInputError (ValueError)   a request is wrong: empty, too long, bad params, wrong task
    │   ├── PromptTooLongError           a prompt exceeds max_model_len and truncation is off
    │   └── UnsupportedTaskError         the model cannot serve the requested task (or not now)
    ├── ConfigError (ValueError)         the engine or pooler configuration is wrong
    ├── ModelLoadError (ValueError)      the model folder is incomplete, corrupt or unsupported
    ├── EngineOverloadedError            too many requests are waiting (the server answers 429)
    └── EngineDeadError                  the engine loop stopped; no further requests are served
"""

from __future__ import annotations


class WinnowError(Exception):
    """Base class of every error winnow raises on purpose."""


class InvalidInputError(WinnowError, ValueError):
    """A request cannot be served as given. ``param`` names the offending field when known."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidInputError):
    """A prompt is longer than ``max_model_len`` and no truncation was asked for."""


class UnsupportedTaskError(InvalidInputError):
    """The model does not support the task, or serves a different active task."""


class ConfigError(WinnowError, ValueError):
    """An engine, pooler or model option is invalid or inconsistent."""


class ModelLoadError(WinnowError, ValueError):
    """The model cannot be loaded: missing files, corrupt weights, unknown architecture."""


class EngineOverloadedError(WinnowError):
    """The engine's queue is full; retry later."""


class EngineDeadError(WinnowError):
    """The engine loop has stopped (shut down or crashed)."""
