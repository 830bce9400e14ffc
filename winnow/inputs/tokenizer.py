"""Tokenizer loading and thread-safe encoding with per-call truncation.

We call the Rust ``tokenizers.Tokenizer`` directly: its batch encoder releases the GIL, and it
lets us avoid transformers' habit of re-configuring one shared tokenizer on every call (which
is not safe when a server tokenizes for several clients at once). Each truncation setting gets
its own configured copy, created once and cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Encoding, Tokenizer

from winnow.errors import ModelLoadError

_MAX_CACHED_VARIANTS = 16

TextOrPair = str | tuple[str, str]


def load_hf_tokenizer(source: str | Path, *, trust_remote_code: bool, revision: str | None = None) -> Any:
    """Load a transformers fast tokenizer (we need its Rust backend and its special-token metadata)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code, revision=revision)
    except Exception as e:
        raise ModelLoadError(
            f"Could not load a tokenizer from {source}: {type(e).__name__}: {e}. The folder needs tokenizer.json "
            "or the files of a tokenizer transformers can convert (vocab.txt, sentencepiece.bpe.model, ...)."
        ) from e
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise ModelLoadError(f"The tokenizer in {source} has no fast (Rust) version; winnow needs one.")
    return tokenizer


class TokenizerGroup:
    """Encodes texts and text pairs, optionally truncated, from any thread.

    ``hf_tokenizer`` stays available for its metadata (special tokens, chat templates, decoding).
    """

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf_tokenizer = hf_tokenizer
        # The tokenizer.json may ship with padding or truncation switched on (all-MiniLM-L6-v2 pads
        # to 128): start from a clean copy so nothing is padded or cut unless a request asks.
        self._base = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
        self._base.no_padding()
        self._base.no_truncation()
        self._variants: OrderedDict[tuple[int, str], Tokenizer] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return int(self._base.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        """The id of an exact token string (case-sensitive), or None if the vocabulary lacks it."""
        found = self._base.token_to_id(token)
        return None if found is None else int(found)

    def num_special_tokens(self, *, pair: bool) -> int:
        return int(self._base.num_special_tokens_to_add(pair))

    def encode(
        self,
        inputs: Sequence[TextOrPair],
        *,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        side: str = "right",
    ) -> list[Encoding]:
        """Encode texts or (text, text_pair) tuples; with ``max_length``, truncate like HF (longest_first)."""
        tokenizer = self._base if max_length is None else self._truncating(max_length, side)
        return tokenizer.encode_batch(list(inputs), add_special_tokens=add_special_tokens)

    def encode_with_offsets(self, texts: Sequence[str]) -> list[Encoding]:
        """Content tokens only (no special tokens), with character offsets for exact text cuts."""
        return self._base.encode_batch(list(texts), add_special_tokens=False)

    def _truncating(self, max_length: int, side: str) -> Tokenizer:
        key = (max_length, side)
        with self._lock:
            tokenizer = self._variants.get(key)
            if tokenizer is not None:
                self._variants.move_to_end(key)
                return tokenizer
        tokenizer = Tokenizer.from_str(self._base.to_str())
        tokenizer.enable_truncation(max_length, strategy="longest_first", direction=side)
        with self._lock:
            self._variants[key] = tokenizer
            while len(self._variants) > _MAX_CACHED_VARIANTS:
                self._variants.popitem(last=False)
        return tokenizer
