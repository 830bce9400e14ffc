"""Resolved configuration: the one place where Hugging Face and sentence-transformers quirks become
plain values. Everything "auto" is decided here, before the frozen objects exist.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from winnow.errors import ConfigError, InvalidInputError, ModelLoadError, UnsupportedTaskError
from winnow.layers.linear import cpu_has_fast, cpu_has_fp16_weights
from winnow.layers.pooling import HeadActivation, PoolerSpec
from winnow.models.base import TokenScoreHead
from winnow.models.registry import ModelEntry
from winnow.params import (
    CLASSIFY_TASKS,
    EMBED_TASKS,
    TOKEN_TASKS,
    PoolerConfig,
    PoolingParams,
    PoolingTask,
    PoolingType,
)

logger = logging.getLogger(__name__)

# Active-task priority when the user does not choose one (vLLM 0.33 §1.3).
_TASK_PRIORITY: tuple[PoolingTask, ...] = ("embed", "classify", "token_embed", "token_classify")
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_ST_POOLING_KEYS = {
    "pooling_mode_cls_token": PoolingType.CLS,
    "pooling_mode_mean_tokens": PoolingType.MEAN,
    "pooling_mode_lasttoken": PoolingType.LAST,
}
_ST_POOLING_NAMES = {"cls": PoolingType.CLS, "mean": PoolingType.MEAN, "lasttoken": PoolingType.LAST}
_ST_SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")
# Fallback model types with RoBERTa's position ids, which start after the pad id: a checkpoint's
# max_position_embeddings (514) holds pad_token_id + 1 positions no prompt can use (512 usable).
_PAD_OFFSET_POSITIONS = frozenset(
    {"camembert", "mpnet", "longformer", "data2vec-text", "xmod", "roberta-prelayernorm", "ibert", "markuplm"}
)
_PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")

HFOverrides = Mapping[str, Any] | Callable[[Any], Any]


@dataclass(frozen=True)
class SentenceTransformersInfo:
    """What a sentence-transformers folder says about pooling, normalisation and input handling."""

    pooling: PoolingType | None = None
    normalize: bool | None = None  # None: the folder has no modules.json
    max_seq_length: int | None = None
    do_lower_case: bool = False

    @staticmethod
    def read(folder: Path) -> SentenceTransformersInfo:
        bert_cfg = _read_json(folder / "sentence_bert_config.json") or {}
        modules = _read_json(folder / "modules.json")
        pooling, normalize = None, None
        if isinstance(modules, list):
            types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
            unsupported = [t for t in types if t not in _ST_SUPPORTED_MODULES]
            if unsupported:
                raise ModelLoadError(
                    f"modules.json uses sentence-transformers modules winnow does not run yet: {unsupported}."
                )
            if "Pooling" in types:
                path = modules[types.index("Pooling")].get("path", "")
                pooling = _st_pooling_mode(_read_json(folder / path / "config.json") or {})
                normalize = "Normalize" in types
        max_len = bert_cfg.get("max_seq_length")
        return SentenceTransformersInfo(
            pooling=pooling,
            normalize=normalize,
            max_seq_length=int(max_len) if max_len else None,
            do_lower_case=bool(bert_cfg.get("do_lower_case", False)),
        )


def _st_pooling_mode(cfg: Mapping[str, Any]) -> PoolingType:
    if isinstance(cfg.get("pooling_mode"), str):
        name = cfg["pooling_mode"].lower()
        if name in _ST_POOLING_NAMES:
            return _ST_POOLING_NAMES[name]
        raise ModelLoadError(f"sentence-transformers pooling_mode {name!r} is not supported (cls, mean, lasttoken).")
    chosen = [mode for key, mode in _ST_POOLING_KEYS.items() if cfg.get(key)]
    others = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in _ST_POOLING_KEYS]
    if len(chosen) != 1 or others:
        raise ModelLoadError(
            f"sentence-transformers pooling {sorted(k for k, v in cfg.items() if v is True)} is not supported: "
            "winnow pools with exactly one of cls, mean or lasttoken."
        )
    return chosen[0]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def load_hf_config(path: Path, *, overrides: HFOverrides | None, trust_remote_code: bool) -> Any:
    """Read config.json with transformers and apply ``hf_overrides`` before anything looks at it."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"Could not read {path / 'config.json'}: {type(e).__name__}: {e}") from e
    if overrides is None:
        return config
    if callable(overrides):
        return overrides(config)
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"hf_overrides must be a dict (or a callable), not a {type(overrides).__name__}.")
    values = dict(overrides)
    # num_labels first: transformers rebuilds id2label from it; an explicit id2label then wins.
    num_labels = _override_num_labels(values.pop("num_labels")) if "num_labels" in values else None
    if num_labels is not None:
        config.num_labels = num_labels
    if "id2label" in values:
        config.id2label = _override_id2label(values.pop("id2label"), num_labels)
        config.label2id = {v: k for k, v in config.id2label.items()}
    if "problem_type" in values:
        _check_problem_type(values["problem_type"])
    for key, value in values.items():
        try:
            setattr(config, key, value)
        except Exception as e:  # newer transformers configs validate their fields (strict dataclasses)
            raise ConfigError(f"hf_overrides {key}={value!r} is refused by the model's config: {e}") from e
    return config


