"""BERT-family encoders: BERT, RoBERTa, XLM-RoBERTa and ELECTRA, with their classification heads.

Reference: transformers' ``modeling_bert.py``, ``modeling_roberta.py``, ``modeling_electra.py``.
Attribute names follow the checkpoints so weights load by name; the only renaming is the fused
query/key/value projection declared in ``packed_modules``. Dropout is omitted (inference only).
All tensors are packed: ``[num_tokens, hidden]`` (see ``runner/batch.py``).
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


def check_bert_config(config: Any) -> None:
    """Reject config variants this implementation does not compute (they run on the fallback)."""
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind not in (None, "absolute"):
        raise ModelLoadError(f"position_embedding_type={kind!r} is not supported natively.")
    if getattr(config, "is_decoder", False):
        raise ModelLoadError("Decoder-mode BERT (is_decoder=True) is not supported natively.")
    if not is_supported_activation(config.hidden_act):
        raise ModelLoadError(f"hidden_act={config.hidden_act!r} is not supported natively.")


# The feed-forward linears of every layer: what quantization="int8" converts (layers/quant.py).
_FFN = (r"(.*\.)?layer\.\d+\.intermediate\.dense", r"(.*\.)?layer\.\d+\.output\.dense")


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        dim = getattr(config, "embedding_size", None) or config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, dim)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, dim)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def forward(self, batch: Batch, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(batch.input_ids) + self.position_embeddings(positions)  # [T, dim]
        if batch.token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(batch.token_type_ids)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        # query, key and value fused into one GEMM (see packed_modules).
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        return fused_qkv_attention(self.qkv_proj(x), batch, self.num_heads)


class BertSelfOutput(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class BertAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)


class BertIntermediate(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


class BertOutput(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class BertLayer(nn.Module):
    """Post-norm transformer block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor, batch: Batch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``rows``: compute the output of these tokens only ([R] -> [R, hidden]); every token still
        serves as a key and value."""
        attn = self.attention
        a = attn.self(x, batch)  # [T, hidden]
        a, x = take_rows(a, rows), take_rows(x, rows)  # [T or R, hidden]
        x = attn.output.LayerNorm(linear_add(attn.output.dense, a, x))  # [T or R, hidden]
        h = linear_act(self.intermediate.dense, self.act, x)  # [T or R, intermediate]
        return self.output.LayerNorm(linear_add(self.output.dense, h, x))  # [T or R, hidden]


class BertEncoder(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """[T, hidden] -> [T, hidden], or [num_seqs, hidden] for ``batch.output_rows``."""
        *body, last = self.layer
        for layer in body:
            x = layer(x, batch)
        return last(x, batch, batch.output_rows)


class BertPooler(nn.Module):
    """BERT's pooler: tanh(W h_cls + b). Part of the classification head, so it runs in head dtype."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


