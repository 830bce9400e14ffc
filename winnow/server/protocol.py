"""Wire formats (vLLM 0.33 shapes, legacy spellings accepted). The only module that defines pydantic models.

Unknown request fields are accepted and ignored, as vLLM does (clients send ``encoding_format``
to /score, ``return_documents`` to /rerank...). Aliases are folded into one value by the
``*_value`` helpers; routes never look at legacy names.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from winnow.errors import InvalidInputError

# A prompt: text, token ids, a batch of texts, or a batch of token-id lists.
PromptInput = str | list[str] | list[StrictInt] | list[list[StrictInt]]
_Item = TypeVar("_Item")
# One side of a score pair: text or {"content": [{"type": "text", "text": ...}, ...]}.
ScoreInput = str | dict[str, Any]


class BaseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="A served model name; omitted means the default model.")
    user: str | None = None
    request_id: str | None = Field(None, description="Echoed in the response id (X-Request-Id also works).")
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="Keep at most this many tokens per prompt (-1: max_model_len)."
    )
    truncation_side: Literal["left", "right"] | None = None
    priority: int = 0

    @field_validator("priority")
    @classmethod
    def _no_priorities(cls, value: int) -> int:
        if value != 0:
            raise ValueError("priority scheduling is not supported: send priority 0 or leave it out.")
        return value

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "normalize" in data:
            raise ValueError("Parameter `normalize` was removed; use `use_activation` instead.")
        return data


class ActivationRequest(BaseRequest):
    use_activation: bool | None = Field(None, description="Apply softmax/sigmoid (classify) or L2 norm (embed).")
    softmax: bool | None = Field(None, description="Legacy alias of use_activation.")
    activation: bool | None = Field(None, description="Legacy alias of use_activation.")

    def use_activation_value(self) -> bool | None:
        given = {v for v in (self.use_activation, self.softmax, self.activation) if v is not None}
        if len(given) > 1:
            raise InvalidInputError("use_activation and its legacy aliases disagree.", param="use_activation")
        return next(iter(given), None)


class PromptRequest(ActivationRequest):
    """Completion form (``input``) or chat form (``messages``)."""

    input: PromptInput | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = Field(None, description="Default: true for input, false for messages.")
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> PromptRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("Pass exactly one of `input` or `messages`.")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return self


class ClassifyRequest(PromptRequest):
    pass


class PoolingRequest(PromptRequest):
    task: str | None = Field(None, description="Pooling task; default: the model's active task.")
    encoding_format: Literal["float", "base64", "bytes", "bytes_only"] = "float"
    embed_dtype: Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] = "float32"
    endianness: Literal["native", "big", "little"] = "native"
    dimensions: int | None = None


class EmbeddingRequest(ActivationRequest):
    """OpenAI ``/v1/embeddings``."""

    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    add_special_tokens: bool = True


CohereEmbeddingType = Literal["float", "base64", "binary", "ubinary", "int8", "uint8"]
_FLOAT_ONLY: tuple[CohereEmbeddingType, ...] = ("float",)


class CohereEmbedRequest(BaseRequest):
    """Cohere Embed v2 (``/v2/embed``), text only."""

    texts: list[str] = Field(min_length=1)
    input_type: Literal["search_document", "search_query", "classification", "clustering"] | None = None
    embedding_types: list[CohereEmbeddingType] = Field(default_factory=lambda: list(_FLOAT_ONLY), min_length=1)
    truncate: Literal["NONE", "START", "END"] = "END"
    output_dimension: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    images: list[Any] | None = None
    inputs: list[Any] | None = None

    @model_validator(mode="after")
    def _text_only(self) -> CohereEmbedRequest:
        if self.images or self.inputs:
            raise ValueError("This is a text-only model: send `texts`, not `images` or `inputs`.")
        return self


class ScoreOptions(ActivationRequest):
    max_tokens_per_query: int = Field(0, ge=0)
    max_tokens_per_doc: int = Field(0, ge=0)
    instruction: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def template_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.chat_template_kwargs or {})
        if self.instruction is not None:
            kwargs.setdefault("instruction", self.instruction)
        return kwargs


class ScoreRequest(ScoreOptions):
    """Any of the four equivalent pair shapes, tried in vLLM's order."""

    queries: ScoreInput | list[ScoreInput] | None = None
    documents: ScoreInput | list[ScoreInput] | None = None
    items: ScoreInput | list[ScoreInput] | None = None
    data_1: ScoreInput | list[ScoreInput] | None = None
    data_2: ScoreInput | list[ScoreInput] | None = None
    text_1: ScoreInput | list[ScoreInput] | None = None
    text_2: ScoreInput | list[ScoreInput] | None = None

    @model_validator(mode="after")
    def _has_pairs(self) -> ScoreRequest:
        if self._pair() is None:
            raise ValueError("Pass the pairs as queries/documents (or queries/items, data_1/data_2, text_1/text_2).")
        return self

    def _pair(self) -> tuple[Any, Any] | None:
        for first, second in (
            (self.queries, self.documents),
            (self.queries, self.items),
            (self.data_1, self.data_2),
            (self.text_1, self.text_2),
        ):
            if first is not None and second is not None:
                return first, second
        return None

    def sides(self) -> tuple[Any, Any]:
        pair = self._pair()
        assert pair is not None, "checked by the validator"
        return pair


class RerankRequest(ScoreOptions):
    query: ScoreInput
    documents: ScoreInput | list[ScoreInput]
    top_n: int = Field(0, ge=0, description="Return the best n results; 0 returns all.")
    return_documents: bool = Field(True, description="Echo each document in its result (Cohere's option).")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("Pass exactly one of `prompt` or `messages`.")
        if self.add_generation_prompt and self.continue_final_message and self.messages is not None:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


# -- responses (documented shapes; routes render plain dicts of exactly these fields) ---------------


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None
    completion_tokens_details: None = None


class ClassifyData(BaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class PoolingData(BaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: Any


class ListResponse(BaseModel, Generic[_Item]):
    """The envelope of /classify, /score and /pooling answers."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[_Item]
    usage: Usage


ClassifyResponse = ListResponse[ClassifyData]
ScoreResponse = ListResponse[ScoreData]
PoolingResponse = ListResponse[PoolingData]


class RerankDocument(BaseModel):
    text: str | None
    multi_modal: list[dict[str, Any]] | None = None


class RerankResult(BaseModel):
    index: int
    document: RerankDocument | None
    relevance_score: float


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: dict[str, int]
    results: list[RerankResult]


class EmbeddingData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: dict[str, int]


class CohereEmbedResponse(BaseModel):
    id: str
    embeddings: dict[str, list[list[float]] | list[list[int]] | list[str]]
    texts: list[str]
    meta: dict[str, Any]
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