def _override_num_labels(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ConfigError(f"hf_overrides num_labels must be a positive integer, got {value!r}.")


def _override_id2label(value: Any, num_labels: int | None) -> dict[int, str]:
    """Label names by output index: the keys must be 0..n-1 (ints, or their strings as JSON has them)."""
    if not isinstance(value, Mapping):
        raise ConfigError(
            f'hf_overrides id2label must be a dict such as {{0: "negative", 1: "positive"}}, got {value!r}.'
        )
    id2label: dict[int, str] = {}
    for key, label in value.items():
        index = _label_index(key)
        if index is None or not isinstance(label, str):
            raise ConfigError(
                f'hf_overrides id2label maps an output index to a label name, such as {{0: "negative"}}; '
                f"got {key!r}: {label!r}."
            )
        id2label[index] = label
    if sorted(id2label) != list(range(len(id2label))):
        raise ConfigError(f"hf_overrides id2label keys must be 0..{len(id2label) - 1}, got {sorted(id2label)}.")
    if num_labels is not None and num_labels != len(id2label):
        raise ConfigError(f"hf_overrides num_labels={num_labels} but id2label has {len(id2label)} labels.")
    return id2label


def _label_index(key: Any) -> int | None:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.isascii() and key.isdigit():  # JSON object keys are strings
        return int(key)
    return None


def _check_problem_type(problem: Any) -> Any:
    # Unchecked, a misspelt problem_type (hf_overrides) silently fell back to the default activation.
    if problem is not None and problem not in _PROBLEM_TYPES:
        raise ConfigError(f"problem_type={problem!r} is not one of {', '.join(_PROBLEM_TYPES)}.")
    return problem


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N.") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was requested but no CUDA GPU is available; use device='cpu'.")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r} is not supported; use auto, cpu or cuda.")
    return resolved


def auto_cpu_dtype() -> torch.dtype:
    """``dtype="auto"`` on this CPU: bfloat16 where it has bf16 matrix instructions, else float32."""
    return torch.bfloat16 if cpu_has_fast(torch.bfloat16) else torch.float32


def auto_cpu_fp16_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """``dtype="auto"`` on a CPU that runs it in float32 (no bf16 instructions): store the linear
    weights in float16 where FBGEMM widens them inside the GEMM (AVX2; 1.2-1.35x float32 here)."""
    return device.type == "cpu" and dtype == torch.float32 and cpu_has_fp16_weights()


