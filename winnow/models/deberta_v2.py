"""DeBERTa-v2 / v3 encoders with their classification heads.

Reference: transformers' ``models/deberta_v2/modeling_deberta_v2.py`` (DeBERTa-v3 checkpoints are
this architecture: relative attention, ``position_buckets=256``, no absolute positions).
Attribute names follow the checkpoints so weights load by name; the only renaming is the fused
query/key/value projection (``packed_modules``). Dropout is omitted (inference only).

Disentangled attention adds two relative-position terms to the content scores of each head:

    c2p[i, j] = q_i . Kr[c2p_row(i - j)]      content-to-position (query content, key position)
    p2c[i, j] = k_j . Qr[p2c_row(j - i)]      position-to-content (HF indexes it from the key side)
    scores    = (q_i . k_j + c2p + p2c) / sqrt(head_dim * (1 + number of terms))

where ``Kr``/``Qr`` project the (optionally layer-normed) relative embeddings and a row is the
(log-bucketed) distance shifted by the attention span and clamped. Dense layers run on the packed
``[num_tokens, hidden]`` stream; attention runs per attention group on its padded grid
(``layers/attention.py``), with the two terms folded into SDPA's additive mask. Each term is one
bmm of a group's queries (keys) against its 2L - 1 distance columns, read along diagonals by a
strided view (``relative_shift``), so no [L, L] index is gathered.

``Kr``, ``Qr`` and the row of every distance depend on the weights and the config only, so they are
computed once, after loading (``process_weights_after_loading``): HF projects all 2 x span relative
rows in every layer of every forward, which for a short prompt is more GEMM work than its tokens'
own projections (a 22-token prompt of DeBERTa-v3-base: 512 rows against 22). A group of length L
reads 2L - 1 consecutive entries of the distance table, a slice whose bounds come from the grid's
shape: a lone request's traced graph (``runner/lone_trace.py``) serves every length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from winnow.errors import ModelLoadError
from winnow.layers.activation import get_activation, is_supported_activation
from winnow.layers.attention import from_grid, to_grid
from winnow.layers.linear import linear_act, linear_add
from winnow.models.base import ModelBase
from winnow.runner.batch import AttentionGroup, Batch, take_rows


def make_log_bucket_position(relative_pos: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """HF's bucketing, op for op (the ``ceil`` must see the same float32 values): distances beyond
    ``bucket_size // 2`` share logarithmically wider buckets."""
    sign = torch.sign(relative_pos)
    mid = bucket_size // 2
    # A Python scalar, not HF's torch.tensor(mid - 1).type_as(...): that is a blocking copy to a GPU.
    abs_pos = torch.where((relative_pos < mid) & (relative_pos > -mid), mid - 1, relative_pos.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative_pos.type_as(log_pos), log_pos * sign)


@dataclass(frozen=True)
class RelativePositions:
    """The relative-embedding row each query - key distance reads, for every distance a prompt of at
    most ``max_len`` tokens has, in descending order: entry k is distance ``max_len - 1 - k``."""

    c2p: torch.Tensor  # [2 * max_len - 1] long: the row of Kr (content -> position)
    p2c: torch.Tensor  # [2 * max_len - 1] long: the row of Qr (position -> content), for the negated distance
    max_len: int

    def columns(self, rows: torch.Tensor, length: int) -> torch.Tensor:
        """[2L - 1]: the rows of a grid of ``length`` L's distance columns; column e is distance
        L - 1 - e, the order ``relative_shift`` reads (entries max_len - L .. max_len + L - 2)."""
        return rows.narrow(0, self.max_len - length, 2 * length - 1)


def relative_shift(scores: torch.Tensor) -> torch.Tensor:
    """[..., L, 2L - 1] scores of each row against distance columns -> [..., L, L] strided view.

    ``out[..., i, j] = scores[..., i, j - i + L - 1]``: row i of the view starts one element earlier
    in memory than a plain row would (stride 2L - 2), so no index tensor and no copy are needed.
    """
    # Strides from the shape, not ``stride()``: a traced graph records shapes, and freezes strides.
    assert scores.is_contiguous() and scores.storage_offset() == 0, "a fresh [..., L, 2L - 1] tensor"
    *lead, length, width = scores.shape
    strides, step = [width - 1, 1], length * width  # step: the elements of one [L, 2L - 1] matrix
    for size in reversed(lead):  # contiguous: each leading dimension steps over everything after it
        strides.insert(0, step)
        step = step * size
    return scores.as_strided((*lead, length, length), strides, length - 1)


