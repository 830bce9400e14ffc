"""What a native model class provides. Read this before adding a model family.

A model is an ``nn.Module`` built from the (transformers) config on the meta device, whose
parameter names equal the checkpoint's, so ``loader.load_weights`` fills it by name:

    forward(batch) -> Tensor            [num_tokens, hidden] final hidden states of the packed batch
                                        ([num_seqs, hidden] at batch.output_rows, if selects_output_rows)
    classify_head(pooled) -> Tensor     [n, hidden] -> [n, num_labels]   (sequence classifiers)
    token_head(hidden) -> Tensor        [n, hidden] -> [n, num_labels]   (token classifiers, and
                                        sequence classifiers asked for token_classify)

Class attributes the loader, config, runner and pooler read (declared with their defaults on
``ModelBase``, below, from which every class the registry names derives; override as needed):

    packed_modules      {checkpoint module name: (fused module name, shard index)}: projections
                        fused at load time, e.g. query/key/value -> qkv_proj
    ignored_weights     checkpoint name prefixes that are known and unused (an MLM head, a pooler)
    ignored_suffixes    checkpoint name endings that are known and unused (GPT-2's ``.attn.bias`` mask buffers)
    head_prefixes       parameter prefixes that run in the head dtype (float32 by default)
    base_model_prefix   bare encoders only: the prefix their checkpoints may carry ("bert")
    body_prefix         classifiers: the body's attribute ("model", "transformer"); checkpoint names
                        without it (a causal LM saved as its bare base model) are accepted too
    max_positions(config)     classmethod, required: the longest prompt the position encoding supports
    default_pooling(config)   classmethod: the sequence pooling when neither the user nor a
                              sentence-transformers config chooses one (CLS if absent)
    pooling_is_fixed          True when the architecture defines its pooling (ModernBERT's
                              classifier_pooling) and a user override would change the model
    init_kwargs(config, names)  classmethod: extra constructor arguments decided by the checkpoint's
                              tensor names (e.g. whether the classifier has a bias)
    process_weights_after_loading()  called by the loader once the weights are in place: what
                              depends on the weights alone is computed here, once (DeBERTa's
                              relative-position projections), not in every forward
    selects_output_rows True when forward honours ``Batch.output_rows``: the last layer runs its
                        output projection and feed-forward on those rows only (every token is still
                        a key and value) and returns them; the runner then asks for the pooled token
                        of each sequence whenever a batch reads nothing else
    lm_head_names       checkpoint names where LM-head rows can be read, first found wins
                        (lm_head, then the input embedding, used only when tie_word_embeddings): a
                        classifier can be built from token rows (``TokenScoreHead``, spec §4.2) into the
                        parameter ``score.weight``
    quantizable         regexes of the linears ``quantization="int8"`` replaces (the feed-forward
                        layers); absent: the model refuses int8
    quantizable_7bit    the same under the 7-bit activation scheme (``layers/quant.py``, CPUs
                        without VNNI), where it differs: a gated MLP's down projection reads the
                        product of two activations, heavy-tailed on both signs, which 7-bit codes
                        resolve worst; None: ``quantizable``
    traces_lone_requests  True when forward reads a one-sequence batch only through its tensors
                        (input_ids, positions, token_type_ids, output_rows) and shapes derived from
                        them, never a host-side length or a Python branch on one: on a CPU a lone
                        request then replays one traced graph at every length (runner/lone_trace.py)
    returns_pooled      True when forward already returns one pooled row per sequence (the
                        transformers fallback's classifiers): the pooler applies no head of its own

Everything else (pooling, calibration, activation, dtype of the head) is the pooler's job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from winnow.params import PoolingType

ScoreMethod = Literal["from_2_way_softmax", "no_post_processing"]


@dataclass(frozen=True)
class TokenScoreHead:
    """A classifier made of LM-head rows (vLLM's ``classifier_from_token`` + ``method``).

    ``from_2_way_softmax`` with tokens [false, true]: one row ``W[true] - W[false]``, so
    ``sigmoid(h . w)`` is the 2-way softmax probability of the true token.
    ``no_post_processing``: the rows of the tokens as they are, one label per token.
    """

    token_ids: tuple[int, ...]
    method: ScoreMethod

    @property
    def num_labels(self) -> int:
        return 1 if self.method == "from_2_way_softmax" else len(self.token_ids)

    def weight(self, lm_head: torch.Tensor) -> torch.Tensor:
        """[vocab, hidden] LM head -> [num_labels, hidden] classifier, computed in float32."""
        rows = lm_head[list(self.token_ids)].float()
        if self.method == "from_2_way_softmax":
            return (rows[1] - rows[0]).unsqueeze(0)
        return rows


class ModelBase(nn.Module):
    """The contract above as typed class attributes with their defaults: every class the registry
    names derives from it, so the loader, config, runner and pooler read attributes, not strings
    through ``getattr`` (where a misspelt name silently meant the default)."""

    packed_modules: ClassVar[Mapping[str, tuple[str, int]]] = MappingProxyType({})
    ignored_weights: ClassVar[tuple[str, ...]] = ()
    ignored_suffixes: ClassVar[tuple[str, ...]] = ()
    head_prefixes: ClassVar[tuple[str, ...]] = ()
    base_model_prefix: ClassVar[str | None] = None
    body_prefix: ClassVar[str | None] = None
    lm_head_names: ClassVar[tuple[str, ...]] = ()
    quantizable: ClassVar[tuple[str, ...]] = ()
    quantizable_7bit: ClassVar[tuple[str, ...] | None] = None
    selects_output_rows: ClassVar[bool] = False
    traces_lone_requests: ClassVar[bool] = False
    returns_pooled: bool = False  # an instance attribute of the fallback, which knows it once built
    pooling_is_fixed: ClassVar[bool] = False

    @classmethod
    def max_positions(cls, config: Any) -> int:
        raise NotImplementedError(f"{cls.__name__} must say how long a prompt its position encoding allows.")

    @classmethod
    def default_pooling(cls, config: Any) -> PoolingType | None:
        """None: the registry's default for the architecture's kind."""
        return None

    @classmethod
    def init_kwargs(cls, config: Any, names: set[str]) -> dict[str, Any]:
        return {}

    def process_weights_after_loading(self) -> None:
        """Called by the loader once every weight is in place: derive what depends on the weights
        alone (non-persistent buffers), so no forward recomputes it. Nothing by default."""