def resolve_dtype(dtype: str | torch.dtype, hf_config: Any, device: torch.device) -> torch.dtype:
    """``auto`` follows vLLM for pooling models: a half-precision checkpoint keeps its dtype and a
    float32 checkpoint runs in half precision, where the hardware multiplies half-precision matrices.
    GPU: bfloat16 (float16 where bf16 is unsupported). CPU: bfloat16 only with AVX512-BF16 or AMX
    (1.6-2x float32 there); any other CPU computes in float32, never in half precision (~100x slower
    without the instructions), and on an x86 AVX2 CPU stores the linear weights in float16
    (``auto_cpu_fp16_weights``). ``float32`` gives transformers' numbers to ~1e-6; float16 weights to
    ~1e-4; bfloat16 to ~1e-3."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        if device.type == "cpu":
            return auto_cpu_dtype()
        saved = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
        saved = _DTYPES.get(str(saved).replace("torch.", "")) if saved is not None else None
        if saved in (torch.float16, torch.bfloat16):
            return saved
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise ConfigError(f"dtype={dtype!r} is not supported; use auto, float32, float16 or bfloat16.")
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"dtype={resolved} is not supported; use float32, float16 or bfloat16.")
    if device.type == "cpu" and resolved != torch.float32 and not cpu_has_fast(resolved):
        logger.warning("dtype=%s on CPU: no matrix instructions for it on this CPU; float32 is far faster.", resolved)
    return resolved


def _resolve_head_dtype(hf_config: Any, dtype: torch.dtype) -> torch.dtype:
    value = getattr(hf_config, "head_dtype", None)
    if value is None:
        return torch.float32
    if value == "model":
        return dtype
    if value in _DTYPES:
        return _DTYPES[value]
    raise ConfigError(f"head_dtype={value!r} is not supported; use model, float32, float16 or bfloat16.")


def resolve_activation(hf_config: Any) -> HeadActivation:
    """Classifier activation, chosen from problem_type, then a sentence-transformers config (spec §3.3)."""
    problem = _check_problem_type(getattr(hf_config, "problem_type", None))
    if problem == "regression":
        return HeadActivation("identity")
    if problem == "single_label_classification":
        return HeadActivation("classify")
    if problem == "multi_label_classification":
        return HeadActivation("sigmoid")
    st = getattr(hf_config, "sentence_transformers", None)
    path = st.get("activation_fn") if isinstance(st, Mapping) else None
    path = path or getattr(hf_config, "sbert_ce_default_activation_function", None)
    if path:
        return HeadActivation.from_st_path(str(path))
    return HeadActivation("classify")


@dataclass(frozen=True)
class ModelConfig:
    """A loaded model's resolved facts. Built by ``ModelConfig.create``; never mutated."""

    model: str  # what the user passed (hub id or path)
    path: Path  # the local folder
    hf_config: Any  # transformers PretrainedConfig, with hf_overrides applied
    entry: ModelEntry
    dtype: torch.dtype
    max_model_len: int
    supported_tasks: tuple[PoolingTask, ...]
    task: PoolingTask  # the active pooling task
    pooler: PoolerSpec
    num_labels: int
    id2label: dict[int, str]
    vocab_size: int
    do_lower_case: bool
    use_sep_token: bool
    is_matryoshka: bool
    hidden_size: int
    tokenizer_gives_token_types: bool  # the tokenizer returns token_type_ids (the fallback passes them on)
    token_score_head: TokenScoreHead | None = None  # classifier built from LM-head rows (spec §4.2)
    trust_remote_code: bool = False
    # float32 activations with float16-stored linear weights (layers/linear.py: Fp16WeightLinear):
    # what dtype="auto" runs on an x86 CPU without bf16 instructions.
    fp16_weights: bool = False

    @property
    def architecture(self) -> str:
        return self.entry.architecture

    @property
    def score_type(self) -> str | None:
        """cross-encoder (1-label classifier), bi-encoder (embed), late-interaction (token_embed) or None."""
        if self.task == "classify" and self.num_labels == 1:
            return "cross-encoder"
        if self.task == "embed":
            return "bi-encoder"
        if self.task == "token_embed":
            return "late-interaction"
        return None

    def require_task(self, task: PoolingTask) -> None:
        """Refuse a task this instance does not serve, with vLLM's advice on what to change."""
        supported = self.supported_tasks
        if task in EMBED_TASKS and not EMBED_TASKS & set(supported):
            raise UnsupportedTaskError(
                "Embedding API is not supported by this model. Try converting the model using `--convert embed`.",
                param="task",
            )
        if task in CLASSIFY_TASKS and not CLASSIFY_TASKS & set(supported):
            raise UnsupportedTaskError(
                "Classification API is not supported by this model. "
                "Try converting the model using `--convert classify`.",
                param="task",
            )
        if task not in supported:
            raise UnsupportedTaskError(f"Unsupported task: {task!r} Supported tasks: {supported}", param="task")
        if task != self.task:
            raise UnsupportedTaskError(
                f'Try switching the model\'s pooling_task via `PoolerConfig(task="{task}")` '
                f"(server: `--pooler-config.task {task}`); this instance serves {self.task!r}.",
                param="task",
            )

    def bind_params(self, params: PoolingParams, task: PoolingTask) -> PoolingParams:
        """Check that ``params`` apply to ``task`` on this model and return a copy bound to it."""
        params.check_for_task(task, step_pooling=self.pooler.tok_pooling is PoolingType.STEP)
        if params.dimensions is not None:
            if not self.is_matryoshka:
                raise InvalidInputError(
                    "Model does not support matryoshka representation, changing output dimensions will lead to "
                    "poor results.",
                    param="dimensions",
                )
            if params.dimensions > self.hidden_size:
                raise InvalidInputError(
                    f"dimensions={params.dimensions} exceeds the embedding size {self.hidden_size}.",
                    param="dimensions",
                )
        if params.returned_token_ids is not None:  # check_for_task allowed it: STEP pooling, a token task
            problem = _returned_ids_problem(params.returned_token_ids, self.token_columns(task, params.dimensions))
            if problem:
                raise InvalidInputError(problem, param="returned_token_ids")
        return params.with_task(task)

    def token_columns(self, task: PoolingTask, dimensions: int | None = None) -> tuple[int, str]:
        """Width of a token task's per-token output, the columns STEP's returned_token_ids pick
        from, and what the columns are."""
        if task in CLASSIFY_TASKS:
            return self.num_labels, "labels"
        return dimensions or self.hidden_size, "embedding dimensions"

    @staticmethod
    def create(
        model: str,
        path: Path,
        hf_config: Any,
        entry: ModelEntry,
        *,
        pooler_config: PoolerConfig | None,
        dtype: str | torch.dtype,
        device: torch.device,
        max_model_len: int | None,
        tokenizer_max_length: int | None,
        tokenizer_vocab_size: int,
        tokenizer_input_names: tuple[str, ...] = ("input_ids", "attention_mask"),
        token_to_id: Callable[[str], int | None] | None = None,
        trust_remote_code: bool = False,
    ) -> ModelConfig:
        pc = pooler_config or PoolerConfig()
        token_head = _token_score_head(hf_config, token_to_id) if entry.kind == "sequence_classifier" else None
        if token_head is not None:
            # The classifier is made of LM-head rows: the model's label count follows from them.
            hf_config.num_labels = token_head.num_labels
        st = SentenceTransformersInfo.read(path)
        supported = _supported_tasks(entry)
        task = _active_task(pc.task, supported, entry.architecture)
        resolved_dtype = resolve_dtype(dtype, hf_config, device)

        if not entry.is_native and entry.kind == "sequence_classifier" and pc.seq_pooling_type is not None:
            raise ConfigError(
                f"{entry.architecture} runs through transformers, which pools inside the model; "
                "seq_pooling_type cannot be changed for it."
            )
        if pc.tok_pooling_type is PoolingType.STEP and pc.step_tag_id is None and not pc.returned_token_ids:
            logger.warning("STEP pooling without step_tag_id or returned_token_ids keeps every token.")
        # Embedding models take sentence-transformers' Normalize module as their default; classifiers
        # apply their activation unless told otherwise.
        default_act = pc.use_activation
        if default_act is None:
            default_act = st.normalize if (entry.kind == "encoder" and st.normalize is not None) else True
        spec = PoolerSpec(
            seq_pooling=_seq_pooling(entry, hf_config, pc, st),
            tok_pooling=pc.tok_pooling_type or PoolingType.ALL,
            activation=resolve_activation(hf_config),
            use_activation=default_act,
            logit_mean=pc.logit_mean if pc.logit_mean is not None else getattr(hf_config, "logit_mean", None),
            logit_sigma=pc.logit_sigma if pc.logit_sigma is not None else getattr(hf_config, "logit_sigma", None),
            step_tag_id=pc.step_tag_id,
            returned_token_ids=pc.returned_token_ids,
            head_dtype=_resolve_head_dtype(hf_config, resolved_dtype),
        )
        num_labels = int(getattr(hf_config, "num_labels", 0) or 0) if entry.kind != "encoder" else 0
        id2label = {int(k): str(v) for k, v in (getattr(hf_config, "id2label", None) or {}).items()}
        config = ModelConfig(
            model=model,
            path=path,
            hf_config=hf_config,
            entry=entry,
            dtype=resolved_dtype,
            fp16_weights=dtype == "auto" and auto_cpu_fp16_weights(device, resolved_dtype),
            max_model_len=_max_model_len(entry, hf_config, tokenizer_max_length, st, max_model_len),
            supported_tasks=supported,
            task=task,
            pooler=spec,
            num_labels=num_labels,
            id2label=id2label if num_labels else {},
            vocab_size=int(getattr(hf_config, "vocab_size", 0) or tokenizer_vocab_size),
            do_lower_case=st.do_lower_case,
            # LLM rerankers read "query + document" as one text; encoders get the tokenizer's pair encoding.
            use_sep_token=bool(
                getattr(hf_config, "use_sep_token", getattr(hf_config, "use_pad_token", token_head is None))
            ),
            is_matryoshka=bool(
                getattr(hf_config, "is_matryoshka", False) or getattr(hf_config, "matryoshka_dimensions", None)
            ),
            hidden_size=int(getattr(hf_config, "hidden_size", None) or getattr(hf_config, "dim", None) or 0),
            tokenizer_gives_token_types="token_type_ids" in tokenizer_input_names,
            token_score_head=token_head,
            trust_remote_code=trust_remote_code,
        )
        if spec.tok_pooling is PoolingType.STEP and spec.returned_token_ids and task in TOKEN_TASKS:
            # Checked here, at load: out of range, every request would fail inside the pooler.
            problem = _returned_ids_problem(spec.returned_token_ids, config.token_columns(task))
            if problem:
                raise ConfigError(problem)
        return config


