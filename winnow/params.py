"""User-facing options: pooling tasks, ``PoolerConfig`` (per model) and ``PoolingParams`` (per request).

Legacy spellings that older vLLM clients still send (``softmax``, ``activation``, ``normalize``,
``logit_bias``, ``logit_scale``, ``pooling_task``) are translated here, once, at construction.
Nothing downstream ever sees them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import InitVar, dataclass
from enum import Enum
from typing import Any, Literal, get_args

from winnow.errors import ConfigError, InvalidInputError

PoolingTask = Literal["classify", "token_classify", "embed", "token_embed"]
POOLING_TASKS: tuple[PoolingTask, ...] = get_args(PoolingTask)
TOKEN_TASKS: frozenset[str] = frozenset({"token_classify", "token_embed"})
CLASSIFY_TASKS: frozenset[str] = frozenset({"classify", "token_classify"})
EMBED_TASKS: frozenset[str] = frozenset({"embed", "token_embed"})

# Which per-request parameters each task accepts (vLLM 0.33 semantics).
_TASK_PARAMS: dict[str, tuple[str, ...]] = {
    "classify": ("use_activation",),
    "token_classify": ("use_activation",),
    "embed": ("dimensions", "use_activation"),
    "token_embed": ("dimensions", "use_activation"),
}


class PoolingType(str, Enum):
    """How hidden states become the head's input. CLS/LAST/MEAN pool a sequence; ALL/STEP keep tokens."""

    CLS = "CLS"
    LAST = "LAST"
    MEAN = "MEAN"
    ALL = "ALL"
    STEP = "STEP"

    @property
    def is_sequence(self) -> bool:
        return self in (PoolingType.CLS, PoolingType.LAST, PoolingType.MEAN)


def check_task(task: str, *, param: str = "task") -> PoolingTask:
    """Validate a task name, rejecting the removed ``score``/``encode`` tasks with vLLM's advice."""
    if task == "score":
        raise InvalidInputError("`score` task was removed; use `classify` instead.", param=param)
    if task == "encode":
        raise InvalidInputError(
            "`encode` task was removed; use `token_embed` or `token_classify` instead.", param=param
        )
    if task == "plugin":
        raise InvalidInputError(
            f"No IOProcessor plugin installed. winnow has no plugin tasks; use one of {', '.join(POOLING_TASKS)}.",
            param=param,
        )
    if task not in POOLING_TASKS:
        raise InvalidInputError(
            f"Unknown pooling task {task!r}; choose one of {', '.join(POOLING_TASKS)}.", param=param
        )
    return task


def _parse_pooling_type(value: str | PoolingType | None, name: str) -> PoolingType | None:
    if value is None or isinstance(value, PoolingType):
        return value
    try:
        return PoolingType(str(value).upper())
    except ValueError:
        options = ", ".join(t.value for t in PoolingType)
        raise ConfigError(f"{name}={value!r} is not a pooling type; choose one of {options}.") from None


def _check_bool(value: Any, name: str) -> bool | None:
    # NOTE: only a real bool: a string such as "false" is truthy and would silently mean True.
    if value is None or isinstance(value, bool):
        return value
    raise InvalidInputError(f"{name} must be a bool (True or False; JSON true or false), got {value!r}.", param=name)


def _check_int(value: Any, name: str, *, minimum: int) -> int | None:
    return None if value is None else _to_int(value, name, minimum=minimum)


def _to_int(value: Any, name: str, *, minimum: int) -> int:
    """An integer (numpy and 0-d torch integers too, as a Python int) of at least ``minimum``."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}.", param=name)
    return number


def _check_number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        number = None if isinstance(value, bool) or not isinstance(value, numbers.Real) else float(value)
    except OverflowError:  # an int beyond float's range
        number = None
    if number is None or not math.isfinite(number):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r}.", param=name)
    return number


def _check_token_ids(value: Any, name: str) -> list[int] | None:
    """A list or tuple of non-negative integers (output columns for STEP pooling)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise InvalidInputError(f"{name} must be a list of integers, got {value!r}.", param=name)
    return [_to_int(v, f"{name}[{i}]", minimum=0) for i, v in enumerate(value)]


def _check_task_or_none(value: Any, name: str) -> PoolingTask | None:
    return None if value is None else check_task(value, param=name)