def check_deberta_config(config: Any) -> None:
    """Reject config variants this implementation does not compute (they run on the fallback)."""
    acts = {"hidden_act": config.hidden_act, "pooler_hidden_act": getattr(config, "pooler_hidden_act", "gelu")}
    if getattr(config, "conv_kernel_size", 0) > 0:
        acts["conv_act"] = getattr(config, "conv_act", "tanh")
        if config.conv_kernel_size % 2 == 0:
            raise ModelLoadError(f"conv_kernel_size={config.conv_kernel_size} must be odd.")
    for key, value in acts.items():
        if not is_supported_activation(value):
            raise ModelLoadError(f"{key}={value!r} is not supported natively.")


class DebertaV2Embeddings(nn.Module):
    def __init__(self, config: Any, *, keep_position_embeddings: bool = False) -> None:
        super().__init__()
        dim = getattr(config, "embedding_size", None) or config.hidden_size
        self.position_biased_input = bool(getattr(config, "position_biased_input", True))
        self.word_embeddings = nn.Embedding(config.vocab_size, dim)
        # Some checkpoints carry an absolute table they never use (HF ignores it on load).
        has_positions = self.position_biased_input or keep_position_embeddings
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, dim) if has_positions else None
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, dim) if config.type_vocab_size > 0 else None
        self.embed_proj = nn.Linear(dim, config.hidden_size, bias=False) if dim != config.hidden_size else None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.word_embeddings(batch.input_ids)  # [T, dim]
        if self.position_biased_input:
            assert self.position_embeddings is not None
            x = x + self.position_embeddings(batch.positions)  # [T, dim]
        if self.token_type_embeddings is not None:
            types = self.token_type_embeddings
            x = x + (types.weight[0] if batch.token_type_ids is None else types(batch.token_type_ids))  # [T, dim]
        if self.embed_proj is not None:
            x = self.embed_proj(x)  # [T, hidden]
        # HF then multiplies by the attention mask: all ones here, packed rows have no padding.
        return self.LayerNorm(x)  # [T, hidden]


class DisentangledSelfAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = getattr(config, "attention_head_size", config.hidden_size // self.num_heads)
        self.all_head = self.num_heads * self.head_dim
        # query_proj, key_proj and value_proj fused into one GEMM (see packed_modules).
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * self.all_head)
        pos_att_type = config.pos_att_type or []
        self.c2p = "c2p" in pos_att_type
        self.p2c = "p2c" in pos_att_type
        self.relative = bool(getattr(config, "relative_attention", False)) and (self.c2p or self.p2c)
        # HF counts the terms in the scale even when relative attention is off.
        self.scale = (self.head_dim * (1 + self.c2p + self.p2c)) ** -0.5
        self.share_att_key = bool(getattr(config, "share_att_key", False))
        if self.relative and not self.share_att_key:
            if self.c2p:
                self.pos_key_proj = nn.Linear(config.hidden_size, self.all_head)
            if self.p2c:
                self.pos_query_proj = nn.Linear(config.hidden_size, self.all_head)
        # Kr and Qr of every relative-embedding row, [heads, head_dim, 2 * span] (scaled), set by
        # ``project_positions`` after loading; None where the term is off.
        self.register_buffer("pos_key", None, persistent=False)
        self.register_buffer("pos_query", None, persistent=False)

    @torch.no_grad()
    def project_positions(self, rel: torch.Tensor) -> None:
        """Project the [2 * span, hidden] (layer-normed) relative embeddings once: ``pos_key`` (Kr)
        and ``pos_query`` (Qr), each [heads, head_dim, 2 * span] with the score scale folded in."""
        if not self.relative:
            return
        a, heads = self.all_head, (self.num_heads, self.head_dim)

        def split(rows: torch.Tensor) -> torch.Tensor:
            # [W, heads * head_dim] -> [heads, head_dim, W]; contiguous, as every forward gathers its columns
            return (rows * self.scale).unflatten(-1, heads).permute(1, 2, 0).contiguous()

        if self.share_att_key:  # the content projections; v is dropped
            qk = self.qkv_proj(rel)[:, : 2 * a]  # [W, 2 * all_head]
            self.pos_key = split(qk[:, a:]) if self.c2p else None
            self.pos_query = split(qk[:, :a]) if self.p2c else None
        else:
            self.pos_key = split(self.pos_key_proj(rel)) if self.c2p else None
            self.pos_query = split(self.pos_query_proj(rel)) if self.p2c else None
            # Their only use was the line above: dropped, so the runner neither packs nor keeps them
            # (2 x hidden x all_head weights per layer).
            for name in ("pos_key_proj", "pos_query_proj"):
                if hasattr(self, name):
                    delattr(self, name)

    def forward(self, x: torch.Tensor, batch: Batch, rel: RelativePositions | None) -> torch.Tensor:
        """[T, hidden] -> [T, all_head]."""
        qkv = self.qkv_proj(x)  # [T, 3 * all_head]
        groups = batch.attn_groups
        if not groups:  # a CUDA graph's batch: relative positions are computed per padded group
            raise RuntimeError("DeBERTa's attention runs on padded groups; it cannot be captured in a CUDA graph.")
        if len(groups) == 1:
            return self._group(qkv, groups[0], rel)
        out = qkv.new_empty(qkv.shape[0], self.all_head)  # [T, all_head]
        for group in groups:
            rows = slice(group.token_start, group.token_end)
            out[rows] = self._group(qkv[rows], group, rel)
        return out

    def _group(self, qkv: torch.Tensor, group: AttentionGroup, rel: RelativePositions | None) -> torch.Tensor:
        """Packed rows of one group [t, 3 * all_head] -> attention output rows [t, all_head]."""
        n, h, dim = group.num_seqs, self.num_heads, self.head_dim
        # [t, 3 * all_head] -> [n, L, 3, heads, dim] -> [3, heads, n, L, dim]: head-major, so that the
        # relative terms are one bmm per head over all n * L queries.
        grid = to_grid(qkv, group).view(n, -1, 3, h, dim).permute(2, 3, 0, 1, 4).contiguous()
        length = grid.shape[3]  # L from the tensor, not the group: a traced lone request's graph serves every length
        q, k, v = grid.unbind(0)  # [heads, n, L, dim] each
        bias: torch.Tensor | None = None
        kr, qr = self.pos_key, self.pos_query
        if rel is not None and kr is not None:  # content -> position: q_i . Kr[row(i - j)]
            kr = kr.index_select(-1, rel.columns(rel.c2p, length))  # [heads, dim, 2L - 1]
            c2p = torch.bmm(q.flatten(1, 2), kr)  # [heads, n * L, 2L - 1]
            bias = relative_shift(c2p.view(h, n, length, 2 * length - 1))  # [heads, n, query, key]
        if rel is not None and qr is not None:  # position -> content: k_j . Qr[row(j - i)]
            qr = qr.index_select(-1, rel.columns(rel.p2c, length))  # [heads, dim, 2L - 1]
            p2c = torch.bmm(k.flatten(1, 2), qr)  # [heads, n * L, 2L - 1]
            p2c = relative_shift(p2c.view(h, n, length, 2 * length - 1)).transpose(-1, -2)  # [heads, n, query, key]
            bias = p2c if bias is None else bias + p2c
        mask = group.attn_mask  # [n, 1, 1, L] bool or None: True on real keys
        if bias is not None:  # the (pre-scaled) relative terms become SDPA's additive mask
            if mask is not None:  # padding keys masked as HF does
                bias = bias.masked_fill(~mask.transpose(0, 1), torch.finfo(bias.dtype).min)  # [heads, n, query, key]
            mask = bias.transpose(0, 1)  # [n, heads, query, key]
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [n, heads, L, dim] views
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # [n, heads, L, dim]
        return from_grid(out.transpose(1, 2).flatten(2), group)  # [t, all_head]