def _returned_ids_problem(ids: Sequence[int], columns: tuple[int, str]) -> str | None:
    """What is wrong with STEP's ``returned_token_ids`` for an output of ``columns`` (width, what), if anything."""
    width, what = columns
    bad = [i for i in ids if i >= width]
    if not bad:
        return None
    return (
        f"returned_token_ids {bad} are out of range: the output has {width} {what}, so each id must be in [0, {width})."
    )


def _seq_pooling(entry: ModelEntry, hf_config: Any, pc: PoolerConfig, st: SentenceTransformersInfo) -> PoolingType:
    """User choice, then sentence-transformers, then the architecture's default; some architectures
    define their pooling themselves (ModernBERT's classifier_pooling) and keep it."""
    model_class = entry.load_class() if entry.is_native else None
    default = entry.default_seq_pooling
    if model_class is not None:
        default = model_class.default_pooling(hf_config) or default
    if model_class is not None and model_class.pooling_is_fixed and entry.kind != "encoder":
        if pc.seq_pooling_type not in (None, default):
            logger.warning(
                "%s pools with %s by its config; ignoring seq_pooling_type=%s.",
                entry.architecture,
                default.value,
                pc.seq_pooling_type.value,
            )
        return default
    return pc.seq_pooling_type or st.pooling or default