class BertModel(ModelBase):
    """The bare encoder: token ids -> final hidden states [num_tokens, hidden] (or the rows of
    ``batch.output_rows``)."""

    # Checkpoint modules fused at load time: HF name -> (our module, shard index).
    packed_modules: ClassVar[dict[str, tuple[str, int]]] = {
        "query": ("qkv_proj", 0),
        "key": ("qkv_proj", 1),
        "value": ("qkv_proj", 2),
    }
    base_model_prefix: ClassVar[str] = "bert"
    quantizable: ClassVar[tuple[str, ...]] = _FFN
    # Weights a bare-encoder checkpoint may carry that embedding does not use.
    ignored_weights: ClassVar[tuple[str, ...]] = ("pooler.", "cls.", "classifier.", "lm_head.")
    head_prefixes: ClassVar[tuple[str, ...]] = ()
    selects_output_rows: ClassVar[bool] = True  # honours Batch.output_rows
    traces_lone_requests: ClassVar[bool] = True

    def __init__(self, config: Any, *, add_pooling_layer: bool = False) -> None:
        super().__init__()
        check_bert_config(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    @staticmethod
    def position_offset(config: Any) -> int:
        return 0

    @classmethod
    def max_positions(cls, config: Any) -> int:
        return int(config.max_position_embeddings) - cls.position_offset(config)

    def compute_positions(self, batch: Batch) -> torch.Tensor:
        return batch.positions

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.embeddings(batch, self.compute_positions(batch))
        return self.encoder(x, batch)


class RobertaModel(BertModel):
    """BERT with positions counted from ``pad_token_id + 1``, skipping pad tokens (HF semantics)."""

    base_model_prefix = "roberta"

    def __init__(self, config: Any, *, add_pooling_layer: bool = False) -> None:
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        self.pad_token_id = int(config.pad_token_id)

    @staticmethod
    def position_offset(config: Any) -> int:
        return int(config.pad_token_id) + 1

    def compute_positions(self, batch: Batch) -> torch.Tensor:
        # HF: position = pad + (number of non-pad tokens up to and including this one), and a
        # pad token itself gets position `pad`. Computed per sequence on the packed stream.
        is_real = (batch.input_ids != self.pad_token_id).long()  # [T]
        count = is_real.cumsum(0)  # [T] running count over the whole packed stream
        # The length read from a tensor, not batch.num_tokens (a Python int): lone requests are traced.
        seq_start = torch.arange(count.shape[0], device=count.device) - batch.positions  # [T]
        count_before_seq = (count - is_real)[seq_start]  # [T] running count just before each sequence
        return (count - count_before_seq) * is_real + self.pad_token_id


class XLMRobertaModel(RobertaModel):
    base_model_prefix = "roberta"


class ElectraModel(BertModel):
    """BERT body with an optional projection from ``embedding_size`` to ``hidden_size``."""

    base_model_prefix = "electra"
    ignored_weights = (*BertModel.ignored_weights, "discriminator_predictions.", "generator_")

    def __init__(self, config: Any) -> None:
        super().__init__(config, add_pooling_layer=False)  # ELECTRA checkpoints have no pooler
        embedding_size = getattr(config, "embedding_size", config.hidden_size)
        self.embeddings_project = (
            nn.Linear(embedding_size, config.hidden_size) if embedding_size != config.hidden_size else None
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.embeddings(batch, batch.positions)
        if self.embeddings_project is not None:
            x = self.embeddings_project(x)
        return self.encoder(x, batch)


# --- classification heads -------------------------------------------------------------------


class RobertaClassificationHead(nn.Module):
    """out_proj(tanh(dense(x))), the RoBERTa / XLM-R sentence head."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x)))


class ElectraClassificationHead(RobertaClassificationHead):
    """out_proj(gelu(dense(x))): ELECTRA uses GELU where RoBERTa uses tanh."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(nn.functional.gelu(self.dense(x)))


class _Classifier(ModelBase):
    """Body + head. ``classify_head`` maps pooled states, ``token_head`` maps every token."""

    body_class: ClassVar[type[BertModel]] = BertModel
    packed_modules = BertModel.packed_modules
    quantizable: ClassVar[tuple[str, ...]] = _FFN
    # Older checkpoints may carry a pooler the head does not use.
    ignored_weights: ClassVar[tuple[str, ...]] = ("bert.pooler.", "roberta.pooler.", "electra.pooler.")
    head_prefixes: ClassVar[tuple[str, ...]] = ("classifier",)
    selects_output_rows: ClassVar[bool] = True
    traces_lone_requests: ClassVar[bool] = True

    @classmethod
    def max_positions(cls, config: Any) -> int:
        return cls.body_class.max_positions(config)

    def body(self) -> BertModel:
        module = getattr(self, self.body_class.base_model_prefix)
        assert isinstance(module, BertModel)
        return module

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.body()(batch)


class BertForSequenceClassification(_Classifier):
    head_prefixes = ("bert.pooler", "classifier")
    ignored_weights = ()

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.bert = BertModel(config, add_pooling_layer=True)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def classify_head(self, pooled: torch.Tensor) -> torch.Tensor:
        assert self.bert.pooler is not None
        return self.classifier(self.bert.pooler(pooled))

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        # vLLM semantics: per token, the classifier alone (the pooler belongs to [CLS] only).
        return self.classifier(hidden)


class BertForTokenClassification(_Classifier):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.bert = BertModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)


class RobertaForSequenceClassification(_Classifier):
    body_class = RobertaModel

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.roberta = self.body_class(config)
        self.classifier = RobertaClassificationHead(config)

    def classify_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)


class RobertaForTokenClassification(_Classifier):
    body_class = RobertaModel

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.roberta = self.body_class(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    body_class = XLMRobertaModel


class XLMRobertaForTokenClassification(RobertaForTokenClassification):
    body_class = XLMRobertaModel


class ElectraForSequenceClassification(_Classifier):
    body_class = ElectraModel

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.electra = ElectraModel(config)
        self.classifier = ElectraClassificationHead(config)

    def classify_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)


class ElectraForTokenClassification(_Classifier):
    body_class = ElectraModel

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.electra = ElectraModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def token_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)