class DebertaV2SelfOutput(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class DebertaV2Attention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.self = DisentangledSelfAttention(config)
        self.output = DebertaV2SelfOutput(config)


class DebertaV2Intermediate(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


class DebertaV2Output(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class DebertaV2Layer(nn.Module):
    """Post-norm block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.attention = DebertaV2Attention(config)
        self.intermediate = DebertaV2Intermediate(config)
        self.output = DebertaV2Output(config)
        self.act = get_activation(config.hidden_act)

    def forward(
        self,
        x: torch.Tensor,
        batch: Batch,
        rel: RelativePositions | None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``rows``: compute the output of these tokens only ([R] -> [R, hidden]); every token still
        serves as a key and value."""
        attn = self.attention
        a = attn.self(x, batch, rel)  # [T, hidden]
        a, x = take_rows(a, rows), take_rows(x, rows)  # [T or R, hidden]
        x = attn.output.LayerNorm(linear_add(attn.output.dense, a, x))  # [T or R, hidden]
        h = linear_act(self.intermediate.dense, self.act, x)  # [T or R, intermediate]
        return self.output.LayerNorm(linear_add(self.output.dense, h, x))  # [T or R, hidden]


class ConvLayer(nn.Module):
    """DeBERTa-v2 (xlarge/xxlarge) convolution beside the first layer, over each sequence's tokens."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        size = config.conv_kernel_size
        groups = getattr(config, "conv_groups", 1)
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, size, padding=(size - 1) // 2, groups=groups)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = get_activation(getattr(config, "conv_act", "tanh"))

    def forward(self, embedded: torch.Tensor, residual: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``embedded`` (the encoder input), ``residual`` (layer 0's output): [T, hidden] -> [T, hidden]."""
        groups = batch.attn_groups
        if len(groups) == 1:  # no row slices: their bounds are host numbers a traced graph would freeze
            out = self._group(embedded, groups[0])  # [T, hidden]
        else:
            out = torch.empty_like(residual)  # [T, hidden]
            for group in groups:
                rows = slice(group.token_start, group.token_end)
                out[rows] = self._group(embedded[rows], group)
        return self.LayerNorm(residual + self.act(out))  # [T, hidden]

    def _group(self, embedded: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        # Zero right padding = HF's masked-out padding embeddings: the kernel sees zeros past the end.
        grid = to_grid(embedded, group).transpose(1, 2)  # [num_seqs, hidden, max_len]
        return from_grid(self.conv(grid).transpose(1, 2), group)  # [t, hidden]


class DebertaV2Encoder(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.layer = nn.ModuleList(DebertaV2Layer(config) for _ in range(config.num_hidden_layers))
        self.relative_attention = bool(getattr(config, "relative_attention", False))
        max_relative = getattr(config, "max_relative_positions", -1)
        self.max_relative_positions = max_relative if max_relative >= 1 else config.max_position_embeddings
        self.position_buckets = getattr(config, "position_buckets", -1)
        # The attention span: relative rows run over [0, 2 * span).
        self.span = self.position_buckets if self.position_buckets > 0 else self.max_relative_positions
        if self.relative_attention:
            self.rel_embeddings = nn.Embedding(2 * self.span, config.hidden_size)
        norm = [x.strip() for x in str(getattr(config, "norm_rel_ebd", "none")).lower().split("|")]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if "layer_norm" in norm else None
        self.conv = ConvLayer(config) if getattr(config, "conv_kernel_size", 0) > 0 else None
        # The longest prompt (``DebertaV2Model.max_positions``), and the row each of its distances
        # reads (``process_weights_after_loading``): [2 * max_len - 1] long each.
        self.max_len = int(config.max_position_embeddings)
        self.register_buffer("c2p_rows", None, persistent=False)
        self.register_buffer("p2c_rows", None, persistent=False)

    @torch.no_grad()
    def process_weights_after_loading(self) -> None:
        """Project every relative-embedding row in each layer (``project_positions``) and tabulate the
        row each distance of a prompt of up to ``max_len`` tokens reads (HF's c2p_pos / p2c_pos)."""
        if not self.relative_attention:
            return
        rel_emb = self.rel_embeddings.weight  # [2 * span, hidden]
        if self.LayerNorm is not None:
            rel_emb = self.LayerNorm(rel_emb)
        for layer in self.layer:
            assert isinstance(layer, DebertaV2Layer)
            layer.attention.self.project_positions(rel_emb)
        # Every query - key distance, descending; bucketed on the host with HF's float32 arithmetic.
        span, dist = self.span, torch.arange(self.max_len - 1, -self.max_len, -1)  # [2 * max_len - 1]
        if self.position_buckets > 0:
            dist = make_log_bucket_position(dist, self.position_buckets, self.max_relative_positions).long()
        device = rel_emb.device
        self.c2p_rows = (dist + span).clamp(0, 2 * span - 1).to(device)  # row of Kr for query - key = d
        self.p2c_rows = (-dist + span).clamp(0, 2 * span - 1).to(device)  # row of Qr for key - query = d

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        rel = RelativePositions(self.c2p_rows, self.p2c_rows, self.max_len) if self.relative_attention else None
        embedded = x
        *body, last = self.layer
        for i, layer in enumerate(body):
            x = layer(x, batch, rel)  # [T, hidden]
            if i == 0 and self.conv is not None:
                x = self.conv(embedded, x, batch)
        if not body and self.conv is not None:  # one layer, then the convolution: it needs every token
            x = self.conv(embedded, last(x, batch, rel), batch)
            return take_rows(x, batch.output_rows)
        return last(x, batch, rel, batch.output_rows)  # [T, hidden] or [num_seqs, hidden]


class DebertaV2Model(ModelBase):
    """The bare encoder: token ids -> final hidden states [num_tokens, hidden] (or the rows of
    ``batch.output_rows``)."""

    # The feed-forward linears: what quantization="int8" converts (layers/quant.py).
    quantizable: ClassVar[tuple[str, ...]] = (
        r"(.*\.)?layer\.\d+\.intermediate\.dense",
        r"(.*\.)?layer\.\d+\.output\.dense",
    )
    packed_modules: ClassVar[dict[str, tuple[str, int]]] = {
        "query_proj": ("qkv_proj", 0),
        "key_proj": ("qkv_proj", 1),
        "value_proj": ("qkv_proj", 2),
    }
    base_model_prefix: ClassVar[str] = "deberta"
    # Heads a bare-encoder checkpoint may carry: classifiers, masked-LM and replaced-token heads.
    ignored_weights: ClassVar[tuple[str, ...]] = (
        "pooler.",
        "classifier.",
        "lm_predictions.",
        "mask_predictions.",
        "cls.",
        "qa_outputs.",
    )
    head_prefixes: ClassVar[tuple[str, ...]] = ()
    selects_output_rows: ClassVar[bool] = True  # honours Batch.output_rows
    traces_lone_requests: ClassVar[bool] = True

    def __init__(self, config: Any, *, keep_position_embeddings: bool = False) -> None:
        super().__init__()
        check_deberta_config(config)
        self.embeddings = DebertaV2Embeddings(config, keep_position_embeddings=keep_position_embeddings)
        self.encoder = DebertaV2Encoder(config)

    @classmethod
    def max_positions(cls, config: Any) -> int:
        # Relative attention has no hard limit, but tokenizers and configs say 512: keep theirs.
        return int(config.max_position_embeddings)

    def process_weights_after_loading(self) -> None:
        self.encoder.process_weights_after_loading()

    @classmethod
    def init_kwargs(cls, config: Any, names: set[str]) -> dict[str, Any]:
        """An unused absolute position table in the checkpoint (position_biased_input=False) is loaded, not an error."""
        return {"keep_position_embeddings": any(n.endswith("embeddings.position_embeddings.weight") for n in names)}

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.encoder(self.embeddings(batch), batch)  # [T, hidden] or [num_seqs, hidden]


# --- classification heads -------------------------------------------------------------------


class ContextPooler(nn.Module):
    """act(dense(x)) on the pooled (first) token; HF's pooler dropout is a no-op at inference."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        size = getattr(config, "pooler_hidden_size", config.hidden_size)
        self.dense = nn.Linear(size, size)
        self.act = get_activation(getattr(config, "pooler_hidden_act", "gelu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))  # [n, hidden]


class _Classifier(ModelBase):
    """Body (``deberta``) + head. ``classify_head`` maps pooled states, ``token_head`` every token."""

    packed_modules = DebertaV2Model.packed_modules
    quantizable = DebertaV2Model.quantizable
    head_prefixes: ClassVar[tuple[str, ...]] = ("classifier.",)
    selects_output_rows = DebertaV2Model.selects_output_rows
    traces_lone_requests = DebertaV2Model.traces_lone_requests

    def __init__(self, config: Any, *, keep_position_embeddings: bool = False) -> None:
        super().__init__()
        self.deberta = DebertaV2Model(config, keep_position_embeddings=keep_position_embeddings)

    @classmethod
    def max_positions(cls, config: Any) -> int:
        return DebertaV2Model.max_positions(config)

    @classmethod
    def init_kwargs(cls, config: Any, names: set[str]) -> dict[str, Any]:
        return DebertaV2Model.init_kwargs(config, names)

    def process_weights_after_loading(self) -> None:
        self.deberta.process_weights_after_loading()

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.deberta(batch)  # [T, hidden]


class DebertaV2ForSequenceClassification(_Classifier):
    head_prefixes = ("pooler.", "classifier.")

    def __init__(self, config: Any, *, keep_position_embeddings: bool = False) -> None:
        super().__init__(config, keep_position_embeddings=keep_position_embeddings)
        self.pooler = ContextPooler(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)  # HF: the pooler's output_dim

    def classify_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(pooled))  # [n, hidden] -> [n, num_labels]

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        # The whole head per token (pooler dense + activation + classifier): DeBERTa's pooler is
        # part of its classification head (like RoBERTa's dense), unlike BERT's [CLS]-only pooler.
        return self.classifier(self.pooler(hidden))  # [n, hidden] -> [n, num_labels]


class DebertaV2ForTokenClassification(_Classifier):
    def __init__(self, config: Any, *, keep_position_embeddings: bool = False) -> None:
        super().__init__(config, keep_position_embeddings=keep_position_embeddings)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)  # [n, hidden] -> [n, num_labels]
