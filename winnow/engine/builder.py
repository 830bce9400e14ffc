"""From user options to a running engine: resolve the model, load config, tokenizer and weights.

``EngineArgs`` holds what the user typed (``LLM(...)`` keywords or ``winnow serve`` flags);
``build_engine`` turns it into an ``Engine``: the frozen ``EngineConfig``, the ``InputProcessor``
that tokenizes for this model, and the ``EngineCore`` that batches and runs requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from winnow.config import HFOverrides, ModelConfig, load_hf_config, resolve_device
from winnow.engine.cpu_cores import CpuCores
from winnow.engine.cpu_malloc import keep_freed_memory
from winnow.engine.engine_core import EngineCore, StepStats
from winnow.engine.scheduler import Scheduler
from winnow.errors import ConfigError, InvalidInputError
from winnow.inputs.prompts import InputProcessor
from winnow.inputs.scoring import load_template
from winnow.inputs.tokenizer import TokenizerGroup, load_hf_tokenizer
from winnow.models.files import check_model_folder, resolve_model_path
from winnow.models.registry import resolve_architecture
from winnow.params import PoolerConfig
from winnow.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Token budget per forward pass. On CPU, batches beyond a few thousand tokens stop gaining
# throughput and only add latency (see benchmarks/); GPUs need far larger batches to fill.
_CPU_BATCHED_TOKENS, _GPU_BATCHED_TOKENS = 4096, 16384
_CPU_MAX_SEQS, _GPU_MAX_SEQS = 128, 512
# CPU workers when cpu_workers is unset (engine/cpu_cores.py), on a CPU with at least that many threads.
_DEFAULT_CPU_WORKERS = 2


@dataclass(frozen=True, kw_only=True)
class EngineArgs:
    model: str
    runner: str = "auto"
    convert: str = "auto"
    pooler_config: PoolerConfig | dict[str, Any] | None = None
    hf_overrides: HFOverrides | None = None
    dtype: str | torch.dtype = "auto"
    max_model_len: int | None = None
    device: str = "auto"
    tokenizer: str | None = None
    chat_template: str | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    quantization: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    seed: int = 0
    cuda_graph_max_tokens: int = 0  # 0: eager; else capture CUDA graphs for batches up to this many tokens
    cpu_workers: int | None = None  # CPU: batches run side by side, each on cores // cpu_workers threads


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    device: torch.device
    max_num_batched_tokens: int
    max_num_seqs: int
    chat_template: str | None  # default score template (cross-encoders)
    seed: int
    quantization: str | None = None  # "int8": feed-forward layers in int8 (CPU)
    cuda_graph_max_tokens: int = 0  # batches up to this many tokens replay captured graphs (GPU); 0: off
    cpu_workers: int = 1  # batches running side by side on the CPU's cores (engine/cpu_cores.py); 1 on a GPU
    cpu_cores: int = 1  # torch threads when the engine was configured: the cores the workers share

    def describe(self) -> str:
        """One line for logs: what runs, how, where."""
        m = self.model
        path = "native" if m.entry.is_native else "transformers fallback"
        dtype = str(m.dtype).replace("torch.", "") + (" + int8 feed-forward" if self.quantization else "")
        where = str(self.device)
        if self.device.type == "cpu":
            where += f" ({self.cpu_workers} workers on {self.cpu_cores} threads)"
        return f"{m.architecture} ({path}), task {m.task}, on {where} in {dtype}, max_model_len {m.max_model_len}"


@dataclass(frozen=True)
class Engine:
    config: EngineConfig
    inputs: InputProcessor
    core: EngineCore


def build_engine(args: EngineArgs, *, on_step: Callable[[StepStats], None] | None = None) -> Engine:
    """Resolve the configuration and load the model: everything ``LLM(...)`` needs."""
    config, inputs = prepare_engine(args)
    return load_engine(config, inputs, on_step=on_step)


def prepare_engine(args: EngineArgs) -> tuple[EngineConfig, InputProcessor]:
    """Everything but the weights: model folder, configs, tokenizer. Fast; a server can route and
    tokenize with it while ``load_engine`` reads the weights."""
    device = resolve_device(args.device)
    pooler_config = _pooler_config(args.pooler_config)
    path = resolve_model_path(args.model, revision=args.revision)
    check_model_folder(path)
    hf_config = load_hf_config(path, overrides=args.hf_overrides, trust_remote_code=args.trust_remote_code)
    entry = resolve_architecture(
        list(getattr(hf_config, "architectures", None) or []),
        model_type=getattr(hf_config, "model_type", None),
        runner=args.runner,
        convert=args.convert,
    )
    tokenizer_path = path
    if args.tokenizer:
        tokenizer_path = resolve_model_path(args.tokenizer, revision=args.revision, what="Tokenizer")
    hf_tokenizer = load_hf_tokenizer(tokenizer_path, trust_remote_code=args.trust_remote_code, revision=args.revision)
    tokenizers = TokenizerGroup(hf_tokenizer)
    quantization = _quantization(args.quantization, device)
    model_config = ModelConfig.create(
        args.model,
        path,
        hf_config,
        entry,
        pooler_config=pooler_config,
        dtype=args.dtype,
        device=device,
        max_model_len=args.max_model_len,
        tokenizer_max_length=getattr(hf_tokenizer, "model_max_length", None),
        tokenizer_vocab_size=tokenizers.vocab_size,
        tokenizer_input_names=tuple(getattr(hf_tokenizer, "model_input_names", ())),
        token_to_id=tokenizers.token_to_id,
        trust_remote_code=args.trust_remote_code,
    )
    cores = torch.get_num_threads()  # the threads this process gives torch: what the CPU workers share
    max_num_batched_tokens = _batched_tokens(args.max_num_batched_tokens, model_config.max_model_len, device)
    config = EngineConfig(
        model=model_config,
        device=device,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=_positive(args.max_num_seqs, "max_num_seqs")
        or (_GPU_MAX_SEQS if device.type == "cuda" else _CPU_MAX_SEQS),
        chat_template=_engine_template(args.chat_template),
        seed=args.seed,
        quantization=quantization,
        # No batch holds more than the token budget: larger buckets would never replay.
        cuda_graph_max_tokens=min(_cuda_graph_tokens(args.cuda_graph_max_tokens, device), max_num_batched_tokens),
        cpu_workers=_cpu_workers(args.cpu_workers, device, cores, native=entry.is_native),
        cpu_cores=cores,
    )
    inputs = InputProcessor(
        tokenizers,
        max_model_len=model_config.max_model_len,
        vocab_size=model_config.vocab_size,
        lower_case=model_config.do_lower_case,
    )
    return config, inputs


def load_engine(
    config: EngineConfig, inputs: InputProcessor, *, on_step: Callable[[StepStats], None] | None = None
) -> Engine:
    """Load the weights onto the device and assemble scheduler, runner and core."""
    started = time.perf_counter()
    model_config = config.model
    cpu = CpuCores(config.cpu_cores, config.cpu_workers) if config.device.type == "cpu" else None
    if cpu is not None:
        keep_freed_memory()  # a batch's activations reuse the last batch's memory (engine/cpu_malloc.py)
    runner = ModelRunner(
        model_config,
        config.device,
        quantization=config.quantization,
        cuda_graph_max_tokens=config.cuda_graph_max_tokens,
        cpu_threads=cpu.thread_counts if cpu is not None else (),
    )
    scheduler = Scheduler(
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        padded_cost=runner.pads_dense_layers,
    )
    logger.info("Loaded %s: %s, in %.1fs", model_config.model, config.describe(), time.perf_counter() - started)
    return Engine(config, inputs, EngineCore(scheduler, runner, cpu=cpu, on_step=on_step))


def _pooler_config(value: Any) -> PoolerConfig | None:
    """A PoolerConfig, or its fields as a dict (JSON, ``--pooler-config``)."""
    if value is None or isinstance(value, PoolerConfig):
        return value
    if isinstance(value, dict):
        return PoolerConfig.from_dict(value)
    raise ConfigError(
        f"pooler_config must be a PoolerConfig or a dict of its fields, not a {type(value).__name__} "
        f'({value!r}); e.g. PoolerConfig(pooling_type="CLS") or {{"pooling_type": "CLS"}}.'
    )


# Legacy `task=` values (before runner/convert existed) -> convert. "reward" also made the token task
# active (PoolerConfig(task="token_classify")); the others' tasks are what the model's head gives anyway.
LEGACY_TASKS: dict[str, str] = {"classify": "auto", "score": "auto", "embed": "embed", "reward": "auto", "auto": "auto"}


def legacy_task_args(
    task: str, convert: str, pooler_config: PoolerConfig | dict[str, Any] | None
) -> tuple[str, PoolerConfig | dict[str, Any] | None]:
    """``convert`` and ``pooler_config`` for a legacy ``task`` (``LLM(task=...)``, ``--task``); an
    explicit ``convert`` or pooler config wins. The callers warn that it is deprecated, each in its words."""
    if task not in LEGACY_TASKS:
        raise InvalidInputError(
            f"task={task!r} is not a pooling task ({', '.join(LEGACY_TASKS)}); use convert and PoolerConfig(task=...)."
        )
    if task == "reward" and pooler_config is None:
        pooler_config = PoolerConfig(task="token_classify")
    return (LEGACY_TASKS[task] if convert == "auto" else convert), pooler_config


def _engine_template(template: str | None) -> str | None:
    """The engine's default chat/score template, compiled once here: a broken one is the operator's
    mistake, refused at start-up, not a 400 blaming every client that sends a chat or a score."""
    text = load_template(template)
    if text is None:
        return None
    try:  # transformers' own chat-template environment (its extensions and filters), as rendering uses
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without it: the first request reports a broken template
        return text
    try:
        _compile_jinja_template(text)
    except Exception as e:  # jinja2.TemplateSyntaxError and kin
        raise ConfigError(f"chat_template does not compile: {type(e).__name__}: {e}") from e
    return text


def _quantization(value: str | None, device: torch.device) -> str | None:
    if value in (None, "none"):
        return None
    if value != "int8":
        raise ConfigError(f"quantization={value!r} is not supported; use 'int8' (CPU) or leave it unset.")
    if device.type != "cpu":
        raise ConfigError("quantization='int8' is a CPU path; on a GPU use dtype='bfloat16' (the default there).")
    return value


def _cuda_graph_tokens(value: int, device: torch.device) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"cuda_graph_max_tokens must be 0 (off) or a positive integer, got {value!r}.")
    if value and device.type != "cuda":
        raise ConfigError("cuda_graph_max_tokens needs a CUDA device; leave it at 0 on a CPU.")
    return value


def _cpu_workers(value: int | None, device: torch.device, cores: int, *, native: bool) -> int:
    """The default is two workers on a CPU with two threads or more, for native models: their forward
    keeps no state between calls. The transformers fallback runs one unless asked."""
    if device.type != "cpu":
        if value not in (None, 1):
            raise ConfigError(
                "cpu_workers applies to the CPU; a GPU runs one batch at a time and overlaps the next one's host work."
            )
        return 1
    if value is None:
        return _DEFAULT_CPU_WORKERS if native and cores >= _DEFAULT_CPU_WORKERS else 1
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= cores:
        raise ConfigError(
            f"cpu_workers must be an integer from 1 to the {cores} torch threads this process has "
            f"(each worker runs its batches on cores // cpu_workers of them), got {value!r}."
        )
    return value


def _positive(value: int | None, name: str) -> int | None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _batched_tokens(requested: int | None, max_model_len: int, device: torch.device) -> int:
    # Encoders cannot split a prompt across steps, so one step must hold the longest prompt.
    if _positive(requested, "max_num_batched_tokens") is not None:
        assert requested is not None
        if requested < max_model_len:
            raise ConfigError(
                f"max_num_batched_tokens={requested} is smaller than max_model_len={max_model_len}; a prompt "
                "must fit in one batch. Raise max_num_batched_tokens or lower max_model_len."
            )
        return requested
    default = _GPU_BATCHED_TOKENS if device.type == "cuda" else _CPU_BATCHED_TOKENS
    return max(default, max_model_len)
