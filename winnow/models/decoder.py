"""Decoder-only transformers: Qwen2, Qwen3, Llama, Mistral, Gemma and Gemma2, with pooling heads.

Reference: transformers (v5) ``models/{llama,qwen2,qwen3,mistral,gemma,gemma2}/modeling_*.py`` and
``modeling_layers.GenericFor{Sequence,Token}Classification``. The six families share one pre-norm
decoder layer (RMSNorm -> causal grouped-query attention with RoPE -> RMSNorm -> gated MLP); what
differs is read from the config once into a ``DecoderSpec``:

    family   q/k/v bias      o bias          MLP bias   extra
    qwen2    always          never           never      sliding window on the layers ``layer_types`` marks
    qwen3    attention_bias  attention_bias  never      per-head RMSNorm on q and k before RoPE; sliding as qwen2
    llama    attention_bias  attention_bias  mlp_bias
    mistral  never           never           never      sliding window on every layer (``sliding_window``)
    gemma    attention_bias  attention_bias  never      RMSNorm (1 + w), embeddings x sqrt(hidden), GeGLU (hidden_act)
    gemma2   attention_bias  attention_bias  never      gemma + post-attention and pre/post-feed-forward norms,
                                                        logit soft-capping, query_pre_attn_scalar, sliding layers

Attribute names follow the checkpoints (``model.layers.0.self_attn.q_proj``...) so weights load by
name; q/k/v and gate/up are fused into one GEMM each at load time (``packed_modules``; with GQA the
fused projection is split into unequal widths). Sequence classifiers pool the LAST token (HF: the
last non-pad token, the same for unpadded prompts) into ``score``; a ``*ForCausalLM`` checkpoint
converted with ``classifier_from_token`` gets ``score`` from LM-head rows (``lm_head_names``). Gemma2's
``final_logit_softcapping`` acts on LM logits only, which these heads never compute (config.py refuses
``classifier_from_token`` on a soft-capped model for that reason).
All tensors are packed: ``[num_tokens, hidden]`` (see ``runner/batch.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from winnow.errors import ModelLoadError
from winnow.layers.activation import get_activation
from winnow.layers.attention import AttentionSpec, packed_attention
from winnow.layers.norm import RMSNorm
from winnow.layers.rotary import RotaryEmbedding, apply_rotary
from winnow.models.base import ModelBase
from winnow.params import PoolingType
from winnow.runner.batch import Batch, take_rows

_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class DecoderSpec:
    """Everything a decoder layer needs from the config, per family (see the module docstring)."""

    family: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int
    eps: float
    act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # qwen3: RMSNorm over head_dim on q and k
    gemma: bool  # RMSNorm (1 + w) and embeddings scaled by sqrt(hidden_size)
    sandwich_norms: bool  # gemma2: norms after attention and around the MLP
    scale: float | None  # attention scale; None: head_dim ** -0.5
    softcap: float | None  # attention logit soft-capping
    windows: tuple[int | None, ...]  # per layer: AttentionSpec.window (keys at most this far back), or None

    @staticmethod
    def from_config(config: Any, family: str) -> DecoderSpec:
        model_type = getattr(config, "model_type", None)
        if model_type != family:
            raise ModelLoadError(
                f"The {family} implementation cannot run a config of model_type={model_type!r}; "
                "set `architectures` to the class of the checkpoint's own family."
            )
        if getattr(config, "use_bidirectional_attention", False):
            raise ModelLoadError("use_bidirectional_attention=True (bidirectional Gemma) is not supported natively.")
        gemma = family in ("gemma", "gemma2")
        bias = bool(getattr(config, "attention_bias", False))
        act = config.hidden_activation if family == "gemma2" else config.hidden_act
        get_activation(act)  # an unknown activation is a ModelLoadError now, not at the first forward
        heads = int(config.num_attention_heads)
        return DecoderSpec(
            family=family,
            hidden_size=int(config.hidden_size),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            intermediate_size=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers),
            eps=float(config.rms_norm_eps),
            act=act,
            qkv_bias=True if family == "qwen2" else bias and family != "mistral",
            o_bias=bias and family not in ("qwen2", "mistral"),
            mlp_bias=family == "llama" and bool(getattr(config, "mlp_bias", False)),
            qk_norm=family == "qwen3",
            gemma=gemma,
            sandwich_norms=family == "gemma2",
            scale=float(config.query_pre_attn_scalar) ** -0.5 if family == "gemma2" else None,
            softcap=_optional_float(getattr(config, "attn_logit_softcapping", None)) if family == "gemma2" else None,
            windows=_layer_windows(config, family),
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _layer_windows(config: Any, family: str) -> tuple[int | None, ...]:
    """Per layer, the AttentionSpec window of the layers HF runs with a sliding-window mask.

    HF's mask lets query i see key j when ``i - window < j <= i``: at most ``window - 1`` back.
    """
    num_layers = int(config.num_hidden_layers)
    sliding = getattr(config, "sliding_window", None)
    if family in ("llama", "gemma"):
        return (None,) * num_layers
    if family == "mistral":  # every layer, when the config sets a window
        kinds = ["sliding_attention" if sliding is not None else "full_attention"] * num_layers
    else:
        kinds = list(getattr(config, "layer_types", None) or ["full_attention"] * num_layers)
    unknown = sorted(set(kinds) - set(_LAYER_TYPES))
    if unknown or len(kinds) != num_layers:
        raise ModelLoadError(f"layer_types {unknown or kinds} are not supported natively (full or sliding attention).")
    if "sliding_attention" not in kinds:
        return (None,) * num_layers
    if sliding is None or int(sliding) < 1:
        raise ModelLoadError(f"Sliding-window layers need a positive sliding_window, got {sliding!r}.")
    return tuple(int(sliding) - 1 if kind == "sliding_attention" else None for kind in kinds)


class DecoderAttention(nn.Module):
    """Causal grouped-query attention with RoPE; q/k/v fused into ``qkv_proj`` (see packed_modules)."""

    def __init__(self, spec: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.qkv_proj = nn.Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=spec.o_bias)
        self.q_norm: RMSNorm | None = RMSNorm(spec.head_dim, spec.eps) if spec.qk_norm else None
        self.k_norm: RMSNorm | None = RMSNorm(spec.head_dim, spec.eps) if spec.qk_norm else None
        self.attn = AttentionSpec(
            num_heads=spec.num_heads,
            head_dim=spec.head_dim,
            num_kv_heads=spec.num_kv_heads,
            causal=True,
            scale=spec.scale,
            window=spec.windows[layer_idx],
            softcap=spec.softcap,
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: Batch, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[T, hidden] -> [T, hidden], or [R, hidden] for the tokens ``rows`` (all tokens still are keys and values)."""
        # [T, hidden] -> q [T, heads * dim], k and v [T, kv_heads * dim]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.unflatten(-1, (self.attn.num_heads, self.attn.head_dim))  # [T, heads, dim]
        k = k.unflatten(-1, (self.attn.kv_heads, self.attn.head_dim))  # [T, kv_heads, dim]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q, cos, sin).flatten(1)
        k = apply_rotary(k, cos, sin).flatten(1)
        out = packed_attention(q, k, v, batch, self.attn)  # [T, heads * dim]
        return self.o_proj(take_rows(out, rows))  # [T or R, hidden]