@contextmanager
def _as_config_errors() -> Iterator[None]:
    """PoolerConfig shares PoolingParams' checks; in a model's configuration they are ConfigErrors."""
    try:
        yield
    except InvalidInputError as e:
        raise ConfigError(str(e)) from None


def _fold_use_activation(
    value: bool | None, softmax: bool | None, activation: bool | None, normalize: bool | None
) -> bool | None:
    """``use_activation``, or the one legacy spelling given instead (each checked to be a bool)."""
    aliases = {"softmax": softmax, "activation": activation, "normalize": normalize}
    return _merge_alias(value, aliases, "use_activation", _check_bool)


def _merge_alias(canonical: Any, aliases: dict[str, Any], canonical_name: str, check: Callable[[Any, str], Any]) -> Any:
    """Return the canonical value, taking a legacy alias if only the alias was set. Each value is
    first passed through ``check`` under the name the caller used."""
    canonical = check(canonical, canonical_name)
    given = {name: check(value, name) for name, value in aliases.items() if value is not None}
    if not given:
        return canonical
    names = ", ".join(f"`{n}`" for n in given)
    warnings.warn(
        f"{names} is a legacy spelling of `{canonical_name}`; use `{canonical_name}` instead.",
        DeprecationWarning,
        stacklevel=4,
    )
    values = set(given.values()) | ({canonical} if canonical is not None else set())
    if len(values) > 1:
        raise ConfigError(f"Conflicting values for `{canonical_name}` and its legacy alias {names}.")
    return next(iter(given.values()))


