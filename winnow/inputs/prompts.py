"""Prompts -> token ids: parsing, tokenization options, truncation and length checks.

Everything a user can get wrong about a prompt is caught here, before any request reaches the
engine, so a bad prompt never produces a partial answer.
"""

from __future__ import annotations

import itertools
import logging
import operator
import reprlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from tokenizers import Encoding

from winnow.errors import InvalidInputError, PromptTooLongError
from winnow.inputs.tokenizer import TextOrPair, TokenizerGroup

logger = logging.getLogger(__name__)

# A parsed prompt: text to tokenize, or token ids used as they are.
Prompt = str | list[int]

_KNOWN_TOKENIZATION_KWARGS = frozenset(
    {"truncate_prompt_tokens", "truncation_side", "add_special_tokens", "max_length", "truncation", "padding"}
)


@dataclass(frozen=True)
class TokenizedPrompt:
    token_ids: list[int]
    token_type_ids: list[int] | None = None  # None when every type id is 0

    @staticmethod
    def from_encoding(enc: Encoding) -> TokenizedPrompt:
        types = enc.type_ids
        return TokenizedPrompt(list(enc.ids), list(types) if any(types) else None)


@dataclass(frozen=True)
class TruncationOptions:
    """Resolved tokenization options of one call."""

    max_tokens: int | None = None  # keep at most this many tokens (special tokens included); None: refuse long
    side: str = "right"  # which end truncation removes tokens from
    add_special_tokens: bool = True


def parse_prompts(prompts: Any) -> list[Prompt]:
    """Accept str, {"prompt": str}, {"prompt_token_ids": [int]} or a list of those (token ids may be
    numpy or torch integers, or a 1-D array or tensor)."""
    items = prompts if isinstance(prompts, (list, tuple)) else [prompts]
    if not items:
        raise InvalidInputError("You must pass at least one prompt", param="input")
    return [_parse_one(item, i) for i, item in enumerate(items)]


def _parse_one(item: Any, index: int) -> Prompt:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping):
        if "prompt_token_ids" in item:
            return _token_ids(item["prompt_token_ids"], index)
        if isinstance(item.get("prompt"), str):
            return str(item["prompt"])
    raise InvalidInputError(
        f"Prompt {index} has an unsupported form ({type(item).__name__}); pass a str, "
        '{"prompt": str} or {"prompt_token_ids": [int, ...]}.',
        param="input",
    )


def _token_ids(ids: Any, index: int) -> list[int]:
    """``prompt_token_ids`` as Python ints: a list or tuple of integers (numpy and torch integers
    too), or a 1-D numpy array or torch tensor of them."""
    if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):  # numpy array, torch tensor
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise InvalidInputError(
            f"Prompt {index}: prompt_token_ids must be a list of ints, got {type(ids).__name__}.", param="input"
        )
    if all(type(t) is int for t in ids):  # the common case, without a call per token
        return list(ids)
    return [_token_id(t, index, i) for i, t in enumerate(ids)]


def _token_id(value: Any, index: int, position: int) -> int:
    # NOTE: .tolist() unwraps numpy and torch scalars first, so that a bool stays a bool (and is
    # refused): operator.index reads torch.tensor(True) as 1.
    plain = value.tolist() if hasattr(value, "tolist") else value
    if not isinstance(plain, bool):
        try:
            return operator.index(plain)
        except TypeError:
            pass
    raise InvalidInputError(
        f"Prompt {index}: prompt_token_ids[{position}] is {reprlib.repr(value)} ({type(value).__name__}), "
        "not an integer token id.",
        param="input",
    )


def parse_truncation(
    kwargs: Mapping[str, Any] | None, *, max_model_len: int, truncate_prompt_tokens: int | None = None
) -> TruncationOptions:
    """Read ``tokenization_kwargs`` (vLLM names, plus HF-style max_length/truncation)."""
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - _KNOWN_TOKENIZATION_KWARGS)
    if unknown:
        logger.warning("Ignoring unknown tokenization_kwargs %s", unknown)
    if kwargs.get("padding") not in (None, False, "do_not_pad", "longest"):
        logger.warning("Ignoring padding=%r: winnow never pads prompts (results would change).", kwargs["padding"])

    k = kwargs.get("truncate_prompt_tokens", truncate_prompt_tokens)
    if k is None and kwargs.get("truncation") not in (None, False, "do_not_truncate"):
        k = kwargs.get("max_length", -1)
    side = kwargs.get("truncation_side") or "right"
    if side not in ("left", "right"):
        raise InvalidInputError(f"truncation_side must be 'left' or 'right', got {side!r}.", param="truncation_side")
    add_special = kwargs.get("add_special_tokens", True)
    if not isinstance(add_special, bool):
        raise InvalidInputError("add_special_tokens must be true or false.", param="add_special_tokens")
    return TruncationOptions(
        max_tokens=resolve_truncate_tokens(k, max_model_len), side=side, add_special_tokens=add_special
    )