def _token_score_head(hf_config: Any, token_to_id: Callable[[str], int | None] | None) -> TokenScoreHead | None:
    """``classifier_from_token`` + ``method`` (or ``is_original_qwen3_reranker``) from the HF config."""
    tokens = getattr(hf_config, "classifier_from_token", None)
    if not tokens:
        return None
    method = getattr(hf_config, "method", None)
    if getattr(hf_config, "is_original_qwen3_reranker", False):
        if len(tokens) != 2:
            raise ConfigError("is_original_qwen3_reranker needs exactly two classifier_from_token entries.")
        method = "from_2_way_softmax"
    if method not in ("from_2_way_softmax", "no_post_processing"):
        raise ConfigError(
            f"classifier_from_token needs method 'from_2_way_softmax' or 'no_post_processing', got {method!r}."
        )
    if method == "from_2_way_softmax" and len(tokens) != 2:
        raise ConfigError("method 'from_2_way_softmax' needs exactly two tokens: [false_token, true_token].")
    if getattr(hf_config, "final_logit_softcapping", None):
        # Soft-capped LM logits are not linear in the hidden state: rows of the LM head cannot reproduce them.
        raise ConfigError(
            "classifier_from_token cannot be used with final_logit_softcapping (Gemma2): the capped token logits "
            "are not a linear classifier. Use a converted *ForSequenceClassification checkpoint."
        )
    if token_to_id is None:
        raise ConfigError("classifier_from_token needs the model's tokenizer.")
    ids = [token_to_id(str(t)) for t in tokens]
    missing = [t for t, i in zip(tokens, ids) if i is None]
    if missing:
        raise ConfigError(
            f"classifier_from_token {missing} are not tokens of this tokenizer (they are case-sensitive)."
        )
    return TokenScoreHead(tuple(int(i) for i in ids if i is not None), method)


