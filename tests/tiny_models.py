"""Tiny random models and tokenizers built locally (no hub access), saved in Hugging Face layout.

``build_model(root, family, head, ...)`` writes config.json, model.safetensors and a fast tokenizer
into a fresh folder and returns its path. Weights are drawn with a larger spread than transformers'
default init so logits are far from zero and parity checks have something to compare.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "is",
    "was",
    "what",
    "who",
    "where",
    "capital",
    "france",
    "paris",
    "brazil",
    "brasilia",
    "city",
    "country",
    "horses",
    "cows",
    "are",
    "both",
    "animals",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "hello",
    "world",
    "barack",
    "obama",
    "visited",
    "microsoft",
    "headquarters",
    "seattle",
    "on",
    "january",
    "this",
    "product",
    "excellent",
    "and",
    "exceeded",
    "my",
    "expectations",
    "chef",
    "prepared",
    "delicious",
    "meal",
    "rain",
    "snow",
    "sun",
    "model",
    "server",
    "fast",
    "slow",
    "good",
    "bad",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'")

# Mixed lengths on purpose: batching must not change any result.
PROMPTS = [
    "hello",
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france?",
    "barack obama visited microsoft headquarters in seattle on january 2025.",
    "rain",
    "this product was excellent and exceeded my expectations " * 3,
    "a b c d e f g",
    "horses and cows are both animals",
]


def _bert_tokenizer(folder: Path) -> Any:
    from transformers import BertTokenizerFast

    vocab = list(dict.fromkeys(SPECIALS + CHARS + [f"##{c}" for c in CHARS] + WORDS))
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=512)


def _roberta_tokenizer(folder: Path) -> Any:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    corpus = [" ".join(WORDS), *PROMPTS, "".join(CHARS)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus, vocab_size=400, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    bpe.save_model(str(folder))
    lines = (folder / "merges.txt").read_text().splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#")]
    (folder / "merges.txt").unlink()
    (folder / "vocab.json").unlink()
    return RobertaTokenizerFast(vocab=bpe.get_vocab(), merges=merges, model_max_length=512)


_FAMILIES: dict[str, dict[str, Any]] = {
    "bert": {"config": "BertConfig", "prefix": "Bert", "tokenizer": "bert"},
    "roberta": {"config": "RobertaConfig", "prefix": "Roberta", "tokenizer": "roberta", "offset": True},
    "xlm-roberta": {"config": "XLMRobertaConfig", "prefix": "XLMRoberta", "tokenizer": "roberta", "offset": True},
    "electra": {"config": "ElectraConfig", "prefix": "Electra", "tokenizer": "bert"},
    "distilbert": {"config": "DistilBertConfig", "prefix": "DistilBert", "tokenizer": "bert"},
    "gpt2": {"config": "GPT2Config", "prefix": "GPT2", "tokenizer": "bert", "no_pad": True},
    # Fallback families (no native implementation in winnow). GPT-Neo: a decoder without a pad token.
    "albert": {"config": "AlbertConfig", "prefix": "Albert", "tokenizer": "bert"},
    # RoBERTa's code under another name: positions offset by the pad id, as RoBERTa's.
    "camembert": {"config": "CamembertConfig", "prefix": "Camembert", "tokenizer": "roberta", "offset": True},
    "gpt-neo": {"config": "GPTNeoConfig", "prefix": "GPTNeo", "tokenizer": "bert", "no_pad": True},
}
_HEADS = {"seq": "ForSequenceClassification", "tok": "ForTokenClassification", "base": "Model"}


def _config(family: str, vocab_size: int, pad_token_id: int, num_labels: int, extra: dict[str, Any]) -> Any:
    import transformers

    cfg_cls = getattr(transformers, _FAMILIES[family]["config"])
    offset = _FAMILIES[family].get("offset", False)
    if family == "distilbert":
        base = {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4, "max_position_embeddings": 64}
    elif family == "gpt2":
        base = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "bos_token_id": 2, "eos_token_id": 3}
    elif family == "gpt-neo":
        # One global and one local (window 8) attention layer.
        base = {
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 4,
            "attention_types": [[["global", "local"], 1]],
            "window_size": 8,
            "max_position_embeddings": 64,
            "bos_token_id": 2,
            "eos_token_id": 3,
        }
    else:
        base = {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "max_position_embeddings": 64 + (pad_token_id + 1 if offset else 0),
            "type_vocab_size": 1 if offset else 2,
        }
        if family == "electra":
            base["embedding_size"] = 16
        if family == "albert":
            base["embedding_size"] = 16
    base.update(vocab_size=vocab_size, pad_token_id=pad_token_id, num_labels=num_labels, initializer_range=0.3)
    base.update(extra)
    return cfg_cls(**base)


def build_model(
    root: Path,
    family: str,
    head: str,
    *,
    num_labels: int = 2,
    seed: int = 0,
    config_extra: dict[str, Any] | None = None,
    sentence_transformers: dict[str, Any] | None = None,
) -> Path:
    """Create a tiny ``family`` model with ``head`` (seq / tok / base) under ``root`` and return its folder."""
    import transformers

    fam = _FAMILIES[family]
    folder = root / f"{family}-{head}-{num_labels}-{seed}-{abs(hash(json.dumps(config_extra, sort_keys=True)))}"
    folder.mkdir(parents=True, exist_ok=False)
    tok = _bert_tokenizer(folder) if fam["tokenizer"] == "bert" else _roberta_tokenizer(folder)
    no_pad = fam.get("no_pad", False)
    pad = None if no_pad else tok.pad_token_id
    config = _config(family, len(tok), pad if pad is not None else 0, num_labels, config_extra or {})
    if no_pad:
        config.pad_token_id = None
    arch = fam["prefix"] + _HEADS[head]
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    _spread_weights(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    if sentence_transformers:
        _write_st_files(folder, sentence_transformers)
    return folder


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter so biases are non-zero and logits are well away from 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (
                "LayerNorm" in name
                or "layer_norm" in name
                or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            ):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _write_st_files(folder: Path, spec: dict[str, Any]) -> None:
    """sentence-transformers layout: modules.json, 1_Pooling/config.json, sentence_bert_config.json."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if spec.get("normalize", True):
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    mode = spec.get("pooling", "mean")
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": mode == "cls",
                "pooling_mode_mean_tokens": mode == "mean",
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
                "pooling_mode_lasttoken": mode == "lasttoken",
            }
        )
    )
    (folder / "sentence_bert_config.json").write_text(
        json.dumps(
            {
                "max_seq_length": spec.get("max_seq_length", 48),
                "do_lower_case": spec.get("do_lower_case", False),
            }
        )
    )
