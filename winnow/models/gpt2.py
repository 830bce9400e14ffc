"""GPT-2 with its pooling heads: ``GPT2Model``, ``GPT2ForSequenceClassification``, ``GPT2ForTokenClassification``.

Reference: transformers (v5) ``models/gpt2/modeling_gpt2.py``. Pre-LN blocks (ln_1 -> causal
attention -> residual; ln_2 -> MLP -> residual), learned absolute positions (``wpe``), a final
``ln_f``. Attribute names follow the checkpoints (``transformer.h.0.attn.c_attn``...). GPT-2's
``Conv1D`` stores its weight as ``[in, out]``; ``Conv1D`` below keeps that layout and computes
``x @ W + b``, so weights load as they are (no transposition). q/k/v are already fused in ``c_attn``.

The sequence classifier reads the LAST token (HF: the last non-pad token; GPT-2 has no pad token
by default, and unpadded prompts need none). Token type ids are ignored, as vLLM does: GPT-2
tokenizers never produce them. Old checkpoints carry the causal-mask buffers ``attn.bias`` and
``attn.masked_bias``; they hold no learned values and are skipped. All tensors are packed:
``[num_tokens, hidden]`` (see ``runner/batch.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from winnow.errors import ModelLoadError
from winnow.layers.activation import get_activation
from winnow.layers.attention import AttentionSpec, packed_attention
from winnow.models.base import ModelBase
from winnow.params import PoolingType
from winnow.runner.batch import Batch, take_rows


class Conv1D(nn.Module):
    """HF's Conv1D: a linear layer whose weight is stored transposed, ``[in_features, out_features]``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)  # [T, in] @ [in, out] + [out]


class GPT2Attention(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
        head_dim = hidden // heads
        scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.c_attn = Conv1D(hidden, 3 * hidden)  # q, k, v
        self.c_proj = Conv1D(hidden, hidden)
        self.spec = AttentionSpec(num_heads=heads, head_dim=head_dim, causal=True, scale=scale)

    def forward(self, x: torch.Tensor, batch: Batch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[T, hidden] -> [T, hidden], or [R, hidden] for the tokens ``rows`` (all tokens still are keys and values)."""
        q, k, v = self.c_attn(x).chunk(3, dim=-1)  # [T, hidden] each
        out = packed_attention(q, k, v, batch, self.spec)  # [T, hidden]
        return self.c_proj(take_rows(out, rows))


class GPT2MLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        inner = config.n_inner if config.n_inner is not None else 4 * config.hidden_size
        self.c_fc = Conv1D(config.hidden_size, inner)
        self.c_proj = Conv1D(inner, config.hidden_size)
        self.act = get_activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))  # [T, hidden] -> [T, inner] -> [T, hidden]


class GPT2Block(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, batch: Batch, rows: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.attn(self.ln_1(x), batch, rows)  # [T or R, hidden]
        x = take_rows(x, rows) + attn
        return x + self.mlp(self.ln_2(x))


class _GPT2Base(ModelBase):
    # Causal-mask buffers of old checkpoints (h.N.attn.bias, h.N.attn.masked_bias): no learned values.
    ignored_suffixes: ClassVar[tuple[str, ...]] = (".attn.bias", ".attn.masked_bias")

    selects_output_rows: ClassVar[bool] = True  # honours Batch.output_rows
    traces_lone_requests: ClassVar[bool] = True

    @classmethod
    def max_positions(cls, config: Any) -> int:
        return int(config.n_positions)

    @classmethod
    def default_pooling(cls, config: Any) -> PoolingType:
        return PoolingType.LAST  # the last token is the only one that has seen the whole prompt


class GPT2Model(_GPT2Base):
    """The bare decoder: token ids -> final hidden states (after ``ln_f``) [num_tokens, hidden]."""

    base_model_prefix: ClassVar[str] = "transformer"
    ignored_weights: ClassVar[tuple[str, ...]] = ("lm_head.", "score.", "classifier.")
    head_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any) -> None:
        super().__init__()
        if getattr(config, "add_cross_attention", False):
            raise ModelLoadError("GPT-2 with cross-attention (add_cross_attention=True) is not supported natively.")
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.n_positions, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.wte(batch.input_ids) + self.wpe(batch.positions)  # [T, hidden]
        *body, last = self.h
        for block in body:
            x = block(x, batch)
        return self.ln_f(last(x, batch, batch.output_rows))  # [T, hidden] or [num_seqs, hidden]


class _GPT2Classifier(_GPT2Base):
    ignored_weights: ClassVar[tuple[str, ...]] = ("lm_head.",)  # a converted GPT2LMHeadModel's head
    body_prefix: ClassVar[str] = "transformer"  # openai-community/gpt2 itself is saved with bare names
    transformer: GPT2Model

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.transformer(batch)


class GPT2ForSequenceClassification(_GPT2Classifier):
    """``score`` (no bias unless the checkpoint has one) on the last token."""

    head_prefixes: ClassVar[tuple[str, ...]] = ("score",)
    # classifier_from_token: GPT-2's LM head is tied to the input embedding.
    lm_head_names: ClassVar[tuple[str, ...]] = ("lm_head.weight", "transformer.wte.weight")

    @classmethod
    def init_kwargs(cls, config: Any, names: set[str]) -> dict[str, Any]:
        return {"score_bias": "score.bias" in names}

    def __init__(self, config: Any, *, score_bias: bool = False) -> None:
        super().__init__()
        self.transformer = GPT2Model(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=score_bias)

    def classify_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.score(pooled)  # [n, hidden] -> [n, num_labels]

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden)


class GPT2ForTokenClassification(_GPT2Classifier):
    """Per-token ``classifier`` with bias (HF GPT2ForTokenClassification)."""

    head_prefixes: ClassVar[tuple[str, ...]] = ("classifier",)

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.transformer = GPT2Model(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)  # [n, hidden] -> [n, num_labels]
