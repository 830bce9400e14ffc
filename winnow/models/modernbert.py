"""ModernBERT: a pre-norm encoder with rotary positions, alternating global and sliding-window
attention and a GeGLU feed-forward, with its sequence and token classification heads.

Reference: transformers' ``models/modernbert/modeling_modernbert.py`` and
``configuration_modernbert.py`` (v5). Attribute names follow the checkpoints
(``model.layers.0.attn.Wqkv``, ``model.final_norm``, ``head.dense``, ``classifier``), so weights
load by name with no renaming; the attention projection is already fused (``Wqkv``). Dropout is
omitted (inference only). All tensors are packed: ``[num_tokens, hidden]`` (see ``runner/batch.py``).

What transformers does, and what this file does the same way:

* embeddings: ``norm(tok_embeddings(ids))``, no absolute positions, no token types;
* layer ``i``: ``x += Wo(attn(attn_norm(x)))``; ``x += mlp(mlp_norm(x))``; layer 0's
  ``attn_norm`` is an Identity (the embedding norm precedes it), so it has no weights;
* ``config.layer_types[i]``: ``full_attention`` (global) or ``sliding_attention`` (local), where a
  token attends to keys at most ``local_attention // 2`` positions away on either side
  (HF's ``config.sliding_window`` and its bidirectional sliding-window mask, inclusive);
* RoPE (rotate-half) with separate parameters per layer type (``config.rope_parameters``), applied
  to queries and keys in float32 as transformers does;
* MLP: ``Wo(act(input) * gate)`` with ``input, gate = Wi(x).chunk(2)``;
* ``final_norm`` after the last layer; LayerNorms have a bias only when ``norm_bias``;
* heads: ``head = norm(act(dense(x)))`` then ``classifier``; the sequence classifier pools by
  ``config.classifier_pooling`` (``cls``: first token, ``mean``: all prompt tokens), which the
  architecture fixes (vLLM ignores a pooler override; see ``pooling_is_fixed``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from winnow.errors import ModelLoadError
from winnow.layers.activation import get_activation, is_supported_activation
from winnow.layers.attention import AttentionSpec, packed_attention
from winnow.layers.linear import is_tracing
from winnow.layers.rotary import RotaryEmbedding, apply_rotary
from winnow.models.base import ModelBase
from winnow.params import PoolingType
from winnow.runner.batch import Batch, take_rows

_LAYER_TYPES = ("full_attention", "sliding_attention")
_POOLINGS = {"cls": PoolingType.CLS, "mean": PoolingType.MEAN}

RopeTables = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer type -> (cos, sin), [num_tokens, head_dim]


def check_modernbert_config(config: Any) -> None:
    """Reject configs this implementation does not compute, naming the field to change."""
    if config.hidden_size % config.num_attention_heads:
        raise ModelLoadError(
            f"hidden_size={config.hidden_size} is not a multiple of num_attention_heads={config.num_attention_heads}."
        )
    for field in ("hidden_activation", "classifier_activation"):
        name = getattr(config, field)
        if not is_supported_activation(name):
            raise ModelLoadError(f"{field}={name!r} is not supported natively by winnow's ModernBERT.")
    layer_types = list(config.layer_types)
    unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
    if len(layer_types) != config.num_hidden_layers or unknown:
        raise ModelLoadError(
            f"layer_types must list one of {_LAYER_TYPES} per layer ({config.num_hidden_layers}); got {layer_types}."
        )


def _layer_norm(config: Any) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


class ModernBertEmbeddings(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = _layer_norm(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tok_embeddings(input_ids))  # [T, hidden]


class ModernBertAttention(nn.Module):
    """Fused QKV, rotary queries and keys, global or sliding-window attention, output projection."""

    def __init__(self, config: Any, layer_type: str) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.layer_type = layer_type
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        # HF: |query - key| <= local_attention // 2 (``config.sliding_window``), inclusive.
        self.window = config.local_attention // 2 if layer_type == "sliding_attention" else None

    def forward(
        self, x: torch.Tensor, batch: Batch, rope: RopeTables, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[T, hidden] -> [T, hidden], or [R, hidden] for the tokens ``rows`` (all tokens still are keys and values)."""
        hidden = self.num_heads * self.head_dim  # a number, not x.shape[1]: a traced graph would warn on it
        q, k, v = self.Wqkv(x).split(hidden, dim=1)  # 3 x [T, hidden], views
        cos, sin = rope[self.layer_type]
        q = self._rotate(q, cos, sin)
        k = self._rotate(k, cos, sin)
        # A window wider than the longest sequence restricts nothing: skip the mask. Not in a traced
        # graph (a lone request's, runner/lone_trace.py): that one serves every length, so it keeps it.
        narrow = self.window is not None and (is_tracing() or self.window < batch.max_seqlen - 1)
        window = self.window if narrow else None
        spec = AttentionSpec(num_heads=self.num_heads, head_dim=self.head_dim, window=window)
        out = packed_attention(q, k, v, batch, spec)  # [T, hidden]
        return self.Wo(take_rows(out, rows))  # [T or R, hidden]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # [T, hidden] -> [T, heads, head_dim], rotated in float32 (as transformers), back to [T, hidden]
        heads = x.unflatten(-1, (self.num_heads, self.head_dim))
        return apply_rotary(heads.float(), cos, sin).to(x.dtype).flatten(1)