class DecoderMLP(nn.Module):
    """down(act(gate(x)) * up(x)); gate and up fused into ``gate_up_proj``."""

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)
        self.act = get_activation(spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, intermediate] each
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block; Gemma2 also normalises the attention and MLP outputs before the residual add."""

    def __init__(self, spec: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(spec, layer_idx)
        self.mlp = DecoderMLP(spec)
        self.input_layernorm = _norm(spec)
        self.post_attention_layernorm = _norm(spec)
        self.sandwich = spec.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = _norm(spec)
            self.post_feedforward_layernorm = _norm(spec)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: Batch, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, batch, rows)  # [T or R, hidden]
        x = take_rows(x, rows)
        if not self.sandwich:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def _norm(spec: DecoderSpec) -> RMSNorm:
    return RMSNorm(spec.hidden_size, spec.eps, unit_offset=spec.gemma)


# Checkpoint modules fused at load time: HF name -> (our module, shard index).
_PACKED: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


# The dtypes a model runs in (config.resolve_dtype).
_EMBED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Decoder(ModelBase):
    """What every class here shares: the family, fused projections, positions and LAST pooling."""

    family: ClassVar[str]
    packed_modules: ClassVar[dict[str, tuple[str, int]]] = _PACKED
    # The MLP linears: what quantization="int8" converts (layers/quant.py).
    quantizable: ClassVar[tuple[str, ...]] = (
        r"(.*\.)?layers\.\d+\.mlp\.gate_up_proj",
        r"(.*\.)?layers\.\d+\.mlp\.down_proj",
    )
    quantizable_7bit: ClassVar[tuple[str, ...] | None] = quantizable[:1]  # not down_proj (ModelBase)
    selects_output_rows: ClassVar[bool] = True  # honours Batch.output_rows
    traces_lone_requests: ClassVar[bool] = True

    @classmethod
    def max_positions(cls, config: Any) -> int:
        return int(config.max_position_embeddings)

    @classmethod
    def default_pooling(cls, config: Any) -> PoolingType:
        # A causal model's last token is the only one that has seen the whole prompt.
        return PoolingType.LAST


class DecoderModel(_Decoder):
    """The bare decoder: token ids -> final (normed) hidden states [num_tokens, hidden]."""

    base_model_prefix: ClassVar[str] = "model"
    # A causal LM's head, or a classifier's, when the checkpoint is served as an embedder.
    ignored_weights: ClassVar[tuple[str, ...]] = ("lm_head.", "score.")
    head_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any) -> None:
        super().__init__()
        spec = DecoderSpec.from_config(config, self.family)
        self.embed_tokens = nn.Embedding(config.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = _norm(spec)
        # Gemma scales the embeddings by sqrt(hidden) rounded to the model dtype first, as HF does:
        # rounded here for each dtype it may run in, so forward makes no tensor of it (a traced
        # lone request's graph would freeze one, runner/lone_trace.py). On the CPU explicitly, as
        # models are built under torch.device("meta").
        self.embed_scale = (
            {d: torch.tensor(spec.hidden_size**0.5, dtype=d, device="cpu").item() for d in _EMBED_DTYPES}
            if spec.gemma
            else None
        )
        # Built on the CPU even when the model is built on the meta device (the loader does that).
        with torch.device("cpu"):
            self.rotary = RotaryEmbedding.from_config(config, spec.head_dim)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)  # [T, hidden]
        if self.embed_scale is not None:  # Gemma
            x = x * self.embed_scale[x.dtype]
        cos, sin = self.rotary.cos_sin(batch.positions, x.dtype)  # [T, head_dim] each, shared by all layers
        *body, last = self.layers
        for layer in body:
            x = layer(x, cos, sin, batch)
        return self.norm(last(x, cos, sin, batch, batch.output_rows))  # [T, hidden] or [num_seqs, hidden]


class _DecoderClassifier(_Decoder):
    body_class: ClassVar[type[DecoderModel]]
    head_prefixes: ClassVar[tuple[str, ...]] = ("score",)
    # A causal-LM checkpoint converted into a classifier carries its LM head: known, unused.
    ignored_weights: ClassVar[tuple[str, ...]] = ("lm_head.",)
    body_prefix: ClassVar[str] = "model"
    model: DecoderModel
    score: nn.Linear

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model(batch)

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden)  # [n, hidden] -> [n, num_labels]


class DecoderForSequenceClassification(_DecoderClassifier):
    """Body + ``score`` (no bias unless the checkpoint has one) on the last token."""

    # Where classifier_from_token finds LM-head rows: the LM head, else the tied input embedding.
    lm_head_names: ClassVar[tuple[str, ...]] = ("lm_head.weight", "model.embed_tokens.weight")

    @classmethod
    def init_kwargs(cls, config: Any, names: set[str]) -> dict[str, Any]:
        return {"score_bias": "score.bias" in names}

    def __init__(self, config: Any, *, score_bias: bool = False) -> None:
        super().__init__()
        self.model = self.body_class(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=score_bias)

    def classify_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.score(pooled)  # [n, hidden] -> [n, num_labels]


class DecoderForTokenClassification(_DecoderClassifier):
    """Body + per-token ``score`` (HF GenericForTokenClassification: bias unless token_classification_bias=False)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.model = self.body_class(config)
        bias = bool(getattr(config, "token_classification_bias", True))
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=bias)


