"""Score inputs: pairing rules and cross-encoder prompt construction (spec §5).

Order of precedence for one (query, document) pair:
  1. per-side limits ``max_tokens_per_query`` / ``max_tokens_per_doc`` cut the text at a token boundary;
  2. a score template (``chat_template``) renders messages with roles ``query`` and ``document``;
  3. else, when the model uses a separator (``use_sep_token``, default true), tokenizer pair encoding
     (BERT ``[CLS] q [SEP] d [SEP]`` with token types, RoBERTa ``<s> q </s></s> d </s>``);
  4. else plain concatenation ``q + d``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from winnow.errors import InvalidInputError, UnsupportedTaskError
from winnow.inputs.prompts import InputProcessor, TokenizedPrompt, TruncationOptions
from winnow.inputs.tokenizer import TextOrPair
from winnow.params import PoolingParams, PoolingTask

if TYPE_CHECKING:
    from winnow.config import ModelConfig


def parse_score_side(data: Any, name: str) -> list[str]:
    """One side of a score call: a str, a {"content": [text parts]} dict, or a list of those."""
    items = data if isinstance(data, (list, tuple)) else [data]
    return [_score_text(item, name, i) for i, item in enumerate(items)]


def _score_text(item: Any, name: str, index: int) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping) and isinstance(item.get("content"), list):
        parts = item["content"]
        if all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
            return "".join(str(p["text"]) for p in parts)
        raise InvalidInputError(f"{name}[{index}] has non-text content parts; this is a text-only model.", param=name)
    raise InvalidInputError(
        f"{name}[{index}] must be a string or {{'content': [{{'type': 'text', 'text': ...}}]}}, "
        f"got {type(item).__name__}.",
        param=name,
    )


def pair_up(queries: list[str], documents: list[str]) -> list[tuple[str, str]]:
    """1:1, 1:N (the query repeated) or N:N (zipped); result order follows the documents."""
    if len(queries) > 1 and len(queries) != len(documents):
        raise InvalidInputError("Input lengths must be either 1:1, 1:N or N:N", param="documents")
    if not queries:
        raise InvalidInputError("At least one text element must be given", param="queries")
    if not documents:
        raise InvalidInputError("At least one text_pair element must be given", param="documents")
    if len(queries) == 1:
        return [(queries[0], d) for d in documents]
    return list(zip(queries, documents))


def check_side_limit(value: int, name: str, max_model_len: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < max_model_len:
        raise InvalidInputError(
            f"{name} must be an integer in [0, max_model_len={max_model_len}), got {value!r}.", param=name
        )
    return value


def cut_to_tokens(processor: InputProcessor, texts: Sequence[str], max_tokens: int) -> list[str]:
    """Cut each text after its first ``max_tokens`` content tokens, at the exact character offset."""
    if max_tokens <= 0:
        return list(texts)
    out = []
    for text, enc in zip(texts, processor.tokenizers.encode_with_offsets(texts)):
        out.append(text[: enc.offsets[max_tokens - 1][1]] if len(enc.ids) > max_tokens else text)
    return out


TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"


def shipped_templates() -> list[str]:
    """Names of the score templates winnow ships (winnow/templates/*.jinja)."""
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def load_template(template: str | None) -> str | None:
    """A template is inline Jinja, a path to a Jinja file, or the name of a shipped one ("qwen3_reranker")."""
    if template is None:
        return None
    if "{" in template:
        return template
    shipped = TEMPLATES_DIR / (template if template.endswith(".jinja") else f"{template}.jinja")
    for candidate in (Path(template).expanduser(), shipped):
        if len(template) < 4096 and candidate.is_file():
            return candidate.read_text()
    raise InvalidInputError(
        f"chat_template {template!r} is neither Jinja text, an existing file, nor a shipped template "
        f"({', '.join(shipped_templates())}).",
        param="chat_template",
    )


def cross_encoder_prompts(
    processor: InputProcessor,
    pairs: list[tuple[str, str]],
    options: TruncationOptions,
    *,
    max_tokens_per_query: int = 0,
    max_tokens_per_doc: int = 0,
    template: str | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
    use_sep_token: bool = True,
    offset: int = 0,
) -> list[TokenizedPrompt]:
    """Token ids (and token types) the cross-encoder sees for each pair. ``offset``: the index of
    ``pairs[0]`` in the caller's list, for error messages."""
    queries = [processor.normalize_text(q) for q, _ in pairs]
    docs = [processor.normalize_text(d) for _, d in pairs]
    queries = cut_to_tokens(processor, queries, max_tokens_per_query)
    docs = cut_to_tokens(processor, docs, max_tokens_per_doc)
    # Score calls always add the tokenizer's special tokens (vLLM: add_special_tokens is forced on).
    options = TruncationOptions(options.max_tokens, options.side, add_special_tokens=True)

    inputs: list[TextOrPair]
    if template is not None:
        inputs = [_render(processor, template, q, d, template_kwargs) for q, d in zip(queries, docs)]
        if options.max_tokens is not None:
            # Cut documents, never the template or the query; the fitted texts need no further cutting.
            inputs = _fit_documents(
                processor, template, template_kwargs, queries, docs, inputs, options.max_tokens, offset
            )
            options = TruncationOptions(None, options.side, add_special_tokens=True)
    elif use_sep_token:
        inputs = list(zip(queries, docs))
    else:
        inputs = [q + d for q, d in zip(queries, docs)]
    prompts = [TokenizedPrompt.from_encoding(enc) for enc in processor.encode(inputs, options)]
    for i, p in enumerate(prompts):
        processor.check(p, offset + i, truncated=options.max_tokens is not None)
    return prompts


def _fit_documents(
    processor: InputProcessor,
    template: str,
    kwargs: Mapping[str, Any] | None,
    queries: list[str],
    docs: list[str],
    rendered: list[TextOrPair],
    limit: int,
    offset: int,
) -> list[TextOrPair]:
    """Template-aware truncation: shorten each over-long pair's document until the rendered prompt fits.

    vLLM and sentence-transformers cut the token sequence instead, which drops the template's suffix
    (the "<|im_start|>assistant ..." an LLM reranker scores from) or the query.
    """
    full = TruncationOptions(None, "right", add_special_tokens=True)
    lengths = [len(e.ids) for e in processor.encode(rendered, full)]
    fitted = list(rendered)
    for i, n in enumerate(lengths):
        if n <= limit:
            continue
        [frame_encoding] = processor.encode([_render(processor, template, queries[i], "", kwargs)], full)
        frame = len(frame_encoding.ids)
        budget = limit - frame
        if budget < 1:
            raise InvalidInputError(
                f"The score template and the query alone take {frame} tokens, more than the {limit} allowed; "
                "shorten the query or raise truncate_prompt_tokens.",
                param="truncate_prompt_tokens",
            )
        doc_tokens = len(processor.tokenizers.encode_with_offsets([docs[i]])[0].ids)
        while n > limit and budget > 0:  # tokens can merge across the cut: shrink until it fits
            text = cut_to_tokens(processor, [docs[i]], min(budget, doc_tokens))[0]
            fitted[i] = _render(processor, template, queries[i], text, kwargs)
            [encoding] = processor.encode([fitted[i]], full)
            n = len(encoding.ids)
            budget -= max(1, n - limit)
        if n > limit:
            raise InvalidInputError(
                f"Pair {offset + i} cannot be fitted into {limit} tokens.", param="truncate_prompt_tokens"
            )
    return fitted


def template_kwargs_of(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """A request's ``chat_template_kwargs``, refusing the keys that would override what the caller
    controls elsewhere (the template itself, tools, whether to tokenize)."""
    kwargs = dict(kwargs or {})
    refused = sorted({"chat_template", "tools", "tokenize"} & set(kwargs))
    if refused:
        raise InvalidInputError(f"chat_template_kwargs may not set {refused}.", param="chat_template_kwargs")
    return kwargs


def _render(processor: InputProcessor, template: str, query: str, doc: str, kwargs: Mapping[str, Any] | None) -> str:
    kwargs = template_kwargs_of(kwargs)
    messages = [{"role": "query", "content": query}, {"role": "document", "content": doc}]
    try:
        rendered = processor.tokenizers.hf_tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, **kwargs
        )
    except Exception as e:
        raise InvalidInputError(f"The score template failed to render: {type(e).__name__}: {e}") from e
    return str(rendered)


@dataclass(frozen=True)
class ScorePlan:
    """What the engine runs for a score call, and how its outputs become one score per pair.

    Cross-encoder: one prompt per pair, its single classifier output is the score. Bi-encoder /
    late interaction: each distinct text is embedded once; ``pairs`` holds the (query, document)
    prompt rows of each pair, scored by cosine similarity or MaxSim in float32.
    """

    prompts: list[TokenizedPrompt]
    params: PoolingParams  # bound to classify, embed or token_embed
    pairs: list[tuple[int, int]] | None = None  # None: cross-encoder, prompt i is pair i
    late_interaction: bool = False
    pad_token_id: int = 0

    @property
    def num_usage_tokens(self) -> int:
        """Tokens billed: every cross-encoder pair; for embeddings each query once plus every document."""
        if self.pairs is None:
            return sum(len(p.token_ids) for p in self.prompts)
        queries = {q for q, _ in self.pairs}
        return sum(len(self.prompts[q].token_ids) for q in queries) + sum(
            len(self.prompts[d].token_ids) for _, d in self.pairs
        )

    def scores(self, outputs: Sequence[torch.Tensor]) -> list[float]:
        if self.pairs is None:
            return [float(out.reshape(-1)[0]) for out in outputs]
        if self.late_interaction:
            return [float(_maxsim(outputs[q], outputs[d])) for q, d in self.pairs]
        return [float(F.cosine_similarity(outputs[q].float(), outputs[d].float(), dim=0)) for q, d in self.pairs]

    def pair_token_ids(self, i: int) -> list[int]:
        """The tokens of pair i: the cross-encoder prompt, or query + [pad] + document (vLLM's bi-encoder form)."""
        if self.pairs is None:
            return self.prompts[i].token_ids
        q, d = self.pairs[i]
        return [*self.prompts[q].token_ids, self.pad_token_id, *self.prompts[d].token_ids]


def plan_scores(
    processor: InputProcessor,
    config: ModelConfig,
    queries: list[str],
    documents: list[str],
    *,
    truncation: TruncationOptions,
    params: PoolingParams,
    template: str | None = None,
    default_template: str | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
    pad_token_id: int = 0,
    offset: int = 0,
) -> ScorePlan:
    """Validate a score call and tokenize what the engine must run for it. ``template`` is the caller's
    score template; ``default_template`` the engine's (``chat_template`` option), used when none is given.
    ``offset``: where these pairs start in the caller's call, when it plans its pairs a chunk at a time
    (cross-encoders only: each pair is its own prompt)."""
    check_can_score(config, template)
    if config.score_type != "cross-encoder":
        texts, rows = embedding_inputs(processor, config, queries, documents, params)
        return embedding_plan(config, processor.process(texts, truncation), rows, params, pad_token_id)
    per_query, per_doc = side_limits(config, params)
    prompts = cross_encoder_prompts(
        processor,
        pair_up(queries, documents),
        truncation,
        max_tokens_per_query=per_query,
        max_tokens_per_doc=per_doc,
        template=template or default_template,
        template_kwargs=template_kwargs,
        use_sep_token=config.use_sep_token,
        offset=offset,
    )
    return ScorePlan(prompts, score_params(config, params))


def side_limits(config: ModelConfig, params: PoolingParams) -> tuple[int, int]:
    """``max_tokens_per_query`` and ``max_tokens_per_doc`` from ``params.extra_kwargs`` (0: no limit)."""
    extra, limit = dict(params.extra_kwargs or {}), config.max_model_len
    return (
        check_side_limit(extra.get("max_tokens_per_query", 0), "max_tokens_per_query", limit),
        check_side_limit(extra.get("max_tokens_per_doc", 0), "max_tokens_per_doc", limit),
    )


def embedding_inputs(
    processor: InputProcessor, config: ModelConfig, queries: list[str], documents: list[str], params: PoolingParams
) -> tuple[list[str], list[tuple[int, int]]]:
    """What an embedding model runs for a score call: each side cut to its token limit, then each
    distinct text once (embedded once for all its pairs), and each pair's (query, document) rows."""
    pair_up(queries, documents)  # the call's shape, before any tokenizing
    per_query, per_doc = side_limits(config, params)
    queries = cut_to_tokens(processor, [processor.normalize_text(q) for q in queries], per_query)
    documents = cut_to_tokens(processor, [processor.normalize_text(d) for d in documents], per_doc)
    return distinct_texts(pair_up(queries, documents))


def embedding_plan(
    config: ModelConfig,
    prompts: list[TokenizedPrompt],
    rows: list[tuple[int, int]],
    params: PoolingParams,
    pad_token_id: int,
) -> ScorePlan:
    """The plan of an embedding model's score call, given its distinct texts' prompts."""
    return ScorePlan(
        prompts,
        score_params(config, params),
        pairs=rows,
        late_interaction=config.score_type == "late-interaction",
        pad_token_id=pad_token_id,
    )


def check_can_score(config: ModelConfig, template: str | None) -> None:
    """The model scores (a 1-label classifier or an embedding model); a score template needs a cross-encoder."""
    if config.score_type is None:
        if config.task == "classify":
            raise UnsupportedTaskError("Scoring API is only enabled for num_labels == 1.")
        raise UnsupportedTaskError("This model does not support the Scoring API.")
    if template is not None and config.score_type != "cross-encoder":
        raise InvalidInputError("chat_template is only supported for cross-encoder models.")


def score_params(config: ModelConfig, params: PoolingParams) -> PoolingParams:
    """The caller's params bound to what the model's score runs: classify (cross-encoder), embed
    (cosine) or token_embed (MaxSim). Score-only options (``extra_kwargs``) stay behind."""
    tasks: dict[str | None, PoolingTask] = {"cross-encoder": "classify", "late-interaction": "token_embed"}
    task = tasks.get(config.score_type, "embed")
    kept = PoolingParams(use_activation=params.use_activation, dimensions=params.dimensions, task=params.task)
    return config.bind_params(kept, task)


def distinct_texts(pairs: list[tuple[str, str]]) -> tuple[list[str], list[tuple[int, int]]]:
    """Each distinct text once (an embedding model embeds it once for all its pairs), and each pair
    as the (query, document) rows of its texts in that list."""
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))
    row = {t: i for i, t in enumerate(texts)}
    return texts, [(row[q], row[d]) for q, d in pairs]


def _maxsim(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Late interaction: sum over query tokens of the best-matching document token. q: [m, k], d: [n, k]."""
    return (q.float() @ d.float().T).max(dim=1).values.sum()
