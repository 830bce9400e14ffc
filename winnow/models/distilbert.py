"""DistilBERT with its classification heads (reference: transformers' ``modeling_distilbert.py``).

Same post-norm block as BERT under different names (q_lin/k_lin/v_lin/out_lin, sa_layer_norm,
ffn.lin1/lin2, output_layer_norm), no token types, layer-norm epsilon fixed at 1e-12.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from winnow.errors import ModelLoadError
from winnow.layers.activation import get_activation, is_supported_activation
from winnow.layers.attention import fused_qkv_attention
from winnow.layers.linear import linear_act, linear_add
from winnow.models.base import ModelBase
from winnow.runner.batch import Batch, take_rows

_LN_EPS = 1e-12
# The feed-forward linears: what quantization="int8" converts (layers/quant.py).
_FFN = (r"(.*\.)?layer\.\d+\.ffn\.lin1", r"(.*\.)?layer\.\d+\.ffn\.lin2")


class Embeddings(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=_LN_EPS)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.word_embeddings(batch.input_ids) + self.position_embeddings(batch.positions)  # [T, dim]
        return self.LayerNorm(x)


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv_proj = nn.Linear(config.dim, 3 * config.dim)  # q_lin, k_lin, v_lin fused
        self.out_lin = nn.Linear(config.dim, config.dim)

    def context(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """[T, dim] -> [T, dim]: the heads' outputs before ``out_lin``, which the block applies
        together with the residual."""
        return fused_qkv_attention(self.qkv_proj(x), batch, self.n_heads)


class FFN(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.act = get_activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, dim] -> [T, dim]: the feed-forward plus its residual ``x``."""
        return linear_add(self.lin2, linear_act(self.lin1, self.act, x), x)


class TransformerBlock(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.attention = MultiHeadSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=_LN_EPS)
        self.ffn = FFN(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=_LN_EPS)

    def forward(self, x: torch.Tensor, batch: Batch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[T, dim] -> [T, dim], or [R, dim] for the tokens ``rows`` (all tokens still are keys and values)."""
        a = take_rows(self.attention.context(x, batch), rows)  # [T or R, dim]
        x = self.sa_layer_norm(linear_add(self.attention.out_lin, a, take_rows(x, rows)))  # [T or R, dim]
        return self.output_layer_norm(self.ffn(x))


class Transformer(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.layer = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """[T, dim] -> [T, dim], or [num_seqs, dim] for ``batch.output_rows``."""
        *body, last = self.layer
        for layer in body:
            x = layer(x, batch)
        return last(x, batch, batch.output_rows)


class DistilBertModel(ModelBase):
    packed_modules: ClassVar[dict[str, tuple[str, int]]] = {
        "q_lin": ("qkv_proj", 0),
        "k_lin": ("qkv_proj", 1),
        "v_lin": ("qkv_proj", 2),
    }
    base_model_prefix: ClassVar[str] = "distilbert"
    quantizable: ClassVar[tuple[str, ...]] = _FFN
    ignored_weights: ClassVar[tuple[str, ...]] = (
        "pre_classifier.",
        "classifier.",
        "vocab_transform.",
        "vocab_layer_norm.",
        "vocab_projector.",
    )
    head_prefixes: ClassVar[tuple[str, ...]] = ()
    selects_output_rows: ClassVar[bool] = True  # honours Batch.output_rows
    traces_lone_requests: ClassVar[bool] = True

    def __init__(self, config: Any) -> None:
        super().__init__()
        if not is_supported_activation(config.activation):
            raise ModelLoadError(f"activation={config.activation!r} is not supported natively.")
        self.embeddings = Embeddings(config)
        self.transformer = Transformer(config)

    @classmethod
    def max_positions(cls, config: Any) -> int:
        return int(config.max_position_embeddings)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.transformer(self.embeddings(batch), batch)


class _DistilBertClassifier(ModelBase):
    packed_modules = DistilBertModel.packed_modules
    quantizable = DistilBertModel.quantizable
    ignored_weights: ClassVar[tuple[str, ...]] = ()
    max_positions = DistilBertModel.max_positions
    selects_output_rows = DistilBertModel.selects_output_rows
    traces_lone_requests = DistilBertModel.traces_lone_requests

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.distilbert = DistilBertModel(config)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.distilbert(batch)


class DistilBertForSequenceClassification(_DistilBertClassifier):
    head_prefixes: ClassVar[tuple[str, ...]] = ("pre_classifier", "classifier")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, config.num_labels)

    def classify_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.pre_classifier(pooled)))

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        # The whole sentence head applied per token, as vLLM does for RoBERTa-style heads.
        return self.classify_head(hidden)


class DistilBertForTokenClassification(_DistilBertClassifier):
    head_prefixes: ClassVar[tuple[str, ...]] = ("classifier",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.classifier = nn.Linear(config.dim, config.num_labels)

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)