# --- the registered classes (names = HF architecture names) ------------------------------------


class Qwen2Model(DecoderModel):
    family = "qwen2"


class Qwen2ForSequenceClassification(DecoderForSequenceClassification):
    family = "qwen2"
    body_class = Qwen2Model


class Qwen2ForTokenClassification(DecoderForTokenClassification):
    family = "qwen2"
    body_class = Qwen2Model


class Qwen3Model(DecoderModel):
    family = "qwen3"


class Qwen3ForSequenceClassification(DecoderForSequenceClassification):
    family = "qwen3"
    body_class = Qwen3Model


class Qwen3ForTokenClassification(DecoderForTokenClassification):
    family = "qwen3"
    body_class = Qwen3Model


class LlamaModel(DecoderModel):
    family = "llama"


class LlamaForSequenceClassification(DecoderForSequenceClassification):
    family = "llama"
    body_class = LlamaModel


class LlamaForTokenClassification(DecoderForTokenClassification):
    family = "llama"
    body_class = LlamaModel


class MistralModel(DecoderModel):
    family = "mistral"


class MistralForSequenceClassification(DecoderForSequenceClassification):
    family = "mistral"
    body_class = MistralModel


class MistralForTokenClassification(DecoderForTokenClassification):
    family = "mistral"
    body_class = MistralModel


class GemmaModel(DecoderModel):
    family = "gemma"


class GemmaForSequenceClassification(DecoderForSequenceClassification):
    family = "gemma"
    body_class = GemmaModel


class GemmaForTokenClassification(DecoderForTokenClassification):
    family = "gemma"
    body_class = GemmaModel


class Gemma2Model(DecoderModel):
    family = "gemma2"


class Gemma2ForSequenceClassification(DecoderForSequenceClassification):
    family = "gemma2"
    body_class = Gemma2Model


class Gemma2ForTokenClassification(DecoderForTokenClassification):
    family = "gemma2"
    body_class = Gemma2Model
