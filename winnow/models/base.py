"""What a native model class provides. Read this before adding a model family.

A model is an ``nn.Module`` built from the (transformers) config on the meta device, whose
parameter names equal the checkpoint's, so ``loader.load_weights`` fills it by name:

    forward(batch) -> Tensor            [num_tokens, hidden] final hidden states of the packed batch
                                        ([num_seqs, hidden] at batch.output_rows, if selects_output_rows)
    classify_head(pooled) -> Tensor     [n, hidden] -> [n, num_labels]   (sequence classifiers)
    token_head(hidden) -> Tensor        [n, hidden] -> [n, num_labels]   (token classifiers, and
                                        sequence classifiers asked for token_classify)

Class attributes the loader, config, runner and pooler read (optional unless marked):

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
    returns_pooled      True when forward already returns one pooled row per sequence (the
                        transformers fallback's classifiers): the pooler applies no head of its own

Everything else (pooling, calibration, activation, dtype of the head) is the pooler's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

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