def resolve_truncate_tokens(k: Any, max_model_len: int) -> int | None:
    """``truncate_prompt_tokens``: None = off, -1 = max_model_len, else 1..max_model_len."""
    if k is None:
        return None
    if not isinstance(k, int) or isinstance(k, bool) or k < -1 or k == 0:
        raise InvalidInputError(
            f"truncate_prompt_tokens must be -1 (= max_model_len) or a positive integer, got {k!r}.",
            param="truncate_prompt_tokens",
        )
    if k > max_model_len:
        raise InvalidInputError(
            f"truncate_prompt_tokens value ({k}) is greater than max_model_len ({max_model_len}). "
            "Please request a smaller truncation size.",
            param="truncate_prompt_tokens",
        )
    return max_model_len if k == -1 else k


class InputProcessor:
    """Tokenizes and validates prompts for one model."""

    def __init__(self, tokenizers: TokenizerGroup, *, max_model_len: int, vocab_size: int, lower_case: bool) -> None:
        self.tokenizers = tokenizers
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.lower_case = lower_case  # sentence-transformers do_lower_case

    def process(
        self, prompts: Sequence[Prompt], options: TruncationOptions, *, offset: int = 0
    ) -> list[TokenizedPrompt]:
        """Tokenize texts (in one batch) and take token-id prompts as given; validate every result.
        ``offset``: the index of ``prompts[0]`` in the caller's list, for error messages."""
        results: list[TokenizedPrompt | None] = [None] * len(prompts)
        text_rows = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        for i, p in enumerate(prompts):
            if not p:
                raise InvalidInputError(
                    f"Prompt {offset + i} is empty; pass at least one character or token.", param="input"
                )
            if isinstance(p, list):
                results[i] = TokenizedPrompt(_truncate_ids(p, options))
        texts: list[TextOrPair] = [self.normalize_text(prompts[i]) for i in text_rows]  # type: ignore[arg-type]
        for i, enc in zip(text_rows, self.encode(texts, options)):
            results[i] = TokenizedPrompt.from_encoding(enc)
        checked = [r for r in results if r is not None]
        for i, r in enumerate(checked):
            self.check(r, offset + i, truncated=options.max_tokens is not None)
        return checked

    def encode(self, inputs: Sequence[TextOrPair], options: TruncationOptions) -> Iterator[Encoding]:
        """Tokenize texts or pairs. Without truncation, work is bounded at max_model_len + 1 tokens.
        Encodings come ``_ENCODE_CHUNK`` at a time, each chunk freed before the next is made: freeing
        200k of them at once held the GIL for ~1.2 s, a stall of the server's event loop."""
        self._check_room(inputs, options)  # now, not when the first encoding is asked for
        chunks = range(0, len(inputs), _ENCODE_CHUNK)
        return itertools.chain.from_iterable(self._encode(inputs[i : i + _ENCODE_CHUNK], options) for i in chunks)

    def _check_room(self, inputs: Sequence[TextOrPair], options: TruncationOptions) -> None:
        pair = bool(inputs) and isinstance(inputs[0], tuple)
        limit = options.max_tokens
        if limit is not None and options.add_special_tokens:
            specials = self.tokenizers.num_special_tokens(pair=pair)
            if limit <= specials:
                raise InvalidInputError(
                    f"truncate_prompt_tokens={limit} leaves no room for text: the tokenizer adds {specials} "
                    "special tokens. Please request a larger truncation size.",
                    param="truncate_prompt_tokens",
                )

    def _encode(self, inputs: Sequence[TextOrPair], options: TruncationOptions) -> list[Encoding]:
        pair = bool(inputs) and isinstance(inputs[0], tuple)
        limit = options.max_tokens
        side = options.side if limit is not None else "right"
        max_length = limit if limit is not None else self.max_model_len + 1
        if pair:
            pairs = cast(Sequence[tuple[str, str]], inputs)
            inputs = [self._kept_pair(first, second, max_length, side) for first, second in pairs]
        else:
            inputs = [self._kept_part(text, max_length, side) for text in cast(Sequence[str], inputs)]
        return self.tokenizers.encode(
            inputs, add_special_tokens=options.add_special_tokens, max_length=max_length, side=side
        )

    def _kept_part(self, text: str, max_tokens: int, side: str) -> str:
        """The part of ``text`` that holds every token a truncation to ``max_tokens`` keeps.

        Truncation bounds what the model runs, not what the tokenizer reads: a 6 MB text took ~4 s
        and ~0.8 GB to tokenize only to be cut (or refused) at 513 tokens. So a long text is read a
        window at a time from the kept side, growing 4x, until the tokens that end before the
        window's last whitespace (which every pre-tokenizer here splits on, so tokenizing further
        text cannot change them) already number ``max_tokens``; the text is cut at that whitespace.
        A text without such a point is read whole, as before."""
        window = _KEPT_CHARS_PER_TOKEN * max_tokens
        while window < len(text):
            part = text[:window] if side == "right" else text[-window:]
            [enc] = self.tokenizers.encode_with_offsets([part])
            if side == "right":
                cut = part.rfind(" ")
                stable = sum(1 for _, end in enc.offsets if end <= cut)
                if cut > 0 and stable >= max_tokens:
                    return text[:cut]
            else:
                cut = part.find(" ")
                stable = sum(1 for start, _ in enc.offsets if start > cut)
                if cut >= 0 and stable >= max_tokens:
                    return part[cut:]
            window *= 4
        return text

    def _kept_pair(self, first: str, second: str, max_tokens: int, side: str) -> tuple[str, str]:
        """A pair with its long sides cut to what a truncation to ``max_tokens`` can keep of them.

        Pairs truncate longest-first: the shorter side keeps up to half the budget, and when both
        must be cut the odd token goes to the side with more tokens (the second on a tie). So a long
        side is cut (``_kept_part``) to more tokens than ``max_tokens``, and than the other side where
        that decides who is longer: every token either side keeps stays as it was. Read whole, two
        long sides also made the tokenizer pair up every overflow window of one with every window
        of the other (two 60k-character texts at 21 tokens: minutes)."""
        limit = _KEPT_CHARS_PER_TOKEN * max_tokens
        first_long, second_long = len(first) > limit, len(second) > limit
        if not (first_long or second_long):
            return first, second
        if first_long != second_long:
            [short] = self.tokenizers.encode_with_offsets([second if first_long else first])
            keep = max(max_tokens, len(short.ids) + 1)
            if first_long:
                return self._kept_part(first, keep, side), second
            return first, self._kept_part(second, keep, side)
        budget = max_tokens - self.tokenizers.num_special_tokens(pair=True)
        if budget % 2 == 0:  # each side keeps half, whichever is longer
            return self._kept_part(first, max_tokens, side), self._kept_part(second, max_tokens, side)
        # The odd token goes by the full lengths, so count both (linear); then the shorter side is
        # cut first and the longer one to more tokens than that (or as many: a tie favours the second).
        n_first, n_second = (len(e.ids) for e in self.tokenizers.encode_with_offsets([first, second]))
        first_longer = n_first > n_second
        shorter = self._kept_part(second if first_longer else first, max_tokens, side)
        [cut] = self.tokenizers.encode_with_offsets([shorter])
        longer = self._kept_part(first if first_longer else second, max(max_tokens, len(cut.ids) + first_longer), side)
        return (longer, shorter) if first_longer else (shorter, longer)

    def check(self, prompt: TokenizedPrompt, index: int, *, truncated: bool) -> None:
        n = len(prompt.token_ids)
        if n == 0:
            raise InvalidInputError(f"Prompt {index} has no tokens after tokenization.", param="input")
        if n > self.max_model_len:
            at_least = "" if truncated else "at least "
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
                f"(index {index}) contains {at_least}{n} input tokens. Please reduce the length of the input prompt "
                f"or set truncate_prompt_tokens. (parameter=input_tokens, value={n})",
                param="input",
            )
        bad = next((t for t in prompt.token_ids if t < 0 or t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidInputError(
                f"Prompt {index} contains token id {bad}, outside this model's vocabulary [0, {self.vocab_size}).",
                param="input",
            )

    def normalize_text(self, text: str) -> str:
        """sentence-transformers do_lower_case: the model was trained on lower-cased text."""
        return text.lower() if self.lower_case else text


# First window of a long text, in characters per token kept: most tokens cover 3-6 characters.
_KEPT_CHARS_PER_TOKEN = 16
_ENCODE_CHUNK = 2048  # texts or pairs per tokenizer call (InputProcessor.encode)


def _truncate_ids(ids: list[int], options: TruncationOptions) -> list[int]:
    k = options.max_tokens
    if k is None or len(ids) <= k:
        return list(ids)
    return ids[-k:] if options.side == "left" else ids[:k]