@dataclass(frozen=True, kw_only=True)
class PoolerConfig:
    """Model-level pooling options (vLLM's ``PoolerConfig``). ``None`` means "use the model's default".

    ``task`` selects the active pooling task; ``pooling_type`` fills ``seq_pooling_type`` or
    ``tok_pooling_type`` depending on its granularity. ``logit_mean``/``logit_sigma`` calibrate
    classifier logits as ``(z - mean) / sigma`` before the activation.
    """

    task: PoolingTask | None = None
    pooling_type: PoolingType | None = None
    seq_pooling_type: PoolingType | None = None
    tok_pooling_type: PoolingType | None = None
    use_activation: bool | None = None
    logit_mean: float | None = None
    logit_sigma: float | None = None
    step_tag_id: int | None = None
    returned_token_ids: tuple[int, ...] | None = None
    dimensions: int | None = None
    # Legacy spellings, translated in __post_init__.
    softmax: InitVar[bool | None] = None
    activation: InitVar[bool | None] = None
    normalize: InitVar[bool | None] = None
    logit_bias: InitVar[float | None] = None
    logit_scale: InitVar[float | None] = None
    pooling_task: InitVar[str | None] = None

    def __post_init__(
        self,
        softmax: bool | None,
        activation: bool | None,
        normalize: bool | None,
        logit_bias: float | None,
        logit_scale: float | None,
        pooling_task: str | None,
    ) -> None:
        # NOTE: object.__setattr__ only during construction, to fold legacy aliases into the
        # canonical fields and store checked values; the object is immutable once __init__ returns.
        setattr_ = object.__setattr__
        with _as_config_errors():
            setattr_(self, "use_activation", _fold_use_activation(self.use_activation, softmax, activation, normalize))
            mean = _merge_alias(self.logit_mean, {"logit_bias": logit_bias}, "logit_mean", _check_number)
            setattr_(self, "logit_mean", mean)
            scale = _check_number(logit_scale, "logit_scale")
            if scale == 0:
                raise ConfigError("logit_scale must not be 0.")
            inverse = {"logit_scale": None if scale is None else 1.0 / scale}
            setattr_(self, "logit_sigma", _merge_alias(self.logit_sigma, inverse, "logit_sigma", _check_number))
            task = _merge_alias(self.task, {"pooling_task": pooling_task}, "task", _check_task_or_none)
            setattr_(self, "task", task)
            setattr_(self, "step_tag_id", _check_int(self.step_tag_id, "step_tag_id", minimum=0))
            token_ids = _check_token_ids(self.returned_token_ids, "returned_token_ids")
            setattr_(self, "returned_token_ids", None if token_ids is None else tuple(token_ids))
            setattr_(self, "dimensions", _check_int(self.dimensions, "dimensions", minimum=1))
        for name in ("pooling_type", "seq_pooling_type", "tok_pooling_type"):
            setattr_(self, name, _parse_pooling_type(getattr(self, name), name))
        if self.pooling_type is not None:
            if self.seq_pooling_type is not None or self.tok_pooling_type is not None:
                raise ConfigError("Set either `pooling_type` or `seq_pooling_type`/`tok_pooling_type`, not both.")
            target = "seq_pooling_type" if self.pooling_type.is_sequence else "tok_pooling_type"
            setattr_(self, target, self.pooling_type)
        if self.seq_pooling_type is not None and not self.seq_pooling_type.is_sequence:
            raise ConfigError(f"seq_pooling_type must be CLS, LAST or MEAN, not {self.seq_pooling_type.value}.")
        if self.tok_pooling_type is not None and self.tok_pooling_type.is_sequence:
            raise ConfigError(f"tok_pooling_type must be ALL or STEP, not {self.tok_pooling_type.value}.")
        if self.logit_sigma is not None and self.logit_sigma == 0:
            raise ConfigError("logit_sigma must not be 0.")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PoolerConfig:
        """Build from JSON (CLI ``--pooler-config``), rejecting unknown keys with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)} | {
            "softmax",
            "activation",
            "normalize",
            "logit_bias",
            "logit_scale",
            "pooling_task",
        }
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"Unknown pooler config keys {unknown}; known keys: {sorted(known)}.")
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class PoolingParams:
    """Per-request options (vLLM's ``PoolingParams``).

    ``use_activation``: classify tasks apply softmax/sigmoid (see ``layers/pooling.py``), embed tasks
    L2-normalise; ``None`` takes the model default. ``dimensions`` truncates Matryoshka embeddings.
    ``extra_kwargs`` carries scoring options ``max_tokens_per_query`` / ``max_tokens_per_doc``.
    """

    use_activation: bool | None = None
    dimensions: int | None = None
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None
    extra_kwargs: dict[str, Any] | None = None
    task: PoolingTask | None = None
    softmax: InitVar[bool | None] = None
    activation: InitVar[bool | None] = None
    normalize: InitVar[bool | None] = None

    def __post_init__(self, softmax: bool | None, activation: bool | None, normalize: bool | None) -> None:
        # NOTE: object.__setattr__ only during construction (legacy alias folding, checked values),
        # as in PoolerConfig.
        setattr_ = object.__setattr__
        setattr_(self, "use_activation", _fold_use_activation(self.use_activation, softmax, activation, normalize))
        setattr_(self, "task", _check_task_or_none(self.task, "task"))
        setattr_(self, "dimensions", _check_int(self.dimensions, "dimensions", minimum=1))
        setattr_(self, "step_tag_id", _check_int(self.step_tag_id, "step_tag_id", minimum=0))
        setattr_(self, "returned_token_ids", _check_token_ids(self.returned_token_ids, "returned_token_ids"))
        if self.extra_kwargs is not None and not isinstance(self.extra_kwargs, dict):
            raise InvalidInputError(
                f"extra_kwargs must be a dict, got {type(self.extra_kwargs).__name__}.", param="extra_kwargs"
            )

    def set_fields(self) -> list[str]:
        """Names of the task-specific parameters the user actually set."""
        names = ("use_activation", "dimensions", "step_tag_id", "returned_token_ids")
        return [n for n in names if getattr(self, n) is not None]

    def with_task(self, task: PoolingTask) -> PoolingParams:
        """A copy bound to ``task``; refuses to silently change a task the caller already set."""
        if self.task is not None and self.task != task:
            raise InvalidInputError(f"You cannot overwrite self.task={self.task!r} with task={task!r}!")
        return dataclasses.replace(self, task=task)

    def check_for_task(self, task: str, *, step_pooling: bool) -> None:
        """Reject parameters that do not apply to ``task`` (vLLM's wording)."""
        allowed = list(_TASK_PARAMS[task])
        if step_pooling and task in TOKEN_TASKS:
            allowed += ["step_tag_id", "returned_token_ids"]
        bad = [n for n in self.set_fields() if n not in allowed]
        if bad:
            raise InvalidInputError(
                f"Task {task!r} only supports {allowed} parameters, does not support {bad} parameters"
            )
