"""The offline API, shaped like vLLM's ``LLM``: ``classify``, ``score``, ``encode``, ``embed``.

Prompts are tokenized and validated, then submitted to the engine core, which batches them by
length under the token budget. Outputs come back in input order; a bad prompt fails the whole call.
On a CPU every prompt is tokenized before any work (the host is the device: nothing to overlap). On
a GPU the prompts are tokenized a chunk at a time, while the device runs the batch just launched, so
a bad prompt fails the call after the prompts before it may have run.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from winnow.engine.builder import EngineArgs, build_engine, legacy_task_args
from winnow.engine.engine_core import Finished
from winnow.engine.request import Request
from winnow.errors import InvalidInputError, UnsupportedTaskError
from winnow.inputs.prompts import Prompt, TokenizedPrompt, TruncationOptions, parse_prompts, parse_truncation
from winnow.inputs.scoring import (
    ScorePlan,
    check_can_score,
    embedding_inputs,
    embedding_plan,
    load_template,
    pair_up,
    parse_score_side,
    plan_scores,
    score_params,
)
from winnow.models.files import DEFAULT_MODEL
from winnow.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from winnow.params import PoolerConfig, PoolingParams, PoolingTask, check_task

logger = logging.getLogger(__name__)

# vLLM engine options that mean nothing for winnow; accepted so vLLM code runs unchanged.
_IGNORED_VLLM_ARGS = frozenset(
    {
        "enforce_eager",
        "gpu_memory_utilization",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "enable_prefix_caching",
        "enable_chunked_prefill",
        "tokenizer_mode",
        "disable_log_stats",
        "swap_space",
        "kv_cache_dtype",
    }
)
UseTqdm = bool | Callable[..., tqdm]
_T = TypeVar("_T")

# Prompts tokenized at a time where tokenizing overlaps the device's work (GPU): large enough for the
# tokenizer's thread pool, small enough that the first batch starts soon.
_TOKENIZE_CHUNK = 256
# Prompts from which a CPU call with several workers tokenizes on two threads (below, the hand-off
# costs more than it saves).
_TWO_THREAD_TOKENIZE = 256


class LLM:
    """Load a classification, reranking or embedding model and run it offline.

    >>> llm = LLM("cross-encoder/ms-marco-MiniLM-L-6-v2")
    >>> llm.score("What is the capital of France?", ["Paris is the capital.", "Horses are animals."])
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        runner: str = "auto",
        convert: str = "auto",
        pooler_config: PoolerConfig | dict[str, Any] | None = None,
        hf_overrides: dict[str, Any] | Callable[[Any], Any] | None = None,
        dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
        device: str = "auto",
        tokenizer: str | None = None,
        chat_template: str | None = None,
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int | None = None,
        quantization: str | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        revision: str | None = None,
        cuda_graph_max_tokens: int = 0,
        cpu_workers: int | None = None,
        **kwargs: Any,
    ) -> None:
        legacy_pooler = kwargs.pop("override_pooler_config", None)
        if legacy_pooler is not None:
            warnings.warn("override_pooler_config is deprecated; use pooler_config.", DeprecationWarning, stacklevel=2)
            pooler_config = pooler_config or legacy_pooler
        legacy_task = kwargs.pop("task", None)
        if legacy_task is not None:
            warnings.warn(
                "LLM(task=...) is deprecated; use convert= and pooler_config.", DeprecationWarning, stacklevel=2
            )
            convert, pooler_config = legacy_task_args(legacy_task, convert, pooler_config)
        unknown = sorted(set(kwargs) - _IGNORED_VLLM_ARGS)
        if unknown:
            raise TypeError(f"LLM() got unexpected keyword arguments {unknown}")
        if kwargs:
            logger.info("Ignoring vLLM options that do not apply to winnow: %s", sorted(kwargs))
        self.engine = build_engine(
            EngineArgs(
                model=model,
                runner=runner,
                convert=convert,
                pooler_config=pooler_config,
                hf_overrides=hf_overrides,
                dtype=dtype,
                max_model_len=max_model_len,
                device=device,
                tokenizer=tokenizer,
                chat_template=chat_template,
                max_num_batched_tokens=max_num_batched_tokens,
                max_num_seqs=max_num_seqs,
                quantization=quantization,
                trust_remote_code=trust_remote_code,
                revision=revision,
                seed=seed,
                cuda_graph_max_tokens=cuda_graph_max_tokens,
                cpu_workers=cpu_workers,
            )
        )
        self.model_config = self.engine.config.model
        self._request_counter = itertools.count()
        self._tokenize_helper: concurrent.futures.ThreadPoolExecutor | None = None  # started on first use

    def get_tokenizer(self) -> Any:
        return self.engine.inputs.tokenizers.hf_tokenizer

    # -- public methods ------------------------------------------------------------------------

    def encode(
        self,
        prompts: Any,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        use_tqdm: UseTqdm = True,
        lora_request: Any = None,
        pooling_task: str | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[PoolingRequestOutput[PoolingOutput]]:
        """Run ``pooling_task`` on each prompt; ``outputs.data`` is the raw output tensor."""
        if pooling_task is None:
            raise InvalidInputError(
                "pooling_task required for `LLM.encode`. Use LLM.classify / LLM.embed / LLM.score, or set "
                "pooling_task to one of: classify, token_classify, embed, token_embed."
            )
        if pooling_task == "plugin":
            # NOTE: offline, vLLM finds `plugin` among no model's supported tasks and says so (spec §9.2);
            # check_task's "No IOProcessor plugin installed" is the server's /pooling wording (§6.6).
            raise UnsupportedTaskError(
                f"Unsupported task: 'plugin' Supported tasks: {self.model_config.supported_tasks}",
                param="pooling_task",
            )
        task = check_task(pooling_task, param="pooling_task")
        self.model_config.require_task(task)
        _reject_lora(lora_request)
        parsed = parse_prompts(prompts)
        params = self._bind_params(pooling_params, task, len(parsed))
        truncation = parse_truncation(
            tokenization_kwargs,
            max_model_len=self.model_config.max_model_len,
            truncate_prompt_tokens=_legacy_truncate(truncate_prompt_tokens),
        )
        ids, data, tokenized = self._run(self._tokenize(parsed, truncation), params, use_tqdm)
        return [PoolingRequestOutput(rid, PoolingOutput(out), p.token_ids) for rid, out, p in zip(ids, data, tokenized)]

    def classify(
        self,
        prompts: Any,
        *,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: UseTqdm = True,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt (``outputs.probs``, ``outputs.num_classes``)."""
        results = self.encode(
            prompts,
            pooling_params,
            use_tqdm=use_tqdm,
            lora_request=lora_request,
            pooling_task="classify",
            tokenization_kwargs=tokenization_kwargs,
            truncate_prompt_tokens=truncate_prompt_tokens,
        )
        return [ClassificationRequestOutput.from_base(r) for r in results]

    def embed(
        self,
        prompts: Any,
        *,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: UseTqdm = True,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (``outputs.embedding``), L2-normalised unless told otherwise."""
        results = self.encode(
            prompts,
            pooling_params,
            use_tqdm=use_tqdm,
            lora_request=lora_request,
            pooling_task="embed",
            tokenization_kwargs=tokenization_kwargs,
            truncate_prompt_tokens=truncate_prompt_tokens,
        )
        return [EmbeddingRequestOutput.from_base(r) for r in results]

    def reward(
        self,
        prompts: Any,
        /,
        *,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: UseTqdm = True,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[PoolingRequestOutput[PoolingOutput]]:
        """Legacy alias of ``encode(..., pooling_task="token_classify")``."""
        warnings.warn(
            '`LLM.reward` is deprecated; use `LLM.encode(..., pooling_task="token_classify")`.',
            DeprecationWarning,
            stacklevel=2,
        )
        return self.encode(
            prompts,
            pooling_params,
            use_tqdm=use_tqdm,
            lora_request=lora_request,
            pooling_task="token_classify",
            tokenization_kwargs=tokenization_kwargs,
            truncate_prompt_tokens=truncate_prompt_tokens,
        )

    def score(
        self,
        data_1: Any,
        data_2: Any,
        /,
        *,
        use_tqdm: UseTqdm = True,
        pooling_params: PoolingParams | None = None,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[ScoringRequestOutput]:
        """Relevance of each (query, document) pair: 1:1, 1:N or N:N. Results follow ``data_2``'s order."""
        _reject_lora(lora_request)
        if pooling_params is not None and not isinstance(pooling_params, PoolingParams):
            raise InvalidInputError(
                f"score's pooling_params must be one PoolingParams, not a {type(pooling_params).__name__}; "
                "e.g. PoolingParams(use_activation=False).",
                param="pooling_params",
            )
        truncation = parse_truncation(
            tokenization_kwargs,
            max_model_len=self.model_config.max_model_len,
            truncate_prompt_tokens=_legacy_truncate(truncate_prompt_tokens),
        )
        queries, documents = parse_score_side(data_1, "data_1"), parse_score_side(data_2, "data_2")
        params, template = pooling_params or PoolingParams(), load_template(chat_template)
        check_can_score(self.model_config, template)
        pad_token_id = self.get_tokenizer().pad_token_id or 0
        if self.model_config.score_type != "cross-encoder":
            return self._score_embeddings(queries, documents, truncation, params, pad_token_id, use_tqdm)
        plan_for = functools.partial(
            plan_scores,
            self.engine.inputs,
            self.model_config,
            truncation=truncation,
            params=params,
            template=template,
            default_template=self.engine.config.chat_template,
            template_kwargs=chat_template_kwargs,
            pad_token_id=pad_token_id,
        )
        return self._score_pairs(queries, documents, plan_for, use_tqdm)

    # -- internals -----------------------------------------------------------------------------

    def _score_pairs(
        self,
        queries: list[str],
        documents: list[str],
        plan_for: Callable[..., ScorePlan],
        use_tqdm: UseTqdm,
    ) -> list[ScoringRequestOutput]:
        """``score`` for a cross-encoder: each pair is its own prompt, so pairs are planned and
        tokenized ``_TOKENIZE_CHUNK`` at a time between steps on a GPU, as ``_run`` takes them, and
        all before the first step on a CPU (``_on_two_threads``). The first chunk is planned before
        any work, so a call the model cannot serve fails at once."""
        num_pairs = len(pair_up(queries, documents))  # checks the call's shapes over all of it

        def plan(start: int, stop: int) -> ScorePlan:
            return plan_for(queries if len(queries) == 1 else queries[start:stop], documents[start:stop], offset=start)

        size = _TOKENIZE_CHUNK
        first = plan(0, size)
        chunks: Iterable[list[TokenizedPrompt]]
        if self.engine.core.overlaps:
            chunks = itertools.chain(
                [first.prompts], (plan(start, start + size).prompts for start in range(size, num_pairs, size))
            )
        else:  # all before the first step, so on two threads where there are two CPU workers
            rest = self._on_two_threads(max(0, num_pairs - size), lambda a, b: plan(size + a, size + b).prompts)
            chunks = [first.prompts + rest]
        ids, outputs, prompts = self._run(chunks, [first.params] * num_pairs, use_tqdm)
        scores = first.scores(outputs)  # a cross-encoder's score is its prompt's own output
        return [
            ScoringRequestOutput(rid, ScoringOutput(score), prompt.token_ids)
            for rid, score, prompt in zip(ids, scores, prompts)
        ]

    def _score_embeddings(
        self,
        queries: list[str],
        documents: list[str],
        truncation: TruncationOptions,
        params: PoolingParams,
        pad_token_id: int,
        use_tqdm: UseTqdm,
    ) -> list[ScoringRequestOutput]:
        """``score`` for an embedding model: each distinct text is embedded once (tokenized as
        ``_tokenize`` takes prompts), then each pair is scored by cosine similarity or MaxSim."""
        texts, rows = embedding_inputs(self.engine.inputs, self.model_config, queries, documents, params)
        plan_params = [score_params(self.model_config, params)] * len(texts)
        ids, outputs, prompts = self._run(self._tokenize(list(texts), truncation), plan_params, use_tqdm)
        plan = embedding_plan(self.model_config, prompts, rows, params, pad_token_id)
        return [
            ScoringRequestOutput(f"{ids[q]}_{ids[d]}", ScoringOutput(score), plan.pair_token_ids(i))
            for i, ((q, d), score) in enumerate(zip(rows, plan.scores(outputs)))
        ]

    def _bind_params(
        self, given: PoolingParams | Sequence[PoolingParams] | None, task: PoolingTask, n: int
    ) -> list[PoolingParams]:
        """One validated, task-bound PoolingParams per prompt."""
        if given is None or isinstance(given, PoolingParams):
            return [self.model_config.bind_params(given or PoolingParams(), task)] * n
        # NOTE: only a list or tuple: anything else iterable (a dict's keys, a string's characters)
        # would be read as one entry per prompt and fail far from the cause.
        if not isinstance(given, (list, tuple)):
            raise InvalidInputError(
                f"pooling_params must be a PoolingParams or a list of them (one per prompt), not a "
                f"{type(given).__name__}; e.g. PoolingParams(use_activation=False).",
                param="pooling_params",
            )
        items = list(given)
        wrong = next((i for i, p in enumerate(items) if not isinstance(p, PoolingParams)), None)
        if wrong is not None:
            raise InvalidInputError(
                f"pooling_params[{wrong}] is a {type(items[wrong]).__name__}, not a PoolingParams; "
                "e.g. PoolingParams(use_activation=False).",
                param="pooling_params",
            )
        if len(items) != n:
            raise InvalidInputError(f"The lengths of prompts ({n}) and params ({len(items)}) must be the same.")
        bound = {id(p): self.model_config.bind_params(p, task) for p in items}  # each distinct object once
        return [bound[id(p)] for p in items]

    def _tokenize(self, prompts: list[Prompt], truncation: TruncationOptions) -> Iterator[list[TokenizedPrompt]]:
        """The prompts tokenized and validated, in chunks: all in one where the engine does not
        overlap (CPU), ``_TOKENIZE_CHUNK`` at a time where it does (GPU; see ``_run``)."""
        if not self.engine.core.overlaps:
            if prompts:
                yield self._tokenize_now(prompts, truncation)
            return
        for start in range(0, len(prompts), _TOKENIZE_CHUNK):
            yield self.engine.inputs.process(prompts[start : start + _TOKENIZE_CHUNK], truncation, offset=start)

    def _tokenize_now(self, prompts: list[Prompt], truncation: TruncationOptions) -> list[TokenizedPrompt]:
        """Every prompt, before the first step (CPU)."""
        process = self.engine.inputs.process
        return self._on_two_threads(len(prompts), lambda a, b: process(prompts[a:b], truncation, offset=a))

    def _on_two_threads(self, n: int, work: Callable[[int, int], list[_T]]) -> list[_T]:
        """``work(start, stop)`` over ``[0, n)``: tokenizing, before a CPU call's first step. The cores
        are idle meanwhile, so with several CPU workers a large call is split between this thread
        and a helper: the Rust tokenizer releases the GIL while it works (2,048 workload texts:
        ~0.35 s on one thread, half on two). The lower half's error, if any, is the one raised, so
        the first bad prompt by index still names it."""
        if n == 0:
            return []
        if self.engine.core.workers < 2 or n < _TWO_THREAD_TOKENIZE:
            return work(0, n)
        if self._tokenize_helper is None:
            self._tokenize_helper = concurrent.futures.ThreadPoolExecutor(1, "winnow-tokenize")
        half = n // 2
        second = self._tokenize_helper.submit(work, half, n)
        try:
            first = work(0, half)
        finally:
            concurrent.futures.wait([second])  # never leave it running behind an error
        return first + second.result()

    def _run(
        self, chunks: Iterable[list[TokenizedPrompt]], params: list[PoolingParams], use_tqdm: UseTqdm
    ) -> tuple[list[str], list[torch.Tensor], list[TokenizedPrompt]]:
        """Submit the prompts (``params[i]`` for the i-th) and step the engine until all finish;
        request ids, outputs and prompts in submission order.

        Where the engine overlaps (GPU), chunks are taken only while less than one batch waits, and
        between steps: the host tokenizes the next prompts while the device runs the batch just
        launched (``step`` returns with it queued), instead of the device idling while every prompt
        is tokenized first. Elsewhere every chunk is taken before the first step."""
        core = self.engine.core
        pending = iter(chunks)
        prompts: list[TokenizedPrompt] = []
        request_ids: list[str] = []
        ahead = core.scheduler.max_num_batched_tokens if core.overlaps else math.inf

        def submit() -> None:
            while core.scheduler.waiting_tokens < ahead:
                chunk = next(pending, None)
                if chunk is None:
                    return
                first = len(prompts)
                ids = [str(next(self._request_counter)) for _ in chunk]
                core.add_requests([Request(rid, p, params[first + k]) for k, (rid, p) in enumerate(zip(ids, chunk))])
                request_ids.extend(ids)
                prompts.extend(chunk)

        results: dict[str, torch.Tensor] = {}
        bar_class = use_tqdm if callable(use_tqdm) else tqdm
        # No bar object at all when it is off: building a disabled one cost a short request ~0.09 ms
        # (MiniLM, paired call by call).
        bar_context = (
            nullcontext(_NoBar())
            if use_tqdm is False
            else bar_class(total=len(params), desc="Processed prompts", unit="prompt", delay=1.0)
        )
        with bar_context as bar:

            def keep(finished: Finished) -> None:
                for request, output in finished:
                    results[request.request_id] = output
                bar.update(len(finished))

            try:
                submit()
                if core.workers > 1:
                    core.drain(keep)
                while core.has_unfinished():  # one worker (and a GPU's overlapped last batch)
                    keep(core.step())
                    submit()
            except BaseException:
                core.abort_requests(set(request_ids))
                raise
        return request_ids, [results[rid] for rid in request_ids], prompts


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _reject_lora(lora_request: Any) -> None:
    if lora_request is not None:
        raise InvalidInputError("LoRA adapters are not supported by winnow yet; pass lora_request=None.")


def _legacy_truncate(value: int | None) -> int | None:
    if value is not None:
        warnings.warn(
            "truncate_prompt_tokens= as a keyword is deprecated; pass tokenization_kwargs="
            '{"truncate_prompt_tokens": k}.',
            DeprecationWarning,
            stacklevel=3,
        )
    return value
