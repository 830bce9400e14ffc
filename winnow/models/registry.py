"""The model registry: Hugging Face architecture name -> the class that runs it.

Native classes are imported lazily by module name. Any other ``*ForSequenceClassification``,
``*ForTokenClassification`` or bare ``*Model`` encoder runs through transformers' own classes
(``hf_fallback.py``), which is correct but slower; ``resolve_architecture`` logs that once.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Literal

from winnow.errors import ConfigError, ModelLoadError
from winnow.models.base import ModelBase
from winnow.params import PoolingType

logger = logging.getLogger(__name__)

ModelKind = Literal["sequence_classifier", "token_classifier", "encoder"]


@dataclass(frozen=True)
class ModelEntry:
    """What the engine needs to know about an architecture before building it."""

    architecture: str  # the HF architecture name as written in config.json
    module: str  # module under winnow.models holding the class
    class_name: str
    kind: ModelKind
    default_seq_pooling: PoolingType
    is_native: bool = True

    def load_class(self) -> type[ModelBase]:
        module = importlib.import_module(f"winnow.models.{self.module}")
        cls = getattr(module, self.class_name)
        assert issubclass(cls, ModelBase), f"{self.class_name} must derive from models.base.ModelBase"
        return cls


_SEQ: ModelKind = "sequence_classifier"
_TOK: ModelKind = "token_classifier"
_ENC: ModelKind = "encoder"

# BERT-family encoders pool the first token ([CLS] / <s>) by default (vLLM 0.33).
_NATIVE: dict[str, tuple[str, ModelKind]] = {
    "BertForSequenceClassification": ("bert", _SEQ),
    "BertForTokenClassification": ("bert", _TOK),
    "BertModel": ("bert", _ENC),
    "RobertaForSequenceClassification": ("bert", _SEQ),
    "RobertaForTokenClassification": ("bert", _TOK),
    "RobertaModel": ("bert", _ENC),
    "XLMRobertaForSequenceClassification": ("bert", _SEQ),
    "XLMRobertaForTokenClassification": ("bert", _TOK),
    "XLMRobertaModel": ("bert", _ENC),
    "ElectraForSequenceClassification": ("bert", _SEQ),
    "ElectraForTokenClassification": ("bert", _TOK),
    "ElectraModel": ("bert", _ENC),
    "DistilBertForSequenceClassification": ("distilbert", _SEQ),
    "DistilBertForTokenClassification": ("distilbert", _TOK),
    "DistilBertModel": ("distilbert", _ENC),
    "DebertaV2ForSequenceClassification": ("deberta_v2", _SEQ),
    "DebertaV2ForTokenClassification": ("deberta_v2", _TOK),
    "DebertaV2Model": ("deberta_v2", _ENC),
    "ModernBertForSequenceClassification": ("modernbert", _SEQ),
    "ModernBertForTokenClassification": ("modernbert", _TOK),
    "ModernBertModel": ("modernbert", _ENC),
}
# Decoders: the classifier reads the last token; a *ForCausalLM checkpoint becomes a classifier
# with convert="classify" (its `score` head from the checkpoint, or built from LM-head rows).
for _family, _module in (
    ("Qwen2", "decoder"),
    ("Qwen3", "decoder"),
    ("Llama", "decoder"),
    ("Mistral", "decoder"),
    ("Gemma", "decoder"),
    ("Gemma2", "decoder"),
    ("GPT2", "gpt2"),
):
    _NATIVE[f"{_family}ForSequenceClassification"] = (_module, _SEQ)
    _NATIVE[f"{_family}ForTokenClassification"] = (_module, _TOK)
    _NATIVE[f"{_family}Model"] = (_module, _ENC)

_GENERATIVE_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "ChatModel", "LMHeadModel")


def native_architectures() -> list[str]:
    return sorted(_NATIVE)


def resolve_architecture(
    architectures: list[str], *, model_type: str | None = None, runner: str = "auto", convert: str = "auto"
) -> ModelEntry:
    """Pick the class for a config's ``architectures`` list, honouring ``runner`` and ``convert``."""
    if runner not in ("auto", "pooling"):
        raise ConfigError(
            f"runner={runner!r} is not supported: winnow runs pooling models only (classify, score, embed)."
        )
    if convert not in ("auto", "none", "classify", "embed"):
        raise ConfigError(f"convert={convert!r} is not one of auto, none, classify, embed.")
    if not architectures:
        raise ModelLoadError("config.json lists no `architectures`; set it with hf_overrides={'architectures': [...]}.")
    arch = architectures[0]
    if arch.endswith(_GENERATIVE_SUFFIXES):
        arch = _convert_generative(arch, convert)

    if arch in _NATIVE:
        module, kind = _NATIVE[arch]
        if convert == "embed" and kind != _ENC:
            arch, kind = arch.split("For")[0] + "Model", _ENC
        elif convert == "classify" and kind == _ENC:
            raise ConfigError(
                f"{arch} is a bare encoder with no classifier weights; convert='classify' needs a checkpoint "
                "that carries a classification head."
            )
        return ModelEntry(arch, module, arch, kind, PoolingType.CLS)

    if convert == "embed" or arch.endswith("Model"):
        kind = _ENC
    elif arch.endswith("ForSequenceClassification"):
        kind = _SEQ
    elif arch.endswith("ForTokenClassification"):
        kind = _TOK
    else:
        raise ModelLoadError(
            f"Architecture {arch} is not supported. winnow runs *ForSequenceClassification, "
            f"*ForTokenClassification and bare *Model encoders; natively: {', '.join(native_architectures())}."
        )
    logger.warning(
        "%s has no native winnow implementation: running it through transformers' own classes (slow path).",
        arch,
    )
    # A causal model's first token has seen only itself: decoders pool the last token, encoders the first.
    pooling = PoolingType.LAST if _is_causal_only(model_type) else PoolingType.CLS
    return ModelEntry(arch, "hf_fallback", "HFFallbackModel", kind, pooling, is_native=False)


def _convert_generative(arch: str, convert: str) -> str:
    """A generative architecture runs as the same body with a pooling head: ``classify`` adds a
    classifier on the last token, ``embed`` serves the bare model. Without convert it cannot run."""
    family = next(arch[: -len(suffix)] for suffix in _GENERATIVE_SUFFIXES if arch.endswith(suffix))
    target = {"classify": f"{family}ForSequenceClassification", "embed": f"{family}Model"}.get(convert)
    if target is None:
        raise ModelLoadError(
            f"{arch} is a generative model and does not support the pooling runner as it is. You can pass "
            "convert='classify' (--convert classify) or convert='embed' to adapt it into a pooling model."
        )
    if target not in _NATIVE:
        raise ModelLoadError(
            f"{arch} cannot be converted: winnow has no native {target}. Natively: {', '.join(native_architectures())}."
        )
    return target


def _is_causal_only(model_type: str | None) -> bool:
    """True for decoder-only model types (GPT-2, Llama...): causal LMs with no masked-LM variant."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