class ModernBertMLP(nn.Module):
    """GeGLU: Wo(act(input) * gate), where Wi projects to [input | gate]."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = get_activation(config.hidden_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs, gate = self.Wi(x).chunk(2, dim=-1)  # 2 x [T, intermediate]
        return self.Wo(self.act(inputs) * gate)  # [T, hidden]


class ModernBertEncoderLayer(nn.Module):
    """Pre-norm block: x = x + attn(attn_norm(x)); x = x + mlp(mlp_norm(x))."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        # Layer 0 reads the already normalised embeddings: HF's attn_norm is an Identity there.
        self.attn_norm: nn.Module = nn.Identity() if layer_idx == 0 else _layer_norm(config)
        self.attn = ModernBertAttention(config, config.layer_types[layer_idx])
        self.mlp_norm = _layer_norm(config)
        self.mlp = ModernBertMLP(config)

    def forward(
        self, x: torch.Tensor, batch: Batch, rope: RopeTables, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        attn = self.attn(self.attn_norm(x), batch, rope, rows)  # [T or R, hidden]
        x = take_rows(x, rows) + attn
        return x + self.mlp(self.mlp_norm(x))  # [T or R, hidden]


class ModernBertModel(ModelBase):
    """The bare encoder: token ids -> final hidden states [num_tokens, hidden]."""

    base_model_prefix: ClassVar[str] = "model"
    # Weights a bare-encoder checkpoint may carry that embedding does not use (heads, the MLM decoder).
    ignored_weights: ClassVar[tuple[str, ...]] = ("head.", "classifier.", "decoder.")
    head_prefixes: ClassVar[tuple[str, ...]] = ()
    # The MLP linears: what quantization="int8" converts (layers/quant.py).
    quantizable: ClassVar[tuple[str, ...]] = (r"(.*\.)?layers\.\d+\.mlp\.Wi", r"(.*\.)?layers\.\d+\.mlp\.Wo")
    quantizable_7bit: ClassVar[tuple[str, ...] | None] = quantizable[:1]  # not Wo (ModelBase)
    selects_output_rows: ClassVar[bool] = True  # honours Batch.output_rows
    traces_lone_requests: ClassVar[bool] = True

    def __init__(self, config: Any) -> None:
        super().__init__()
        check_modernbert_config(config)
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(ModernBertEncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = _layer_norm(config)
        head_dim = config.hidden_size // config.num_attention_heads
        # Plain objects, not modules: no buffers in the state dict, nothing for the loader to fill.
        # Built on the CPU even when the model is built on the meta device (the loader does that).
        with torch.device("cpu"):
            self.rotary = {t: RotaryEmbedding.from_config(config, head_dim, t) for t in sorted(set(config.layer_types))}

    @classmethod
    def max_positions(cls, config: Any) -> int:
        return int(config.max_position_embeddings)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.embeddings(batch.input_ids)  # [T, hidden]
        # cos/sin per layer type, computed once per batch from each token's position in its sequence.
        rope = {t: r.cos_sin(batch.positions, x.dtype) for t, r in self.rotary.items()}
        *body, last = self.layers
        for layer in body:
            x = layer(x, batch, rope)
        return self.final_norm(last(x, batch, rope, batch.output_rows))  # [T, hidden] or [num_seqs, hidden]


class ModernBertPredictionHead(nn.Module):
    """norm(act(dense(x))): shared by the sequence and token classifiers."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.act = get_activation(config.classifier_activation)
        self.norm = _layer_norm(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class _ModernBertClassifier(ModelBase):
    """Body (``model``) + prediction head (``head``) + linear ``classifier``."""

    # The head runs in the head dtype (float32 by default), as the pooler casts pooled rows to it.
    head_prefixes: ClassVar[tuple[str, ...]] = ("head.", "classifier.")
    # classifier_pooling is part of the architecture: a user pooling override is ignored (vLLM).
    pooling_is_fixed: ClassVar[bool] = True
    quantizable = ModernBertModel.quantizable
    quantizable_7bit = ModernBertModel.quantizable_7bit
    selects_output_rows = ModernBertModel.selects_output_rows
    traces_lone_requests = ModernBertModel.traces_lone_requests

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    @classmethod
    def max_positions(cls, config: Any) -> int:
        return ModernBertModel.max_positions(config)

    @classmethod
    def default_pooling(cls, config: Any) -> PoolingType:
        value = getattr(config, "classifier_pooling", "cls")
        if value not in _POOLINGS:
            raise ModelLoadError(f"classifier_pooling={value!r} is not supported; ModernBERT pools with cls or mean.")
        return _POOLINGS[value]

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model(batch)  # [T, hidden] or [num_seqs, hidden]

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(hidden))  # [n, hidden] -> [n, num_labels]


class ModernBertForSequenceClassification(_ModernBertClassifier):
    def classify_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(pooled))  # [num_seqs, hidden] -> [num_seqs, num_labels]


class ModernBertForTokenClassification(_ModernBertClassifier):
    pass
