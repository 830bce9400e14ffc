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
from pathlib import Path
from typing import Any

from winnow.errors import InvalidInputError
from winnow.inputs.prompts import InputProcessor, TokenizedPrompt, TruncationOptions, _to_prompt
from winnow.inputs.tokenizer import TextOrPair

ScoreInput = str | Mapping[str, Any]


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


def load_template(template: str | None) -> str | None:
    """A template is given inline or as a path to a Jinja file."""
    if template is None:
        return None
    path = Path(template).expanduser()
    if len(template) < 4096 and "{" not in template and path.is_file():
        return path.read_text()
    return template


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
) -> list[TokenizedPrompt]:
    """Token ids (and token types) the cross-encoder sees for each pair."""
    queries = [processor._text(q) for q, _ in pairs]
    docs = [processor._text(d) for _, d in pairs]
    queries = cut_to_tokens(processor, queries, max_tokens_per_query)
    docs = cut_to_tokens(processor, docs, max_tokens_per_doc)
    # Score calls always add the tokenizer's special tokens (vLLM: add_special_tokens is forced on).
    options = TruncationOptions(options.max_tokens, options.side, add_special_tokens=True)

    inputs: list[TextOrPair]
    if template is not None:
        inputs = [_render(processor, template, q, d, template_kwargs) for q, d in zip(queries, docs)]
    elif use_sep_token:
        inputs = list(zip(queries, docs))
    else:
        inputs = [q + d for q, d in zip(queries, docs)]
    prompts = [_to_prompt(enc) for enc in processor.encode(inputs, options)]
    for i, p in enumerate(prompts):
        processor.check(p, i, truncated=options.max_tokens is not None)
    return prompts


def _render(processor: InputProcessor, template: str, query: str, doc: str, kwargs: Mapping[str, Any] | None) -> str:
    kwargs = dict(kwargs or {})
    refused = sorted({"chat_template", "tools", "tokenize"} & set(kwargs))
    if refused:
        raise InvalidInputError(f"chat_template_kwargs may not set {refused}.", param="chat_template_kwargs")
    messages = [{"role": "query", "content": query}, {"role": "document", "content": doc}]
    try:
        rendered = processor.tokenizers.hf_tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, **kwargs
        )
    except Exception as e:
        raise InvalidInputError(f"The score template failed to render: {type(e).__name__}: {e}") from e
    return str(rendered)