def _supported_tasks(entry: ModelEntry) -> tuple[PoolingTask, ...]:
    if entry.kind == "encoder":
        return ("embed", "token_embed")
    if entry.kind == "token_classifier":
        return ("token_classify",)
    # A native sequence classifier also applies its classifier per token; the fallback cannot.
    return ("classify", "token_classify") if entry.is_native else ("classify",)


def _active_task(requested: PoolingTask | None, supported: tuple[PoolingTask, ...], arch: str) -> PoolingTask:
    if requested is not None:
        if requested not in supported:
            raise ConfigError(f"Unsupported task: {requested!r} Supported tasks: {supported}")
        return requested
    if "token_classify" in supported and "ForTokenClassification" in arch:
        return "token_classify"
    return next(t for t in _TASK_PRIORITY if t in supported)


def _max_model_len(
    entry: ModelEntry,
    hf_config: Any,
    tokenizer_max_length: int | None,
    st: SentenceTransformersInfo,
    requested: int | None,
) -> int:
    """min(position limit, tokenizer limit), then sentence-transformers max_seq_length, then the user's value."""
    if entry.is_native:
        positions = int(entry.load_class().max_positions(hf_config))
    else:
        positions = int(
            getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None) or 0
        )
        if positions and getattr(hf_config, "model_type", None) in _PAD_OFFSET_POSITIONS:
            positions -= int(getattr(hf_config, "pad_token_id", None) or 0) + 1
    limit = positions or tokenizer_max_length or 512
    if tokenizer_max_length and tokenizer_max_length < 1_000_000:
        limit = min(limit, tokenizer_max_length)
    if st.max_seq_length:
        limit = min(st.max_seq_length, positions) if positions else st.max_seq_length
    if requested is None:
        return limit
    ceiling = positions or limit
    if requested < 1 or requested > ceiling:
        raise ConfigError(
            f"max_model_len={requested} is outside [1, {ceiling}], the most this model's position embeddings allow."
        )
    return requested
